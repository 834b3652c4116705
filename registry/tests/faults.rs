//! Faults injected into the registry's object store through `thaw_registry::Faults`
//! (a wrapper store under a running in-process registry; the filesystem, or MinIO with
//! `THAW_TEST_STORAGE=s3`):
//!
//! - a failed PUT of a pack, its index or the recipe, during a plain OCI upload and during
//!   a `_thaw` push: the client gets 503 with an `UNAVAILABLE` body, nothing half-written
//!   is visible, and the retry succeeds;
//! - corrupted GETs of packs while serving a blob: the registry never sends a byte that is
//!   not the blob's, and fails the request (or cuts the body short) instead;
//! - a stalled read in one repository does not hold up requests to another.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use thaw_registry::{Fault, Faults, Op, Rule, ServeOptions};

const MIB: usize = 1 << 20;

async fn start(faults: &Arc<Faults>) -> TestRegistry {
    TestRegistry::start_with(ServeOptions::default().with_faults(faults.clone())).await
}

/// Waits (up to 30 s) until `cond` holds.
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Monolithic upload of `data`; the raw answer to the closing PUT.
async fn try_push_blob(r: &TestRegistry, name: &str, data: &[u8]) -> reqwest::Response {
    let url = r.start_upload(name).await;
    r.client
        .put(with_query(&url, &[("digest", &sha256_digest(data))]))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .expect("PUT upload")
}

async fn assert_blob_absent(r: &TestRegistry, name: &str, digest: &str, what: &str) {
    let resp = r.head(&format!("/v2/{name}/blobs/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{what}: HEAD of the failed blob");
}

#[tokio::test]
async fn a_failed_store_write_during_an_oci_upload_is_503_and_leaves_nothing_visible() {
    let faults = Faults::new(1);
    let r = start(&faults).await;
    let name = "faults/oci";
    r.push_simple_image(name, "v1", &Rng::new(1).bytes(200_000)).await;
    // (where the failing PUT goes, which matching PUT fails, blob size): 18 MiB of random
    // bytes make two packs, so the second pack fails after the first one was stored.
    let cases = [
        ("chunks/packs/", 1, 300_000),
        ("chunks/packs/", 2, 18 * MIB),
        ("chunks/index/", 1, 300_000),
        ("recipes/", 1, 300_000),
    ];
    for (i, (prefix, nth, size)) in cases.into_iter().enumerate() {
        let what = format!("PUT #{nth} under {prefix} failing");
        let data = Rng::new(100 + i as u64).bytes(size);
        let digest = sha256_digest(&data);
        let before = reachable_state(&r.storage());
        let injected = faults.injected();
        let rule = faults.add(Rule::on(Op::Put, Fault::Fail).under(prefix).nth(nth));
        let resp = try_push_blob(&r, name, &data).await;
        expect_error(resp, 503, &["UNAVAILABLE"], &what).await;
        assert_eq!(faults.injected(), injected + 1, "{what}: the fault fired once");
        faults.remove(rule);
        assert_blob_absent(&r, name, &digest, &what).await;
        assert_nothing_new_reachable(&r.storage(), &before, &what);
        assert_eq!(r.push_blob(name, &data).await, digest, "{what}: retry");
        assert_eq!(r.get_blob_digest(name, &digest).await, (digest.clone(), size as u64), "{what}");
    }
    r.shutdown().await;
}

fn missing_query(entries: &[BatchEntry]) -> serde_json::Value {
    json!({ "chunks": entries.iter().map(|e| hex::encode(e.id)).collect::<Vec<_>>() })
}

#[tokio::test]
async fn a_failed_pack_write_during_a_thaw_push_is_503_and_the_retry_succeeds() {
    let faults = Faults::new(2);
    let r = start(&faults).await;
    let name = "faults/thaw";
    r.push_simple_image(name, "v1", &Rng::new(2).bytes(100_000)).await;
    for (seed, prefix, nth) in [(10, "chunks/packs/", 1), (11, "chunks/index/", 1)] {
        let what = format!("_thaw push with PUT #{nth} under {prefix} failing");
        let mut blob = Rng::new(seed).bytes(2 * MIB);
        blob[MIB..MIB + 256 * 1024].fill(0);
        let fc = fixed_chunked(&blob, 64 * 1024);
        let before = reachable_state(&r.storage());
        let rule = faults.add(Rule::on(Op::Put, Fault::Fail).under(prefix).nth(nth));
        let upload = |body: Vec<u8>| {
            r.req(Method::POST, &format!("/v2/{name}/_thaw/chunks"))
                .header("Content-Type", CHUNKS_TYPE)
                .body(body)
                .send()
        };
        let resp = upload(chunk_batch(&fc.entries)).await.expect("POST chunks");
        expect_error(resp, 503, &["UNAVAILABLE"], &what).await;
        faults.remove(rule);

        // None of the batch's chunks is known, so a commit by recipe is refused.
        let resp = r
            .req(Method::POST, &format!("/v2/{name}/_thaw/chunks/missing"))
            .json(&missing_query(&fc.entries))
            .send()
            .await
            .expect("POST missing");
        assert_eq!(resp.status(), StatusCode::OK, "{what}");
        let missing: serde_json::Value = resp.json().await.expect("missing JSON");
        assert_eq!(missing["missing"].as_array().map(Vec::len), Some(fc.entries.len()), "{what}");
        let commit = || {
            r.req(Method::PUT, &format!("/v2/{name}/_thaw/blobs/{}", fc.digest))
                .header("Content-Type", RECIPE_TYPE)
                .body(fc.recipe.clone())
                .send()
        };
        expect_error(commit().await.expect("PUT recipe"), 400, &["BLOB_UNKNOWN"], &what).await;
        assert_blob_absent(&r, name, &fc.digest, &what).await;
        assert_nothing_new_reachable(&r.storage(), &before, &what);

        let resp = upload(chunk_batch(&fc.entries)).await.expect("POST chunks again");
        assert_eq!(resp.status(), StatusCode::OK, "{what}: retried batch: {}", body_text(resp).await);
        let resp = commit().await.expect("PUT recipe again");
        assert_eq!(resp.status(), StatusCode::CREATED, "{what}: commit: {}", body_text(resp).await);
        assert_eq!(r.get_blob(name, &fc.digest).await, blob, "{what}");
    }
    r.shutdown().await;
}

/// What a GET of a blob delivered: status, and the body bytes received before the body
/// ended or broke (and whether it broke).
async fn read_what_arrives(r: &TestRegistry, name: &str, digest: &str) -> (StatusCode, Vec<u8>, bool) {
    let mut resp = r.get(&format!("/v2/{name}/blobs/{digest}")).await;
    let status = resp.status();
    let mut got = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(piece)) => got.extend_from_slice(&piece),
            Ok(None) => return (status, got, false),
            Err(_) => return (status, got, true),
        }
    }
}

#[tokio::test]
async fn corrupt_pack_reads_are_never_served() {
    let faults = Faults::new(3);
    let r = start(&faults).await;
    let name = "faults/corrupt";

    // Every ranged read of a pack corrupted: the first window fails, so the client gets an
    // error body instead of a 200.
    let small = Rng::new(3).bytes(MIB);
    let digest = r.push_blob(name, &small).await;
    let rule = faults.add(Rule::on(Op::GetRange, Fault::Corrupt).under("chunks/packs/"));
    let resp = r.get(&format!("/v2/{name}/blobs/{digest}")).await;
    expect_error(resp, 500, &["UNKNOWN"], "GET of a blob whose pack reads are corrupt").await;
    let resp =
        r.req(Method::GET, &format!("/v2/{name}/blobs/{digest}")).header("Range", "bytes=1000-").send();
    expect_error(resp.await.expect("ranged GET"), 500, &["UNKNOWN"], "ranged GET, corrupt").await;
    faults.remove(rule);
    assert_eq!(r.get_blob(name, &digest).await, small, "reads are fine again once the fault is gone");

    // One corrupted read somewhere in a large blob (several windows, two packs): whatever
    // arrives is a prefix of the blob, and the whole blob never arrives as if it were fine.
    let large = Rng::new(4).bytes(40 * MIB);
    let digest = r.push_blob(name, &large).await;
    for nth in [1, 2, 3, 5] {
        let rule = faults.add(Rule::on(Op::GetRange, Fault::Corrupt).under("chunks/packs/").nth(nth));
        let (status, got, broke) = read_what_arrives(&r, name, &digest).await;
        faults.remove(rule);
        let what =
            format!("GET with ranged read #{nth} corrupted: {status}, {} bytes, broke {broke}", got.len());
        eprintln!("{what}");
        if status == StatusCode::OK {
            assert!(got.len() < large.len() && broke, "{what}: a corrupt blob must not arrive whole");
            assert!(got == large[..got.len()], "{what}: bytes that are not the blob's were sent");
        } else {
            assert!(status.is_server_error(), "{what}");
        }
    }
    assert_eq!(r.get_blob_digest(name, &digest).await, (digest.clone(), large.len() as u64));
    r.shutdown().await;
}

#[tokio::test]
async fn a_stalled_read_in_one_repository_does_not_block_another() {
    let faults = Faults::new(4);
    let r = Arc::new(start(&faults).await);
    let slow = Rng::new(5).bytes(300_000);
    let fast = Rng::new(6).bytes(300_000);
    let slow_digest = r.push_blob("faults/slow", &slow).await;
    let fast_digest = r.push_blob("faults/fast", &fast).await;
    faults.add(Rule::on(Op::Get, Fault::Stall).under("repositories/faults/slow/"));

    let stalled = tokio::spawn({
        let r = r.clone();
        let digest = slow_digest.clone();
        async move { r.get_blob_digest("faults/slow", &digest).await }
    });
    wait_for("the slow repository's read to stall", || faults.stalled() > 0).await;

    // Bounded by a timeout, not timed: the other repository answers while the first is
    // still held.
    for _ in 0..3 {
        let got =
            tokio::time::timeout(Duration::from_secs(60), r.get_blob_digest("faults/fast", &fast_digest))
                .await
                .expect("a request to another repository must not wait for the stalled one");
        assert_eq!(got, (fast_digest.clone(), fast.len() as u64));
        let tags = tokio::time::timeout(Duration::from_secs(60), r.get("/v2/faults/fast/tags/list"))
            .await
            .expect("tags of another repository");
        assert_eq!(tags.status(), StatusCode::OK, "tags of a repository holding a blob");
    }
    assert!(!stalled.is_finished(), "the stalled request is still held");
    assert_eq!(faults.stalled(), 1);

    faults.release_stalls();
    let got = tokio::time::timeout(Duration::from_secs(60), stalled).await.expect("released").expect("task");
    assert_eq!(got, (slow_digest, slow.len() as u64));
}

#[tokio::test]
async fn random_store_failures_never_make_a_wrong_blob_visible() {
    // A seeded storm: 15 % of all store calls fail and 10 % of the ranged reads that get
    // through are corrupted, while blobs are pushed and read back.
    let faults = Faults::new(0xC4A05);
    let r = start(&faults).await;
    let name = "faults/storm";
    faults.add(Rule::any(Fault::Fail).with_probability(0.15));
    faults.add(Rule::on(Op::GetRange, Fault::Corrupt).with_probability(0.10));
    let (mut pushed, mut failed) = (Vec::new(), Vec::new());
    for i in 0..24u64 {
        let data = Rng::new(1000 + i).bytes(100_000 + i as usize * 37_000);
        let digest = sha256_digest(&data);
        let resp = try_push_blob(&r, name, &data).await;
        match resp.status().as_u16() {
            201 => pushed.push((digest, data)),
            _ => {
                expect_error(resp, 503, &["UNAVAILABLE"], &format!("push {i} in the storm")).await;
                failed.push(digest);
            }
        }
        for (digest, data) in &pushed {
            let (status, got, broke) = read_what_arrives(&r, name, digest).await;
            let what = format!("GET {digest} in the storm: {status}, {} bytes, broke {broke}", got.len());
            match status {
                StatusCode::OK => {
                    assert!(got == data[..got.len().min(data.len())], "{what}: bytes not the blob's");
                    assert!(got.len() == data.len() || broke, "{what}: cut short without an error");
                }
                s => assert!(s.is_server_error(), "{what}"),
            }
        }
    }
    let injected = faults.injected();
    faults.clear();
    eprintln!("storm: {injected} faults injected, {} pushes stored, {} refused", pushed.len(), failed.len());
    assert!(injected > 10, "the storm injected {injected} faults");
    assert!(!pushed.is_empty() && !failed.is_empty(), "{} pushed, {} failed", pushed.len(), failed.len());
    for (digest, data) in &pushed {
        assert_eq!(&r.get_blob(name, digest).await, data, "{digest} after the storm");
    }
    for digest in &failed {
        assert_blob_absent(&r, name, digest, "a push answered 503").await;
    }
    r.shutdown().await;
}
