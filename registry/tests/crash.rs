//! Crash safety of the `thaw-registry` binary: SIGKILL in the middle of a large upload
//! (and in the middle of its commit) never leaves a half-written blob reachable, and the
//! restarted registry accepts the same upload again.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

const PIECE: usize = 1 << 20;
const PIECES: u64 = 200; // 200 MiB
const NAME: &str = "crash/blob";
/// Pieces sent before the body stalls and the registry is killed.
const HOLD_AT: u64 = 64;

/// Piece `i` of the test blob: mostly random, every fifth piece zero.
fn piece(i: u64) -> Vec<u8> {
    if i % 5 == 4 {
        vec![0u8; PIECE]
    } else {
        Rng::new(0xC0FFEE ^ i).bytes(PIECE)
    }
}

fn blob_digest() -> String {
    let mut h = Sha256::new();
    for i in 0..PIECES {
        h.update(piece(i));
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// A streaming request body of the blob; `sent` counts pieces handed to the client.
/// With `hold_at`, the stream stops producing (without ending) after that many pieces, so
/// the upload is guaranteed to be in flight when the registry is killed.
fn streamed_body(sent: Arc<AtomicU64>, hold_at: Option<u64>) -> reqwest::Body {
    let s = futures::stream::unfold(0u64, move |i| {
        let sent = sent.clone();
        async move {
            if i == PIECES {
                return None;
            }
            if Some(i) == hold_at {
                std::future::pending::<()>().await;
            }
            let p = piece(i);
            sent.store(i + 1, Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(p), i + 1))
        }
    });
    reqwest::Body::wrap_stream(s)
}

async fn start_upload(base: &str) -> String {
    let c = client();
    let resp = c
        .post(format!("{base}/v2/{NAME}/blobs/uploads/"))
        .header("Content-Length", "0")
        .send()
        .await
        .expect("POST uploads");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    resolve(base, &location(&resp).expect("Location"))
}

/// Streams the whole blob in one PATCH (no Content-Range); returns the next URL.
async fn stream_all(base: &str, url: &str) -> String {
    let resp = client()
        .patch(url)
        .header("Content-Type", "application/octet-stream")
        .body(streamed_body(Arc::new(AtomicU64::new(0)), None))
        .send()
        .await
        .expect("streamed PATCH");
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "streamed PATCH");
    resolve(base, &location(&resp).expect("Location"))
}

fn links_naming(storage: &Path, digest: &str) -> Vec<std::path::PathBuf> {
    let hex = digest_hex(digest).to_owned();
    list_files(&storage.join("repositories"))
        .into_keys()
        .filter(|p| p.to_string_lossy().contains(&hex))
        .collect()
}

async fn assert_absent_after_restart(base: &str, storage: &Path, digest: &str) {
    assert!(
        links_naming(storage, digest).is_empty(),
        "no link to {digest} may exist: {:?}",
        links_naming(storage, digest)
    );
    let c = client();
    let resp = c.get(format!("{base}/v2/{NAME}/blobs/{digest}")).send().await.unwrap();
    expect_error(resp, 404, &["BLOB_UNKNOWN"], "blob after crash mid-upload").await;
    let resp = c.head(format!("{base}/v2/{NAME}/blobs/{digest}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

async fn upload_and_verify(base: &str, digest: &str) {
    let url = start_upload(base).await;
    let url = stream_all(base, &url).await;
    let resp = client()
        .put(with_query(&url, &[("digest", digest)]))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    assert_reads_back(base, digest).await;
}

async fn assert_reads_back(base: &str, digest: &str) {
    let mut resp = client().get(format!("{base}/v2/{NAME}/blobs/{digest}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(c) = resp.chunk().await.expect("body") {
        n += c.len() as u64;
        h.update(&c);
    }
    assert_eq!(n, PIECES * PIECE as u64, "length read back");
    assert_eq!(format!("sha256:{}", hex::encode(h.finalize())), digest, "bytes read back");
}

#[tokio::test]
async fn sigkill_mid_upload_leaves_nothing_and_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let log = dir.path().join("registry.log");
    let digest = blob_digest();

    let mut reg = BinRegistry::start(&storage, &log).await;
    let url = start_upload(&reg.base).await;
    let old_path = reqwest::Url::parse(&url).unwrap().path().to_owned();

    let sent = Arc::new(AtomicU64::new(0));
    let body = streamed_body(sent.clone(), Some(HOLD_AT));
    let upload = tokio::spawn({
        let url = url.clone();
        async move {
            client().patch(url).header("Content-Type", "application/octet-stream").body(body).send().await
        }
    });
    // Kill once the body is held at 64 MiB and the registry has put at least half of that
    // on disk: the upload is certainly in progress, never complete.
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent.load(Ordering::SeqCst) < HOLD_AT || dir_usage(&storage).1 < 32 << 20 {
        assert!(
            Instant::now() < deadline,
            "upload never got going: {} pieces sent, {} bytes stored",
            sent.load(Ordering::SeqCst),
            dir_usage(&storage).1
        );
        assert!(!upload.is_finished(), "upload ended early: {:?}", upload.await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reg.kill9();
    upload.abort();
    let _ = upload.await;
    assert_eq!(sent.load(Ordering::SeqCst), HOLD_AT, "the body was held until the kill");
    assert!(links_naming(&storage, &digest).is_empty());

    let reg = BinRegistry::start(&storage, &log).await;
    assert_absent_after_restart(&reg.base, &storage, &digest).await;
    // The killed session is gone or still resumable, but never a server error.
    let resp = client().get(format!("{}{old_path}", reg.base)).send().await.unwrap();
    assert!(!resp.status().is_server_error(), "status of the killed session: {}", resp.status());

    upload_and_verify(&reg.base, &digest).await;
    drop(reg);
}

#[tokio::test]
async fn sigkill_during_commit_leaves_blob_absent_or_whole() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let log = dir.path().join("registry.log");
    let digest = blob_digest();

    let mut reg = BinRegistry::start(&storage, &log).await;
    let url = start_upload(&reg.base).await;
    let url = stream_all(&reg.base, &url).await;
    // Send the closing PUT (which verifies, chunks and links) and kill while it runs.
    let commit = tokio::spawn({
        let put = with_query(&url, &[("digest", &digest)]);
        async move { client().put(put).header("Content-Length", "0").send().await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    reg.kill9();
    // Did the registry acknowledge the commit before it died?
    let acked = matches!(
        tokio::time::timeout(Duration::from_secs(30), commit).await,
        Ok(Ok(Ok(resp))) if resp.status() == StatusCode::CREATED
    );

    let reg = BinRegistry::start(&storage, &log).await;
    let resp = client().head(format!("{}/v2/{NAME}/blobs/{digest}", reg.base)).send().await.unwrap();
    println!("crash during commit: acknowledged before kill {acked}, HEAD after restart {}", resp.status());
    match resp.status() {
        StatusCode::OK => assert_reads_back(&reg.base, &digest).await,
        StatusCode::NOT_FOUND => {
            assert!(!acked, "the commit answered 201 before the kill, yet the blob is gone");
            assert_absent_after_restart(&reg.base, &storage, &digest).await;
            upload_and_verify(&reg.base, &digest).await;
        }
        s => panic!("HEAD of the blob after a crash during commit: {s}"),
    }
    drop(reg);
}
