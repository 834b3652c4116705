//! Faults during a node cache's `ensure`, against a real `thaw-node-cache` process:
//!
//! - the registry's object store fails, delays or corrupts the Nth read while the node
//!   fetches a snapshot (an in-process registry wrapped in `thaw_registry::Faults`): the
//!   ensure either succeeds with byte-identical files or fails with a clear error, never
//!   lists or hands out a half-written or corrupt snapshot, and once the faults stop the
//!   next ensure succeeds and `scrub` finds nothing damaged;
//! - the cache directory's filesystem is full (a small tmpfs, as root only): a clear error
//!   status with a message saying so, nothing listed, and the same ensure succeeds once
//!   the filesystem has room; the status is 507 `NO_SPACE`, as docs/API.md promises.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::{assert_files, push, FaultyRegistry, NodeCache, Pushed, SnapshotData};
use thaw_registry::{Fault, Op, Rule};

/// Far more than any snapshot here: the node's own capacity never decides an outcome.
const CAPACITY: u64 = 1 << 30;

/// An ensure's status and body, without asserting success.
async fn try_ensure(node: &NodeCache, reference: &str) -> (u16, Value) {
    node.post("/v1/snapshots/ensure", json!({ "reference": reference })).await
}

/// The cache is consistent: nothing left in `work/`, disk usage matches the index, every
/// listed snapshot is one of `expected` and verifies, and `scrub` finds nothing corrupt.
async fn assert_consistent(node: &NodeCache, expected: &[&Pushed], what: &str) {
    let work = node.dir.join("work");
    if work.is_dir() {
        let leftovers: Vec<_> = std::fs::read_dir(&work).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(leftovers.is_empty(), "{what}: work in progress left behind: {leftovers:?}");
    }
    let disk = node.get("/v1/disk").await;
    assert_eq!(disk["allocated_on_disk"], disk["used_by_index"], "{what}: disk and index disagree: {disk}");
    let listed = node.get("/v1/snapshots").await;
    let listed = listed["snapshots"].as_array().unwrap().clone();
    for s in &listed {
        let reference = s["references"][0].as_str().unwrap_or_default();
        let pushed = expected
            .iter()
            .find(|p| p.reference == reference)
            .unwrap_or_else(|| panic!("{what}: listed {s} is none of the snapshots expected here"));
        let answer = node.ensure(reference).await;
        assert_eq!(answer["hit"], true, "{what}: listed but not a hit: {answer}");
        assert_files(&answer, &pushed.data);
        node.release(answer["lease"].as_str().unwrap()).await;
    }
    let (status, report) = node.post("/v1/scrub", json!({})).await;
    assert_eq!(status, 200, "{what}: scrub: {report}");
    assert_eq!(report["corrupt"], json!([]), "{what}: scrub found damage: {report}");
    assert_eq!(report["checked"].as_u64().unwrap() as usize, listed.len(), "{what}: {report}");
}

/// A failed ensure says what went wrong: an error status and `{"error": {"code",
/// "message"}}` with a message; answers the code.
fn assert_clear_error<'a>(status: u16, body: &'a Value, what: &str) -> &'a str {
    assert!(status >= 400, "{what}: status {status}: {body}");
    let code = body["error"]["code"].as_str().unwrap_or_else(|| panic!("{what}: no error code: {body}"));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: the error has no message: {body}");
    code
}

/// Whether the node lists a snapshot under `reference`.
async fn listed_as(node: &NodeCache, reference: &str) -> bool {
    let listing = node.get("/v1/snapshots").await;
    listing["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["references"].as_array().unwrap().iter().any(|r| r == reference))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_delayed_and_corrupt_registry_reads_never_leave_a_bad_snapshot() {
    let registry = FaultyRegistry::start(7).await;
    let host = registry.host();
    let faults = registry.faults.clone();
    let dir = tempfile::tempdir().unwrap();
    let node = NodeCache::start(&host, dir.path(), CAPACITY, "node-faults").await;

    // (rule, what): each case fetches a snapshot the node has never seen.
    let cases: Vec<(Rule, &str)> = vec![
        (Rule::on(Op::GetRange, Fault::Fail).under("chunks/packs/").nth(1), "1st pack range read fails"),
        (Rule::on(Op::GetRange, Fault::Fail).under("chunks/packs/").nth(3), "3rd pack range read fails"),
        (Rule::on(Op::GetRange, Fault::Fail).under("chunks/packs/"), "every pack range read fails"),
        (Rule::on(Op::GetRange, Fault::Corrupt).under("chunks/packs/").nth(1), "1st pack range read corrupt"),
        (Rule::on(Op::GetRange, Fault::Corrupt).under("chunks/packs/"), "every pack range read corrupt"),
        (Rule::on(Op::GetRange, Fault::Delay(Duration::from_millis(300))).nth(1), "1st range read delayed"),
        (Rule::any(Fault::Fail).nth(1), "1st store call fails"),
        (Rule::on(Op::Get, Fault::Corrupt).nth(1), "1st whole-object read corrupt"),
    ];
    let mut served: Vec<Pushed> = Vec::new();
    let (mut succeeded, mut failed) = (0, 0);
    for (i, (rule, what)) in cases.into_iter().enumerate() {
        let pushed =
            push(&host, &format!("fn/faults:c{i}"), SnapshotData::new(1024, 128, 500 + i as u64)).await;
        let injected = faults.injected();
        let id = faults.add(rule);
        let (status, body) = try_ensure(&node, &pushed.reference).await;
        faults.remove(id);
        assert!(faults.injected() > injected, "{what}: the fault never fired, so this case tests nothing");
        if status == 200 {
            // A retry got past the fault: the files must be the snapshot's, exactly.
            assert_files(&body, &pushed.data);
            node.release(body["lease"].as_str().unwrap()).await;
            succeeded += 1;
        } else {
            assert_clear_error(status, &body, what);
            assert!(
                !listed_as(&node, &pushed.reference).await,
                "{what}: a failed ensure left its snapshot listed"
            );
            failed += 1;
        }
        eprintln!(
            "{what}: ensure answered {status} {}",
            if status == 200 { String::new() } else { body.to_string() }
        );
        served.push(pushed);
        let expected: Vec<&Pushed> = served.iter().collect();
        assert_consistent(&node, &expected, what).await;

        // Faults gone: the same ensure succeeds with the right bytes.
        let answer = node.ensure(&served[i].reference).await;
        assert_files(&answer, &served[i].data);
        node.release(answer["lease"].as_str().unwrap()).await;
        assert_consistent(&node, &expected, &format!("{what}, then without faults")).await;
    }
    eprintln!("{succeeded} ensures got past their fault, {failed} failed cleanly");
    assert!(failed > 0, "an always-failing store must make some ensure fail");
}

/// A tmpfs of `size` mounted at `at`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_owned()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("mount -o remount");
        assert!(status.success(), "remounting the tmpfs with size {size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the cache's filesystem during an ensure, checks the error and that nothing is
/// listed, then makes room and checks the same ensure succeeds. Answers the failed
/// ensure's status and error code (`None` when no tmpfs can be mounted here).
async fn fill_the_cache_filesystem_then_make_room() -> Option<(u16, String)> {
    let mount_point = tempfile::tempdir().unwrap();
    // Mounting needs root (CAP_SYS_ADMIN); elsewhere this case cannot run.
    let Some(tmpfs) = Tmpfs::mount(mount_point.path(), "3m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return None;
    };
    let registry = FaultyRegistry::start(9).await;
    let host = registry.host();
    // About 4.5 MiB of files: more than the 3 MiB filesystem holds.
    let pushed = push(&host, "fn/full:v1", SnapshotData::new(1024, 128, 77)).await;
    let cache_dir = mount_point.path().join("cache");
    let node = NodeCache::start(&host, &cache_dir, CAPACITY, "node-full").await;

    let (status, body) = try_ensure(&node, &pushed.reference).await;
    eprintln!("ensure into a full filesystem: {status} {body}");
    let code = assert_clear_error(status, &body, "full filesystem").to_owned();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("No space left on device"), "the error does not say the disk is full: {body}");
    assert!(node.cached().await.is_empty(), "a failed ensure left a snapshot listed");
    assert_consistent(&node, &[], "after the full filesystem").await;

    // Room again: the same ensure succeeds.
    tmpfs.resize("64m");
    let answer = node.ensure(&pushed.reference).await;
    assert_files(&answer, &pushed.data);
    node.release(answer["lease"].as_str().unwrap()).await;
    assert_consistent(&node, &[&pushed], "after making room").await;
    drop(node);
    drop(tmpfs);
    Some((status, code))
}

/// docs/API.md promises 507 `NO_SPACE` when the cache has no room, and a filesystem that
/// fills up mid-fetch is no room either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_filesystem_is_507_no_space_and_leaves_nothing_listed() {
    if let Some((status, code)) = fill_the_cache_filesystem_then_make_room().await {
        assert_eq!((status, code.as_str()), (507, "NO_SPACE"));
    }
}
