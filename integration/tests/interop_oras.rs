//! Interop: oras-py (PyPI `oras` 0.2.43, the Python ORAS SDK) against an in-process
//! thaw-registry.
//!
//! oras-py pushes a Firecracker-style snapshot directory as an artifact (one layer per
//! file, `info.json` as the config) and pulls it back into another directory; every file
//! must come back byte for byte. oras-py never checks what it downloads, so these tests do.
//! It also needs `Docker-Content-Digest` on manifest answers (its `delete_tag` reads it),
//! which the last test checks, with raw HTTP beside it.
//!
//! Needs `python3` with oras-py: `scripts/install-test-deps.sh` installs it. A missing client
//! fails the test; it is never skipped.

mod common;

use std::path::Path;

use anyhow::{ensure, Context, Result};
use common::{
    ensure_same_files, header, http, require_tool, run, sha256_digest, snapshot_names, write_snapshot,
    TestRegistry, CLIENT_DEADLINE, INSTALL_HINT,
};
use serde_json::Value;
use tokio::process::Command;

const ORAS_PY_VERSION: &str = "0.2.43";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/oras_roundtrip.py");
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

async fn require_oras_py() -> Result<()> {
    let version = require_tool(
        &python(),
        &["-c", "import oras.client, importlib.metadata as m; print(m.version('oras'))"],
    )
    .await?;
    ensure!(
        version == ORAS_PY_VERSION,
        "oras-py {version} is installed, these tests pin {ORAS_PY_VERSION}: {INSTALL_HINT}"
    );
    Ok(())
}

/// Runs `oras_roundtrip.py ARGS… --registry HOST` and parses the JSON it prints.
async fn oras(registry: &TestRegistry, args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new(python());
    cmd.arg(SCRIPT)
        .args(args)
        .args(["--registry", &registry.host()])
        .env("NO_PROXY", "127.0.0.1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let output = run(cmd, CLIENT_DEADLINE).await?;
    let stdout = String::from_utf8(output.stdout).context("oras_roundtrip.py printed non-UTF-8")?;
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("oras_roundtrip.py printed {stdout:?}"))
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Pushes `src` to `target` with oras-py (extra push options in `push_args`), pulls it into
/// `dst`, and checks every snapshot file came back unchanged.
async fn round_trip(
    registry: &TestRegistry,
    target: &str,
    src: &Path,
    dst: &Path,
    push_args: &[&str],
) -> Result<Value> {
    let mut args = vec!["push", "--target", target, "--src", path_str(src)?];
    args.extend_from_slice(push_args);
    let pushed = oras(registry, &args).await?;
    ensure!(pushed["status"] == 201, "manifest PUT answered {}, want 201", pushed["status"]);

    let pulled = oras(registry, &["pull", "--target", target, "--dst", path_str(dst)?]).await?;
    let mut want = snapshot_names();
    want.sort_unstable();
    let got: Vec<&str> = pulled["files"]
        .as_array()
        .context("pull printed no file list")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(got == want, "oras-py pulled {got:?}, want {want:?}");
    ensure_same_files(src, dst, &snapshot_names())?;
    Ok(pushed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_py_monolithic_push_and_pull_round_trip_a_snapshot() -> Result<()> {
    require_oras_py().await?;
    let registry = TestRegistry::start().await?;
    let work = tempfile::tempdir()?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    write_snapshot(&src, 1)?;

    // POST an upload session, PUT the whole blob with ?digest= (oras-py's default).
    round_trip(&registry, "thaw/functions/hello:v1", &src, &dst, &[]).await?;

    registry.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_py_chunked_push_and_pull_round_trip_a_snapshot() -> Result<()> {
    require_oras_py().await?;
    let registry = TestRegistry::start().await?;
    let work = tempfile::tempdir()?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    write_snapshot(&src, 2)?;

    // POST, then PATCHes with `Content-Range: start-end` of 5,000,000 bytes (not a multiple
    // of any chunk or page size; the 32 MiB memory file takes 7), then PUT ?digest=.
    round_trip(
        &registry,
        "thaw/functions/hello:chunked",
        &src,
        &dst,
        &["--chunked", "--chunk-size", "5000000"],
    )
    .await?;

    registry.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_answers_docker_content_digest_that_oras_py_relies_on() -> Result<()> {
    require_oras_py().await?;
    let registry = TestRegistry::start().await?;
    let work = tempfile::tempdir()?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    write_snapshot(&src, 3)?;
    let repo = "thaw/functions/digests";
    let pushed = round_trip(&registry, &format!("{repo}:v1"), &src, &dst, &[]).await?;
    let client = http();
    let base = format!("{}/v2/{repo}", registry.url());

    // The manifest PUT answered the digest of the bytes the registry serves.
    let get = client.get(format!("{base}/manifests/v1")).header("Accept", OCI_MANIFEST).send().await?;
    ensure!(get.status() == 200, "GET manifest by tag: {}", get.status());
    let digest = header(&get, "Docker-Content-Digest")?.to_owned();
    ensure!(
        header(&get, "Content-Type")? == OCI_MANIFEST,
        "GET manifest Content-Type {:?}",
        header(&get, "Content-Type")?
    );
    let manifest_bytes = get.bytes().await?;
    ensure!(
        digest == sha256_digest(&manifest_bytes),
        "GET manifest: Docker-Content-Digest {digest} but the body hashes to {}",
        sha256_digest(&manifest_bytes)
    );
    ensure!(
        pushed["docker_content_digest"] == digest.as_str(),
        "manifest PUT answered Docker-Content-Digest {}, GET answers {digest}",
        pushed["docker_content_digest"]
    );

    // HEAD by tag and GET by digest answer the same digest and length.
    for (method, reference) in [("HEAD", "v1"), ("GET", digest.as_str())] {
        let response = client
            .request(method.parse()?, format!("{base}/manifests/{reference}"))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await?;
        ensure!(response.status() == 200, "{method} manifest {reference}: {}", response.status());
        ensure!(
            header(&response, "Docker-Content-Digest")? == digest,
            "{method} manifest {reference}: Docker-Content-Digest {:?}, want {digest}",
            header(&response, "Docker-Content-Digest")?
        );
        ensure!(
            header(&response, "Content-Length")? == manifest_bytes.len().to_string(),
            "{method} manifest {reference}: Content-Length {:?}, want {}",
            header(&response, "Content-Length")?,
            manifest_bytes.len()
        );
    }

    // Every blob: HEAD and GET answer its digest and size, and GET its bytes.
    let manifest: Value = serde_json::from_slice(&manifest_bytes)?;
    let layers = manifest["layers"].as_array().context("manifest has no layers")?;
    for descriptor in layers.iter().chain([&manifest["config"]]) {
        let blob = descriptor["digest"].as_str().context("descriptor digest")?;
        let size = descriptor["size"].as_u64().context("descriptor size")?;
        let head = client.head(format!("{base}/blobs/{blob}")).send().await?;
        ensure!(head.status() == 200, "HEAD blob {blob}: {}", head.status());
        ensure!(
            header(&head, "Docker-Content-Digest")? == blob,
            "HEAD blob {blob}: Docker-Content-Digest {:?}",
            header(&head, "Docker-Content-Digest")?
        );
        ensure!(
            header(&head, "Content-Length")? == size.to_string(),
            "HEAD blob {blob}: Content-Length {:?}, want {size}",
            header(&head, "Content-Length")?
        );
        let get = client.get(format!("{base}/blobs/{blob}")).send().await?;
        ensure!(get.status() == 200, "GET blob {blob}: {}", get.status());
        ensure!(
            header(&get, "Docker-Content-Digest")? == blob,
            "GET blob {blob}: Docker-Content-Digest {:?}",
            header(&get, "Docker-Content-Digest")?
        );
        let body = get.bytes().await?;
        ensure!(
            sha256_digest(&body) == blob && body.len() as u64 == size,
            "GET blob {blob}: {} bytes hashing to {}",
            body.len(),
            sha256_digest(&body)
        );
    }

    // The blob upload PUT oras-py makes (POST, then PUT ?digest=) answers the digest too.
    let bytes = b"a blob uploaded by hand, the way oras-py does".to_vec();
    let blob = sha256_digest(&bytes);
    let post = client
        .post(format!("{base}/blobs/uploads/"))
        .header("Content-Type", "application/octet-stream")
        .send()
        .await?;
    ensure!(post.status() == 202, "POST blob upload: {}", post.status());
    let location = header(&post, "Location")?;
    let location = if location.starts_with("http") {
        location.to_owned()
    } else {
        format!("{}{location}", registry.url())
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    let put = client
        .put(format!("{location}{separator}digest={blob}"))
        .header("Content-Type", "application/octet-stream")
        .body(bytes)
        .send()
        .await?;
    ensure!(put.status() == 201, "PUT blob upload: {}", put.status());
    ensure!(
        header(&put, "Docker-Content-Digest")? == blob,
        "PUT blob upload: Docker-Content-Digest {:?}, want {blob}",
        header(&put, "Docker-Content-Digest")?
    );

    // oras-py lists tags, then deletes one: it HEADs the tag, reads Docker-Content-Digest,
    // and DELETEs the manifest by that digest (202).
    oras(&registry, &["push", "--target", &format!("{repo}:v2"), "--src", path_str(&src)?]).await?;
    let tags = oras(&registry, &["tags", "--repo", repo]).await?;
    ensure!(
        tags["tags"] == serde_json::json!(["v1", "v2"]),
        "oras-py listed tags {}, want [\"v1\", \"v2\"]",
        tags["tags"]
    );
    oras(&registry, &["delete-tag", "--target", &format!("{repo}:v1")]).await?;
    for reference in [digest.as_str(), "v1"] {
        let gone =
            client.get(format!("{base}/manifests/{reference}")).header("Accept", OCI_MANIFEST).send().await?;
        ensure!(
            gone.status() == 404,
            "GET manifest {reference} after oras-py deleted it: {}, want 404",
            gone.status()
        );
    }

    registry.stop().await;
    Ok(())
}
