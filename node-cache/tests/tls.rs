//! The peer service over mutual TLS, end to end: two real `thaw-node-cache` processes with
//! certificates from one cluster CA share chunks over HTTPS; clients without a client
//! certificate, or with one from another CA, are refused at the handshake; the cluster
//! token is still required on top.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    assert_files, bytes_from, new_chunk_bytes, push, recipes, NodeCache, SnapshotData, ThawRegistry,
};

#[path = "../../registry/tests/tls_certs/mod.rs"]
mod certs;

const TOKEN: &str = "test-cluster-token-0123456789";

async fn wait_for_holdings(host: &str, node: &str, digest: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d: Value =
            http.get(format!("http://{host}/v2/_thaw/nodes")).send().await.unwrap().json().await.unwrap();
        let found = d["nodes"].as_array().unwrap().iter().any(|n| {
            n["node"] == node && n["snapshots"].as_array().unwrap().iter().any(|s| s["digest"] == digest)
        });
        if found {
            return;
        }
        assert!(Instant::now() < deadline, "{node} never published {digest}: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A client trusting `ca`, presenting `identity` (cert, key) if given.
fn client(ca: &Path, identity: Option<(&Path, &Path)>) -> reqwest::Client {
    let mut builder =
        reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&pem(ca)).unwrap());
    if let Some((cert, key)) = identity {
        let mut both = pem(cert);
        both.extend_from_slice(&pem(key));
        builder = builder.identity(reqwest::Identity::from_pem(&both).unwrap());
    }
    builder.build().unwrap()
}

fn error_chain(err: &reqwest::Error) -> String {
    std::iter::successors(Some(err as &dyn std::error::Error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_share_chunks_over_mutual_tls_and_strangers_are_refused() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/tls:v1", SnapshotData::new(2048, 256, 9)).await;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cluster_ca = certs::make_ca(d, "cluster");
    certs::make_ca(d, "stranger");
    let (a_cert, a_key) = certs::make_leaf(d, "cluster", "node-a", 1);
    let (b_cert, b_key) = certs::make_leaf(d, "cluster", "node-b", 2);
    let (s_cert, s_key) = certs::make_leaf(d, "stranger", "intruder", 3);
    let token = d.join("peer-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let args = |cert: &Path, key: &Path| -> Vec<String> {
        [
            "--peer-token-file",
            token.to_str().unwrap(),
            "--peer-listen",
            "auto",
            "--peer-tls-cert",
            cert.to_str().unwrap(),
            "--peer-tls-key",
            key.to_str().unwrap(),
            "--peer-tls-ca",
            cluster_ca.to_str().unwrap(),
            "--peer-tls-client-ca",
            cluster_ca.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let (a_args, b_args) = (args(&a_cert, &a_key), args(&b_cert, &b_key));
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = NodeCache::start_with(&host, dirs.0.path(), 1 << 30, "node-a", &a_args).await;
    let b = NodeCache::start_with(&host, dirs.1.path(), 1 << 30, "node-b", &b_args).await;

    let all_v1 = new_chunk_bytes(&[], &recipes(&v1.reference).await);
    let cold = a.ensure(&v1.reference).await;
    assert_eq!(bytes_from(&cold, "registry"), all_v1, "{cold}");
    wait_for_holdings(&host, "node-a", cold["digest"].as_str().unwrap()).await;
    let warm = b.ensure(&v1.reference).await;
    assert_files(&warm, &v1.data);
    let peers = bytes_from(&warm, "peers");
    assert!(peers >= all_v1 - all_v1 / 20, "node B must take most bytes from A over TLS: {warm}");

    let url = format!("https://{}{}", a.peer_addr.as_deref().unwrap(), thaw_node_cache::peer::CHUNKS_PATH);
    let auth = format!("Bearer {TOKEN}");
    for (who, http) in [
        ("no client certificate", client(&cluster_ca, None)),
        ("a certificate from another CA", client(&cluster_ca, Some((&s_cert, &s_key)))),
    ] {
        let err = http.get(&url).header("authorization", &auth).send().await.expect_err(who);
        eprintln!("{who}: {}", error_chain(&err));
        assert!(err.is_connect() || err.is_request(), "{who}: {}", error_chain(&err));
    }
    // The right certificate without the token: past the handshake, refused by the token check.
    let member = client(&cluster_ca, Some((&b_cert, &b_key)));
    let status = member.get(&url).send().await.unwrap().status();
    assert_eq!(status, 401, "mTLS does not replace the cluster token");
    // Plain HTTP to the TLS peer port gets no HTTP answer.
    let plain = format!("http://{}{}", a.peer_addr.as_deref().unwrap(), thaw_node_cache::peer::CHUNKS_PATH);
    assert!(reqwest::Client::new().get(plain).header("authorization", &auth).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_peer_certificate_file_stops_the_node_cache_with_its_name() {
    let registry = ThawRegistry::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("peer-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let missing = tmp.path().join("missing.crt");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thaw-node-cache"))
        .args(["--registry", &format!("http://{}", registry.host()), "--capacity", "1G", "--node-name", "n"])
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0", "--peer-advertise", "127.0.0.1:1"])
        .arg("--peer-token-file")
        .arg(&token)
        .arg("--peer-tls-cert")
        .arg(&missing)
        .arg("--peer-tls-key")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.crt"), "{stderr}");
}
