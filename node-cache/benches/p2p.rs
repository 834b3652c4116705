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
//!   snapshot until it finishes: the nodes swarm (docs/DECISIONS.md D19).
//! - **p2p, one seed**: one node pulls first (not counted), then the others at once.
//!
//! The registry's uplink is limited (`THAW_BENCH_UPLINK_MBIT`, default 1000: one 1 Gbit/s
//! NIC, shared by every connection, at the proxy); the links between nodes are loopback,
//! not limited (no network namespaces here), so P2P times are optimistic for a real network.

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
    let mbit: f64 = std::env::var("THAW_BENCH_UPLINK_MBIT").map_or(1000.0, |v| v.parse().expect("a number"));
    let host = uplink(registry.host(), sent.clone(), mbit * 1e6 / 8.0).await;
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
        "Snapshot: {source}, {} MiB of files. Registry uplink limited to {mbit} Mbit/s (shared by \
         all connections) at a proxy in front of the registry, which counts its egress (HTTP \
         included); node-to-node traffic on loopback, not limited. One copy (one node alone) = {} MiB.\n",
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
    if let Some(path) = std::env::var_os("THAW_BENCH_PLOT") {
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
    let modes = [Mode::Registry, Mode::AllCold, Mode::OneSeed];
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
