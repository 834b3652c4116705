//! `/prioritize` latency at 1,000 nodes and 10,000 cached snapshots across the cluster, with
//! synthetic holdings and recipes injected into the scorer (no registry). Prints Markdown.
//!
//! The cluster: 500 functions × 20 revisions = 10,000 distinct snapshots of 1,024 chunks of
//! 64 KiB each (64 MiB of non-zero memory): 256 chunks from one of 4 language runtimes
//! (shared by every function in that language), 768 of the function, of which each revision
//! rewrites 5% of the previous one's. Each node holds 10 snapshots, each snapshot is held by
//! exactly one node (a random permutation).
//!
//! Rows: the scorer alone (coverage + herd damping; cold = first ask for a pod snapshot,
//! coverage computed for all 1,000 nodes; warm = coverage cached), and the whole HTTP path
//! (JSON `ExtenderArgs` with 1,000 `NodeNames` over loopback to the axum router and back).
//!
//! `cargo bench -p thaw-extender --bench prioritize [-- --quick]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use thaw_extender::herd::HerdConfig;
use thaw_extender::scorer::{Scorer, SnapshotChunks};
use thaw_extender::{app, AppState, Config};
use thaw_schema::holdings::{HeldSnapshot, NodeHoldings};
use thaw_schema::{ChunkId, Sha256Digest};

const NODES: usize = 1000;
const FUNCTIONS: usize = 500;
const REVISIONS: usize = 20;
const RUNTIMES: usize = 4;
const RUNTIME_CHUNKS: usize = 256;
const FUNCTION_CHUNKS: usize = 768;
const CHANGED_PER_REVISION: usize = FUNCTION_CHUNKS / 20;
const HELD_PER_NODE: usize = 10;
const CHUNK: u32 = 64 * 1024;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn chunk(kind: u64, a: u64, b: u64) -> ChunkId {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&kind.to_le_bytes());
    key[8..16].copy_from_slice(&a.to_le_bytes());
    key[16..].copy_from_slice(&b.to_le_bytes());
    ChunkId::of(&key)
}

fn digest(f: usize, r: usize) -> Sha256Digest {
    Sha256Digest::of(format!("fn-{f}-rev-{r}").as_bytes())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (warm_calls, http_calls) = if quick { (200, 50) } else { (5000, 1000) };
    let mut rng = Rng(0x7a3b_91c4_55e2_0f1d);

    // Recipes → profiles.
    let built = Instant::now();
    let scorer = Arc::new(Scorer::new(HerdConfig::default()));
    for f in 0..FUNCTIONS {
        let runtime = f % RUNTIMES;
        let runtime_part: Vec<ChunkId> =
            (0..RUNTIME_CHUNKS).map(|i| chunk(1, runtime as u64, (i + f) as u64 % 1024)).collect();
        let mut own: Vec<ChunkId> = (0..FUNCTION_CHUNKS).map(|i| chunk(2, f as u64, i as u64)).collect();
        for r in 0..REVISIONS {
            if r > 0 {
                for k in 0..CHANGED_PER_REVISION {
                    let at = rng.below(FUNCTION_CHUNKS);
                    own[at] = chunk(3, (f * REVISIONS + r) as u64, k as u64);
                }
            }
            let mut c = SnapshotChunks::default();
            c.chunks.extend(runtime_part.iter().chain(&own).map(|id| (*id, CHUNK)));
            scorer.insert_profile(digest(f, r), &c);
        }
    }
    let profiles_took = built.elapsed();

    // Holdings: a permutation of the 10,000 snapshots, 10 per node.
    let mut all: Vec<(usize, usize)> =
        (0..FUNCTIONS).flat_map(|f| (0..REVISIONS).map(move |r| (f, r))).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    let names: Vec<String> = (0..NODES).map(|i| format!("worker-{i:04}.cluster.local")).collect();
    let holdings: Vec<NodeHoldings> = names
        .iter()
        .enumerate()
        .map(|(i, n)| NodeHoldings {
            node: n.clone(),
            peer_endpoint: None,
            capacity_bytes: 64 << 30,
            used_bytes: 0,
            snapshots: all[i * HELD_PER_NODE..(i + 1) * HELD_PER_NODE]
                .iter()
                .map(|&(f, r)| HeldSnapshot {
                    reference: format!("registry.local/fn-{f}:rev-{r}"),
                    digest: digest(f, r),
                    size_bytes: u64::from(CHUNK) * 1024,
                    cached_bytes: u64::from(CHUNK) * 1024,
                })
                .collect(),
        })
        .collect();
    scorer.set_holdings(&holdings);

    // Pods: 100 distinct snapshots asked.
    let pods: Vec<Sha256Digest> =
        (0..100).map(|_| digest(rng.below(FUNCTIONS), rng.below(REVISIONS))).collect();
    let mut cold = Vec::new();
    for d in &pods {
        let t = Instant::now();
        let s = scorer.prioritize(d, &names, Instant::now());
        cold.push(t.elapsed());
        assert_eq!(s.len(), NODES);
        assert!(
            s.contains(&10) || s.contains(&9) || s.contains(&8) || s.contains(&7),
            "the holder scores high"
        );
    }
    let mut warm = Vec::with_capacity(warm_calls);
    for i in 0..warm_calls {
        let d = &pods[i % pods.len()];
        let t = Instant::now();
        let s = scorer.prioritize(d, &names, Instant::now());
        warm.push(t.elapsed());
        std::hint::black_box(s);
    }
    cold.sort();
    warm.sort();

    // The whole HTTP path, in-process router on loopback; pods name their snapshot by digest
    // so no registry is asked (the poller is not started).
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut http_lat = rt.block_on(async {
        let state = AppState::with_scorer(&Config::new("registry.local", true), scorer.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app(state)).await.unwrap() });
        let http = reqwest::Client::new();
        let bodies: Vec<Vec<u8>> = pods
            .iter()
            .map(|d| {
                let pod = serde_json::json!({"metadata": {"name": "p", "namespace": "fn",
                    "annotations": {"thaw.dev/snapshot": format!("registry.local/fn@{d}")}}});
                serde_json::to_vec(&serde_json::json!({"Pod": pod, "Nodes": null, "NodeNames": names}))
                    .unwrap()
            })
            .collect();
        let mut lat = Vec::with_capacity(http_calls);
        for i in 0..http_calls {
            let t = Instant::now();
            let r = http
                .post(format!("http://{addr}/prioritize"))
                .header("content-type", "application/json")
                .body(bodies[i % bodies.len()].clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let answer: serde_json::Value = r.json().await.unwrap();
            lat.push(t.elapsed());
            assert_eq!(answer.as_array().unwrap().len(), NODES);
        }
        lat
    });
    http_lat.sort();

    let sizes = scorer.sizes();
    println!(
        "## prioritize latency: {NODES} nodes, {} snapshots cached across the cluster\n",
        FUNCTIONS * REVISIONS
    );
    println!(
        "{} profiles ({} distinct chunks interned) built in {:.2} s; {HELD_PER_NODE} snapshots per node.\n",
        sizes.profiles,
        sizes.chunks,
        profiles_took.as_secs_f64()
    );
    println!("| path | calls | p50 (µs) | p99 (µs) | max (µs) |");
    println!("|---|---:|---:|---:|---:|");
    for (what, lat) in [
        ("scorer, cold (coverage of 1,000 nodes computed)", &cold),
        ("scorer, warm (coverage cached)", &warm),
        ("HTTP /prioritize, warm, JSON over loopback", &http_lat),
    ] {
        println!(
            "| {what} | {} | {} | {} | {} |",
            lat.len(),
            us(percentile(lat, 0.5)),
            us(percentile(lat, 0.99)),
            us(*lat.last().unwrap())
        );
    }
}
