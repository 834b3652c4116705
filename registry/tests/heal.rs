//! Healing on the filesystem backend (issue 18, finding 7), through the real binary: a pack
//! truncated after commit (what a power loss leaves when writes were not fsync'd) is
//! detected on read and healed by pushing the blob again; a flipped bit is reported by
//! `thaw-registry scrub --dry-run`, dropped by `thaw-registry scrub`, and healed by a push.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use reqwest::StatusCode;

const REPO: &str = "heal/app";

/// Monolithic OCI upload of `data` (POST, then PUT with the digest), as any client does.
async fn push(base: &str, data: &[u8]) -> StatusCode {
    let c = client();
    let resp = c.post(format!("{base}/v2/{REPO}/blobs/uploads/")).send().await.expect("POST upload");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let url = resolve(base, &location(&resp).expect("Location"));
    let resp = c
        .put(with_query(&url, &[("digest", &sha256_digest(data))]))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .expect("PUT upload");
    resp.status()
}

/// The blob as a client gets it: `None` when the answer is not 200 or the body breaks off.
async fn pull(base: &str, digest: &str) -> Option<Vec<u8>> {
    let resp = client().get(format!("{base}/v2/{REPO}/blobs/{digest}")).send().await.ok()?;
    if resp.status() != StatusCode::OK {
        return None;
    }
    resp.bytes().await.ok().map(|b| b.to_vec())
}

/// The biggest pack file: the one holding the layer's chunks.
fn biggest_pack(storage: &Path) -> PathBuf {
    let (path, _) = list_files(storage)
        .into_iter()
        .filter(|(p, _)| p.starts_with("chunks/packs"))
        .max_by_key(|(_, len)| *len)
        .expect("a pack");
    storage.join(path)
}

/// The number on the report line starting with `label`.
fn count(report: &str, label: &str) -> u64 {
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in:\n{report}"));
    line[line.find(label).unwrap() + label.len()..].trim().parse().unwrap_or_else(|_| panic!("{line:?}"))
}

fn scrub(storage: &Path, dry_run: bool) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw-registry"));
    cmd.arg("scrub").arg("--storage").arg(storage).env_remove("THAW_STORAGE");
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().expect("run thaw-registry scrub");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_pack_is_detected_on_read_healed_by_a_push_and_scrub_finds_bit_flips() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let log = dir.path().join("registry.log");
    let layer = Rng::new(18).bytes(3 << 20);
    let digest = sha256_digest(&layer);

    let mut reg = BinRegistry::start(&storage, &log).await;
    assert_eq!(push(&reg.base, &layer).await, StatusCode::CREATED);
    assert_eq!(pull(&reg.base, &digest).await.as_deref(), Some(layer.as_slice()));
    reg.kill9();

    // Lost writes: the pack keeps only its first half, its index still names every chunk.
    let pack = biggest_pack(&storage);
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&pack).unwrap().set_len(len / 2).unwrap();

    let mut reg = BinRegistry::start(&storage, &log).await;
    assert_ne!(pull(&reg.base, &digest).await.as_deref(), Some(layer.as_slice()), "truncated pack served");
    // Pushing the blob again stores the chunks found bad, and the blob reads back whole.
    assert_eq!(push(&reg.base, &layer).await, StatusCode::CREATED);
    assert_eq!(
        pull(&reg.base, &digest).await.as_deref(),
        Some(layer.as_slice()),
        "a push after the corruption was found must heal the blob; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    reg.kill9();
    // And it stays healed in a fresh process (the pack's stored index no longer names them).
    let mut reg = BinRegistry::start(&storage, &log).await;
    assert_eq!(pull(&reg.base, &digest).await.as_deref(), Some(layer.as_slice()), "healed after restart");
    reg.kill9();

    // A flipped bit inside the biggest pack: scrub reports it, changes nothing when dry.
    let pack = biggest_pack(&storage);
    let mut bytes = std::fs::read(&pack).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();
    let before = list_files(&storage);
    let (ok, out, err) = scrub(&storage, true);
    println!("{out}\n{err}");
    assert!(!ok, "a dry scrub that finds bad chunks exits with failure");
    assert!(err.contains("scrub: pack 1/"), "progress on stderr: {err}");
    assert_eq!(count(&out, "bad chunks"), 1, "{out}");
    assert_eq!(list_files(&storage), before, "a dry scrub changes nothing");
    let (ok, out, err) = scrub(&storage, false);
    assert!(ok, "{err}");
    assert_eq!(count(&out, "pack indexes fixed"), 1, "{out}");
    let (ok, out, _) = scrub(&storage, true);
    assert!(ok && count(&out, "bad chunks") == 0, "nothing bad after scrub:\n{out}");

    let reg = BinRegistry::start(&storage, &log).await;
    assert_ne!(pull(&reg.base, &digest).await.as_deref(), Some(layer.as_slice()));
    assert_eq!(push(&reg.base, &layer).await, StatusCode::CREATED);
    assert_eq!(pull(&reg.base, &digest).await.as_deref(), Some(layer.as_slice()), "healed after scrub");
}
