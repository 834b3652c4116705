//! thaw push → thaw pull against an in-process thaw-registry, through the library and
//! through the `thaw` binary: byte-identical files, holes where the zero chunks were,
//! nothing re-sent on a second push, unsafe layer titles refused.

mod common;

use std::collections::HashMap;
use std::process::Command;

use bytes::Bytes;
use common::*;
use serde_json::Value;
use thaw_client::{PullOptions, PushOptions, Reference};
use thaw_schema::media;
use thaw_schema::Sha256Digest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thaw_push_then_pull_is_byte_identical_with_holes() {
    let registry = ThawRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let data = SnapshotData::new(4096, 2048, 7); // 16 MiB memory, 8 MiB disk
    let src = work.path().join("snap");
    data.write(&src);
    let reference = Reference::parse(&format!("{}/functions/hello:rev-1", registry.host())).unwrap();
    let client = client_for(&reference);

    let pushed = thaw_client::push_dir(&client, &reference, &src, &PushOptions::default()).await.unwrap();
    assert!(pushed.thaw, "thaw-registry offers _thaw");
    assert_eq!(pushed.files.len(), 4);
    let s = &pushed.stats;
    assert!(s.chunks_zero > 0 && s.chunks_transferred > 0, "{s:?}");
    // Zero chunks are never sent: what went up is at most the non-zero bytes (plus overhead).
    let nonzero = (data.memory.len() + data.disk.len()) as u64
        - zero_page_bytes(&data.memory)
        - zero_page_bytes(&data.disk);
    assert!(s.bytes_sent < nonzero + 256 * 1024, "sent {} for {nonzero} non-zero bytes", s.bytes_sent);

    let dest = work.path().join("out");
    let pulled = thaw_client::pull(&client, &reference, &dest, &PullOptions::default()).await.unwrap();
    assert_eq!(pulled.digest, pushed.digest);
    assert!(pulled.files.iter().all(|f| f.from_recipe));
    assert_same_files(&data, &dest);
    for (name, bytes) in [("memory", &data.memory), ("disk.ext4", &data.disk)] {
        let holes = zero_page_bytes(bytes);
        let alloc = allocated(&dest.join(name));
        assert!(
            alloc <= bytes.len() as u64 - holes / 2,
            "{name}: {alloc} bytes allocated for {} bytes with {holes} zero bytes: holes were not kept",
            bytes.len()
        );
    }

    // A second push of the same snapshot sends no blob again.
    let again = thaw_client::push_dir(&client, &reference, &src, &PushOptions::default()).await.unwrap();
    assert_eq!(again.digest, pushed.digest);
    assert_eq!(again.stats.blobs_skipped, 4);
    assert!(again.stats.bytes_sent < 8 * 1024, "re-push sent {} bytes", again.stats.bytes_sent);

    // Pulling over an existing copy takes every chunk from the files already there.
    let repull = thaw_client::pull(&client, &reference, &dest, &PullOptions::default()).await.unwrap();
    assert_eq!(repull.stats.chunks_transferred, 0, "{:?}", repull.stats);
    assert_same_files(&data, &dest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_titles_that_escape_the_directory_are_refused() {
    let registry = ThawRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let reference = Reference::parse(&format!("{}/evil/artifact:v1", registry.host())).unwrap();
    let client = client_for(&reference);
    let payload = Bytes::from_static(b"owned");
    let digest = Sha256Digest::of(&payload);
    client.upload_blob_bytes("evil/artifact", &digest, payload.clone()).await.unwrap();
    let config = Bytes::from_static(b"{}");
    let config_digest = Sha256Digest::of(&config);
    client.upload_blob_bytes("evil/artifact", &config_digest, config).await.unwrap();
    for (i, title) in ["../escaped", "/tmp/absolute", "a/b", ".."].iter().enumerate() {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": {"mediaType": media::SNAPSHOT_CONFIG, "digest": config_digest, "size": 2},
            "layers": [{"mediaType": media::MEMORY_LAYER, "digest": digest, "size": 5,
                        "annotations": {media::ANNOTATION_TITLE: title}}],
        });
        let tag = format!("t{i}");
        let body = Bytes::from(serde_json::to_vec(&manifest).unwrap());
        client.put_manifest("evil/artifact", &tag, body, media::OCI_MANIFEST).await.unwrap();
        let dest = work.path().join("inner").join("dest");
        let r = Reference::parse(&format!("{}/evil/artifact:{tag}", registry.host())).unwrap();
        let err = thaw_client::pull(&client, &r, &dest, &PullOptions::default()).await.unwrap_err();
        assert!(err.to_string().contains("not a plain file name"), "{title}: {err}");
        assert!(entries(&dest).is_empty(), "{title}: {:?}", entries(&dest));
    }
    assert!(!work.path().join("inner").join("escaped").exists());
    assert!(!work.path().join("escaped").exists());
}

fn thaw_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_thaw"));
    c.env("DOCKER_CONFIG", "/nonexistent/thaw-test").env_remove("THAW_REGISTRY").env_remove("THAW_CACHE");
    c
}

fn run_ok(args: &[&str]) -> String {
    let out = thaw_cmd().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "thaw {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_push_pull_inspect_tags_copy_and_exit_codes() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let work = tempfile::tempdir().unwrap();
    let data = SnapshotData::new(1024, 512, 11);
    let src = work.path().join("snap");
    data.write(&src);
    let src_s = src.to_str().unwrap();
    let r1 = format!("{host}/fn/cli:v1");

    let out = run_ok(&["push", "--plain-http", "--quiet", &r1, src_s]);
    let digest: Sha256Digest = out.trim().parse().expect("push prints the manifest digest");

    let dest = work.path().join("out");
    let report: Value =
        serde_json::from_str(&run_ok(&["pull", "--plain-http", "--json", &r1, dest.to_str().unwrap()]))
            .unwrap();
    assert_eq!(report["digest"], digest.to_string());
    assert_eq!(report["files"].as_array().unwrap().len(), 4);
    assert_same_files(&data, &dest);

    let inspect: Value = serde_json::from_str(&run_ok(&["inspect", "--plain-http", "--json", &r1])).unwrap();
    assert_eq!(inspect["artifact_type"], media::SNAPSHOT_ARTIFACT);
    let memory = inspect["files"].as_array().unwrap().iter().find(|f| f["title"] == "memory").unwrap();
    assert_eq!(memory["size"], data.memory.len());
    assert!(memory["recipe"]["zero_bytes"].as_u64().unwrap() > 0);
    assert!(inspect["dedup_ratio"].as_f64().unwrap() > 1.0);
    let human = run_ok(&["inspect", "--plain-http", &r1]);
    assert!(human.contains("memory") && human.contains("dedup ratio"), "{human}");

    // copy into another repository, tag it, list tags.
    let r2 = format!("{host}/fn/copied:v2");
    let copied = run_ok(&["copy", "--plain-http", "--quiet", &r1, &r2]);
    assert_eq!(copied.trim(), digest.to_string());
    run_ok(&["push", "--plain-http", "--quiet", &format!("{host}/fn/copied:v3"), src_s]);
    let tags = run_ok(&["tags", "--plain-http", &format!("{host}/fn/copied")]);
    assert_eq!(tags.lines().collect::<Vec<_>>(), ["v2", "v3"]);
    let dest2 = work.path().join("out2");
    run_ok(&["pull", "--plain-http", "-q", &format!("{host}/fn/copied@{digest}"), dest2.to_str().unwrap()]);
    assert_same_files(&data, &dest2);

    // Exit codes: 2 for usage, 1 for failures, with the reference named and a hint.
    let usage = thaw_cmd().args(["pull", "--plain-http", "NOT A REF", "x"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let no_args = thaw_cmd().arg("push").output().unwrap();
    assert_eq!(no_args.status.code(), Some(2));
    let missing = thaw_cmd()
        .args([
            "pull",
            "--plain-http",
            &format!("{host}/fn/cli:nope"),
            work.path().join("x").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("fn/cli:nope") && err.contains("hint:"), "{err}");
    let tls = thaw_cmd().args(["tags", &format!("{host}/fn/cli")]).output().unwrap();
    assert_eq!(tls.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&tls.stderr).contains("--plain-http"),
        "{}",
        String::from_utf8_lossy(&tls.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_overrides_and_annotations_reach_the_manifest() {
    let registry = ThawRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("odd");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("guest-ram.bin"), vec![1u8; 100_000]).unwrap();
    std::fs::write(dir.join("state.bin"), b"vmstate bytes").unwrap();
    let reference = Reference::parse(&format!("{}/fn/odd:v1", registry.host())).unwrap();
    let client = client_for(&reference);
    let overrides = thaw_client::snapshot::RoleOverrides {
        memory: Some(dir.join("guest-ram.bin")),
        vmstate: Some(dir.join("state.bin")),
        ..Default::default()
    };
    let files = thaw_client::snapshot::snapshot_files(Some(&dir), &overrides).unwrap();
    let options = PushOptions {
        annotations: HashMap::from([("dev.thaw.revision".to_owned(), "odd-1".to_owned())]),
        ..Default::default()
    };
    let pushed = thaw_client::push(&client, &reference, &files, &options).await.unwrap();
    let manifest = client.get_manifest("fn/odd", "v1").await.unwrap();
    assert_eq!(manifest.digest, pushed.digest);
    let v: Value = serde_json::from_slice(&manifest.body).unwrap();
    assert_eq!(v["annotations"]["dev.thaw.revision"], "odd-1");
    assert_eq!(v["config"]["digest"], Sha256Digest::of(b"{}").to_string(), "no info file: config is {{}}");
    assert_eq!(v["layers"][0]["mediaType"], media::MEMORY_LAYER);
    assert_eq!(v["layers"][0]["annotations"][media::ANNOTATION_TITLE], "guest-ram.bin");
    assert_eq!(v["layers"][1]["mediaType"], media::VMSTATE_LAYER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chunk_cache_serves_a_second_pull_and_copies_move_only_compressed_chunks() {
    let a = ThawRegistry::start().await;
    let b = ThawRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let data = SnapshotData::new(2048, 1024, 5);
    let src = work.path().join("snap");
    data.write(&src);
    let ra = Reference::parse(&format!("{}/fn/cached:v1", a.host())).unwrap();
    let client_a = client_for(&ra);
    let pushed = thaw_client::push_dir(&client_a, &ra, &src, &PushOptions::default()).await.unwrap();

    let cache = work.path().join("cache");
    let with_cache = PullOptions { cache: Some(cache.clone()), ..Default::default() };
    let first = thaw_client::pull(&client_a, &ra, &work.path().join("one"), &with_cache).await.unwrap();
    assert!(first.stats.chunks_transferred > 0);
    let second = thaw_client::pull(&client_a, &ra, &work.path().join("two"), &with_cache).await.unwrap();
    assert_eq!(second.stats.chunks_transferred, 0, "{:?}", second.stats);
    assert_eq!(second.stats.chunks_local, first.stats.chunks_transferred);
    assert_same_files(&data, &work.path().join("two"));

    // A corrupt cache entry is caught by its id, removed, and reported.
    let entry = walk_files(&cache).into_iter().next().unwrap();
    std::fs::write(&entry, b"\x00\x05\x00\x00\x00junk!").unwrap();
    let err = thaw_client::pull(&client_a, &ra, &work.path().join("three"), &with_cache).await.unwrap_err();
    assert!(err.to_string().contains("cached chunk"), "{err}");
    assert!(!entry.exists());
    assert!(entries(&work.path().join("three")).is_empty());

    // thaw-registry to thaw-registry: chunks travel as they are stored, once.
    let rb = Reference::parse(&format!("{}/mirror/cached:v1", b.host())).unwrap();
    let client_b = client_for(&rb);
    let copied = thaw_client::copy(&client_a, &ra, &client_b, &rb, &Default::default()).await.unwrap();
    assert_eq!(copied.digest, pushed.digest);
    assert_eq!(copied.stats.chunks_transferred, pushed.stats.chunks_transferred);
    assert_eq!(
        copied.stats.chunk_compressed_bytes_transferred,
        pushed.stats.chunk_compressed_bytes_transferred
    );
    let dest = work.path().join("from-b");
    thaw_client::pull(&client_b, &rb, &dest, &PullOptions::default()).await.unwrap();
    assert_same_files(&data, &dest);
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
