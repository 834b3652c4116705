//! The real `thaw` binary against a thaw-registry storing on S3 (a real MinIO, the
//! registry's harness): push two revisions, pull them back byte-identical, pull the second
//! with the first as a seed, and pull from a second registry process on the same bucket
//! prefix, which can only answer from what the first one put into S3.

mod common;
#[path = "../../registry/tests/common/minio.rs"]
#[allow(dead_code, unreachable_pub)]
mod minio;

use std::path::Path;
use std::process::Command;

use common::*;
use minio::{list_keys, unique_prefix, Minio};
use serde_json::Value;
use thaw_registry::{RegistryConfig, RunningRegistry};

/// An in-process thaw-registry on `storage` (`s3://…`; the `AWS_*` variables are exported).
async fn registry_on(storage: &str) -> RunningRegistry {
    let config = RegistryConfig::new("127.0.0.1:0".parse().unwrap(), storage);
    thaw_registry::spawn(config).await.expect("starting thaw-registry on MinIO")
}

/// Runs `thaw --plain-http --json <args>` (no credentials file, no cache) and returns
/// its JSON report, asserting success.
fn thaw_json(args: &[&str]) -> Value {
    let (command, rest) = args.split_first().expect("a subcommand");
    let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .env("DOCKER_CONFIG", "/nonexistent/thaw-test")
        .env_remove("THAW_REGISTRY")
        .env_remove("THAW_CACHE")
        .args([command, "--plain-http", "--json", "--quiet"])
        .args(rest)
        .output()
        .expect("run thaw");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "thaw {args:?} failed: {}\n{stderr}", out.status);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("thaw {args:?}: JSON report: {e}\n{stderr}"))
}

/// Revision 2: 64 pages of rev 1's memory rewritten, a disk block changed, a new info file.
fn revision_2(rev1: &SnapshotData) -> SnapshotData {
    let mut rng = Rng::new(0x5317);
    let mut next = SnapshotData {
        memory: rev1.memory.clone(),
        vmstate: rev1.vmstate.clone(),
        disk: rev1.disk.clone(),
        info: rev1.info.clone(),
    };
    for p in 0..64 {
        let at = (300 + 7 * p) * PAGE;
        rng.fill(&mut next.memory[at..at + PAGE]);
    }
    next.disk[40 * PAGE..41 * PAGE].copy_from_slice(&text_page(77));
    next.info.extend_from_slice(b"\n");
    next
}

fn pull(reference: &str, dest: &Path, seed: Option<&Path>) -> Value {
    let dest = dest.to_str().unwrap();
    match seed {
        Some(seed) => thaw_json(&["pull", "--seed", seed.to_str().unwrap(), reference, dest]),
        None => thaw_json(&["pull", reference, dest]),
    }
}

fn received(report: &Value) -> u64 {
    report["stats"]["bytes_received"].as_u64().expect("bytes_received")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thaw_cli_round_trips_through_a_registry_on_s3() {
    let minio = Minio::shared();
    minio.export_env();
    let prefix = unique_prefix("cli");
    let storage = minio.storage_url(&prefix);
    let registry = registry_on(&storage).await;
    let host = registry.addr().to_string();

    let work = tempfile::tempdir().unwrap();
    let rev1 = SnapshotData::new(4096, 2048, 41);
    let rev2 = revision_2(&rev1);
    let (dir1, dir2) = (work.path().join("rev1"), work.path().join("rev2"));
    rev1.write(&dir1);
    rev2.write(&dir2);
    let (r1, r2) = (format!("{host}/functions/s3:rev-1"), format!("{host}/functions/s3:rev-2"));

    let push1 = thaw_json(&["push", &r1, dir1.to_str().unwrap()]);
    let push2 = thaw_json(&["push", "--base", &r1, &r2, dir2.to_str().unwrap()]);
    assert_ne!(push1["digest"], push2["digest"]);
    // Everything went to the bucket: packs, their indexes, recipes, manifests, links.
    let bucket = minio.client();
    for dir in ["chunks/packs", "chunks/index", "recipes/sha256", "manifests/sha256", "repositories"] {
        let keys = list_keys(bucket.as_ref(), &format!("{prefix}/{dir}")).await;
        assert!(!keys.is_empty(), "nothing under {prefix}/{dir} in the bucket");
    }

    // Pulls, byte-identical.
    let out1 = work.path().join("out1");
    let pull1 = pull(&r1, &out1, None);
    assert_eq!(pull1["digest"], push1["digest"]);
    assert_eq!(pull1["thaw"], true, "the _thaw fast path is used on S3 too");
    assert_same_files(&rev1, &out1);
    let out2_cold = work.path().join("out2-cold");
    let cold = pull(&r2, &out2_cold, None);
    assert_same_files(&rev2, &out2_cold);

    // Revision 2 seeded with the pulled revision 1: only what changed comes over the wire.
    let out2 = work.path().join("out2");
    let seeded = pull(&r2, &out2, Some(&out1));
    assert_eq!(seeded["digest"], push2["digest"]);
    assert_same_files(&rev2, &out2);
    assert!(seeded["stats"]["chunks_local"].as_u64().unwrap() > 0, "{seeded}");
    assert!(
        received(&seeded) * 4 < received(&cold),
        "seeded pull received {} B, cold pull {} B",
        received(&seeded),
        received(&cold)
    );
    eprintln!(
        "S3: push rev 1 sent {} B, rev 2 (base rev 1) {} B; pull rev 1 received {} B, rev 2 cold {} B, \
         rev 2 seeded {} B",
        push1["stats"]["bytes_sent"],
        push2["stats"]["bytes_sent"],
        received(&pull1),
        received(&cold),
        received(&seeded)
    );

    // A second registry process on the same bucket prefix (a replica) serves both revisions.
    registry.shutdown().await;
    let replica = registry_on(&storage).await;
    let r2_replica = format!("{}/functions/s3:rev-2", replica.addr());
    let out_replica = work.path().join("out-replica");
    let from_replica = pull(&r2_replica, &out_replica, Some(&out1));
    assert_eq!(from_replica["digest"], push2["digest"]);
    assert_same_files(&rev2, &out_replica);
    replica.shutdown().await;
}
