//! The `thaw-extender` binary serving HTTPS (`--tls-cert/--tls-key`) and reaching a TLS
//! registry through `--ca-cert`: kube-scheduler's `/prioritize` over real TLS on loopback.

// The shared support module re-exports helpers this test does not use.
#[allow(unused_imports)]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{args_with_names, knative_pod, node_names};
use thaw_registry::tls::TlsFiles;
use thaw_registry::{RegistryConfig, ServeOptions};

#[path = "../../registry/tests/tls_certs/mod.rs"]
mod certs;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extender_answers_prioritize_over_https() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ca = certs::make_ca(d, "ca");
    let (reg_cert, reg_key) = certs::make_leaf(d, "ca", "registry", 1);
    let (ext_cert, ext_key) = certs::make_leaf(d, "ca", "extender", 2);
    let storage = tempfile::tempdir().unwrap();
    let registry = thaw_registry::spawn_with(
        RegistryConfig::new("127.0.0.1:0".parse().unwrap(), storage.path().to_str().unwrap()),
        ServeOptions::default().with_tls(TlsFiles::new(&reg_cert, &reg_key)),
    )
    .await
    .unwrap();

    let addr = format!("127.0.0.1:{}", support::free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_thaw-extender"))
        .args(["--listen", &addr, "--registry", &format!("https://{}", registry.addr())])
        .arg("--ca-cert")
        .arg(&ca)
        .arg("--tls-cert")
        .arg(&ext_cert)
        .arg("--tls-key")
        .arg(&ext_key)
        .env("THAW_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("starting thaw-extender");
    let mut child = Killed(child);
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = trusting.get(format!("https://{addr}/healthz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("thaw-extender exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "thaw-extender did not answer over https on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let names = node_names(3);
    let pod = knative_pod("default", "hello", "hello-00001", &[]);
    let https_addr = format!("https://{addr}");
    let r = trusting
        .post(format!("{https_addr}/prioritize"))
        .json(&args_with_names(&pod, &names))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let scores: serde_json::Value = r.json().await.unwrap();
    let hosts: Vec<&str> = scores.as_array().unwrap().iter().map(|e| e["Host"].as_str().unwrap()).collect();
    assert_eq!(hosts, names.iter().map(String::as_str).collect::<Vec<_>>());

    // A scheduler that does not trust the CA, or speaks plain HTTP, gets nowhere.
    assert!(reqwest::Client::new().get(format!("https://{addr}/healthz")).send().await.is_err());
    assert!(reqwest::Client::new().get(format!("http://{addr}/healthz")).send().await.is_err());
}
