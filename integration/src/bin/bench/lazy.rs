//! Lazy restore (issue #20), per corpus snapshot, against the thaw-registry of the run (which
//! holds the whole corpus), node caches where the network's clients run:
//!
//! - **eager**: a fresh node cache's ordinary `ensure` (all four files complete);
//! - **lazy, empty node**: a fresh node cache's `ensure` with `"memory": "uffd"`, then the
//!   Firecracker stand-in (`node-cache/tests/support/firecracker_stand_in.rs`, the tests'
//!   own) loads the snapshot from the answer's socket exactly as Firecracker does, and its
//!   vCPU threads touch the pages of the snapshot's recorded fault trace
//!   (`CORPUS/<function>/<revision>.trace`), each compared with the memory file. Timed from
//!   the `ensure` call: until the VM could resume (answer in and handshake done), until the
//!   working set has been served, until the background fill has completed the snapshot (it
//!   is listed as cached). Then every page of memory is touched and compared;
//! - **lazy, snapshot cached** (a locally held chunk for every fault): on the same node, a
//!   second lazy `ensure` (a hit, served by a page server over the cached file) replays the
//!   trace again; the page server's fault-service histogram (`/metrics`) and the stand-in's
//!   own fault latencies are taken over that replay.
//!
//! Any page that differs from the memory file fails the run.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use thaw_integration::corpus::Snapshot;

use crate::cluster::{self, measured_ensure, post_json, start_node, Daemons, Ensure, NodeCache};
use crate::fault_trace::FaultTrace;
use crate::firecracker_stand_in::{self, FirecrackerStandIn, Touched, PAGE};
use crate::link::Net;
use crate::proxy::{Proxy, Wire};
use crate::systems::{reference, wire_since};

/// Threads the stand-in touches the working set from (vCPUs).
pub(crate) const VCPUS: usize = 4;
/// Longest the stand-in waits for a set of pages before the run fails.
const PAGES_DEADLINE: Duration = Duration::from_secs(300);
/// Longest the background fill may take before the run fails.
const FILL_DEADLINE: Duration = Duration::from_secs(600);
/// The page server's histogram of fault service times.
const SERVICE_METRIC: &str = "thaw_lazy_fault_service_seconds";

/// A histogram read from `/metrics`: cumulative counts by upper bound (seconds).
#[derive(Debug, Clone, Default)]
pub(crate) struct Histogram {
    pub(crate) buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// `SERVICE_METRIC{kind=KIND}` from a `/metrics` text.
    fn parse(text: &str, kind: &str) -> Self {
        let prefix = format!("{SERVICE_METRIC}_bucket{{kind=\"{kind}\",le=\"");
        let buckets = text
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, count.trim().parse().ok()?))
            })
            .collect();
        Self { buckets }
    }

    /// What was added between `before` and `self`.
    fn since(&self, before: &Self) -> Self {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, n)| {
                let was = before.buckets.iter().find(|(l, _)| l == le).map_or(0, |b| b.1);
                (*le, n - was)
            })
            .collect();
        Self { buckets }
    }

    fn add(&mut self, other: &Self) {
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
            return;
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.1 += theirs.1;
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.buckets.last().map_or(0, |b| b.1)
    }

    /// The `q` quantile in microseconds, interpolated linearly inside its bucket; `None`
    /// without observations, infinite past the last finite bound.
    pub(crate) fn quantile_micros(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0);
        let (mut lower, mut below) = (0.0, 0u64);
        for &(le, n) in &self.buckets {
            if n as f64 >= rank {
                if le.is_infinite() {
                    return Some(f64::INFINITY);
                }
                let inside = (n - below).max(1) as f64;
                return Some((lower + (le - lower) * (rank - below as f64) / inside) * 1e6);
            }
            (lower, below) = (le, n);
        }
        None
    }
}

/// One repetition's lazy restore of one snapshot.
#[derive(Debug, Clone, Default)]
pub(crate) struct LazySample {
    /// From the `ensure` call until its answer, seconds.
    pub(crate) answered_s: f64,
    /// Until the answer was in and the stand-in's handshake done: the VM could resume.
    pub(crate) ready_s: f64,
    /// Until every page of the recorded working set had been served.
    pub(crate) working_set_s: f64,
    /// Until the background fill had completed and recorded the snapshot.
    pub(crate) fill_s: f64,
    /// Registry traffic from the call until the fill completed.
    pub(crate) wire: Wire,
    /// The stand-in's fault latencies while replaying the trace on the empty node, ns.
    pub(crate) cold_faults_ns: Vec<u64>,
    /// The snapshot cached: ready to resume, seconds from the `ensure` call.
    pub(crate) hit_ready_s: f64,
    /// The snapshot cached: the working set served, seconds from the `ensure` call.
    pub(crate) hit_working_set_s: f64,
    /// The snapshot cached: the stand-in's fault latencies, ns.
    pub(crate) local_faults_ns: Vec<u64>,
    /// The snapshot cached: the page server's service times over the replay.
    pub(crate) local_data: Histogram,
    pub(crate) local_zero: Histogram,
}

/// Everything measured for one snapshot on one network.
#[derive(Debug, Clone)]
pub(crate) struct LazySnapshot {
    pub(crate) label: String,
    pub(crate) memory_bytes: u64,
    pub(crate) trace_pages: usize,
    /// From resume until the guest answered, when the trace was recorded (TCG).
    pub(crate) traced_answer_ms: Option<f64>,
    pub(crate) eager: Vec<Ensure>,
    /// First restores: no working set in the registry (`--working-sets off`).
    pub(crate) lazy: Vec<LazySample>,
    /// Restores on a node that found the working set an earlier node published
    /// (`--working-sets use`), so its background fill fetched that first.
    pub(crate) with_working_set: Vec<LazySample>,
    /// This machine's floor, measured after the replays: a first write to each of as many
    /// pages of fresh anonymous memory as the trace has (no handler), nanoseconds.
    pub(crate) minor_faults_ns: Vec<u64>,
}

/// Runs the lazy-restore scenarios for every snapshot of `snapshots`, `reps` fresh node
/// caches each. The caches live under the system's temporary directory: a lease's socket
/// path must fit a Unix socket address (107 bytes), which the run's work directory may not.
pub(crate) fn run_lazy_scenarios(
    daemons: &Daemons,
    registry: &Proxy,
    net: &Net,
    snapshots: &[&Snapshot],
    reps: usize,
) -> Result<Vec<LazySnapshot>> {
    let rt = cluster::runtime()?;
    let tmp = tempfile::Builder::new().prefix("thaw-lazy-").tempdir()?;
    let dir = tmp.path();
    let mut out = Vec::new();
    for snap in snapshots {
        let trace_path = FaultTrace::path_of(&snap.dir);
        let trace = FaultTrace::read(&trace_path).map_err(anyhow::Error::msg).with_context(|| {
            format!(
                "{}: no usable fault trace (make-corpus.sh records one beside each snapshot; \
                 rebuild the corpus with integration/corpus/make-corpus.sh)",
                snap.label()
            )
        })?;
        let memory = Arc::new(
            std::fs::read(snap.dir.join("memory"))
                .with_context(|| format!("reading {}/memory", snap.dir.display()))?,
        );
        ensure!(
            trace.page_size == PAGE as u64 && trace.memory_size == memory.len() as u64,
            "{}: the trace is of another memory file ({} bytes, {} B pages)",
            trace_path.display(),
            trace.memory_size,
            trace.page_size
        );
        let offsets = trace.offsets();
        let reference = reference(registry, snap);
        let mut row = LazySnapshot {
            label: snap.label(),
            memory_bytes: memory.len() as u64,
            trace_pages: offsets.len(),
            traced_answer_ms: trace.resume_to_answer_ms,
            eager: Vec::new(),
            lazy: Vec::new(),
            with_working_set: Vec::new(),
            minor_faults_ns: Vec::new(),
        };
        for rep in 0..reps {
            let rep_dir = dir.join(rep.to_string());
            let node = start_node(&daemons.node_cache, &rep_dir, "bench-eager", registry, net, None, &[])?;
            let e = rt.block_on(measured_ensure(&node, registry, &reference))?;
            drop(node);
            std::fs::remove_dir_all(&rep_dir)?;
            let node = start_node(
                &daemons.node_cache,
                &rep_dir,
                "bench-lazy",
                registry,
                net,
                None,
                &["--working-sets", "off"],
            )?;
            let s = lazy_restore(&rt, &node, registry, &reference, &memory, &offsets)
                .with_context(|| format!("lazy restore of {}", snap.label()))?;
            drop(node);
            std::fs::remove_dir_all(&rep_dir)?;
            eprintln!(
                "bench:   lazy  {:<14} eager {:>6.3} s | lazy ready {:>7.1} ms, working set ({} pages) {:>6.3} s, \
                 fill {:>6.3} s, registry {:.1} MiB (eager {:.1}) | cached: ready {:.1} ms, working set {:.3} s, \
                 page server p50 {:.1} µs p99 {:.1} µs",
                snap.label(),
                e.secs,
                s.ready_s * 1e3,
                offsets.len(),
                s.working_set_s,
                s.fill_s,
                crate::mib(s.wire.down),
                crate::mib(e.wire.down),
                s.hit_ready_s * 1e3,
                s.hit_working_set_s,
                s.local_data.quantile_micros(0.5).unwrap_or(f64::NAN),
                s.local_data.quantile_micros(0.99).unwrap_or(f64::NAN),
            );
            row.eager.push(e);
            row.lazy.push(s);
        }
        // A first restore that records and publishes the working set (or finds one published
        // in an earlier pass), then restores on nodes that fetch it first.
        let rec_dir = dir.join("recorder");
        let node = start_node(
            &daemons.node_cache,
            &rec_dir,
            "bench-recorder",
            registry,
            net,
            None,
            &["--working-sets", "share", "--working-set-quiet-ms", "300"],
        )?;
        record_working_set(&rt, &node, &reference, &memory, &offsets)
            .with_context(|| format!("recording the working set of {}", snap.label()))?;
        drop(node);
        std::fs::remove_dir_all(&rec_dir)?;
        for rep in 0..reps {
            let rep_dir = dir.join(rep.to_string());
            let node = start_node(
                &daemons.node_cache,
                &rep_dir,
                "bench-lazy-ws",
                registry,
                net,
                None,
                &["--working-sets", "use"],
            )?;
            let s = lazy_restore(&rt, &node, registry, &reference, &memory, &offsets)
                .with_context(|| format!("lazy restore of {} with its working set", snap.label()))?;
            let used = metric(&rt.block_on(metrics(&node))?, "thaw_lazy_working_sets_used_total");
            ensure!(used >= 1.0, "{}: the node did not use the published working set", snap.label());
            drop(node);
            std::fs::remove_dir_all(&rep_dir)?;
            eprintln!(
                "bench:   lazy  {:<14} with its working set: ready {:>7.1} ms, working set {:>6.3} s, fill {:>6.3} s, registry {:.1} MiB",
                snap.label(),
                s.ready_s * 1e3,
                s.working_set_s,
                s.fill_s,
                crate::mib(s.wire.down),
            );
            row.with_working_set.push(s);
        }
        row.minor_faults_ns = firecracker_stand_in::minor_fault_nanos(offsets.len())?;
        out.push(row);
    }
    Ok(out)
}

async fn ensure_lazy(node: &NodeCache, reference: &str) -> Result<Value> {
    post_json(
        &node.http,
        &format!("{}/v1/snapshots/ensure", node.api),
        &json!({"reference": reference, "memory": "uffd"}),
    )
    .await
    .with_context(|| format!("{}: lazy ensure {reference}", node.name))
}

async fn release(node: &NodeCache, answer: &Value) -> Result<()> {
    post_json(&node.http, &format!("{}/v1/snapshots/release", node.api), &json!({"lease": answer["lease"]}))
        .await
        .map(|_| ())
}

async fn metrics(node: &NodeCache) -> Result<String> {
    Ok(node.http.get(format!("{}/metrics", node.api)).send().await?.error_for_status()?.text().await?)
}

/// The value of the unlabelled metric `name` in a `/metrics` text; 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// A lazy restore whose VM touches the trace's pages, held until the node has published
/// the working set it recorded (or found one published already); then released.
fn record_working_set(
    rt: &tokio::runtime::Runtime,
    node: &NodeCache,
    reference: &str,
    memory: &Arc<Vec<u8>>,
    offsets: &[usize],
) -> Result<()> {
    let answer = rt.block_on(ensure_lazy(node, reference))?;
    let vm = load(&answer, memory.len())?;
    touch(&vm, memory, offsets, VCPUS)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = rt.block_on(metrics(node))?;
        let done = metric(&text, "thaw_lazy_working_sets_published_total")
            + metric(&text, "thaw_lazy_working_sets_used_total");
        if done >= 1.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no working set published within 30 s (publish refused or failed: {} / {})",
            metric(&text, "thaw_lazy_working_sets_publish_refused_total"),
            metric(&text, "thaw_lazy_working_sets_publish_failed_total")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.block_on(release(node, &answer))?;
    drop(vm);
    Ok(())
}

/// Whether the node lists `digest` as cached.
async fn cached(node: &NodeCache, digest: &str) -> Result<bool> {
    let listing: Value =
        node.http.get(format!("{}/v1/snapshots", node.api)).send().await?.error_for_status()?.json().await?;
    Ok(listing["snapshots"].as_array().is_some_and(|s| s.iter().any(|s| s["digest"] == json!(digest))))
}

/// The stand-in loading a lazy `ensure`'s answer: its socket, guest memory of `size`.
fn load(answer: &Value, size: usize) -> Result<Arc<FirecrackerStandIn>> {
    let socket = answer["memory_socket"].as_str().with_context(|| format!("no memory_socket: {answer}"))?;
    Ok(Arc::new(
        FirecrackerStandIn::load(Path::new(socket), size, &[])
            .with_context(|| format!("the Firecracker handshake on {socket}"))?,
    ))
}

/// Touches `offsets` and fails on any page that differs from `memory`.
fn touch(
    vm: &Arc<FirecrackerStandIn>,
    memory: &Arc<Vec<u8>>,
    offsets: &[usize],
    threads: usize,
) -> Result<Touched> {
    let touched = vm.touch(memory, offsets, threads, PAGES_DEADLINE).map_err(anyhow::Error::msg)?;
    if !touched.wrong.is_empty() {
        bail!(
            "{} page(s) served by fault differ from the memory file (offsets {:?}…)",
            touched.wrong.len(),
            &touched.wrong[..touched.wrong.len().min(8)]
        );
    }
    Ok(touched)
}

/// One lazy restore on a fresh node, then the same snapshot served again from its cache.
fn lazy_restore(
    rt: &tokio::runtime::Runtime,
    node: &NodeCache,
    registry: &Proxy,
    reference: &str,
    memory: &Arc<Vec<u8>>,
    offsets: &[usize],
) -> Result<LazySample> {
    let mut s = LazySample::default();
    let before = registry.wire();
    let started = Instant::now();
    let answer = rt.block_on(ensure_lazy(node, reference))?;
    s.answered_s = started.elapsed().as_secs_f64();
    ensure!(answer["hit"] == json!(false), "the lazy ensure on a fresh node was a hit: {answer}");
    let vm = load(&answer, memory.len())?;
    s.ready_s = started.elapsed().as_secs_f64();
    let touched = touch(&vm, memory, offsets, VCPUS)?;
    s.working_set_s = started.elapsed().as_secs_f64();
    s.cold_faults_ns = touched.fault_nanos;
    let digest = answer["digest"].as_str().context("no digest")?.to_owned();
    let deadline = Instant::now() + FILL_DEADLINE;
    while !rt.block_on(cached(node, &digest))? {
        ensure!(Instant::now() < deadline, "the background fill did not complete within {FILL_DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    s.fill_s = started.elapsed().as_secs_f64();
    s.wire = wire_since(registry, before);
    // Every other page too: nothing served by fault may differ.
    let all: Vec<usize> = (0..memory.len() / PAGE).map(|p| p * PAGE).collect();
    touch(&vm, memory, &all, 2)?;

    // The snapshot is cached now: every fault is a locally held chunk.
    let text = rt.block_on(metrics(node))?;
    let (data0, zero0) = (Histogram::parse(&text, "data"), Histogram::parse(&text, "zero"));
    ensure!(!data0.buckets.is_empty(), "{}/metrics has no {SERVICE_METRIC}", node.api);
    let started = Instant::now();
    let hit = rt.block_on(ensure_lazy(node, reference))?;
    ensure!(hit["hit"] == json!(true), "the lazy ensure of a cached snapshot was not a hit: {hit}");
    let second = load(&hit, memory.len())?;
    s.hit_ready_s = started.elapsed().as_secs_f64();
    let touched = touch(&second, memory, offsets, VCPUS)?;
    s.hit_working_set_s = started.elapsed().as_secs_f64();
    s.local_faults_ns = touched.fault_nanos;
    let text = rt.block_on(metrics(node))?;
    s.local_data = Histogram::parse(&text, "data").since(&data0);
    s.local_zero = Histogram::parse(&text, "zero").since(&zero0);
    rt.block_on(async {
        release(node, &hit).await?;
        release(node, &answer).await
    })?;
    drop((vm, second));
    Ok(s)
}

/// The page server's histograms summed over every sample.
pub(crate) fn local_histograms(rows: &[LazySnapshot]) -> (Histogram, Histogram) {
    let (mut data, mut zero) = (Histogram::default(), Histogram::default());
    for s in rows.iter().flat_map(|r| &r.lazy) {
        data.add(&s.local_data);
        zero.add(&s.local_zero);
    }
    (data, zero)
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let text = "x\n\
            thaw_lazy_fault_service_seconds_bucket{kind=\"data\",le=\"0.00001\"} 50\n\
            thaw_lazy_fault_service_seconds_bucket{kind=\"data\",le=\"0.00002\"} 100\n\
            thaw_lazy_fault_service_seconds_bucket{kind=\"data\",le=\"+Inf\"} 100\n\
            thaw_lazy_fault_service_seconds_bucket{kind=\"zero\",le=\"+Inf\"} 7\n";
        let h = Histogram::parse(text, "data");
        assert_eq!(h.count(), 100);
        assert!((h.quantile_micros(0.5).unwrap() - 10.0).abs() < 1e-9);
        assert!((h.quantile_micros(0.75).unwrap() - 15.0).abs() < 1e-9);
        let before = Histogram { buckets: vec![(0.00001, 50), (0.00002, 50), (f64::INFINITY, 50)] };
        let d = h.since(&before);
        assert_eq!(d.count(), 50);
        assert!(d.quantile_micros(0.5).unwrap() > 10.0, "all added observations lie in the second bucket");
        assert_eq!(Histogram::parse(text, "zero").count(), 7);
        assert!(Histogram::default().quantile_micros(0.5).is_none());
    }
}
