//! The report's node-side sections: node-cache `ensure`, P2P egress and extender latency
//! (measured by `cluster.rs`), each related to the baselines' restores where one exists.

use std::fmt::Write as _;
use std::path::Path;

use plotters::style::RGBColor;

use crate::cluster::{percentile, Ensure, Round};
use crate::plot::{self, Series, COLORS};
use crate::report::median;
use crate::systems::Kind;
use crate::{mib, Args, Measured, PULL_EMPTY, PULL_SEEDED};

fn med_of(v: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.collect();
    (!v.is_empty()).then(|| median(&mut v))
}

/// Median wall time and bytes fetched (down) of a baseline's restore on network `net`.
fn baseline(measured: &Measured, net: usize, kind: Kind, scenario: &str) -> Option<(f64, f64)> {
    let samples = measured.samples.get(&(net, kind, scenario))?;
    Some((med_of(samples.iter().map(|s| s.secs))?, med_of(samples.iter().map(|s| s.wire.down as f64))?))
}

fn ratio(base: Option<f64>, thaw: Option<f64>) -> String {
    match (base, thaw) {
        (Some(b), Some(t)) if t > 0.0 => format!("{:.1}×", b / t),
        _ => "–".into(),
    }
}

fn opt_mib(v: Option<f64>) -> String {
    v.map_or("not run".into(), |b| format!("{:.1}", b / (1u64 << 20) as f64))
}

fn opt_secs(v: Option<f64>) -> String {
    v.map_or("not run".into(), |s| format!("{s:.2}"))
}

/// Medians of the fetching ensures: (secs, min, max, registry down, local, peers, registry).
struct EnsureMed {
    secs: f64,
    min: f64,
    max: f64,
    down: f64,
    local: f64,
    registry: f64,
}

fn ensure_med(v: &[Ensure]) -> Option<EnsureMed> {
    Some(EnsureMed {
        secs: med_of(v.iter().map(|e| e.secs))?,
        min: v.iter().map(|e| e.secs).fold(f64::MAX, f64::min),
        max: v.iter().map(|e| e.secs).fold(f64::MIN, f64::max),
        down: med_of(v.iter().map(|e| e.wire.down as f64))?,
        local: med_of(v.iter().map(|e| e.local as f64))?,
        registry: med_of(v.iter().map(|e| e.registry as f64))?,
    })
}

struct RoundMed {
    secs: f64,
    down: f64,
    peers: f64,
}

fn round_med(v: &[Round]) -> Option<RoundMed> {
    Some(RoundMed {
        secs: med_of(v.iter().map(|r| r.secs_to_last))?,
        down: med_of(v.iter().map(|r| r.wire.down as f64))?,
        peers: med_of(v.iter().map(|r| r.peers as f64))?,
    })
}

/// Median registry bytes (down) for the thaw rows of the plot: cold, previous cached,
/// P2P on, P2P off; loopback.
pub(crate) fn write(md: &mut String, args: &Args, measured: &Measured, plot_dir: &Path) {
    if measured.nodes.is_empty() && measured.extender.is_none() {
        return;
    }
    let _ = writeln!(md, "## Node-side scenarios: node cache, P2P, extender\n");
    let nodes = measured.nodes.values().next().map_or(args.nodes, |n| n.nodes);
    let _ = writeln!(
        md,
        "Against the thaw-registry of the first thaw repetition on each network, after its \
         scenarios above (it holds the whole corpus). The real `thaw-node-cache` binary, each \
         with a fresh cache directory, runs where the clients run (with a link: in its network \
         namespace, so every registry byte crosses the limited link); times are wall time \
         around the HTTP call to its local API, *registry down* is what the proxy in front of \
         the registry counted (HTTP included), and *chunks* are the `ensure` answer's \
         uncompressed bytes by source. Single-node caches run with `--no-publish` and no peer \
         token, so the count is the restore alone. Fetching rows are medians of {reps} fresh \
         cache(s), range in brackets. The baselines' figures are their restores above on the \
         same network (a node cache restores the same snapshot): oras and S3 have no node \
         cache, so each row compares with a whole fetch.\n",
        reps = args.reps
    );
    for (ni, net) in measured.nets.iter().enumerate() {
        let Some(n) = measured.nodes.get(&ni) else { continue };
        let _ = writeln!(md, "### 6. Node cache `ensure` of the new revision ({net})\n");
        let _ = writeln!(
            md,
            "| case | thaw s (range) | registry down MiB | chunks local / registry MiB | oras s | × thaw | oras MiB | × thaw | S3 s | × thaw | S3 MiB | × thaw |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (case, samples, scenario) in [
            ("cold (empty cache) vs restore onto an empty node", &n.cold, PULL_EMPTY),
            ("previous revision cached vs restore with it on the node", &n.previous_cached, PULL_SEEDED),
        ] {
            let Some(t) = ensure_med(samples) else { continue };
            let (o, s) =
                (baseline(measured, ni, Kind::Oras, scenario), baseline(measured, ni, Kind::S3, scenario));
            let range =
                if samples.len() > 1 { format!(" ({:.2}–{:.2})", t.min, t.max) } else { String::new() };
            let _ = writeln!(
                md,
                "| {case} | {:.2}{range} | {:.1} | {:.1} / {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
                t.secs,
                t.down / (1u64 << 20) as f64,
                t.local / (1u64 << 20) as f64,
                t.registry / (1u64 << 20) as f64,
                opt_secs(o.map(|o| o.0)),
                ratio(o.map(|o| o.0), Some(t.secs)),
                opt_mib(o.map(|o| o.1)),
                ratio(o.map(|o| o.1), Some(t.down)),
                opt_secs(s.map(|s| s.0)),
                ratio(s.map(|s| s.0), Some(t.secs)),
                opt_mib(s.map(|s| s.1)),
                ratio(s.map(|s| s.1), Some(t.down)),
            );
        }
        if !n.hits_ms.is_empty() {
            let _ = writeln!(
                md,
                "\nWarm hit (the snapshot cached; {} ensure + release pairs, the release not timed): \
                 p50 **{:.2} ms**, p99 **{:.2} ms**, max {:.2} ms, 0 bytes from the registry. No \
                 baseline: oras and S3 keep no cache on the node, so every start is a full restore \
                 (the rows above).\n",
                n.hits_ms.len(),
                percentile(&n.hits_ms, 0.50),
                percentile(&n.hits_ms, 0.99),
                percentile(&n.hits_ms, 1.0),
            );
        }

        let _ =
            writeln!(md, "### 7. P2P egress: {nodes} nodes, one warm, {} cold at once ({net})\n", nodes - 1);
        let cold = nodes - 1;
        let (on, off) = (round_med(&n.p2p_on), round_med(&n.p2p_off));
        let (o, s) =
            (baseline(measured, ni, Kind::Oras, PULL_EMPTY), baseline(measured, ni, Kind::S3, PULL_EMPTY));
        let _ = writeln!(
            md,
            "Node 0 ensures the new revision and is listed in the node directory as holding it; \
             then the other {cold} fresh node caches ensure it at the same moment. *P2P on*: every \
             node with `--peer-listen` and a cluster token (`--peer-token-file`), so cold nodes \
             fetch what peers hold from them (docs/API.md, peer API); *P2P off*: no peer service \
             and no token, every cold node fetches from the registry. Registry egress is the \
             proxy's *down* count over the whole round (node-directory reads and holdings \
             writes included); time is until the last cold node had its answer. Medians of {} \
             round(s) each. oras and S3 were not run concurrently: their rows are {cold} × the \
             bytes their single restore onto an empty node fetched (above), i.e. every cold node \
             fetching the whole snapshot, so they have no time.\n",
            n.p2p_on.len()
        );
        let _ = writeln!(
            md,
            "| system | registry egress MiB | from peers MiB (chunks) | time to last node s | egress × thaw P2P |\n\
             |---|---:|---:|---:|---:|"
        );
        let t_on = on.as_ref().map(|r| r.down);
        if let Some(r) = &on {
            let _ = writeln!(
                md,
                "| thaw, P2P on | {:.1} | {:.1} | {:.2} | 1.0× |",
                mib(r.down as u64),
                mib(r.peers as u64),
                r.secs
            );
        }
        if let Some(r) = &off {
            let _ = writeln!(
                md,
                "| thaw, P2P off | {:.1} | {:.1} | {:.2} | {} |",
                mib(r.down as u64),
                mib(r.peers as u64),
                r.secs,
                ratio(Some(r.down), t_on)
            );
        }
        for (kind, b) in [(Kind::Oras, o), (Kind::S3, s)] {
            let total = b.map(|b| b.1 * cold as f64);
            let _ = writeln!(
                md,
                "| {} ({cold} × whole snapshot, computed) | {} | – | – | {} |",
                kind.label(),
                opt_mib(total),
                ratio(total, t_on)
            );
        }
        let _ = writeln!(md);
    }

    if let Some(e) = &measured.extender {
        let _ = writeln!(md, "### 8. Extender latency (loopback)\n");
        let _ = writeln!(
            md,
            "The real `thaw-extender --holdings registry` reading the run's registry: its node \
             directory holds {} synthetic node records (node *i* holding snapshot *i* mod {} of \
             the corpus, with its real manifest digest), so coverage is scored from the real \
             recipes. Each call is kube-scheduler's `ExtenderArgs` (a Knative pod annotated \
             `thaw.dev/snapshot` with the new revision, `NodeNames` of all {} nodes, as for \
             `nodeCacheCapable: true`) over one kept-alive connection, timed after the extender \
             scored the pod (it scored {} node(s) above 0). No baseline: kube-scheduler's default \
             plugins make no such call, so this is added scheduling latency per pod.\n",
            e.nodes, e.snapshots, e.nodes, e.scored_nodes
        );
        let _ = writeln!(md, "| verb | calls | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|");
        for (verb, v) in [("/prioritize", &e.prioritize_ms), ("/filter", &e.filter_ms)] {
            let _ = writeln!(
                md,
                "| {verb} | {} | {:.2} | {:.2} | {:.2} |",
                v.len(),
                percentile(v, 0.5),
                percentile(v, 0.99),
                percentile(v, 1.0)
            );
        }
        let _ = writeln!(md);
    }

    // The plot: registry bytes per node-side scenario, loopback.
    let Some(n) = measured.nodes.get(&0) else { return };
    let (cold, prev) = (ensure_med(&n.cold), ensure_med(&n.previous_cached));
    let (on, off) = (round_med(&n.p2p_on), round_med(&n.p2p_off));
    let to_mib = |v: f64| v / (1u64 << 20) as f64;
    let base = |k: Kind, sc: &str| baseline(measured, 0, k, sc).map(|b| to_mib(b.1));
    let cold_nodes = (nodes - 1) as f64;
    let series = vec![
        Series {
            label: "thaw (P2P on)".into(),
            color: COLORS[0],
            values: vec![
                cold.map(|c| to_mib(c.down)),
                prev.map(|p| to_mib(p.down)),
                on.map(|r| to_mib(r.down)),
            ],
        },
        Series {
            label: "thaw, P2P off".into(),
            color: RGBColor(0x94, 0x67, 0xbd),
            values: vec![None, None, off.map(|r| to_mib(r.down))],
        },
        Series {
            label: Kind::Oras.label().into(),
            color: COLORS[1],
            values: vec![
                base(Kind::Oras, PULL_EMPTY),
                base(Kind::Oras, PULL_SEEDED),
                base(Kind::Oras, PULL_EMPTY).map(|b| b * cold_nodes),
            ],
        },
        Series {
            label: Kind::S3.label().into(),
            color: COLORS[2],
            values: vec![
                base(Kind::S3, PULL_EMPTY),
                base(Kind::S3, PULL_SEEDED),
                base(Kind::S3, PULL_EMPTY).map(|b| b * cold_nodes),
            ],
        },
    ];
    let p2p_group = format!("{} cold nodes", nodes - 1);
    let groups = ["cold ensure", "ensure, prev. cached", p2p_group.as_str()];
    let drawn = plot::bars(
        &plot_dir.join("nodes.png"),
        "Registry bytes per node-side scenario (MiB, loopback)",
        "MiB",
        &groups,
        &series,
    );
    plot::embed(md, "nodes.png", "registry bytes of the node-side scenarios", drawn);
}
