//! Swarming on simultaneous cold pulls (docs/DECISIONS.md D19), end to end: real
//! `thaw-node-cache` processes, all cold, ensuring the same snapshot at the same moment
//! through a byte-counting proxy in front of a thaw-registry on loopback. The registry must
//! send about one copy, every node's files must verify, and a member that dies or lies must
//! cost time, not correctness. Bitmap and chunk requests without the token are refused.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::common::{serve_raw, RawRequest, RawResponse};
use support::{assert_files, bytes_from, proxy, push, NodeCache, Pushed, SnapshotData, ThawRegistry};

const TOKEN: &str = "test-cluster-token-0123456789";

fn token_file(dir: &std::path::Path) -> String {
    let path = dir.join("peer-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path.display().to_string()
}

/// A snapshot of several fetch batches (16 MiB each) in its memory file.
fn snapshot() -> SnapshotData {
    SnapshotData::new(12 * 1024, 1024, 7)
}

/// Registry bytes of one node pulling `pushed` alone (P2P off) through the proxy at `via`
/// counting into `counted`, which is zero again after.
async fn one_copy(via: &str, counted: &AtomicU64, pushed: &Pushed) -> u64 {
    counted.store(0, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let alone = NodeCache::start(via, dir.path(), 1 << 30, "alone").await;
    let answer = alone.ensure(&pushed.reference).await;
    assert_files(&answer, &pushed.data);
    counted.swap(0, Ordering::SeqCst)
}

/// Starts `n` P2P node caches (`swarm-0`…) against `registry`.
async fn swarm(registry: &str, n: usize, token: &str, dirs: &[tempfile::TempDir]) -> Vec<NodeCache> {
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate().take(n) {
        let args = ["--peer-token-file", token, "--peer-listen", "auto"];
        nodes.push(NodeCache::start_with(registry, dir.path(), 1 << 30, &format!("swarm-{i}"), &args).await);
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_cold_nodes_at_once_take_about_one_copy_from_the_registry() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    // Every byte to and from the registry goes through the proxy (references name it).
    let counted = Arc::new(AtomicU64::new(0));
    let via = proxy(host.clone(), counted.clone(), Duration::ZERO).await;
    let pushed = push(&via, "fn/swarm:v1", snapshot()).await;
    let copy = one_copy(&via, &counted, &pushed).await;
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = swarm(&via, 4, &token, &dirs).await;
    let answers = futures::future::join_all(nodes.iter().map(|n| n.ensure(&pushed.reference))).await;
    let mut from_peers = 0;
    for a in &answers {
        assert_files(a, &pushed.data);
        from_peers += bytes_from(a, "peers");
    }
    let sent = counted.load(Ordering::SeqCst);
    eprintln!(
        "4 nodes at once: registry sent {sent} bytes ({:.2} copies of {copy}); {from_peers} bytes between peers",
        sent as f64 / copy as f64
    );
    assert!(sent * 4 <= copy * 5, "registry sent {sent} bytes, more than 1.25 x one copy ({copy})");
    assert!(from_peers > 0, "no chunk went between the nodes");

    // The bitmap of a held snapshot: complete, with the token; refused without.
    let digest = answers[0]["digest"].as_str().unwrap();
    let blob = thaw_schema::Sha256Digest::of(&pushed.data.memory);
    let peer = nodes[1].peer_addr.clone().unwrap();
    let http = reqwest::Client::new();
    let path = format!("http://{peer}/v1/peer/snapshots/{digest}/blobs/{blob}/bitmap");
    let refused = http.get(&path).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401, "a bitmap without the token");
    let wrong = http.get(&path).bearer_auth("not-the-cluster-token-000").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401, "a bitmap with a wrong token");
    let chunks = http.post(format!("http://{peer}/v1/peer/chunks")).body(vec![0u8; 8]).send().await.unwrap();
    assert_eq!(chunks.status().as_u16(), 401, "chunks without the token");
    let ok = http.get(&path).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert!(ok.headers().contains_key("thaw-snapshot-complete"), "{:?}", ok.headers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_dies_mid_transfer_costs_time_not_correctness() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    // Slow enough that the transfer is under way when a member dies.
    let counted = Arc::new(AtomicU64::new(0));
    let via = proxy(host.clone(), counted.clone(), Duration::from_millis(2)).await;
    let pushed = push(&via, "fn/swarm:v1", snapshot()).await;
    counted.store(0, Ordering::SeqCst);
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = swarm(&via, 4, &token, &dirs).await;
    let mut victim = nodes.pop().unwrap();
    let reference = pushed.reference.clone();
    let survivors = tokio::spawn(async move {
        let answers = futures::future::join_all(nodes.iter().map(|n| n.ensure(&reference))).await;
        drop(nodes);
        answers
    });
    let victim_pull = {
        let r = pushed.reference.clone();
        let url = victim.url("/v1/snapshots/ensure");
        tokio::spawn(async move {
            let _ = reqwest::Client::new().post(url).json(&json!({"reference": r})).send().await;
        })
    };
    // Until the registry has sent some bytes of the snapshot (not a timing assertion).
    while counted.load(Ordering::SeqCst) < 2 << 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill();
    victim_pull.abort();
    for a in survivors.await.unwrap() {
        assert_files(&a, &pushed.data);
    }
}

/// A swarm member that claims every chunk of every blob and answers every chunk request
/// with garbage.
async fn liar() -> String {
    serve_raw(Arc::new(|req: &RawRequest| {
        if req.path.ends_with("/bitmap") {
            RawResponse { status: 200, headers: vec![], body: vec![0xff; 4096], declared: None }
        } else {
            let mut body = thaw_schema::batch::BATCH_MAGIC.to_vec();
            body.extend_from_slice(&[0x5a; 64]);
            RawResponse { status: 200, headers: vec![], body, declared: None }
        }
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_serves_corrupt_chunks_costs_time_not_correctness() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let pushed = push(&host, "fn/swarm:v1", snapshot()).await;
    let manifest_digest = {
        let dir = tempfile::tempdir().unwrap();
        let probe = NodeCache::start(&host, dir.path(), 1 << 30, "probe").await;
        let a = probe.ensure(&pushed.reference).await;
        // The probe published no peer endpoint, so it takes no part; drop it from the directory.
        a["digest"].as_str().unwrap().to_owned()
    };
    // The liar announces the snapshot as in progress, with a peer endpoint.
    let endpoint = liar().await;
    let body = json!({
        "node": "liar", "peerEndpoint": endpoint, "capacityBytes": 1u64 << 30, "usedBytes": 0,
        "snapshots": [{"reference": pushed.reference, "digest": manifest_digest, "sizeBytes": 1000, "cachedBytes": 0}]
    });
    let put = reqwest::Client::new()
        .put(format!("http://{host}/v2/_thaw/nodes/liar"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "PUT liar: {}", put.status());

    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = swarm(&host, 3, &token, &dirs).await;
    let answers = futures::future::join_all(nodes.iter().map(|n| n.ensure(&pushed.reference))).await;
    for a in &answers {
        assert_files(a, &pushed.data);
    }
    let mut corrupt = 0;
    for n in &nodes {
        let text = reqwest::get(n.url("/metrics")).await.unwrap().text().await.unwrap();
        corrupt += text
            .lines()
            .find_map(|l| l.strip_prefix("thaw_cache_peer_failures_total{reason=\"corrupt\"} "))
            .map_or(0, |v| v.parse::<u64>().unwrap());
    }
    eprintln!("corrupt answers caught: {corrupt}");
    assert!(corrupt > 0, "no node asked the liar, so the test tested nothing");
}

/// A swarm member prefetches only what it lacks: with the previous revision cached, the
/// registry sends a P2P node no more than it sends a node with P2P off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_previous_revision_cached_a_p2p_node_fetches_only_what_it_lacks() {
    let registry = ThawRegistry::start().await;
    let counted = Arc::new(AtomicU64::new(0));
    let via = proxy(registry.host(), counted.clone(), Duration::ZERO).await;
    let v1 = push(&via, "fn/rev:v1", snapshot()).await;
    let v2 = push(&via, "fn/rev:v2", support::revision(&v1.data, 16, 9)).await;
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let mut sent = Vec::new();
    for p2p in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<&str> =
            if p2p { vec!["--peer-token-file", &token, "--peer-listen", "auto"] } else { vec![] };
        let node = NodeCache::start_with(&via, dir.path(), 1 << 30, &format!("rev-{p2p}"), &args).await;
        assert_files(&node.ensure(&v1.reference).await, &v1.data);
        counted.store(0, Ordering::SeqCst);
        assert_files(&node.ensure(&v2.reference).await, &v2.data);
        sent.push(counted.swap(0, Ordering::SeqCst));
    }
    eprintln!(
        "revision 2 with revision 1 cached: registry sent {} bytes (P2P off), {} (P2P on)",
        sent[0], sent[1]
    );
    let copy = one_copy(&via, &counted, &v2).await;
    assert!(sent[0] * 4 < copy, "the test needs a small change: {} of {copy} bytes", sent[0]);
    assert!(
        sent[1] * 10 <= sent[0] * 11,
        "P2P on: {} bytes, more than 1.1 x the {} with P2P off",
        sent[1],
        sent[0]
    );
}
