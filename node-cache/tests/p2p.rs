//! P2P between node caches, end to end: a thaw-registry on loopback, real `thaw-node-cache`
//! processes serving each other chunks, and adversarial peers (test servers posing as nodes in
//! the registry's node directory) that lie, truncate, stall or die mid-transfer; the token and
//! `--peer-insecure`.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::common::{serve_raw, RawRequest, RawResponse};
use support::{
    assert_files, bytes_from, new_chunk_bytes, push, recipes, revision, NodeCache, SnapshotData, ThawRegistry,
};
use thaw_schema::batch::{encode_entry, BATCH_MAGIC};
use thaw_schema::dto::{decode_chunk_id_query, encode_chunk_id_query};
use thaw_schema::frame::EncodedChunk;
use thaw_schema::ChunkId;

const TOKEN: &str = "test-cluster-token-0123456789";

/// A token file in `dir`.
fn token_file(dir: &std::path::Path) -> String {
    let path = dir.join("peer-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path.display().to_string()
}

/// Waits until the registry's node directory shows `node` holding `digest` with a peer endpoint.
async fn wait_for_holdings(host: &str, node: &str, digest: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d: Value =
            http.get(format!("http://{host}/v2/_thaw/nodes")).send().await.unwrap().json().await.unwrap();
        let found = d["nodes"].as_array().unwrap().iter().any(|n| {
            n["node"] == node
                && n["peerEndpoint"].is_string()
                && n["snapshots"].as_array().unwrap().iter().any(|s| s["digest"] == digest)
        });
        if found {
            return;
        }
        assert!(Instant::now() < deadline, "{node} never published {digest}: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes a holdings record for a node that is not a node cache (a liar under test).
async fn put_fake_node(host: &str, node: &str, endpoint: &str, held: &[(&str, &str)]) {
    let snapshots: Vec<Value> = held
        .iter()
        .map(|(r, d)| json!({"reference": r, "digest": d, "sizeBytes": 1000, "cachedBytes": 1000}))
        .collect();
    let body = json!({"node": node, "peerEndpoint": endpoint, "capacityBytes": 1 << 30, "usedBytes": 0, "snapshots": snapshots});
    let r = reqwest::Client::new()
        .put(format!("http://{host}/v2/_thaw/nodes/{node}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "PUT node {node}: {}", r.status());
}

/// One sample of a node's `/metrics`.
async fn metric(node: &NodeCache, sample: &str) -> u64 {
    let text = reqwest::get(node.url("/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
        .parse()
        .unwrap()
}

fn peer_args(token: &str, listen: bool) -> Vec<&str> {
    let mut args = vec!["--peer-token-file", token];
    if listen {
        args.extend(["--peer-listen", "auto"]);
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_takes_its_chunks_from_the_first() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/hello:v1", SnapshotData::new(4096, 512, 1)).await;
    let v2 = push(&host, "fn/hello:v2", revision(&v1.data, 16, 2)).await;
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = NodeCache::start_with(&host, dirs.0.path(), 1 << 30, "node-a", &peer_args(&token, true)).await;
    let b = NodeCache::start_with(&host, dirs.1.path(), 1 << 30, "node-b", &peer_args(&token, true)).await;

    let r1 = recipes(&v1.reference).await;
    let all_v1 = new_chunk_bytes(&[], &r1);
    let cold = a.ensure(&v1.reference).await;
    assert_eq!(bytes_from(&cold, "registry"), all_v1, "{cold}");
    assert_eq!(bytes_from(&cold, "peers"), 0, "no peer holds anything yet: {cold}");
    wait_for_holdings(&host, "node-a", cold["digest"].as_str().unwrap()).await;

    // Node B: everything from node A, nothing from the registry, files byte-identical.
    let from_a = b.ensure(&v1.reference).await;
    assert_eq!(from_a["hit"], false);
    assert_files(&from_a, &v1.data);
    let (peers, reg) = (bytes_from(&from_a, "peers"), bytes_from(&from_a, "registry"));
    eprintln!(
        "node B, v1: {peers} bytes from peers, {reg} from the registry (the snapshot's chunks: {all_v1})"
    );
    assert_eq!(peers + reg, all_v1, "{from_a}");
    assert!(reg <= all_v1 / 20, "most bytes must come from the peer: {from_a}");
    assert!(metric(&a, "thaw_cache_peer_served_chunks_total").await > 0);
    assert_eq!(metric(&b, "thaw_cache_peer_fetched_bytes_total").await, peers);
    assert_eq!(metric(&b, "thaw_cache_peer_failures_total{reason=\"corrupt\"}").await, 0);

    // Revision 2 on node A (which holds only v1) from node B: local first, then the new
    // chunks B has... B holds v1 only too, so the new chunks come from the registry.
    let r2 = recipes(&v2.reference).await;
    let new_in_v2 = new_chunk_bytes(&r1, &r2);
    let second = a.ensure(&v2.reference).await;
    assert_files(&second, &v2.data);
    assert_eq!(bytes_from(&second, "registry") + bytes_from(&second, "peers"), new_in_v2, "{second}");
    wait_for_holdings(&host, "node-a", second["digest"].as_str().unwrap()).await;
    // Node B now takes v2's new chunks from A, and the shared ones from its own v1.
    let b2 = b.ensure(&v2.reference).await;
    assert_files(&b2, &v2.data);
    eprintln!(
        "node B, v2: {} local, {} from peers, {} from the registry (new in v2: {new_in_v2})",
        bytes_from(&b2, "local"),
        bytes_from(&b2, "peers"),
        bytes_from(&b2, "registry")
    );
    assert_eq!(bytes_from(&b2, "peers"), new_in_v2, "{b2}");
    assert_eq!(bytes_from(&b2, "registry"), 0, "{b2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_service_refuses_requests_without_the_token() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/secret:v1", SnapshotData::new(256, 64, 7)).await;
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let dir = tempfile::tempdir().unwrap();
    let a = NodeCache::start_with(&host, dir.path(), 1 << 30, "node-a", &peer_args(&token, true)).await;
    a.ensure(&v1.reference).await;
    let peer = a.peer_addr.clone().unwrap();
    let ids: Vec<ChunkId> = recipes(&v1.reference).await.iter().flat_map(|r| r.distinct_chunks()).collect();
    let query = encode_chunk_id_query(&ids);
    let http = reqwest::Client::new();
    let url = format!("http://{peer}/v1/peer/chunks");

    for auth in [None, Some("Bearer wrong-token-but-long-enough"), Some(TOKEN), Some("Basic dGVzdA==")] {
        let mut req = http.post(&url).body(query.clone());
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "authorization {auth:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{body}");
    }
    // Other paths say nothing either without the token.
    let r = http.get(format!("http://{peer}/v1/snapshots")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(metric(&a, "thaw_cache_peer_refused_total").await >= 5);

    // With it: every chunk, each verifying.
    let r = http.post(&url).bearer_auth(TOKEN).body(query.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/vnd.thaw.chunks.v1");
    let batch = thaw_schema::batch::parse_batch(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(batch.len(), ids.len());
    for ((id, chunk), asked) in batch.iter().zip(&ids) {
        assert_eq!(id, asked);
        chunk.decode(id).unwrap();
    }
    // Chunks it does not hold are left out; a malformed query is refused.
    let unknown = ChunkId::of(b"not cached anywhere");
    let r = http
        .post(&url)
        .bearer_auth(TOKEN)
        .body(encode_chunk_id_query(&[unknown, ids[0]]))
        .send()
        .await
        .unwrap();
    let batch = thaw_schema::batch::parse_batch(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(batch.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![ids[0]]);
    let r = http.post(&url).bearer_auth(TOKEN).body("garbage").send().await.unwrap();
    assert_eq!(r.status(), 400);

    // Wrong method on the chunk path: refused like the rest without the token.
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A damaged cached chunk is not served, and the snapshot holding it is dropped.
    let memory_digest = thaw_schema::Sha256Digest::of(&v1.data.memory);
    let memory_recipe = recipes(&v1.reference).await.into_iter().find(|r| r.digest == memory_digest).unwrap();
    let (mut offset, mut damaged) = (0u64, None);
    for e in &memory_recipe.entries {
        if let Some(id) = e.chunk_id() {
            damaged = Some(*id);
            break;
        }
        offset += u64::from(e.byte_len());
    }
    let damaged = damaged.unwrap();
    let cached = a.get("/v1/snapshots").await;
    let digest = cached["snapshots"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
    let memory_path = dir.path().join("snapshots").join(digest).join("memory");
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&memory_path).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset + 7).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], offset + 7).unwrap();
    }
    let r = http.post(&url).bearer_auth(TOKEN).body(encode_chunk_id_query(&[damaged])).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        thaw_schema::batch::parse_batch(&r.bytes().await.unwrap()).unwrap().is_empty(),
        "served a damaged chunk"
    );
    assert_eq!(metric(&a, "thaw_cache_peer_served_corrupt_total").await, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !a.cached().await.is_empty() {
        assert!(Instant::now() < deadline, "the damaged snapshot is still listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A peer service without a token does not start unless told to run insecure.
    let other = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_thaw-node-cache"))
        .args(["--registry", &format!("http://{host}"), "--capacity", "1G", "--node-name", "n"])
        .arg("--cache-dir")
        .arg(other.path())
        .args(["--listen", &format!("127.0.0.1:{}", support::free_port())])
        .args(["--peer-listen", &format!("127.0.0.1:{}", support::free_port())])
        .env_remove("THAW_PEER_TOKEN")
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "a peer service without a token started");
}

/// How a fake peer misbehaves.
#[derive(Clone, Copy, Debug)]
enum Lie {
    /// Valid frames of the right length, wrong bytes.
    WrongBytes,
    /// A real-looking answer cut short (declares more than it sends).
    Truncated,
}

/// A fake peer that answers every request with `lie`; counts the requests.
async fn liar(lie: Lie, lens: Arc<HashMap<ChunkId, u32>>, count: Arc<AtomicUsize>) -> String {
    serve_raw(Arc::new(move |req: &RawRequest| {
        count.fetch_add(1, Ordering::SeqCst);
        let ids = decode_chunk_id_query(&req.body).unwrap_or_default();
        let mut body = BATCH_MAGIC.to_vec();
        for id in &ids {
            let len = lens.get(id).copied().unwrap_or(4096) as usize;
            let fake: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            encode_entry(&mut body, id, &EncodedChunk::compress(&fake, 1));
        }
        let declared = match lie {
            Lie::WrongBytes => None,
            Lie::Truncated => {
                let full = body.len();
                body.truncate(full / 2);
                Some(full)
            }
        };
        RawResponse {
            status: 200,
            headers: vec![("content-type", "application/vnd.thaw.chunks.v1".into())],
            body,
            declared,
        }
    }))
    .await
}

/// A fake peer that accepts connections and never answers; counts the connections.
async fn staller(count: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_truncating_and_stalling_peers_cost_time_not_correctness() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/hello:v1", SnapshotData::new(2048, 256, 11)).await;
    let v2 = push(&host, "fn/hello:v2", revision(&v1.data, 8, 12)).await;
    let r1 = recipes(&v1.reference).await;
    let lens: Arc<HashMap<ChunkId, u32>> = Arc::new(
        r1.iter()
            .flat_map(|r| r.entries.iter())
            .filter_map(|e| e.chunk_id().map(|id| (*id, e.byte_len())))
            .collect(),
    );
    let counts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let endpoints = [
        liar(Lie::WrongBytes, lens.clone(), counts[0].clone()).await,
        liar(Lie::Truncated, lens.clone(), counts[1].clone()).await,
        staller(counts[2].clone()).await,
    ];
    // The digest of v1, as the directory lists it.
    let manifest_digest = {
        let reference = thaw_client::Reference::parse(&v1.reference).unwrap();
        let reg = support::common::client_for(&reference);
        reg.get_manifest(reference.repository(), "v1").await.unwrap().digest.to_string()
    };
    for (i, name) in ["liar-bytes", "liar-cut", "liar-stall"].iter().enumerate() {
        put_fake_node(&host, name, &endpoints[i], &[(&v1.reference, &manifest_digest)]).await;
    }

    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let dir = tempfile::tempdir().unwrap();
    let mut args = peer_args(&token, false);
    args.extend(["--peer-timeout-ms", "1500"]);
    let b = NodeCache::start_with(&host, dir.path(), 1 << 30, "node-b", &args).await;
    let started = Instant::now();
    let got = b.ensure(&v1.reference).await;
    eprintln!("ensure past three bad peers: {:?}, {got}", started.elapsed());
    assert_files(&got, &v1.data);
    assert_eq!(bytes_from(&got, "peers"), 0, "{got}");
    assert_eq!(bytes_from(&got, "registry"), new_chunk_bytes(&[], &r1), "{got}");
    let asked: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert!(asked.iter().all(|n| *n >= 1), "every bad peer was tried: {asked:?}");
    assert!(metric(&b, "thaw_cache_peer_failures_total{reason=\"corrupt\"}").await >= 1);
    assert!(metric(&b, "thaw_cache_peer_failures_total{reason=\"error\"}").await >= 1);
    assert!(metric(&b, "thaw_cache_peer_failures_total{reason=\"timeout\"}").await >= 1);

    // Avoided afterwards: revision 2 (the liars claim its repository) asks none of them.
    let second = b.ensure(&v2.reference).await;
    assert_files(&second, &v2.data);
    let after: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(after, asked, "a bad peer was asked again within its penalty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_dies_mid_transfer_costs_time_not_correctness() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/big:v1", SnapshotData::new(8192, 512, 21)).await;
    let all_v1 = new_chunk_bytes(&[], &recipes(&v1.reference).await);
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Node A advertises the proxy in front of its peer service.
    let peer_port = support::free_port();
    // Answers pass slowly (64 KiB every 10 ms), so A can be killed mid-transfer.
    let passed = Arc::new(AtomicU64::new(0));
    let proxy =
        support::proxy(format!("127.0.0.1:{peer_port}"), passed.clone(), Duration::from_millis(10)).await;
    let listen = format!("127.0.0.1:{peer_port}");
    let a_args = ["--peer-token-file", &token, "--peer-listen", &listen, "--peer-advertise", &proxy];
    let mut a = NodeCache::start_with(&host, dirs.0.path(), 1 << 30, "node-a", &a_args).await;
    let cold = a.ensure(&v1.reference).await;
    wait_for_holdings(&host, "node-a", cold["digest"].as_str().unwrap()).await;

    let b = NodeCache::start_with(&host, dirs.1.path(), 1 << 30, "node-b", &peer_args(&token, false)).await;
    let reference = v1.reference.clone();
    let b_url = b.url("/v1/snapshots/ensure");
    let ensure = tokio::spawn(async move {
        let r =
            reqwest::Client::new().post(b_url).json(&json!({"reference": reference})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    });
    // Kill A once B has taken one batch from it, while the others are still on the way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&b, "thaw_cache_peer_fetched_bytes_total").await == 0 {
        assert!(Instant::now() < deadline, "nothing came from node A");
        assert!(!ensure.is_finished(), "the ensure finished before A could be killed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!ensure.is_finished(), "the ensure finished before A could be killed");
    a.kill();
    let at_kill = passed.load(Ordering::SeqCst);
    let got = ensure.await.unwrap();
    assert_files(&got, &v1.data);
    let (peers, reg) = (bytes_from(&got, "peers"), bytes_from(&got, "registry"));
    eprintln!("A killed after {at_kill} bytes passed: B took {peers} from peers, {reg} from the registry");
    assert!(peers > 0 && reg > 0, "{got}");
    assert_eq!(peers + reg, all_v1, "{got}");
    assert!(metric(&b, "thaw_cache_peer_failures_total{reason=\"error\"}").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_serves_and_fetches_without_a_token_only_when_asked() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/open:v1", SnapshotData::new(512, 64, 31)).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let insecure = ["--peer-insecure", "--peer-listen", "auto"];
    let a = NodeCache::start_with(&host, dirs.0.path(), 1 << 30, "node-a", &insecure).await;
    let cold = a.ensure(&v1.reference).await;
    wait_for_holdings(&host, "node-a", cold["digest"].as_str().unwrap()).await;
    let all = new_chunk_bytes(&[], &recipes(&v1.reference).await);
    // A node without P2P flags never asks peers.
    let plain = NodeCache::start(&host, dirs.1.path(), 1 << 30, "node-plain").await;
    let got = plain.ensure(&v1.reference).await;
    assert_eq!((bytes_from(&got, "peers"), bytes_from(&got, "registry")), (0, all), "{got}");
    // An insecure node fetches from an insecure peer.
    let b = NodeCache::start_with(&host, dirs.2.path(), 1 << 30, "node-b", &["--peer-insecure"]).await;
    let got = b.ensure(&v1.reference).await;
    assert_files(&got, &v1.data);
    assert_eq!((bytes_from(&got, "peers"), bytes_from(&got, "registry")), (all, 0), "{got}");
}
