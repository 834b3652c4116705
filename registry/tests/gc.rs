//! Garbage collection: the standalone `thaw-registry gc` (dry run, real run, refusal while
//! a registry serves), online GC racing pushes and pulls, and upload session expiry.
//! Filesystem storage only.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::json;

/// Runs `thaw-registry gc --storage <storage> <extra…>`; returns (success, stdout, stderr).
fn run_gc(storage: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_thaw-registry"))
        .arg("gc")
        .arg("--storage")
        .arg(storage)
        .args(extra)
        .env_remove("THAW_STORAGE")
        .output()
        .expect("run thaw-registry gc");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The serving leases an in-process registry leaves behind; these tests stop it for good,
/// so they drop its lease.
fn forget_leases(storage: &Path) {
    let _ = std::fs::remove_dir_all(storage.join("gc/serving"));
}

/// Stored content, without GC's own bookkeeping (`gc/`: leases, the lock, sweep records).
fn content_files(storage: &Path) -> std::collections::BTreeMap<std::path::PathBuf, u64> {
    list_files(storage).into_iter().filter(|(p, _)| !p.starts_with("gc")).collect()
}

fn storage_bytes(storage: &Path) -> u64 {
    list_files(storage).iter().filter(|(p, _)| !p.starts_with("gc")).map(|(_, b)| *b).sum()
}

/// Three images in `gc/app`: "keep" (tagged), one untagged (pullable by digest) and one
/// deleted with its layer; the registry is stopped and its storage copied out.
struct Prepared {
    _dir: tempfile::TempDir,
    storage: std::path::PathBuf,
    kept_manifest: Vec<u8>,
    kept_layer: Vec<u8>,
    untagged_manifest: Vec<u8>,
    untagged_digest: String,
    untagged_layer: Vec<u8>,
    dropped_blob: String,
}

async fn prepare(check_refusal: bool) -> Prepared {
    let reg = TestRegistry::start().await;
    let storage = reg.storage();
    // The dropped layer is pushed first and shares its first MiB with the kept one, so its
    // pack ends up a quarter live: GC must rewrite it, not delete it.
    let shared = Rng::new(4).bytes(1 << 20);
    let dropped_layer = [shared.clone(), Rng::new(2).bytes(3 << 20)].concat();
    let kept_layer = [shared, Rng::new(1).bytes(3 << 20)].concat();
    let untagged_layer = Rng::new(3).bytes(1 << 20);
    let (_, dropped_digest) = reg.push_simple_image("gc/app", "drop", &dropped_layer).await;
    let (kept_manifest, _) = reg.push_simple_image("gc/app", "keep", &kept_layer).await;
    let (untagged_manifest, untagged_digest) = reg.push_simple_image("gc/app", "tmp", &untagged_layer).await;
    // Untag the third image (its manifest stays pullable by digest: a root).
    let resp = reg.delete("/v2/gc/app/manifests/tmp").await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    // Delete the first image and its layer.
    let resp = reg.delete(&format!("/v2/gc/app/manifests/{dropped_digest}")).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let dropped_blob = sha256_digest(&dropped_layer);
    let resp = reg.delete(&format!("/v2/gc/app/blobs/{dropped_blob}")).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    if check_refusal {
        // While a registry serves this storage, the standalone GC takes the GC lock and
        // fences the registry's commits (D26): it runs, and a long grace keeps everything.
        let before = list_files(&storage);
        let (ok, _, err) = run_gc(&storage, &["--grace", "1h"]);
        assert!(ok, "gc beside a serving registry on a store with conditional writes: {err}");
        let content =
            |files: &std::collections::BTreeMap<std::path::PathBuf, u64>| -> Vec<std::path::PathBuf> {
                files.keys().filter(|p| !p.starts_with("gc")).cloned().collect()
            };
        assert_eq!(
            content(&list_files(&storage)),
            content(&before),
            "nothing is older than the grace period"
        );
    }
    // Work on a copy of the (now idle) storage: the registry's directory goes with it.
    let dir = tempfile::tempdir().expect("temp dir");
    let status = Command::new("cp").arg("-a").arg(&storage).arg(dir.path()).status().expect("cp");
    assert!(status.success());
    reg.shutdown().await;
    let storage = dir.path().join(storage.file_name().expect("storage dir name"));
    forget_leases(&storage);
    Prepared {
        _dir: dir,
        storage,
        kept_manifest,
        kept_layer,
        untagged_manifest,
        untagged_digest,
        untagged_layer,
        dropped_blob,
    }
}

/// Everything still referenced pulls byte-identical from a fresh registry binary; the
/// dropped layer does not (when `dropped_gone`).
async fn assert_survivors(p: &Prepared, dropped_gone: bool) {
    let log = tempfile::NamedTempFile::new().expect("log file");
    let bin = BinRegistry::start(&p.storage, log.path()).await;
    let c = client();
    let get = |path: String| {
        let c = c.clone();
        let base = bin.base.clone();
        async move { c.get(format!("{base}{path}")).send().await.expect("GET") }
    };
    let resp = get("/v2/gc/app/manifests/keep".into()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), p.kept_manifest);
    let resp = get(format!("/v2/gc/app/manifests/{}", p.untagged_digest)).await;
    assert_eq!(resp.status(), StatusCode::OK, "untagged manifests are roots");
    assert_eq!(resp.bytes().await.unwrap().to_vec(), p.untagged_manifest);
    for layer in [&p.kept_layer, &p.untagged_layer] {
        let resp = get(format!("/v2/gc/app/blobs/{}", sha256_digest(layer))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.bytes().await.unwrap().as_ref() == layer.as_slice(), "layer differs after gc");
    }
    if dropped_gone {
        let resp = get(format!("/v2/gc/app/blobs/{}", p.dropped_blob)).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
    drop(bin);
    forget_leases(&p.storage);
}

#[tokio::test]
async fn standalone_gc_reclaims_deleted_images_keeps_the_rest_and_dry_run_changes_nothing() {
    let p = prepare(true).await;
    let storage = &p.storage;
    let before = content_files(storage);
    let (ok, out, err) = run_gc(storage, &["--grace", "0s", "--dry-run"]);
    assert!(ok, "dry run failed: {err}");
    println!("{out}");
    assert!(out.contains("would delete"), "{out}");
    assert_eq!(content_files(storage), before, "a dry run changes nothing");

    // A long grace period keeps everything.
    let (ok, out, err) = run_gc(storage, &["--grace", "1h"]);
    assert!(ok, "{err}");
    assert_eq!(content_files(storage), before, "nothing is older than the grace period: {out}");

    let bytes_before = storage_bytes(storage);
    let (ok, out, err) = run_gc(storage, &["--grace", "0s"]);
    assert!(ok, "gc failed: {err}");
    println!("{out}");
    let bytes_after = storage_bytes(storage);
    let freed = bytes_before - bytes_after;
    println!("storage bytes: before {bytes_before}, after {bytes_after}, freed {freed}");
    // The dropped layer's own 3 MiB are random (incompressible): about that much goes.
    assert!(freed >= 3 << 20, "freed only {freed} bytes");
    assert!(freed < (3 << 20) + (256 << 10), "freed {freed} bytes: more than the dropped image");
    assert!(out.contains("packs rewritten        1"), "the shared pack must be rewritten:\n{out}");

    // A second run finds nothing more.
    let (ok, out, _) = run_gc(storage, &["--grace", "0s", "--dry-run"]);
    assert!(ok);
    assert!(out.contains("chunks                 0"), "second run found more garbage:\n{out}");
    assert_survivors(&p, true).await;
}

#[tokio::test]
async fn gc_failing_at_any_step_leaves_a_readable_registry() {
    use thaw_registry::{Fault, Faults, Faulty, GcOptions, Op, Rule, Store};
    // Each step GC writes or deletes, failed in turn: what a kill at that point leaves
    // (the run stops there and its memory is lost), then a clean run finishes the job.
    // The steps include the conditional-write probe, the GC lock, the sweep record, the
    // copies and the deletes (D26); a failed best-effort step (pruning an old lock
    // generation, deleting the probe) may let the run finish.
    let steps = (1..=8).map(|n| (Op::Put, n)).chain((1..=5).map(|n| (Op::Delete, n)));
    for (op, nth) in steps {
        let p = prepare(false).await;
        let faults = Faults::new(7);
        faults.add(Rule::on(op, Fault::Fail).nth(nth));
        let local = object_store::local::LocalFileSystem::new_with_prefix(&p.storage).expect("local store");
        let store = Arc::new(Store::new(Arc::new(Faulty::new(Arc::new(local), faults.clone()))));
        let options = GcOptions { grace: Duration::ZERO, ..Default::default() };
        let outcome = store.collect_garbage(&options, None, None).await;
        assert_eq!(faults.injected(), 1, "{op:?} #{nth} must be reached");
        println!("{op:?} #{nth} failed: run {}", if outcome.is_err() { "failed" } else { "finished" });
        assert_survivors(&p, false).await;
        let (ok, out, err) = run_gc(&p.storage, &["--grace", "0s"]);
        assert!(ok, "gc after a failed run ({op:?} #{nth}): {err}");
        println!("after {op:?} #{nth} failed, the next run:\n{out}");
        assert_survivors(&p, true).await;
    }
}

/// Pushes `layer` (plus the shared config) into `repo` under `tag`, retrying the whole
/// push when the registry answers 503 (what a commit gets when GC took its content).
async fn push_image_retrying(
    reg: &TestRegistry,
    repo: &str,
    tag: &str,
    layer: &[u8],
    retries: &AtomicU64,
) -> Vec<u8> {
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    // Unique per tag: deleting one image by digest must not untag another.
    let extra = json!({ "annotations": { "tag": tag } });
    let manifest = image_manifest(descriptor(CONFIG_V1, config), vec![descriptor(LAYER_TAR, layer)], extra);
    'attempt: for _ in 0..50 {
        for blob in [config.as_slice(), layer] {
            let url = reg.start_upload(repo).await;
            let resp = reg
                .client
                .put(with_query(&url, &[("digest", &sha256_digest(blob))]))
                .header("Content-Type", "application/octet-stream")
                .body(blob.to_vec())
                .send()
                .await
                .expect("PUT blob");
            match resp.status() {
                StatusCode::CREATED => {}
                StatusCode::SERVICE_UNAVAILABLE => {
                    retries.fetch_add(1, Ordering::SeqCst);
                    continue 'attempt;
                }
                s => panic!("blob push to {repo}: {s}: {}", body_text(resp).await),
            }
        }
        let resp = reg.put_manifest(repo, tag, MANIFEST_V1, &manifest).await;
        match resp.status() {
            StatusCode::CREATED => return manifest,
            StatusCode::SERVICE_UNAVAILABLE => {
                retries.fetch_add(1, Ordering::SeqCst);
            }
            s => panic!("manifest push {repo}:{tag}: {s}: {}", body_text(resp).await),
        }
    }
    panic!("push of {repo}:{tag} never succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn online_gc_racing_pushes_pulls_and_deletes_loses_nothing() {
    let mut options =
        thaw_registry::ServeOptions { gc_interval: Some(Duration::from_millis(50)), ..Default::default() };
    options.gc.grace = Duration::ZERO;
    let reg = Arc::new(TestRegistry::start_with(options).await);
    let retries = Arc::new(AtomicU64::new(0));
    const WORKERS: u64 = 3;
    const ROUNDS: u64 = 12;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (reg, retries) = (reg.clone(), retries.clone());
        tasks.push(tokio::spawn(async move {
            let repo = format!("race/w{w}");
            // Three layer variants per worker, re-pushed soon after being deleted: their
            // chunks are exactly what GC is busy dooming when the push dedups against them.
            let variants: Vec<Vec<u8>> = (0..3).map(|v| Rng::new(100 * w + v).bytes(512 << 10)).collect();
            let mut previous: Option<(String, Vec<u8>)> = None;
            let mut kept = Vec::new();
            for round in 0..ROUNDS {
                let layer = &variants[(round % 3) as usize];
                let tag = format!("r{round}");
                let manifest = push_image_retrying(&reg, &repo, &tag, layer, &retries).await;
                // Pull what was just pushed, while GC runs.
                assert_eq!(reg.get_blob(&repo, &sha256_digest(layer)).await, *layer, "{repo}:{tag}");
                if let Some((old_digest, old_layer)) = previous.take() {
                    if round % 4 != 0 {
                        let resp = reg.delete(&format!("/v2/{repo}/manifests/{old_digest}")).await;
                        assert_eq!(resp.status(), StatusCode::ACCEPTED);
                        // Kept images keep their layers linked.
                        if old_layer != *layer && !kept.iter().any(|(_, l)| *l == old_layer) {
                            let resp =
                                reg.delete(&format!("/v2/{repo}/blobs/{}", sha256_digest(&old_layer))).await;
                            assert_eq!(resp.status(), StatusCode::ACCEPTED);
                        }
                    } else {
                        kept.push((format!("r{}", round - 1), old_layer));
                    }
                }
                previous = Some((sha256_digest(&manifest), layer.clone()));
            }
            kept.push((format!("r{}", ROUNDS - 1), previous.expect("pushed").1));
            (repo, kept)
        }));
    }
    let mut survivors = Vec::new();
    for t in tasks {
        survivors.push(t.await.expect("worker"));
    }
    // Let a few more GC runs pass over the final state, then check every kept image.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (repo, kept) in &survivors {
        for (tag, layer) in kept {
            let resp = reg.get(&format!("/v2/{repo}/manifests/{tag}")).await;
            assert_eq!(resp.status(), StatusCode::OK, "{repo}:{tag} lost");
            let (digest, len) = reg.get_blob_digest(repo, &sha256_digest(layer)).await;
            assert_eq!((digest, len), (sha256_digest(layer), layer.len() as u64), "{repo}:{tag}");
        }
    }
    println!("retryable 503 answers seen and retried: {}", retries.load(Ordering::SeqCst));
}

#[tokio::test]
async fn abandoned_upload_sessions_expire() {
    let mut options =
        thaw_registry::ServeOptions { gc_interval: Some(Duration::from_millis(100)), ..Default::default() };
    options.gc.upload_max_age = Duration::from_millis(500);
    let reg = TestRegistry::start_with(options).await;
    let url = reg.start_upload("gc/uploads").await;
    let resp = reg
        .client
        .patch(&url)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", "0-9")
        .body(vec![7u8; 10])
        .send()
        .await
        .expect("PATCH");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let url = reg.resolve(&location(&resp).expect("Location"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = reg.client.get(&url).send().await.expect("GET upload");
        if resp.status() == StatusCode::NOT_FOUND {
            let body = resp.bytes().await.unwrap();
            assert!(error_codes(&body).contains(&"BLOB_UPLOAD_UNKNOWN".to_owned()));
            break;
        }
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "upload status before expiry");
        assert!(Instant::now() < deadline, "the abandoned session never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A session in use is not affected: push a blob right away.
    let digest = reg.push_blob("gc/uploads", b"fresh").await;
    assert_eq!(reg.get_blob("gc/uploads", &digest).await, b"fresh");
}
