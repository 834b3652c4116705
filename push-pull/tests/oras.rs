//! Interop with oras-py (PyPI `oras`), against thaw-registry and Debian's docker-registry:
//! what thaw pushes, oras pulls byte for byte; what oras pushes, thaw pulls byte for byte.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use thaw_client::{PullOptions, PushOptions, Reference};

const ORAS: &str = r#"
import json, os, sys
import oras.client
mode, registry, target, d = sys.argv[1:5]
client = oras.client.OrasClient(hostname=registry, insecure=True)
ref = f"{registry}/{target}"
if mode == "pull":
    print(json.dumps(client.pull(target=ref, outdir=d)))
else:
    os.chdir(d)  # oras-py names layers by their path: push bare file names
    client.push(target=ref, files=sorted(n for n in os.listdir(".") if os.path.isfile(n)))
"#;

fn oras(mode: &str, host: &str, target: &str, dir: &Path) {
    let out = Command::new("python3")
        .args(["-c", ORAS, mode, host, target, dir.to_str().unwrap()])
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .expect("python3 with the `oras` package (oras-py) must be installed");
    assert!(
        out.status.success(),
        "oras-py {mode} {host}/{target} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn both_ways(host: &str, work: &Path) {
    let data = SnapshotData::new(2048, 512, 17);
    let src = work.join("snap");
    data.write(&src);

    let reference = Reference::parse(&format!("{host}/interop/thaw-pushed:v1")).unwrap();
    let client = client_for(&reference);
    thaw_client::push_dir(&client, &reference, &src, &PushOptions::default()).await.unwrap();
    let by_oras = work.join("oras-pulled");
    oras("pull", host, "interop/thaw-pushed:v1", &by_oras);
    assert_same_files(&data, &by_oras);

    oras("push", host, "interop/oras-pushed:v1", &src);
    let reference = Reference::parse(&format!("{host}/interop/oras-pushed:v1")).unwrap();
    let by_thaw = work.join("thaw-pulled");
    thaw_client::pull(&client, &reference, &by_thaw, &PullOptions::default()).await.unwrap();
    assert_same_files(&data, &by_thaw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_py_and_thaw_agree_on_thaw_registry() {
    let registry = ThawRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    both_ways(&registry.host(), work.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_py_and_thaw_agree_on_docker_registry() {
    let registry = DockerRegistry::start();
    let work = tempfile::tempdir().unwrap();
    both_ways(&registry.host(), work.path()).await;
}
