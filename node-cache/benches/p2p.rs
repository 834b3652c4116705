//! Registry egress and time to the last node when 1, 2, 4 and 8 node caches restore the same
//! snapshot, without and with P2P. Not a test: nothing is asserted; it prints a Markdown
//! report (and writes it to `THAW_BENCH_REPORT`, a plot to `THAW_BENCH_PLOT`).
//!
//! Run: `cargo bench -p thaw-node-cache --bench p2p`. The snapshot is `fn-json/v1` of the
//! corpus (`THAW_BENCH_CORPUS=DIR`, default `target/corpus-quick`), else a synthetic one.
//! `THAW_BENCH_NODES` lists the node counts (default `1,2,4,8`); `THAW_BENCH_MODES` the
//! modes, of `registry`, `cold`, `seed` (default all three). Three ways to restore:
//!
//! - **registry**: no P2P; every node pulls at the same moment.
//! - **p2p, all cold** (`cold`): P2P on; every node pulls at the same moment. No node holds
//!   the snapshot until it finishes: the nodes swarm (docs/DECISIONS.md D19).
//! - **p2p, one seed** (`seed`): one node pulls first (not counted), then the others at once.
//!
//! The registry and the node caches are the real binaries (`cargo build --release -p
//! thaw-registry -p thaw-node-cache` first in network-namespace mode). Two harnesses:
//!
//! - **loopback** (default): everything on loopback; an in-process registry behind a TCP
//!   proxy that limits its uplink (`THAW_BENCH_UPLINK_MBIT`, default 1000, shared by every
//!   connection) and counts the bytes it sends (HTTP included). The links between nodes are
//!   not limited, so P2P times are optimistic for a real network.
//! - **network namespaces** (`THAW_BENCH_NETNS=1`; root, iproute2): the registry (`thawb-reg`,
//!   10.231.0.2) and each node cache (`thawb-n0`.., 10.231.0.10..) run in a namespace of
//!   their own, joined by veth pairs to a bridge `thawb-br0` (10.231.0.1, where this process
//!   drives everything). Both ends of every veth are limited with `tbf`, so a namespace's
//!   sending and receiving are each limited: node links to `THAW_BENCH_LINK_MBIT` (default
//!   1000), the registry's to `THAW_BENCH_UPLINK_MBIT`. `THAW_BENCH_LINK_DELAY_MS` (default 0)
//!   adds a netem delay to what each namespace sends (round trip: twice that; needs the
//!   kernel's `sch_netem`, which not every kernel has). Registry egress is the transmit
//!   counter of the registry namespace's `eth0` (frames, headers included), read before and
//!   after each round; no proxy. Stale `thawb-*` namespaces and links are deleted at start
//!   and everything is deleted at exit, also on a panic (not on SIGKILL: the next run cleans).
//!
//! Both report per round the CPU seconds (user + system) of each counted node-cache process
//! (and, with namespaces, of the registry process), and whether the targets of issue #7 hold for 8 nodes, p2p, all cold.

#[path = "../tests/support/mod.rs"]
mod support;

mod netns;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Launch, NodeCache, RegistryProcess, SnapshotData, ThawRegistry};
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

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Registry,
    AllCold,
    OneSeed,
}

impl Mode {
    const ALL: [Self; 3] = [Self::Registry, Self::AllCold, Self::OneSeed];

    fn label(self) -> &'static str {
        match self {
            Self::Registry => "registry only",
            Self::AllCold => "p2p, all cold",
            Self::OneSeed => "p2p, one seed",
        }
    }

    fn parse(s: &str) -> Self {
        match s.trim() {
            "registry" => Self::Registry,
            "cold" | "all-cold" => Self::AllCold,
            "seed" | "one-seed" => Self::OneSeed,
            other => panic!("THAW_BENCH_MODES: `{other}` is none of registry, cold, seed"),
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
    /// CPU seconds (user + system) of each counted node-cache process.
    cpu_s: Vec<f64>,
    /// CPU seconds the registry process used in the round (network namespaces only: in
    /// loopback mode the registry runs inside this process).
    registry_cpu_s: Option<f64>,
    /// Share of the whole machine's CPU time that was busy during the round: near 100 %, the
    /// time to the last node measures this machine's cores, not the network.
    machine_busy: f64,
}

/// Where the registry runs and how its egress is counted.
enum Harness {
    Loopback {
        sent: Arc<AtomicU64>,
        mbit: f64,
        _registry: ThawRegistry,
    },
    /// Fields drop in order: the registry process is killed before the namespaces go.
    Netns {
        _registry: RegistryProcess,
        net: netns::Net,
    },
}

impl Harness {
    fn egress(&self) -> u64 {
        match self {
            Self::Loopback { sent, .. } => sent.load(Ordering::Relaxed),
            Self::Netns { net, .. } => net.registry_tx_bytes(),
        }
    }

    fn registry_cpu_s(&self, ticks: f64) -> Option<f64> {
        match self {
            Self::Loopback { .. } => None,
            Self::Netns { _registry: registry, .. } => Some(cpu_seconds(registry.pid(), ticks)),
        }
    }

    fn node(&self, i: usize) -> Launch {
        match self {
            Self::Loopback { .. } => Launch::default(),
            Self::Netns { net, .. } => net.node(i),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Loopback { mbit, .. } => format!(
                "Harness: **loopback**. Registry uplink limited to {mbit} Mbit/s (shared by all \
                 connections) at a proxy in front of the registry, which counts its egress (HTTP \
                 included); node-to-node traffic on loopback, not limited."
            ),
            Self::Netns { net, .. } => {
                let l = net.links;
                format!(
                    "Harness: **network namespaces** (one per process, veth pairs to a bridge, `tbf` \
                     on both ends). Node links {} Mbit/s each way, registry link {} Mbit/s each way, \
                     added delay {} ms per direction. Registry egress: transmit counter of the \
                     registry namespace's interface (frames, headers included).",
                    l.node_mbit, l.registry_mbit, l.delay_ms
                )
            }
        }
    }
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_seconds(pid: u32, ticks_per_s: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return f64::NAN };
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) / ticks_per_s
}

/// The machine's busy and total CPU ticks so far (`/proc/stat`; idle and iowait count as
/// not busy).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    harness: &Harness,
    host: &str,
    reference: &str,
    token: &str,
    mode: Mode,
    n: usize,
    round: usize,
    ticks: f64,
) -> Row {
    let p2p = mode != Mode::Registry;
    let dirs: Vec<tempfile::TempDir> = (0..n + 1).map(|_| tempfile::tempdir().unwrap()).collect();
    let names: Vec<String> = (0..n + 1).map(|i| format!("bench-{round}-{i}")).collect();
    let args: Vec<&str> =
        if p2p { vec!["--peer-token-file", token, "--peer-listen", "auto"] } else { vec![] };
    let mut nodes = Vec::new();
    for i in 0..n + usize::from(mode == Mode::OneSeed) {
        let launch = harness.node(i);
        nodes.push(NodeCache::start_in(&launch, host, dirs[i].path(), 64 << 30, &names[i], &args).await);
    }
    let mut seed = None;
    if mode == Mode::OneSeed {
        nodes[0].ensure(reference).await;
        wait_for_peer(host, &names[0]).await;
        seed = Some(nodes.remove(0)); // kept running: it is the peer
    }
    let before = harness.egress();
    let registry_cpu = harness.registry_cpu_s(ticks);
    let machine_before = machine_ticks();
    let started = Instant::now();
    let answers: Vec<Value> =
        futures::future::join_all(nodes.iter().map(|node| node.ensure(reference))).await;
    let last_s = started.elapsed().as_secs_f64();
    let machine_after = machine_ticks();
    let machine_busy = 100.0 * (machine_after.0 - machine_before.0) as f64
        / (machine_after.1 - machine_before.1).max(1) as f64;
    let egress = harness.egress() - before;
    let registry_cpu_s = harness.registry_cpu_s(ticks).zip(registry_cpu).map(|(after, b)| after - b);
    let cpu_s = nodes.iter().filter_map(NodeCache::pid).map(|pid| cpu_seconds(pid, ticks)).collect();
    let sum = |k: &str| answers.iter().map(|a| a["bytes"][k].as_u64().unwrap()).sum::<u64>();
    let row = Row {
        mode,
        nodes: n,
        egress,
        last_s,
        peers: sum("peers"),
        registry: sum("registry"),
        cpu_s,
        registry_cpu_s,
        machine_busy,
    };
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

/// A TCP proxy to `upstream` that counts the bytes the upstream sends into `passed` and
/// lets them through at most at `bytes_per_s` in total over all connections (one uplink).
async fn uplink(upstream: String, passed: Arc<AtomicU64>, bytes_per_s: f64) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // When the link is next free.
    let free_at = Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now()));
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let (upstream, passed, free_at) = (upstream.clone(), passed.clone(), free_at.clone());
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let _ = up.set_nodelay(true);
                let (mut down_r, mut down_w) = down.into_split();
                let (mut up_r, mut up_w) = up.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match up_r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let send_at = {
                                let mut f = free_at.lock().await;
                                let start = (*f).max(tokio::time::Instant::now());
                                *f = start + Duration::from_secs_f64(n as f64 / bytes_per_s);
                                *f
                            };
                            tokio::time::sleep_until(send_at).await;
                            if down_w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            passed.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
                requests.abort();
            });
        }
    });
    addr
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let counts: Vec<usize> = std::env::var("THAW_BENCH_NODES")
        .unwrap_or_else(|_| "1,2,4,8".into())
        .split(',')
        .map(|s| s.trim().parse().expect("THAW_BENCH_NODES: a list of numbers"))
        .collect();
    let modes: Vec<Mode> = std::env::var("THAW_BENCH_MODES")
        .map_or_else(|_| Mode::ALL.to_vec(), |v| v.split(',').map(Mode::parse).collect());
    let (dir, source, _keep) = snapshot_dir();
    let mbit = env_f64("THAW_BENCH_UPLINK_MBIT", 1000.0);
    let use_netns = std::env::var("THAW_BENCH_NETNS").is_ok_and(|v| !v.is_empty() && v != "0");
    let (harness, host) = if use_netns {
        let links = netns::Links {
            node_mbit: env_f64("THAW_BENCH_LINK_MBIT", 1000.0),
            registry_mbit: mbit,
            delay_ms: env_f64("THAW_BENCH_LINK_DELAY_MS", 0.0),
        };
        let max = counts.iter().copied().max().unwrap_or(1) + usize::from(modes.contains(&Mode::OneSeed));
        let net = netns::Net::setup(max, links).unwrap_or_else(|e| {
            eprintln!("network-namespace harness: {e}");
            std::process::exit(2)
        });
        let registry = RegistryProcess::start_in(&net.registry()).await;
        let host = registry.host();
        (Harness::Netns { _registry: registry, net }, host)
    } else {
        let registry = ThawRegistry::start().await;
        let sent = Arc::new(AtomicU64::new(0));
        let host = uplink(registry.host(), sent.clone(), mbit * 1e6 / 8.0).await;
        (Harness::Loopback { sent, mbit, _registry: registry }, host)
    };
    let reference = Reference::parse(&format!("{host}/fn/json:v1")).unwrap();
    let client = support::common::client_for(&reference);
    thaw_client::push_dir(&client, &reference, &dir, &PushOptions::default()).await.expect("push");
    let reference = reference.to_string();
    let size: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let token = token.display().to_string();
    let ticks = clock_ticks();

    let mut rows = Vec::new();
    let mut round = 0;
    for &mode in &modes {
        for &n in &counts {
            round += 1;
            let row = run(&harness, &host, &reference, &token, mode, n, round, ticks).await;
            eprintln!(
                "{} x{n}: egress {} MiB, last node {:.2} s, peers {} MiB, registry {} MiB, node CPU s {}, registry CPU s {:.1}, machine busy {:.0} %",
                mode.label(),
                mib(row.egress),
                row.last_s,
                mib(row.peers),
                mib(row.registry),
                cpu_summary(&row.cpu_s),
                row.registry_cpu_s.unwrap_or(f64::NAN),
                row.machine_busy
            );
            rows.push(row);
        }
    }
    let out = report(&harness, &rows, &source, size);
    if let Some(path) = std::env::var_os("THAW_BENCH_PLOT") {
        let one_copy = alone(&rows).map_or(0, |r| r.egress);
        match plot(std::path::Path::new(&path), &rows, one_copy) {
            Ok(()) => eprintln!("plot written to {}", path.to_string_lossy()),
            Err(e) => eprintln!("no plot: {e}"),
        }
    }
    print!("{out}");
    if let Some(path) = std::env::var_os("THAW_BENCH_REPORT") {
        std::fs::write(path, &out).expect("writing the report");
    }
}

/// One node pulling alone from the registry: one compressed copy of egress, and the time
/// every other row is compared with.
fn alone(rows: &[Row]) -> Option<&Row> {
    rows.iter().find(|r| r.mode == Mode::Registry && r.nodes == 1)
}

/// "mean / max" of the per-node CPU seconds.
fn cpu_summary(cpu_s: &[f64]) -> String {
    if cpu_s.is_empty() {
        return "n/a".into();
    }
    let mean = cpu_s.iter().sum::<f64>() / cpu_s.len() as f64;
    let max = cpu_s.iter().copied().fold(f64::MIN, f64::max);
    format!("{mean:.1} / {max:.1}")
}

fn report(harness: &Harness, rows: &[Row], source: &str, size: u64) -> String {
    let alone = alone(rows);
    let one_copy = alone.map_or(0, |r| r.egress);
    let ratio = |x: f64, base: Option<f64>| base.map_or("n/a".into(), |b| format!("{:.2}", x / b));
    let mut out = String::new();
    let _ = writeln!(out, "### P2P: registry egress and time to the last node\n");
    let _ = writeln!(
        out,
        "{}\n\nSnapshot: {source}, {} MiB of files. One copy (one node alone, registry only) = {} \
         MiB of registry egress. \"x alone\": time to the last node over the time of one node \
         pulling alone from the registry (for every mode).\n",
        harness.describe(),
        mib(size),
        if one_copy > 0 { mib(one_copy) } else { "n/a (no 1-node registry-only run)".into() }
    );
    let _ = writeln!(
        out,
        "| mode | nodes | registry egress MiB | x one copy | last node s | x alone | node CPU s (mean / max) | registry CPU s | machine CPU busy % | chunk MiB from peers | chunk MiB from registry |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.2} | {} | {} | {} | {:.0} | {} | {} |",
            r.mode.label(),
            r.nodes,
            mib(r.egress),
            ratio(r.egress as f64, (one_copy > 0).then_some(one_copy as f64)),
            r.last_s,
            ratio(r.last_s, alone.map(|a| a.last_s)),
            cpu_summary(&r.cpu_s),
            r.registry_cpu_s.map_or("n/a".into(), |c| format!("{c:.1}")),
            r.machine_busy,
            mib(r.peers),
            mib(r.registry)
        );
    }
    let _ = writeln!(out, "\nIssue #7 targets, 8 nodes, p2p, all cold:\n");
    let cold8 = rows.iter().find(|r| r.mode == Mode::AllCold && r.nodes == 8);
    match (cold8, alone) {
        (Some(c), Some(a)) if one_copy > 0 => {
            let copies = c.egress as f64 / one_copy as f64;
            let times = c.last_s / a.last_s;
            let verdict = |ok: bool| if ok { "**holds**" } else { "**does not hold**" };
            let _ = writeln!(
                out,
                "- registry egress <= 1.25 x one copy: {} ({:.2} x: {} of {} MiB)\n- last node <= 2 x a \
                 single node alone: {} ({:.2} x: {:.2} s against {:.2} s)",
                verdict(copies <= 1.25),
                copies,
                mib(c.egress),
                mib(one_copy),
                verdict(times <= 2.0),
                times,
                c.last_s,
                a.last_s
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "- not measured: needs THAW_BENCH_NODES with 1 and 8 and THAW_BENCH_MODES with registry and cold"
            );
        }
    }
    out
}

/// Two line charts side by side: registry egress in copies, and seconds to the last node,
/// against the node count, one line per mode. The font is read at run time (DejaVu Sans),
/// as the integration runner's plots do.
fn plot(path: &Path, rows: &[Row], one_copy: u64) -> Result<(), String> {
    use plotters::prelude::*;
    let font = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"]
        .iter()
        .find(|p| Path::new(p).is_file())
        .ok_or("no DejaVu Sans font (Debian's fonts-dejavu-core)")?;
    let bytes = std::fs::read(font).map_err(|e| e.to_string())?;
    plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| "not a usable font".to_string())?;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (left, right) = root.split_horizontally(600);
    let max_nodes = rows.iter().map(|r| r.nodes).max().unwrap_or(1) as f64;
    let colors = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e), RGBColor(0x2c, 0xa0, 0x2c)];
    let modes = Mode::ALL;
    type Pick = fn(&Row, u64) -> f64;
    let panels: [(&DrawingArea<BitMapBackend, plotters::coord::Shift>, &str, Pick); 2] = [
        (&left, "registry egress (copies of the snapshot)", |r, c| r.egress as f64 / c.max(1) as f64),
        (&right, "time to the last node (s)", |r, _| r.last_s),
    ];
    for (area, title, pick) in panels {
        let top = rows.iter().map(|r| pick(r, one_copy)).fold(0.0, f64::max) * 1.15 + 0.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0.5f64..max_nodes + 0.5, 0f64..top)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("nodes pulling at once")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|x| e(&x))?;
        for (mode, color) in modes.iter().zip(colors) {
            if !rows.iter().any(|r| r.mode == *mode) {
                continue;
            }
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.mode == *mode)
                .map(|r| (r.nodes as f64, pick(r, one_copy)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(mode.label())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}
