//! Node-cache `ensure` latency and bytes by source, on real snapshots: a cache hit, a cold
//! miss, and a miss where another revision of the function is cached. Not a test: nothing
//! is asserted; it prints a Markdown report (and writes it to `THAW_BENCH_REPORT`).
//!
//! Run: `cargo bench -p thaw-node-cache --bench ensure`. Snapshots come from the corpus
//! (`integration/corpus/make-corpus.sh`, default `target/corpus`; `THAW_BENCH_CORPUS=DIR`
//! overrides): `fn-json/v1`, `fn-json/v2` and `fn-sqlite/v1`. Without a corpus it uses
//! synthetic memory-like snapshots and says so. `THAW_BENCH_HITS` sets the number of hits
//! timed each way (default 300), `THAW_BENCH_RUNS` the repeats of each miss (default 5).
//!
//! The registry is a thaw-registry on loopback (filesystem storage); the cache is the real
//! `thaw-node-cache` binary. Latency is measured by the client around each HTTP call, so it
//! includes the loopback round trip; `millis` in the answer is the server's own view.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use support::{NodeCache, SnapshotData, ThawRegistry};
use thaw_client::{PushOptions, Reference};

struct Input {
    name: &'static str,
    dir: PathBuf,
    _keep: Option<tempfile::TempDir>,
}

fn inputs() -> (Vec<Input>, String) {
    let root = std::env::var_os("THAW_BENCH_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/corpus"));
    let wanted =
        [("fn-json v1", "fn-json/v1"), ("fn-json v2", "fn-json/v2"), ("fn-sqlite v1", "fn-sqlite/v1")];
    if wanted.iter().all(|(_, p)| root.join(p).join("memory").is_file()) {
        let inputs = wanted.iter().map(|(n, p)| Input { name: n, dir: root.join(p), _keep: None }).collect();
        return (
            inputs,
            format!("corpus `{}` (QEMU guests, see integration/corpus/README.md)", root.display()),
        );
    }
    eprintln!(
        "no corpus at {} (run integration/corpus/make-corpus.sh); using synthetic snapshots",
        root.display()
    );
    let v1 = SnapshotData::new(65536, 16384, 1);
    let v2 = support::revision(&v1, 2000, 2);
    let other = SnapshotData::new(65536, 16384, 3);
    let inputs = [("synthetic v1", v1), ("synthetic v2", v2), ("synthetic other", other)]
        .into_iter()
        .map(|(name, data)| {
            let dir = tempfile::tempdir().unwrap();
            data.write(dir.path());
            Input { name, dir: dir.path().to_owned(), _keep: Some(dir) }
        })
        .collect();
    (inputs, "synthetic memory-like snapshots (256 MiB memory, 64 MiB disk): no corpus was found".into())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (inputs, source) = inputs();
    let hits = env_usize("THAW_BENCH_HITS", 300);
    let runs = env_usize("THAW_BENCH_RUNS", 5);
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let mut refs = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let tag = ["v1", "v2", "other"][i];
        let repo = if i < 2 { "fn/json" } else { "fn/other" };
        let reference = Reference::parse(&format!("{host}/{repo}:{tag}")).unwrap();
        let client = support::common::client_for(&reference);
        thaw_client::push_dir(&client, &reference, &input.dir, &PushOptions::default()).await.expect("push");
        refs.push(reference.to_string());
    }
    let size: u64 =
        std::fs::read_dir(&inputs[0].dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();

    // Cold misses and misses with the previous revision cached, each on a fresh cache.
    let mut cold = Vec::new();
    let mut warm_rev = Vec::new();
    let mut cold_bytes = Default::default();
    let mut rev_bytes = Default::default();
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeCache::start(&host, dir.path(), 64 << 30, "bench").await;
        let t = Instant::now();
        let a = node.ensure(&refs[0]).await;
        cold.push(t.elapsed().as_secs_f64() * 1000.0);
        cold_bytes = a["bytes"].clone();
        let t = Instant::now();
        let b = node.ensure(&refs[1]).await;
        warm_rev.push(t.elapsed().as_secs_f64() * 1000.0);
        rev_bytes = b["bytes"].clone();
    }
    // Another function cached: what the runtime and kernel pages save.
    let mut other = Vec::new();
    let mut other_bytes = Default::default();
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeCache::start(&host, dir.path(), 64 << 30, "bench").await;
        node.ensure(&refs[2]).await;
        let t = Instant::now();
        let a = node.ensure(&refs[0]).await;
        other.push(t.elapsed().as_secs_f64() * 1000.0);
        other_bytes = a["bytes"].clone();
    }
    // Hits: ensure + release, timed around the ensure call. First with a pause between
    // pairs (untimed), so the spare disk copy is ready as it is when restores are spaced
    // out; then back to back, so most hits make the lease's disk copy themselves.
    let dir = tempfile::tempdir().unwrap();
    let node = NodeCache::start(&host, dir.path(), 64 << 30, "bench").await;
    let first = node.ensure(&refs[0]).await;
    node.release(first["lease"].as_str().unwrap()).await;
    let mut hit = Vec::with_capacity(hits);
    let mut hit_copying = Vec::with_capacity(hits);
    let mut server_ms = Vec::with_capacity(hits);
    for _ in 0..hits {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let t = Instant::now();
        let a = node.ensure(&refs[0]).await;
        hit.push(t.elapsed().as_secs_f64() * 1000.0);
        server_ms.push(a["millis"].as_u64().unwrap() as f64);
        node.release(a["lease"].as_str().unwrap()).await;
    }
    let spaced_bound = server_p99_bucket(&node, hits).await;
    for _ in 0..hits {
        let t = Instant::now();
        let a = node.ensure(&refs[0]).await;
        hit_copying.push(t.elapsed().as_secs_f64() * 1000.0);
        node.release(a["lease"].as_str().unwrap()).await;
    }
    for v in [&mut cold, &mut warm_rev, &mut other, &mut hit, &mut hit_copying, &mut server_ms] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let b = |v: &serde_json::Value, k: &str| mib(v[k].as_u64().unwrap_or(0));
    let mut out = String::new();
    let _ = writeln!(out, "### Node cache: `ensure` latency and bytes by source\n");
    let _ = writeln!(
        out,
        "`cargo bench -p thaw-node-cache --bench ensure`: thaw-registry (filesystem) and one `thaw-node-cache` on loopback, \
         {source}; {} is {} MiB in 4 files. Latency is wall time around the HTTP call; misses are medians of {runs} fresh caches, \
         hits p50/p99 of {hits} ensure+release pairs each way (the release is not timed). Bytes are uncompressed chunk bytes \
         (zero chunks count nowhere).\n",
        inputs[0].name,
        mib(size)
    );
    let _ = writeln!(out, "| case | p50 ms | p99 ms | from local disk MiB | from registry MiB |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| hit ({}), spare disk copy ready | {:.3} | {:.3} | 0 | 0 |",
        inputs[0].name,
        percentile(&hit, 0.5),
        percentile(&hit, 0.99)
    );
    let _ = writeln!(
        out,
        "| hit ({}), back to back: the lease's disk copy made in the call | {:.3} | {:.3} | 0 | 0 |",
        inputs[0].name,
        percentile(&hit_copying, 0.5),
        percentile(&hit_copying, 0.99)
    );
    let _ = writeln!(
        out,
        "| cold miss ({}) | {:.1} | {:.1} | {} | {} |",
        inputs[0].name,
        percentile(&cold, 0.5),
        cold.last().unwrap(),
        b(&cold_bytes, "local"),
        b(&cold_bytes, "registry")
    );
    let _ = writeln!(
        out,
        "| miss, {} cached ({}) | {:.1} | {:.1} | {} | {} |",
        inputs[0].name,
        inputs[1].name,
        percentile(&warm_rev, 0.5),
        warm_rev.last().unwrap(),
        b(&rev_bytes, "local"),
        b(&rev_bytes, "registry")
    );
    let _ = writeln!(
        out,
        "| miss, another function cached ({} with {} cached) | {:.1} | {:.1} | {} | {} |",
        inputs[0].name,
        inputs[2].name,
        percentile(&other, 0.5),
        other.last().unwrap(),
        b(&other_bytes, "local"),
        b(&other_bytes, "registry")
    );
    let _ = writeln!(
        out,
        "\nMiss rows give the median and the slowest of {runs} runs in place of p50/p99. Server-side time of a hit \
         with a spare ready (`millis`, whole milliseconds): p50 {} ms, p99 {} ms; by the cache's own \
         `thaw_cache_ensure_seconds` histogram, 99% of those hits took at most {spaced_bound} ms.",
        percentile(&server_ms, 0.5),
        percentile(&server_ms, 0.99)
    );
    print!("{out}");
    if let Some(path) = std::env::var_os("THAW_BENCH_REPORT") {
        std::fs::write(&path, &out).expect("writing the report");
        eprintln!("report written to {}", PathBuf::from(path).display());
    }
}

/// The smallest histogram bucket (ms) holding 99% of the `hits` ensures after the first
/// (a miss) that the node has served.
async fn server_p99_bucket(node: &NodeCache, hits: usize) -> String {
    let text = reqwest::get(node.url("/metrics")).await.unwrap().text().await.unwrap();
    // The first ensure, a miss, lands in a bucket far above any hit.
    let wanted = (hits as f64 * 0.99).ceil() as u64;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("thaw_cache_ensure_seconds_bucket{le=\"") else { continue };
        let (le, count) = rest.split_once("\"} ").unwrap();
        if count.trim().parse::<u64>().unwrap() >= wanted && le != "+Inf" {
            return format!("{}", le.parse::<f64>().unwrap() * 1000.0);
        }
    }
    "more than 10000".into()
}
