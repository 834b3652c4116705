//! Lazy restore end to end: a `thaw-registry` process, a `thaw-node-cache` process, and a
//! stand-in for Firecracker that hands its guest memory's userfaultfd to the node cache's
//! page server exactly as Firecracker does (`support/firecracker_stand_in.rs`), then touches
//! pages from several threads and compares every one with the memory file pushed.
//!
//! Every wait is bounded: a page that never comes fails the test instead of hanging it.
//!
//! Most tests replay a synthetic access pattern over synthetic memory; one replays a real
//! guest's: a snapshot of the quick corpus and the pages its restored guest touched serving
//! one request (recorded by `integration/corpus/make-corpus.sh --quick`, which
//! `scripts/test.sh` runs in its corpus stage, before this one).

mod support;

#[path = "support/fault_trace.rs"]
mod fault_trace;
#[path = "support/firecracker_stand_in.rs"]
mod firecracker_stand_in;
#[path = "support/lazy.rs"]
mod lazy_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use fault_trace::FaultTrace;
use firecracker_stand_in::{FirecrackerStandIn, PAGE};
use lazy_support::{
    access_trace, ensure_lazy, metric, metrics, touch_and_check, wait_cached, PAGES_DEADLINE,
};
use serde_json::{json, Value};
use support::common::{serve_raw, RawRequest, RawResponse};
use support::{push, NodeCache, RegistryProcess, SnapshotData};
use thaw_schema::batch::{encode_entry, BATCH_MAGIC};
use thaw_schema::dto::decode_chunk_id_query;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::ChunkId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_served_by_fault_is_the_memory_files_and_the_snapshot_completes() {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    let pages = 4096; // 16 MiB of guest memory
    let snap = push(&host, "fn/lazy:v1", SnapshotData::new(pages, 256, 7)).await;
    let memory = Arc::new(snap.data.memory.clone());
    let zero_pages = memory.chunks(PAGE).filter(|p| p.iter().all(|b| *b == 0)).count();
    assert!(zero_pages > pages / 10, "the test memory should have zero pages: {zero_pages}");
    let dir = tempfile::tempdir().unwrap();
    let node = NodeCache::start(&host, dir.path(), 1 << 30, "node-lazy").await;

    let answer = ensure_lazy(&node, &snap.reference).await;
    assert_eq!(answer["hit"], false, "{answer}");
    let socket = answer["memory_socket"].as_str().expect("a memory socket").to_owned();
    assert!(answer["files"].get("memory").is_none(), "no memory file yet: {answer}");
    for (role, bytes) in
        [("vmstate", &snap.data.vmstate), ("info", &snap.data.info), ("disk", &snap.data.disk)]
    {
        let path = answer["files"][role].as_str().unwrap_or_else(|| panic!("no {role}: {answer}"));
        assert!(std::fs::read(path).unwrap() == **bytes, "{role} differs");
    }
    let digest = answer["digest"].as_str().unwrap().to_owned();

    // Two regions, as an x86 guest above and below its PCI hole has.
    let vm = Arc::new(
        FirecrackerStandIn::load(socket.as_ref(), memory.len(), &[memory.len() / 2 + 37 * PAGE])
            .expect("handshake"),
    );
    touch_and_check(&vm, &memory, access_trace(pages, 11), 4, PAGES_DEADLINE);
    touch_and_check(&vm, &memory, (0..pages).map(|p| p * PAGE).collect(), 2, PAGES_DEADLINE);

    // One fill per unit, not per page: never more copies and zero fills than recipe entries
    // (plus one for the unit the region boundary cuts).
    let recipes = support::recipes(&snap.reference).await;
    let recipe = recipes.iter().find(|r| r.size == memory.len() as u64).expect("the memory file's recipe");
    let text = metrics(&node).await;
    let fills = metric(&text, "thaw_lazy_copies_total") + metric(&text, "thaw_lazy_zero_fills_total");
    assert!(
        fills <= recipe.entries.len() as u64 + 1,
        "{fills} fills for {} recipe entries",
        recipe.entries.len()
    );
    assert!(metric(&text, "thaw_lazy_zero_fills_total") > 0, "zero runs should be zero-filled");
    assert_eq!(metric(&text, "thaw_lazy_copied_bytes_total") % PAGE as u64, 0);

    // The balloon takes pages back: they read as zeros from then on, not as the file's bytes.
    let data_page = (0..pages).find(|p| memory[p * PAGE..(p + 1) * PAGE].iter().any(|b| *b != 0)).unwrap();
    assert_balloon_zeroes(&vm, data_page * PAGE);

    // The background fill completes the snapshot: the next ensure is an ordinary hit.
    wait_cached(&node, &digest).await;
    let hit = node.ensure(&snap.reference).await;
    assert_eq!(hit["hit"], true);
    support::assert_files(&hit, &snap.data);

    // A lazy ensure of the cached snapshot serves its memory file by fault too, straight
    // from the file: touched last page first, every unit's faulting page is filled before
    // the pages around it; the unit the region boundary cuts is served by a task.
    let again = ensure_lazy(&node, &snap.reference).await;
    assert_eq!(again["hit"], true);
    let second = Arc::new(
        FirecrackerStandIn::load(
            again["memory_socket"].as_str().unwrap().as_ref(),
            memory.len(),
            &[memory.len() / 2 + 5 * PAGE],
        )
        .expect("handshake"),
    );
    let before = metrics(&node).await;
    touch_and_check(&second, &memory, (0..pages).rev().map(|p| p * PAGE).collect(), 3, PAGES_DEADLINE);
    let after = metrics(&node).await;
    let delta = |name| metric(&after, name) - metric(&before, name);
    let units = delta("thaw_lazy_units_served_total");
    assert!(units > 0);
    // Reported, not asserted (timing is for benchmarks): units served from the local file.
    eprintln!(
        "cached snapshot by fault: {units} units, mean service {} µs from first fault to fill",
        delta("thaw_lazy_unit_service_microseconds_total") / units
    );
    // The balloon works on a cached snapshot's VM as well.
    assert_balloon_zeroes(&second, data_page * PAGE);
    // The leases' copies and the recorded snapshot are all accounted for.
    let disk = node.get("/v1/disk").await;
    assert_eq!(disk["allocated_on_disk"], disk["used_by_index"], "disk usage and the index disagree: {disk}");
    node.release(again["lease"].as_str().unwrap()).await;
    node.release(answer["lease"].as_str().unwrap()).await;
}

/// Has the balloon take back the page at `offset` of `vm`, then checks that it is served
/// again, as zeros, not as the file's bytes.
fn assert_balloon_zeroes(vm: &Arc<FirecrackerStandIn>, offset: usize) {
    vm.balloon_remove(offset, 1);
    let (tx, rx) = mpsc::channel();
    let reader = vm.clone();
    std::thread::spawn(move || tx.send(reader.read_page(offset)).unwrap());
    let after = rx.recv_timeout(PAGES_DEADLINE).expect("a removed page was not served again");
    assert!(after.iter().all(|b| *b == 0), "a page removed by the balloon came back with data");
}

/// What the proxy in front of the registry does.
const PASS: u8 = 0;
const CORRUPT: u8 = 1;
const DOWN: u8 = 2;
/// Pass bytes through without pausing.
const FAST: u8 = 3;
/// Keep connections open but pass no answer on (a registry that stalls).
const STALL: u8 = 4;

/// A TCP proxy to `upstream` whose behaviour the test switches: pass bytes through,
/// flip a byte in every piece of answer it passes (a registry that lies), or cut every
/// connection and refuse new ones (a registry that failed), or swallow every answer (a
/// registry that stalls). It pauses `pace` after every
/// piece of answer, so that the background fill is still running when the test acts.
async fn switchable_proxy(upstream: String, mode: Arc<AtomicU8>, pace: Duration) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            if mode.load(Ordering::SeqCst) == DOWN {
                continue;
            }
            let (upstream, mode) = (upstream.clone(), mode.clone());
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let (mut down_r, mut down_w) = down.into_split();
                let (mut up_r, mut up_w) = up.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match tokio::time::timeout(Duration::from_millis(200), up_r.read(&mut buf)).await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => n,
                        Err(_) if mode.load(Ordering::SeqCst) == DOWN => break,
                        Err(_) => continue,
                    };
                    match mode.load(Ordering::SeqCst) {
                        DOWN => break,
                        STALL => continue,
                        CORRUPT if n > 512 => buf[n - 100] ^= 0x5a,
                        _ => {}
                    }
                    if down_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if mode.load(Ordering::SeqCst) != FAST {
                        tokio::time::sleep(pace).await;
                    }
                }
                requests.abort();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_lies_fails_and_stalls_mid_restore_never_delivers_a_wrong_page() {
    let registry = RegistryProcess::start().await;
    let pages = 8192; // 32 MiB: still being filled when the registry goes bad
    let snap = push(&registry.host(), "fn/flaky:v1", SnapshotData::new(pages, 128, 21)).await;
    let memory = Arc::new(snap.data.memory.clone());
    let mode = Arc::new(AtomicU8::new(PASS));
    let proxy = switchable_proxy(registry.host(), mode.clone(), Duration::from_millis(5)).await;
    let reference = snap.reference.replacen(&registry.host(), &proxy, 1);
    let dir = tempfile::tempdir().unwrap();
    let node = NodeCache::start(&proxy, dir.path(), 1 << 30, "node-flaky").await;

    let answer = ensure_lazy(&node, &reference).await;
    let socket = answer["memory_socket"].as_str().unwrap().to_owned();
    // From here on the registry lies about every chunk, then is gone, then stalls, then
    // comes back: faults wait (bounded by the fetch timeout, then retried) and never get
    // a page that does not match its chunk id.
    mode.store(CORRUPT, Ordering::SeqCst);
    let vm = Arc::new(FirecrackerStandIn::load(socket.as_ref(), memory.len(), &[]).expect("handshake"));
    let trace = access_trace(pages, 5);
    let (tx, rx) = mpsc::channel();
    {
        let (vm, memory) = (vm.clone(), memory.clone());
        std::thread::spawn(move || {
            // Panics (and so never sends) if a page differs.
            touch_and_check(&vm, &memory, trace, 4, PAGES_DEADLINE);
            let _ = tx.send(());
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    mode.store(DOWN, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    mode.store(STALL, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = metrics(&node).await;
    assert!(
        metric(&text, "thaw_lazy_fetch_failures_total") > 0,
        "the faults should have met failures: {text}"
    );
    mode.store(PASS, Ordering::SeqCst);
    tokio::task::spawn_blocking(move || rx.recv_timeout(PAGES_DEADLINE))
        .await
        .unwrap()
        .expect("the traced pages were not all served (or one differed) once the registry was back");
    touch_and_check(&vm, &memory, (0..pages).map(|p| p * PAGE).collect(), 2, PAGES_DEADLINE);
    wait_cached(&node, answer["digest"].as_str().unwrap()).await;
    let hit = node.ensure(&reference).await;
    assert_eq!(hit["hit"], true);
    support::assert_files(&hit, &snap.data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_lazy_restore_leaves_the_cache_consistent() {
    let registry = RegistryProcess::start().await;
    let pages = 8192;
    let snap = push(&registry.host(), "fn/crash:v1", SnapshotData::new(pages, 128, 33)).await;
    let mode = Arc::new(AtomicU8::new(PASS));
    // The paced proxy keeps the background fill running long enough to kill the cache in it.
    let proxy = switchable_proxy(registry.host(), mode.clone(), Duration::from_millis(50)).await;
    let reference = snap.reference.replacen(&registry.host(), &proxy, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeCache::start(&proxy, dir.path(), 1 << 30, "node-crash").await;

    let answer = ensure_lazy(&node, &reference).await;
    let digest = answer["digest"].as_str().unwrap().to_owned();
    let vm = Arc::new(
        FirecrackerStandIn::load(
            answer["memory_socket"].as_str().unwrap().as_ref(),
            snap.data.memory.len(),
            &[],
        )
        .expect("handshake"),
    );
    let memory = Arc::new(snap.data.memory.clone());
    touch_and_check(&vm, &memory, access_trace(pages, 9), 2, PAGES_DEADLINE);
    assert!(!node.cached().await.contains(&digest), "the fill should still be running (paced proxy)");
    node.kill();
    drop(vm);

    node.restart().await;
    let disk = node.get("/v1/disk").await;
    assert_eq!(disk["allocated_on_disk"], disk["used_by_index"], "disk usage and the index disagree: {disk}");
    assert_eq!(std::fs::read_dir(dir.path().join("work")).unwrap().count(), 0, "work in progress survived");
    assert!(node.cached().await.is_empty(), "a half-filled snapshot is listed");
    mode.store(FAST, Ordering::SeqCst);
    let eager = node.ensure(&reference).await;
    support::assert_files(&eager, &snap.data);
}

/// Waits until the registry's node directory shows `node` holding all of `digest` (not
/// only announcing it in progress) with a peer endpoint.
async fn wait_for_holdings(host: &str, node: &str, digest: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let url = format!("http://{host}/v2/_thaw/nodes");
        let d: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        let found = d["nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().any(|n| {
                n["node"] == node
                    && n["peerEndpoint"].is_string()
                    && n["snapshots"].as_array().is_some_and(|s| {
                        s.iter().any(|s| s["digest"] == digest && s["cachedBytes"] == s["sizeBytes"])
                    })
            })
        });
        if found {
            return;
        }
        assert!(Instant::now() < deadline, "{node} never published {digest}: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_restore_takes_its_pages_from_a_peer_before_the_registry() {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    let pages = 4096;
    let snap = push(&host, "fn/peer:v1", SnapshotData::new(pages, 128, 44)).await;
    let memory = Arc::new(snap.data.memory.clone());
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("peer-token");
    std::fs::write(&token, "test-cluster-token-0123456789\n").unwrap();
    let token = token.display().to_string();
    let args = ["--peer-token-file", token.as_str(), "--peer-listen", "auto"];
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = NodeCache::start_with(&host, dirs.0.path(), 1 << 30, "node-a", &args).await;
    let b = NodeCache::start_with(&host, dirs.1.path(), 1 << 30, "node-b", &args).await;
    let held = a.ensure(&snap.reference).await;
    let digest = held["digest"].as_str().unwrap().to_owned();
    wait_for_holdings(&host, "node-a", &digest).await;

    let answer = ensure_lazy(&b, &snap.reference).await;
    let vm = Arc::new(
        FirecrackerStandIn::load(answer["memory_socket"].as_str().unwrap().as_ref(), memory.len(), &[])
            .expect("handshake"),
    );
    touch_and_check(&vm, &memory, (0..pages).map(|p| p * PAGE).collect(), 2, PAGES_DEADLINE);
    wait_cached(&b, &digest).await;
    let text = metrics(&b).await;
    let from_peers = metric(&text, "thaw_lazy_bytes_total{source=\"peers\"}");
    let from_registry = metric(&text, "thaw_lazy_bytes_total{source=\"registry\"}");
    assert!(from_peers > 0, "no memory came from the peer holding the snapshot");
    assert_eq!(from_registry, 0, "memory came from the registry though a peer held all of it");
    let hit = b.ensure(&snap.reference).await;
    assert_eq!(hit["hit"], true);
    support::assert_files(&hit, &snap.data);
}

/// A fake peer answering every chunk request with well-formed frames of the right lengths
/// holding the wrong bytes; counts the requests.
async fn lying_peer(lens: Arc<std::collections::HashMap<ChunkId, u32>>, asked: Arc<AtomicUsize>) -> String {
    serve_raw(Arc::new(move |req: &RawRequest| {
        asked.fetch_add(1, Ordering::SeqCst);
        let mut body = BATCH_MAGIC.to_vec();
        for id in decode_chunk_id_query(&req.body).unwrap_or_default() {
            let len = lens.get(&id).copied().unwrap_or(4096) as usize;
            let fake: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            encode_entry(&mut body, &id, &EncodedChunk::compress(&fake, 1));
        }
        RawResponse {
            status: 200,
            headers: vec![("content-type", "application/vnd.thaw.chunks.v1".into())],
            body,
            declared: None,
        }
    }))
    .await
}

/// A fake peer that accepts connections and never answers; counts the connections.
async fn stalling_peer(asked: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            asked.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_and_stalling_peers_never_deliver_a_wrong_page() {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    let pages = 4096;
    let snap = push(&host, "fn/liars:v1", SnapshotData::new(pages, 128, 55)).await;
    let memory = Arc::new(snap.data.memory.clone());
    let lens: Arc<std::collections::HashMap<ChunkId, u32>> = Arc::new(
        support::recipes(&snap.reference)
            .await
            .iter()
            .flat_map(|r| r.entries.iter())
            .filter_map(|e| e.chunk_id().map(|id| (*id, e.byte_len())))
            .collect(),
    );
    let asked: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let endpoints = [lying_peer(lens, asked[0].clone()).await, stalling_peer(asked[1].clone()).await];
    let digest = {
        let reference = thaw_client::Reference::parse(&snap.reference).unwrap();
        let client = support::common::client_for(&reference);
        client.get_manifest(reference.repository(), "v1").await.unwrap().digest.to_string()
    };
    // Both claim to hold the whole snapshot in the node directory.
    for (name, endpoint) in ["liar-bytes", "liar-stall"].iter().zip(&endpoints) {
        let body = json!({"node": name, "peerEndpoint": endpoint, "capacityBytes": 1u64 << 30, "usedBytes": 0,
            "snapshots": [{"reference": snap.reference, "digest": digest, "sizeBytes": 1000, "cachedBytes": 1000}]});
        let r = reqwest::Client::new()
            .put(format!("http://{host}/v2/_thaw/nodes/{name}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "PUT node {name}: {}", r.status());
    }
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("peer-token");
    std::fs::write(&token, "test-cluster-token-0123456789\n").unwrap();
    let token = token.display().to_string();
    let args = ["--peer-token-file", token.as_str(), "--peer-timeout-ms", "1500"];
    let dir = tempfile::tempdir().unwrap();
    let node = NodeCache::start_with(&host, dir.path(), 1 << 30, "node-b", &args).await;

    let answer = ensure_lazy(&node, &snap.reference).await;
    let vm = Arc::new(
        FirecrackerStandIn::load(answer["memory_socket"].as_str().unwrap().as_ref(), memory.len(), &[])
            .expect("handshake"),
    );
    touch_and_check(&vm, &memory, access_trace(pages, 3), 4, PAGES_DEADLINE);
    touch_and_check(&vm, &memory, (0..pages).map(|p| p * PAGE).collect(), 2, PAGES_DEADLINE);
    let seen: Vec<usize> = asked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    assert!(seen.iter().all(|n| *n >= 1), "both bad peers were asked: {seen:?}");
    let text = metrics(&node).await;
    assert_eq!(
        metric(&text, "thaw_lazy_bytes_total{source=\"peers\"}"),
        0,
        "a lying peer's bytes were taken"
    );
    assert!(metric(&text, "thaw_lazy_bytes_total{source=\"registry\"}") > 0);
    wait_cached(&node, &digest).await;
    support::assert_files(&node.ensure(&snap.reference).await, &snap.data);
}

/// A snapshot of the quick corpus and its recorded fault trace.
fn corpus_snapshot(label: &str) -> (PathBuf, FaultTrace) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/corpus-quick").join(label);
    let trace = FaultTrace::path_of(&dir);
    assert!(
        dir.join("memory").is_file() && trace.is_file(),
        "this test replays a real guest's recorded faults: make {} and {} with \
         integration/corpus/make-corpus.sh --quick (scripts/test.sh's corpus stage runs it)",
        dir.display(),
        trace.display()
    );
    let trace = FaultTrace::read(&trace).unwrap_or_else(|e| panic!("{e}"));
    (dir, trace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guests_recorded_faults_are_served_byte_identical() {
    let (dir, trace) = corpus_snapshot("fn-json/v1");
    let memory = Arc::new(std::fs::read(dir.join("memory")).unwrap());
    assert_eq!(trace.memory_size, memory.len() as u64, "the trace was recorded on another memory file");
    assert_eq!(trace.page_size, PAGE as u64);
    assert!(!trace.pages.is_empty(), "an empty trace replays nothing");
    let registry = RegistryProcess::start().await;
    let reference = thaw_client::Reference::parse(&format!("{}/fn/corpus-json:v1", registry.host())).unwrap();
    let client = support::common::client_for(&reference);
    thaw_client::push_dir(&client, &reference, &dir, &thaw_client::PushOptions::default())
        .await
        .expect("push");
    let reference = reference.to_string();
    let tmp = tempfile::tempdir().unwrap();
    let node = NodeCache::start(&registry.host(), tmp.path(), 1 << 30, "node-corpus").await;

    let answer = ensure_lazy(&node, &reference).await;
    assert_eq!(answer["hit"], false, "{answer}");
    let digest = answer["digest"].as_str().unwrap().to_owned();
    // One region: QEMU's `pc` guest below 3 GiB has its RAM in one piece.
    let vm = Arc::new(
        FirecrackerStandIn::load(answer["memory_socket"].as_str().unwrap().as_ref(), memory.len(), &[])
            .expect("handshake"),
    );
    // The guest's pages in the order it touched them, by four vCPUs, then all the others.
    touch_and_check(&vm, &memory, trace.offsets(), 4, PAGES_DEADLINE);
    touch_and_check(&vm, &memory, (0..memory.len() / PAGE).map(|p| p * PAGE).collect(), 2, PAGES_DEADLINE);
    wait_cached(&node, &digest).await;
    let hit = node.ensure(&reference).await;
    assert_eq!(hit["hit"], true);
    let cached = std::fs::read(hit["files"]["memory"].as_str().unwrap()).unwrap();
    assert!(cached == *memory, "the memory file the background fill completed differs from the snapshot's");
}
