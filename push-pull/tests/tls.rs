//! `thaw push`/`pull` over real TLS to an in-process registry with a test CA: with
//! `--ca-cert` it works; without it the CLI fails with a certificate error.

mod common;

use std::process::Command;

use common::SnapshotData;
use thaw_registry::tls::TlsFiles;
use thaw_registry::{RegistryConfig, ServeOptions};

#[path = "../../registry/tests/tls_certs/mod.rs"]
mod certs;

fn thaw_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_thaw"));
    c.env("DOCKER_CONFIG", "/nonexistent/thaw-test")
        .env_remove("THAW_REGISTRY")
        .env_remove("THAW_CACHE")
        .env_remove("THAW_CA_CERT")
        .env_remove("THAW_PLAIN_HTTP");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_pull_over_https_trusting_a_private_ca() {
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let ca = certs::make_ca(d, "ca");
    let (cert, key) = certs::make_leaf(d, "ca", "registry", 3);
    let storage = tempfile::tempdir().unwrap();
    let registry = thaw_registry::spawn_with(
        RegistryConfig::new("127.0.0.1:0".parse().unwrap(), storage.path().to_str().unwrap()),
        ServeOptions::default().with_tls(TlsFiles::new(&cert, &key)),
    )
    .await
    .unwrap();
    let data = SnapshotData::new(256, 128, 5);
    let src = d.join("snap");
    data.write(&src);
    let reference = format!("{}/fn/tls:v1", registry.addr());
    let ca_s = ca.to_str().unwrap();

    let untrusted = thaw_cmd().args(["push", "--quiet", &reference, src.to_str().unwrap()]).output().unwrap();
    assert!(!untrusted.status.success());
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(stderr.contains("certificate"), "no certificate error: {stderr}");

    let pushed = thaw_cmd()
        .args(["push", "--quiet", "--ca-cert", ca_s, &reference, src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));

    let dest = d.join("out");
    let pulled = thaw_cmd()
        .env("THAW_CA_CERT", ca_s)
        .args(["pull", "--quiet", &reference, dest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    common::assert_same_files(&data, &dest);

    // A CA file that is not PEM is a clear error naming it.
    std::fs::write(d.join("junk.pem"), b"not a certificate").unwrap();
    let junk = d.join("junk.pem");
    let bad = thaw_cmd()
        .args([
            "pull",
            "--quiet",
            "--ca-cert",
            junk.to_str().unwrap(),
            &reference,
            d.join("o2").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("junk.pem"), "{stderr}");
}
