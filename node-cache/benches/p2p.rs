//! Registry egress and time to the last node when 1, 2, 4 and 8 node caches restore the same
//! snapshot, without and with P2P. Not a test: nothing is asserted; it prints a Markdown
//! report (and writes it to `THAW_BENCH_REPORT`).
//!
//! Run: `cargo bench -p thaw-node-cache --bench p2p`. The snapshot is `fn-json/v1` of the
//! corpus (`THAW_BENCH_CORPUS=DIR`, default `target/corpus-quick`), else a synthetic one.
//! `THAW_BENCH_NODES` lists the node counts (default `1,2,4,8`).
//!
//! Everything runs on this machine over loopback: a thaw-registry behind a TCP proxy that
//! counts the bytes the registry sends (HTTP included), and real `thaw-node-cache`
//! processes. Three ways to restore:
//!
//! - **registry**: no P2P; every node pulls at the same moment.
//! - **p2p, all cold**: P2P on; every node pulls at the same moment. No node holds the
//!   snapshot until it finishes, and swarming is not built yet, so this is the case it must fix.
//! - **p2p, one seed**: one node pulls first (not counted), then the others at once.
//!
//! No bandwidth limit: loopback times say little about a network; bytes are the measure.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{NodeCache, SnapshotData, ThawRegistry};
use thaw_client::{PushOptions, Reference};

const TOKEN: &str = "bench-cluster-token-0123456789";

fn snapshot_dir() -> (PathBuf, String, Option<tempfile::TempDir>) {
    let root = std::env::var_os("THAW_BENCH_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/corpus-quick"));
    let dir = root.join("fn-json/v1");
    if dir.join("memory").is_file() {
        return (dir.clone(), format!("corpus `{}`", dir.display()), None);
    }
    eprintln!("no corpus at {}; using a synthetic snapshot", root.display());
    let data = SnapshotData::new(16384, 4096, 1);
    let tmp = tempfile::tempdir().unwrap();
    data.write(tmp.path());
    (tmp.path().to_owned(), "synthetic (64 MiB memory, 16 MiB disk): no corpus was found".into(), Some(tmp))
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Registry,
    AllCold,
    OneSeed,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::Registry => "registry only",
            Self::AllCold => "p2p, all cold",
            Self::OneSeed => "p2p, one seed",
        }
    }
}

struct Row {
    mode: Mode,
    nodes: usize,
    egress: u64,
    last_s: f64,
    peers: u64,
    registry: u64,
}

async fn run(host: &str, reference: &str, token: &str, mode: Mode, n: usize, round: usize) -> Row {
    let p2p = mode != Mode::Registry;
    let dirs: Vec<tempfile::TempDir> = (0..n + 1).map(|_| tempfile::tempdir().unwrap()).collect();
    let names: Vec<String> = (0..n + 1).map(|i| format!("bench-{round}-{i}")).collect();
    let args: Vec<&str> =
        if p2p { vec!["--peer-token-file", token, "--peer-listen", "auto"] } else { vec![] };
    let mut nodes = Vec::new();
    for i in 0..n + usize::from(mode == Mode::OneSeed) {
        nodes.push(NodeCache::start_with(host, dirs[i].path(), 64 << 30, &names[i], &args).await);
    }
    let mut seed = None;
    if mode == Mode::OneSeed {
        nodes[0].ensure(reference).await;
        wait_for_peer(host, &names[0]).await;
        seed = Some(nodes.remove(0)); // kept running: it is the peer
    }
    let before = SENT.get().unwrap().load(Ordering::Relaxed);
    let started = Instant::now();
    let answers: Vec<Value> =
        futures::future::join_all(nodes.iter().map(|node| node.ensure(reference))).await;
    let last_s = started.elapsed().as_secs_f64();
    let egress = SENT.get().unwrap().load(Ordering::Relaxed) - before;
    let sum = |k: &str| answers.iter().map(|a| a["bytes"][k].as_u64().unwrap()).sum::<u64>();
    let row = Row { mode, nodes: n, egress, last_s, peers: sum("peers"), registry: sum("registry") };
    drop(nodes);
    drop(seed);
    let http = reqwest::Client::new();
    for name in &names {
        let _ = http.delete(format!("http://{host}/v2/_thaw/nodes/{name}")).send().await;
    }
    row
}

async fn wait_for_peer(host: &str, node: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d: Value =
            http.get(format!("http://{host}/v2/_thaw/nodes")).send().await.unwrap().json().await.unwrap();
        let ready = d["nodes"].as_array().unwrap().iter().any(|n| {
            n["node"] == node
                && n["peerEndpoint"].is_string()
                && !n["snapshots"].as_array().unwrap().is_empty()
        });
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "{node} never published its holdings");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

static SENT: std::sync::OnceLock<Arc<AtomicU64>> = std::sync::OnceLock::new();

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let counts: Vec<usize> = std::env::var("THAW_BENCH_NODES")
        .unwrap_or_else(|_| "1,2,4,8".into())
        .split(',')
        .map(|s| s.trim().parse().expect("THAW_BENCH_NODES: a list of numbers"))
        .collect();
    let (dir, source, _keep) = snapshot_dir();
    let registry = ThawRegistry::start().await;
    let sent = SENT.get_or_init(Arc::default).clone();
    let host = support::proxy(registry.host(), sent.clone(), Duration::ZERO).await;
    let reference = Reference::parse(&format!("{host}/fn/json:v1")).unwrap();
    let client = support::common::client_for(&reference);
    thaw_client::push_dir(&client, &reference, &dir, &PushOptions::default()).await.expect("push");
    let reference = reference.to_string();
    let size: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let token = token.display().to_string();

    let mut rows = Vec::new();
    let mut round = 0;
    for mode in [Mode::Registry, Mode::AllCold, Mode::OneSeed] {
        for &n in &counts {
            round += 1;
            let row = run(&host, &reference, &token, mode, n, round).await;
            eprintln!(
                "{} x{n}: egress {} MiB, last node {:.2} s, peers {} MiB, registry {} MiB",
                mode.label(),
                mib(row.egress),
                row.last_s,
                mib(row.peers),
                mib(row.registry)
            );
            rows.push(row);
        }
    }
    // One compressed copy: what a single node pulling alone costs the registry.
    let one_copy = rows.iter().find(|r| r.mode == Mode::Registry && r.nodes == 1).map_or(0, |r| r.egress);
    let mut out = String::new();
    let _ = writeln!(out, "### P2P: registry egress and time to the last node\n");
    let _ = writeln!(
        out,
        "Snapshot: {source}, {} MiB of files. Loopback, no bandwidth limit; egress counted at a \
         proxy in front of the registry (HTTP included). One copy (one node alone) = {} MiB.\n",
        mib(size),
        if one_copy > 0 { mib(one_copy) } else { "n/a (no 1-node run)".into() }
    );
    let _ = writeln!(
        out,
        "| mode | nodes | registry egress MiB | x one copy | last node s | chunk MiB from peers | chunk MiB from registry |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.2} | {} | {} |",
            r.mode.label(),
            r.nodes,
            mib(r.egress),
            if one_copy > 0 { format!("{:.2}", r.egress as f64 / one_copy as f64) } else { "n/a".into() },
            r.last_s,
            mib(r.peers),
            mib(r.registry)
        );
    }
    print!("{out}");
    if let Some(path) = std::env::var_os("THAW_BENCH_REPORT") {
        std::fs::write(path, &out).expect("writing the report");
    }
}
