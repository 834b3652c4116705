//! Request limits of a running registry (docs/API.md, "Limits"; docs/DECISIONS.md D15):
//!
//! - the per-client rate limit answers 429 `TOOMANYREQUESTS` with `Retry-After` to the
//!   client that went past it, while another client (another loopback source address) is
//!   served;
//! - past the in-flight cap a request queues for a slot, and gets 503 `UNAVAILABLE` with
//!   `Retry-After` when none frees up in time.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Client, StatusCode};
use thaw_registry::{Fault, Faults, Limits, Op, RateLimit, Rule, ServeOptions};

/// A client whose connections leave from `source`.
fn client_from(source: &str) -> Client {
    Client::builder()
        .no_proxy()
        .local_address(source.parse::<IpAddr>().expect("source address"))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

#[tokio::test]
async fn a_client_past_its_rate_gets_429_and_others_are_served() {
    // One request per 10 s after a burst of 5: the bucket cannot refill while the test runs.
    let limits = Limits { rate: Some(RateLimit { per_second: 0.1, burst: 5.0 }), ..Limits::default() };
    let r = TestRegistry::start_with(ServeOptions::default().with_limits(limits)).await;
    // `start_with` polled `/v2/` from 127.0.0.1 until ready: use other sources.
    let greedy = client_from("127.0.0.2");
    let other = client_from("127.0.0.3");
    let base = r.url("/v2/");
    let mut refused = None;
    for i in 0..20 {
        let resp = greedy.get(&base).send().await.expect("GET /v2/");
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some((i, resp));
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK, "request {i} within the burst");
    }
    let (i, resp) = refused.expect("20 requests at once must go past a burst of 5");
    assert_eq!(i, 5, "the burst is 5 requests");
    let retry_after: u64 = header(resp.headers(), "retry-after")
        .expect("429 carries Retry-After")
        .parse()
        .expect("Retry-After in whole seconds");
    assert!((1..=10).contains(&retry_after), "Retry-After {retry_after}: one token takes at most 10 s");
    expect_error(resp, 429, &["TOOMANYREQUESTS"], "past the rate").await;

    // Any route is limited, not only the base.
    let resp = greedy.get(r.url("/v2/some/repo/tags/list")).send().await.expect("GET tags");
    expect_error(resp, 429, &["TOOMANYREQUESTS"], "tags past the rate").await;

    for i in 0..5 {
        let resp = other.get(&base).send().await.expect("GET /v2/ from another client");
        assert_eq!(resp.status(), StatusCode::OK, "another client's request {i}");
    }
    r.shutdown().await;
}

#[tokio::test]
async fn past_the_inflight_cap_requests_queue_then_get_503() {
    // One slot; the request holding it stalls on its store read until released.
    let start = |wait: Duration| async move {
        let faults = Faults::new(1);
        let limits = Limits { max_inflight: 1, inflight_wait: wait, ..Limits::default() };
        let options = ServeOptions::default().with_limits(limits).with_faults(faults.clone());
        let r = Arc::new(TestRegistry::start_with(options).await);
        let blob = Rng::new(9).bytes(100_000);
        let digest = r.push_blob("limits/held", &blob).await;
        faults.add(Rule::on(Op::Get, Fault::Stall).under("repositories/limits/held/"));
        let holder = tokio::spawn({
            let (r, digest) = (r.clone(), digest.clone());
            async move { r.get_blob_digest("limits/held", &digest).await }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while faults.stalled() == 0 {
            assert!(Instant::now() < deadline, "the holding request never reached the store");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (r, faults, holder, (digest, blob.len() as u64))
    };

    // A short wait: the second request is refused with 503 and Retry-After.
    let (r, faults, holder, expect) = start(Duration::from_millis(200)).await;
    let resp = r.get("/v2/").await;
    assert_eq!(header(resp.headers(), "retry-after").as_deref(), Some("1"), "503 carries Retry-After");
    expect_error(resp, 503, &["UNAVAILABLE"], "a request past the in-flight cap").await;
    faults.release_stalls();
    assert_eq!(holder.await.expect("holder"), expect);
    assert_eq!(r.get("/v2/").await.status(), StatusCode::OK, "the slot is free again");

    // A long wait: the second request queues (still unanswered while the slot is held)
    // and is served once the slot frees.
    let (r, faults, holder, expect) = start(Duration::from_secs(60)).await;
    let queued = tokio::spawn({
        let r = r.clone();
        async move { r.get("/v2/").await.status() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "a request past the cap waits for a slot");
    assert!(!holder.is_finished());
    faults.release_stalls();
    assert_eq!(holder.await.expect("holder"), expect);
    assert_eq!(queued.await.expect("queued"), StatusCode::OK, "the queued request is served");
}

#[tokio::test]
async fn every_buffered_body_has_a_limit() {
    // Each request body the registry reads into memory, declared one byte past its limit:
    // refused with 413 `SIZE_INVALID` from the headers alone. (Blob uploads are not here:
    // they stream to the spool file on disk.)
    let r = TestRegistry::start().await;
    let digest = sha256_digest(b"x");
    let cases = [
        ("PUT", "/v2/lim/manifests/v1".to_owned(), MANIFEST_V1, 4 << 20),
        ("POST", "/v2/lim/_thaw/chunks".to_owned(), CHUNKS_TYPE, 64 << 20),
        ("POST", "/v2/lim/_thaw/chunks/missing".to_owned(), "application/json", 8 << 20),
        ("POST", "/v2/lim/_thaw/chunks/missing".to_owned(), "application/vnd.thaw.chunk-ids.v1", 8 << 20),
        ("POST", "/v2/lim/_thaw/chunks/fetch".to_owned(), "application/json", 8 << 20),
        ("PUT", format!("/v2/lim/_thaw/blobs/{digest}"), RECIPE_TYPE, 64 << 20),
        ("PUT", "/v2/_thaw/nodes/node-a".to_owned(), "application/json", 1 << 20),
    ];
    for (method, path, content_type, limit) in cases {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            limit + 1
        );
        let (status, text) = raw_http_early(r.addr(), &head, &[]).await.expect("an answer");
        assert_eq!(status, 413, "{method} {path} ({content_type}) declaring {limit} + 1 bytes: {text}");
        assert!(text.contains("SIZE_INVALID"), "{method} {path}: {text}");
    }
    r.shutdown().await;
}

#[tokio::test]
async fn the_binary_takes_its_limits_from_the_environment() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = dir.path().join("storage");
    let log = dir.path().join("registry.log");
    let env = [("THAW_RATE_LIMIT", "0.1".to_owned()), ("THAW_RATE_BURST", "2".to_owned())];
    let registry = BinRegistry::start_with(storage.as_os_str(), &log, &env).await;
    let c = client_from("127.0.0.2");
    let base = format!("{}/v2/", registry.base);
    for i in 0..2 {
        assert_eq!(c.get(&base).send().await.expect("GET").status(), StatusCode::OK, "request {i}");
    }
    let resp = c.get(&base).send().await.expect("GET");
    expect_error(resp, 429, &["TOOMANYREQUESTS"], "the binary's rate limit").await;
    drop(registry);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thaw-registry"))
        .args(["--listen", "127.0.0.1:0", "--storage"])
        .arg(&storage)
        .env("THAW_MAX_INFLIGHT", "0")
        .output()
        .expect("run thaw-registry");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "THAW_MAX_INFLIGHT=0 must be refused: {stderr}");
    assert!(stderr.contains("THAW_MAX_INFLIGHT"), "the error names the variable: {stderr}");
}
