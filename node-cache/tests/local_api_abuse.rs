//! The local API as a hostile caller on the node uses it (issue 18, finding 8): publish and
//! every call that takes a reference reach only the cache's own registry, publish reads only
//! under `--publish-root`, leases expire unless renewed, and a lease survives a SIGKILL
//! right after `ensure` answered. Options go through the environment (`THAW_LEASE_TTL`,
//! `THAW_PUBLISH_ROOT`) so that each test also runs, and fails, against a binary that
//! lacks them.

mod support;

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{push, NodeCache, SnapshotData, ThawRegistry};

/// A TCP listener that counts the connections it accepts and closes each at once.
fn recording_listener() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (addr, count)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_references_reach_only_the_configured_registry_and_root() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let (evil, connections) = recording_listener();
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("publish");
    let inside = root.join("snap-1");
    let outside = base.path().join("elsewhere");
    let data = SnapshotData::new(256, 64, 7);
    data.write(&inside);
    data.write(&outside);
    let cache_dir = base.path().join("cache");
    let node = NodeCache::start_env(
        &host,
        &cache_dir,
        1 << 30,
        "node-abuse",
        &[("THAW_PUBLISH_ROOT", root.to_str().unwrap())],
    )
    .await;
    let inside_s = inside.to_str().unwrap();

    // Another host, spelled every way a reference can carry one: refused, no connection.
    let digest = "sha256:".to_owned() + &"ab".repeat(32);
    let foreign = [
        format!("{evil}/team-b/stolen:v1"),
        format!("{evil}/team-b/stolen@{digest}"),
        format!("{evil}/{host}/stolen:v1"),
        format!("localhost:{}/stolen:v1", evil.rsplit_once(':').unwrap().1),
    ];
    for reference in &foreign {
        for (path, body) in [
            ("/v1/snapshots/publish", json!({"reference": reference, "dir": inside_s})),
            ("/v1/snapshots/ensure", json!({"reference": reference})),
            ("/v1/snapshots/prefetch", json!({"reference": reference})),
            ("/v1/snapshots/release", json!({"reference": reference})),
        ] {
            let (status, answer) = node.post(path, body).await;
            assert_eq!(status, 400, "{path} {reference}: {answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("this cache pulls from") || message.contains("not a valid"),
                "{path} {reference}: the refusal should say why: {answer}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(connections.load(Ordering::SeqCst), 0, "a connection reached the foreign host");

    // The configured registry, but a directory outside the publish root (directly, through
    // `..`, or through a symbolic link): refused.
    let reference = format!("{host}/fn/published:v1");
    let escapes = [
        outside.to_str().unwrap().to_owned(),
        format!("{}/../elsewhere", root.display()),
        cache_dir.to_str().unwrap().to_owned(),
        "/etc".to_owned(),
    ];
    for dir in &escapes {
        let (status, answer) =
            node.post("/v1/snapshots/publish", json!({"reference": reference, "dir": dir})).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{dir}: {answer}");
    }
    let linked = root.join("snap-2");
    std::fs::create_dir_all(&linked).unwrap();
    for (name, _) in data.files() {
        std::os::unix::fs::symlink(outside.join(name), linked.join(name)).unwrap();
    }
    let (status, answer) = node
        .post("/v1/snapshots/publish", json!({"reference": reference, "dir": linked.to_str().unwrap()}))
        .await;
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{answer}");

    // Within both bounds: published, and ensure finds it.
    let (status, published) =
        node.post("/v1/snapshots/publish", json!({"reference": reference, "dir": inside_s})).await;
    assert_eq!(status, 200, "{published}");
    let hit = node.ensure(&reference).await;
    assert_eq!(hit["digest"], published["digest"]);
    support::assert_files(&hit, &data);
    assert_eq!(connections.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_off_without_a_publish_root() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let base = tempfile::tempdir().unwrap();
    let snapshot = base.path().join("snap");
    SnapshotData::new(64, 16, 3).write(&snapshot);
    let node = NodeCache::start(&host, &base.path().join("cache"), 1 << 30, "node-nopub").await;
    let (status, answer) = node
        .post(
            "/v1/snapshots/publish",
            json!({"reference": format!("{host}/fn/x:v1"), "dir": snapshot.to_str().unwrap()}),
        )
        .await;
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("--publish-root"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_expires_and_frees_its_capacity() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let a = push(&host, "fn/lease-a:v1", SnapshotData::new(1024, 256, 11)).await;
    let b = push(&host, "fn/lease-b:v1", SnapshotData::new(1024, 256, 12)).await;
    let dir = tempfile::tempdir().unwrap();
    // Room for one of these snapshots and its lease's disk copy, not for two.
    let capacity = 11 << 19;
    let ttl_secs = 2;
    let node =
        NodeCache::start_env(&host, dir.path(), capacity, "node-ttl", &[("THAW_LEASE_TTL", "2")]).await;

    // A crashed orchestrator: ensure, then nothing. The lease pins A for now.
    let held = node.ensure(&a.reference).await;
    let (status, answer) = node.post("/v1/snapshots/ensure", json!({"reference": b.reference})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (507, Some("NO_SPACE")), "{answer}");

    // Past the TTL (and a reaper round) the cache releases the lease itself.
    tokio::time::sleep(Duration::from_secs(ttl_secs + 2)).await;
    let listing = node.get("/v1/snapshots").await;
    assert_eq!(listing["snapshots"][0]["leases"], 0, "the lease outlived its TTL: {listing}");
    let (status, answer) =
        node.post("/v1/snapshots/release", json!({"lease": held["lease"].as_str().unwrap()})).await;
    assert_eq!(status, 404, "an expired lease is gone: {answer}");
    let got_b = node.ensure(&b.reference).await;
    assert!(!node.cached().await.contains(&held["digest"].as_str().unwrap().to_owned()), "A was evicted");

    // The answer says when the lease ends; renewing keeps it past that.
    let expires = got_b["lease_expires_ms"].as_u64().expect("ensure answers lease_expires_ms");
    let asked = now_ms();
    assert!(expires > asked && expires <= asked + ttl_secs * 1000 + 1000, "expiry {expires}, now {asked}");
    let lease = got_b["lease"].as_str().unwrap().to_owned();
    let until = Instant::now() + Duration::from_secs(ttl_secs * 2);
    let mut last = expires;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, renewed) = node.post("/v1/snapshots/renew", json!({"lease": lease})).await;
        assert_eq!(status, 200, "{renewed}");
        let next = renewed["lease_expires_ms"].as_u64().unwrap();
        assert!(next >= last, "a renewal moved the expiry back: {next} < {last}");
        last = next;
    }
    let listing = node.get("/v1/snapshots").await;
    assert_eq!(listing["snapshots"][0]["leases"], 1, "a renewed lease expired: {listing}");
    let (status, answer) = node.post("/v1/snapshots/renew", json!({"lease": "no-such-lease"})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("NOT_FOUND")), "{answer}");
    // Unrenewed again: it ends.
    tokio::time::sleep(Duration::from_secs(ttl_secs + 2)).await;
    let listing = node.get("/v1/snapshots").await;
    assert_eq!(listing["snapshots"][0]["leases"], 0, "{listing}");
    let (status, _) = node.post("/v1/snapshots/renew", json!({"lease": lease})).await;
    assert_eq!(status, 404, "an expired lease cannot be renewed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_survives_sigkill_right_after_ensure_answered() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let a = push(&host, "fn/durable:v1", SnapshotData::new(512, 64, 21)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeCache::start(&host, dir.path(), 1 << 30, "node-durable").await;
    // A miss, then a warm hit: each lease must be on disk before its answer.
    let mut leases = Vec::new();
    for round in 0..2 {
        let answer = node.ensure(&a.reference).await;
        assert_eq!(answer["hit"], round == 1, "{answer}");
        leases.push(answer["lease"].as_str().unwrap().to_owned());
        node.kill();
        node.restart().await;
        let listing = node.get("/v1/snapshots").await;
        assert_eq!(
            listing["snapshots"][0]["leases"],
            leases.len(),
            "round {round}: a lease was lost: {listing}"
        );
    }
    for lease in &leases {
        node.release(lease).await;
    }
    let listing = node.get("/v1/snapshots").await;
    assert_eq!(listing["snapshots"][0]["leases"], 0, "{listing}");
}
