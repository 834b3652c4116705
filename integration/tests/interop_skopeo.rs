//! Interop: skopeo (Debian `skopeo`, containers/image) against an in-process thaw-registry.
//!
//! An OCI image layout is built by hand (config, two uncompressed tar layers, manifest,
//! index.json), copied into the registry with `skopeo copy --preserve-digests` and back out
//! into a second layout; the manifest digest and every blob must be unchanged. skopeo's
//! push is HEAD blob, POST, one streamed PATCH without Content-Range, PUT ?digest=, then
//! the manifest PUT; a second repository's copy may use cross-repository mounts.
//! `skopeo inspect --raw` and `skopeo list-tags` read the manifest and the tag list. A
//! snapshot pushed by thaw is copied out byte for byte and mirrored into a second registry.
//!
//! Needs `skopeo`: `scripts/install-test-deps.sh` installs it. A missing client fails the
//! test; it is never skipped.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use common::{
    digest_hex, ensure_same_bytes, ensure_same_files, require_tool, run, sha256_digest, snapshot_names,
    write_snapshot, TestRegistry, TestRng, CLIENT_DEADLINE,
};
use serde_json::{json, Value};
use thaw_client::{ClientOptions, PullOptions, PushOptions, Reference, Registry, Stats};
use tokio::process::Command;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// skopeo with no signature policy file needed and nothing read from a terminal.
fn skopeo() -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy").env("NO_PROXY", "127.0.0.1");
    cmd
}

async fn skopeo_run(args: &[&str]) -> Result<Vec<u8>> {
    let mut cmd = skopeo();
    cmd.args(args);
    Ok(run(cmd, CLIENT_DEADLINE).await?.stdout)
}

async fn require_skopeo() -> Result<()> {
    require_tool("skopeo", &["--version"]).await?;
    let help = require_tool("skopeo", &["copy", "--help"]).await?;
    ensure!(
        help.contains("--preserve-digests"),
        "this skopeo's `copy` has no --preserve-digests; the test needs skopeo >= 1.6"
    );
    Ok(())
}

/// A ustar archive of regular files, as an image layer holds.
fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    fn octal(field: &mut [u8], value: u64) {
        let text = format!("{value:0width$o}\0", width = field.len() - 1);
        field.copy_from_slice(text.as_bytes());
    }
    let mut out = Vec::new();
    for (name, data) in entries {
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut header[100..108], 0o644); // mode
        octal(&mut header[108..116], 0); // uid
        octal(&mut header[116..124], 0); // gid
        octal(&mut header[124..136], data.len() as u64);
        octal(&mut header[136..148], 1_700_000_000); // mtime
        header[156] = b'0'; // regular file
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[148..156].fill(b' ');
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0); // two zero blocks end the archive
    out
}

/// What `tar -tf` lists for each layer of [`build_image`].
const LAYER_LISTINGS: [&str; 2] = ["app/handler\napp/README\n", "etc/thaw/function.conf\n"];

/// The image written into an OCI layout: each blob by digest, and the manifest.
struct Image {
    blobs: BTreeMap<String, Vec<u8>>,
    layer_digests: Vec<String>,
    manifest: Vec<u8>,
    manifest_digest: String,
    config_digest: String,
}

fn build_image() -> Result<Image> {
    let mut rng = TestRng::new(42);
    // A 3 MiB + 77 byte "binary" (not a multiple of anything) and a small text layer.
    let binary = rng.bytes(3 * 1024 * 1024 + 77);
    let layer_app = tar(&[("app/handler", &binary), ("app/README", b"thaw interop\n")]);
    let layer_etc = tar(&[("etc/thaw/function.conf", b"name = hello\nport = 8080\n")]);
    let layers = [layer_app, layer_etc];
    let layer_digests: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
    // Uncompressed layers: each diff_id is the layer's own digest.
    let diff_ids = layer_digests.clone();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/app/handler"], "Env": ["PORT=8080"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [
            { "created_by": "thaw interop test: app" },
            { "created_by": "thaw interop test: etc" }
        ]
    }))?;
    let config_digest = sha256_digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": layers.iter().map(|l| json!({
            "mediaType": OCI_LAYER_TAR,
            "digest": sha256_digest(l),
            "size": l.len(),
        })).collect::<Vec<_>>(),
        "annotations": { "dev.thaw.test.client": "skopeo" }
    }))?;
    let manifest_digest = sha256_digest(&manifest);
    let mut blobs = BTreeMap::new();
    for blob in layers.into_iter().chain([config, manifest.clone()]) {
        blobs.insert(sha256_digest(&blob), blob);
    }
    Ok(Image { blobs, layer_digests, manifest, manifest_digest, config_digest })
}

fn write_layout(dir: &Path, image: &Image, tag: &str) -> Result<()> {
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    for (digest, bytes) in &image.blobs {
        std::fs::write(blob_dir.join(digest_hex(digest)?), bytes)?;
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest_digest,
            "size": image.manifest.len(),
            "annotations": { REF_NAME: tag }
        }]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// Checks that the layout at `dir` names `image`'s manifest under `tag` and holds each of its
/// blobs unchanged.
fn ensure_layout_holds(dir: &Path, image: &Image, tag: &str) -> Result<()> {
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let entry = index["manifests"]
        .as_array()
        .context("index.json has no manifests")?
        .iter()
        .find(|m| m["annotations"][REF_NAME] == tag)
        .with_context(|| format!("index.json names no manifest {tag:?}: {index}"))?;
    ensure!(
        entry["digest"] == image.manifest_digest.as_str(),
        "the layout's manifest {tag} is {}, pushed {}",
        entry["digest"],
        image.manifest_digest
    );
    for (digest, bytes) in &image.blobs {
        let path = dir.join("blobs/sha256").join(digest_hex(digest)?);
        let read = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ensure_same_bytes(digest, bytes, &read)?;
    }
    Ok(())
}

fn oci_ref(dir: &Path, tag: &str) -> Result<String> {
    let dir = dir.to_str().with_context(|| format!("{} is not UTF-8", dir.display()))?;
    Ok(format!("oci:{dir}:{tag}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_an_oci_image_in_and_out_unchanged() -> Result<()> {
    require_skopeo().await?;
    let registry = TestRegistry::start().await?;
    let work = tempfile::tempdir()?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let image = build_image()?;
    write_layout(&src, &image, "v1")?;
    for (digest, bytes) in &image.blobs {
        ensure!(sha256_digest(bytes) == *digest, "fixture blob {digest} is stored under the wrong digest");
    }
    // The fixture's layers are real tar archives, as an image's are.
    for (digest, want) in image.layer_digests.iter().zip(LAYER_LISTINGS) {
        let mut list = Command::new("tar");
        list.arg("-tf").arg(src.join("blobs/sha256").join(digest_hex(digest)?));
        let listed = run(list, CLIENT_DEADLINE).await?;
        ensure!(
            listed.stdout == want.as_bytes(),
            "tar lists the fixture layer {digest} as {:?}",
            String::from_utf8_lossy(&listed.stdout)
        );
    }

    let repo = format!("{}/thaw/images/hello", registry.host());
    for tag in ["v1", "v2"] {
        skopeo_run(&[
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &oci_ref(&src, "v1")?,
            &format!("docker://{repo}:{tag}"),
        ])
        .await?;
    }

    // The registry serves back the manifest and config byte for byte.
    let raw = skopeo_run(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{repo}:v1")]).await?;
    ensure_same_bytes("manifest (skopeo inspect --raw)", &image.manifest, &raw)?;
    let by_digest = skopeo_run(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{repo}@{}", image.manifest_digest),
    ])
    .await?;
    ensure_same_bytes("manifest by digest", &image.manifest, &by_digest)?;
    let config =
        skopeo_run(&["inspect", "--config", "--raw", "--tls-verify=false", &format!("docker://{repo}:v1")])
            .await?;
    ensure_same_bytes("config (skopeo inspect --config --raw)", &image.blobs[&image.config_digest], &config)?;

    // skopeo's own parse of the image: digest and layers as pushed.
    let inspected: Value = serde_json::from_slice(
        &skopeo_run(&["inspect", "--tls-verify=false", &format!("docker://{repo}:v2")]).await?,
    )?;
    ensure!(
        inspected["Digest"] == image.manifest_digest.as_str(),
        "skopeo inspect reports digest {}, pushed {}",
        inspected["Digest"],
        image.manifest_digest
    );

    let tags: Value = serde_json::from_slice(
        &skopeo_run(&["list-tags", "--tls-verify=false", &format!("docker://{repo}")]).await?,
    )?;
    ensure!(tags["Tags"] == json!(["v1", "v2"]), "skopeo list-tags: {tags}, want tags [\"v1\", \"v2\"]");

    // And out again into a fresh layout: same manifest digest, same blobs.
    skopeo_run(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{repo}:v2"),
        &oci_ref(&dst, "v2")?,
    ])
    .await?;
    ensure_layout_holds(&dst, &image, "v2")?;

    registry.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_between_repositories_of_the_registry() -> Result<()> {
    require_skopeo().await?;
    let registry = TestRegistry::start().await?;
    let work = tempfile::tempdir()?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let image = build_image()?;
    write_layout(&src, &image, "v1")?;

    // Registry to registry: skopeo may mount the blobs from the first repository
    // (POST ?mount=&from=) instead of uploading them again.
    let first = format!("{}/thaw/images/first", registry.host());
    let second = format!("{}/thaw/images/second", registry.host());
    skopeo_run(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &oci_ref(&src, "v1")?,
        &format!("docker://{first}:v1"),
    ])
    .await?;
    skopeo_run(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{first}:v1"),
        &format!("docker://{second}:v1"),
    ])
    .await?;
    skopeo_run(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{second}:v1"),
        &oci_ref(&dst, "v1")?,
    ])
    .await?;
    ensure_layout_holds(&dst, &image, "v1")?;

    registry.stop().await;
    Ok(())
}

/// A thaw client for `reference`, plain HTTP, no credentials from the environment.
fn thaw_client_for(reference: &Reference) -> Result<Registry> {
    let options = ClientOptions {
        plain_http: true,
        docker_config: Some(std::path::PathBuf::from("/nonexistent/thaw-test/config.json")),
        ..Default::default()
    };
    Ok(Registry::for_reference(reference, &options, Arc::new(Stats::new()))?)
}

/// What `thaw push` writes, skopeo reads: a copy out of the registry into an OCI layout keeps
/// the manifest digest, and every layer is the pushed file byte for byte. A copy into a
/// second thaw-registry (a mirror: skopeo uploads whole blobs, which that registry cuts its
/// own way) is accepted, and `thaw pull` from the mirror gives the same files, checking those
/// whose recipe the mirror does not keep as the manifest names it whole (docs/FORMAT.md,
/// "The verified chunk chain").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_a_thaw_pushed_snapshot_out_and_into_a_mirror() -> Result<()> {
    require_skopeo().await?;
    let (registry, mirror) = (TestRegistry::start().await?, TestRegistry::start().await?);
    let work = tempfile::tempdir()?;
    let src = work.path().join("snapshot");
    write_snapshot(&src, 41)?;
    let reference = Reference::parse(&format!("{}/fn/skopeo:v1", registry.host()))?;
    let client = thaw_client_for(&reference)?;
    let pushed = thaw_client::push_dir(&client, &reference, &src, &PushOptions::default()).await?;

    let layout = work.path().join("layout");
    skopeo_run(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &oci_ref(&layout, "v1")?,
    ])
    .await?;
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    ensure!(
        index["manifests"][0]["digest"] == pushed.digest.to_string().as_str(),
        "the layout holds manifest {}, thaw pushed {}",
        index["manifests"][0]["digest"],
        pushed.digest
    );
    for file in &pushed.files {
        let path = layout.join("blobs/sha256").join(file.blob.digest.hex());
        let copied = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ensure_same_bytes(&file.title, &std::fs::read(src.join(&file.title))?, &copied)?;
    }

    let mirrored = format!("{}/fn/skopeo:v1", mirror.host());
    skopeo_run(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("docker://{mirrored}"),
    ])
    .await?;
    let mirrored = Reference::parse(&mirrored)?;
    let mirror_client = thaw_client_for(&mirrored)?;
    let dest = work.path().join("pulled");
    let pulled = thaw_client::pull(&mirror_client, &mirrored, &dest, &PullOptions::default()).await?;
    ensure!(pulled.digest == pushed.digest, "the mirror serves manifest {}", pulled.digest);
    ensure_same_files(&src, &dest, &snapshot_names())?;
    let memory = pulled.files.iter().find(|f| f.title == "memory").context("no memory file pulled")?;
    ensure!(
        memory.from_recipe && !memory.verified_by_chain,
        "the mirror cut the memory file its own way, so it must be checked whole: {memory:?}"
    );

    registry.stop().await;
    mirror.stop().await;
    Ok(())
}
