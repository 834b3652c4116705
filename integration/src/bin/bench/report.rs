//! The environment, and the Markdown report with its plots.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use thaw_integration::corpus::Snapshot;

use crate::plot::{self, Series, COLORS};
use crate::systems::{snapshot_files, Kind, Sample};
use crate::{mib, version_of, Args, Measured, Plan, Tools, PULL_EMPTY, PULL_SEEDED, PUSH_BASE, PUSH_NEW};

// ---------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------

pub(crate) struct Environment {
    lines: Vec<String>,
    load_before: String,
    oras_startup: Option<f64>,
}

fn read_first(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_owned()).unwrap_or_default()
}

impl Environment {
    /// `load_before`: `/proc/loadavg` when the run started.
    pub(crate) fn gather(tools: &Tools, args: &Args, load_before: String) -> Self {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpu = read_first("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown CPU".into());
        let mem = read_first("/proc/meminfo", "MemTotal")
            .and_then(|v| v.trim_end_matches(" kB").trim().parse::<f64>().ok())
            .map_or("?".into(), |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0));
        let kernel = version_of("uname", &["-sr"]);
        let mut rev = format!("git {}", version_of("git", &["rev-parse", "--short=12", "HEAD"]));
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        // A run may measure binaries built from a clean export of some commit while the
        // checkout it runs in holds other work in progress: THAW_BENCH_SOURCE names what
        // the binaries were built from, and replaces the checkout's revision.
        if let Ok(source) = std::env::var("THAW_BENCH_SOURCE") {
            rev = source;
        } else if dirty {
            rev.push_str(" (working tree with uncommitted changes)");
        }
        let py = &tools.python;
        let oras = version_of(py, &["-c", "import importlib.metadata as m; print(m.version('oras'))"]);
        let minio = match &tools.minio {
            Ok(bin) => version_of(&bin.to_string_lossy(), &["--version"]),
            Err(why) => format!("not run: {why}"),
        };
        let lines = vec![
            format!("- Machine: {cpu}, {cores} cores (`nproc`), {mem} RAM, {kernel}"),
            format!("- thaw: `{rev}`, `{}`", version_of(&tools.thaw.to_string_lossy(), &["--version"])),
            format!("- docker-registry: `{}`", version_of("/usr/bin/docker-registry", &["--version"])),
            format!("- oras-py: {oras} on `{}`", version_of(py, &["--version"])),
            format!("- MinIO: `{minio}`"),
            format!("- Corpus: `{}`; repetitions: {}", args.corpus.display(), args.reps),
        ];
        // What every oras-py call pays before its first request: Python start-up and import.
        let mut startup = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            if Command::new(py).args(["-c", "import oras.client"]).output().is_ok_and(|o| o.status.success())
            {
                startup.push(t.elapsed().as_secs_f64());
            }
        }
        let oras_startup = (!startup.is_empty()).then(|| median(&mut startup));
        Self { lines, load_before, oras_startup }
    }
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median of one measurement over the repetitions.
#[derive(Clone, Copy)]
struct Med {
    secs: f64,
    min: f64,
    max: f64,
    up: f64,
    down: f64,
    client_up: Option<f64>,
    client_down: Option<f64>,
}

fn med(samples: &[Sample]) -> Option<Med> {
    if samples.is_empty() {
        return None;
    }
    let col = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        median(&mut v)
    };
    let secs: Vec<f64> = samples.iter().map(|s| s.secs).collect();
    let client = samples.iter().all(|s| s.client.is_some());
    Some(Med {
        secs: col(&|s| s.secs),
        min: secs.iter().copied().fold(f64::MAX, f64::min),
        max: secs.iter().copied().fold(f64::MIN, f64::max),
        up: col(&|s| s.wire.up as f64),
        down: col(&|s| s.wire.down as f64),
        client_up: client.then(|| col(&|s| s.client.map_or(0.0, |c| c.up as f64))),
        client_down: client.then(|| col(&|s| s.client.map_or(0.0, |c| c.down as f64))),
    })
}

fn ratio(base: Option<f64>, thaw: Option<f64>) -> String {
    match (base, thaw) {
        (Some(b), Some(t)) if t > 0.0 => format!("{:.1}×", b / t),
        _ => "–".into(),
    }
}

fn cell_mib(v: Option<f64>) -> String {
    v.map_or("not run".into(), |b| format!("{:.1}", b / (1u64 << 20) as f64))
}

fn cell_secs(m: Option<Med>, reps: usize) -> String {
    match m {
        Some(m) if reps > 1 => format!("{:.2} ({:.2}–{:.2})", m.secs, m.min, m.max),
        Some(m) => format!("{:.2}", m.secs),
        None => "not run".into(),
    }
}

/// The direction of traffic a scenario is about.
fn moved(scenario: &str, m: &Med) -> f64 {
    if scenario == PULL_EMPTY || scenario == PULL_SEEDED {
        m.down
    } else {
        m.up
    }
}

pub(crate) fn write(
    args: &Args,
    plan: &Plan,
    measured: &Measured,
    ingest: &crate::ingest::Ingest,
    env: &Environment,
    total_secs: f64,
) -> Result<()> {
    let mut md = String::new();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let command: Vec<String> = std::env::args().skip(1).collect();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo run -p thaw-integration --release --bin bench -- {}` \
         (source: `integration/src/bin/bench/`), finished at Unix time {now}, in {:.0} s. \
         Regenerate rather than edit: every number below comes from that run.\n",
        command.join(" "),
        total_secs
    );
    let _ = writeln!(md, "## Machine and versions\n");
    for l in &env.lines {
        let _ = writeln!(md, "{l}");
    }
    let _ = writeln!(
        md,
        "- Load average before / after: `{}` / `{}`. The machine is shared (other builds run \
         on its 2 cores), so wall times are noisy; medians of {} repetition(s) are given, with \
         the range in brackets.\n",
        env.load_before,
        load_average(),
        args.reps
    );

    // Corpus.
    let _ = writeln!(md, "## Corpus\n");
    let _ = writeln!(
        md,
        "Made by `integration/corpus/make-corpus.sh` (real guest memory of small Linux VMs under \
         QEMU; see `integration/corpus/README.md`). Every system stores the snapshots below \
         except **{new}**, then the new revision **{new}** (the previous revision **{prev}** \
         is already stored), then restores {new}.\n",
        new = plan.new.label(),
        prev = plan.previous.label()
    );
    let _ = writeln!(md, "| snapshot | files | MiB | non-zero 4 KiB pages, MiB |\n|---|---|---:|---:|");
    let mut all: Vec<&Snapshot> = plan.base.iter().collect();
    all.push(&plan.new);
    let mut corpus_bytes = 0;
    for s in &all {
        let names = snapshot_files(&s.dir)?;
        let mut size = 0;
        let mut nz = 0;
        for n in &names {
            let p = s.dir.join(n);
            size += std::fs::metadata(&p)?.len();
            nz += crate::ingest::nonzero_bytes(&p)?;
        }
        corpus_bytes += size;
        let _ = writeln!(md, "| {} | {} | {:.1} | {:.1} |", s.label(), names.join(", "), mib(size), mib(nz));
    }
    let _ = writeln!(md, "| **all** | | **{:.1}** | |\n", mib(corpus_bytes));

    // Method.
    let _ = writeln!(md, "## Method\n");
    let _ = writeln!(
        md,
        "- **thaw**: the real `thaw-registry` binary on filesystem storage, the real `thaw` CLI \
         (`thaw push`, `thaw pull`, `thaw pull --seed <previous revision dir>`), `_thaw` fast path.\n\
         - **oras**: Debian's `docker-registry` (distribution) on filesystem storage, oras-py \
         through `integration/scripts/oras_roundtrip.py` (`push`: every file one layer, \
         `pull`). Each call is a fresh Python process: start-up and `import oras.client` take {} \
         of every oras time below.\n\
         - **S3**: the reference system's way: the four files PUT whole to MinIO (multipart, \
         16 MiB parts, 4 in flight, above 16 MiB) and GET whole into files, with the \
         `object_store` crate. It has no notion of a previous revision, so both restores fetch \
         everything; so does oras.\n\
         - **Bytes on the wire** are counted by a TCP proxy in the benchmark process in front \
         of each server: everything the client sent (*up*) or received (*down*), HTTP \
         headers included. {link}\n\
         - **Stored bytes**: the lengths of every file under the registry's storage directory \
         (thaw, docker-registry), the sizes of every object in the bucket prefix (S3, as MinIO \
         reports them; its erasure-coding overhead on disk is not counted).\n\
         - Every system starts empty in every repetition; every restore is checked byte for \
         byte against the source files (untimed). Restores write into a fresh directory on \
         the same disk; the page cache is not dropped (the machine is shared).\n",
        env.oras_startup.map_or("an unmeasured time".into(), |s| format!("~{s:.2} s")),
        link = match args.link_mbit {
            None => "Loopback only: no bandwidth limit, so times show CPU and disk cost and \
                     understate what bytes cost on a real network."
                .to_owned(),
            Some(mbit) => format!(
                "Every scenario runs twice: clients on loopback, and clients in a network \
                 namespace of the run's own behind a veth pair with `tc tbf` at {mbit} Mbit/s \
                 on both ends (servers and proxies stay on the host; no added latency)."
            ),
        }
    );
    for (kind, why) in &measured.skipped {
        let _ = writeln!(md, "**{} was not run: {why}.**\n", kind.label());
    }

    // Medians.
    let get_on = |net: usize, k: Kind, s: &str| measured.samples.get(&(net, k, s)).and_then(|v| med(v));
    let get = |k: Kind, s: &str| get_on(0, k, s);
    let stored = |k: Kind| {
        measured.stored.get(&k).map(|v| {
            let mut f: Vec<f64> = v.iter().map(|b| *b as f64).collect();
            median(&mut f)
        })
    };

    // Headline table.
    let scenarios = [PUSH_BASE, PUSH_NEW, PULL_EMPTY, PULL_SEEDED];
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "Bytes in MiB (2^20), times in seconds; *× thaw* is the baseline's figure divided by \
         thaw's (above 1: thaw moves or stores less, or is faster).\n"
    );
    let (ts, os, ss) = (stored(Kind::Thaw), stored(Kind::Oras), stored(Kind::S3));
    for (ni, net) in measured.nets.iter().enumerate() {
        if measured.nets.len() > 1 {
            let _ = writeln!(md, "### Clients on {net}\n");
        }
        let _ = writeln!(
            md,
            "| scenario | thaw MiB | oras MiB | × thaw | S3 MiB | × thaw | thaw s | oras s | × thaw | S3 s | × thaw |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let _ = writeln!(
            md,
            "| 1. stored after all {} snapshots | {} | {} | {} | {} | {} | | | | | |",
            all.len(),
            cell_mib(ts),
            cell_mib(os),
            ratio(os, ts),
            cell_mib(ss),
            ratio(ss, ts)
        );
        for (i, sc) in scenarios.iter().enumerate() {
            let (t, o, s) =
                (get_on(ni, Kind::Thaw, sc), get_on(ni, Kind::Oras, sc), get_on(ni, Kind::S3, sc));
            let b = |m: Option<Med>| m.map(|m| moved(sc, &m));
            let w = |m: Option<Med>| m.map(|m| m.secs);
            let num = if i == 0 { "1b.".to_owned() } else { format!("{}.", i + 1) };
            let _ = writeln!(
                md,
                "| {num} {sc} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell_mib(b(t)),
                cell_mib(b(o)),
                ratio(b(o), b(t)),
                cell_mib(b(s)),
                ratio(b(s), b(t)),
                w(t).map_or("not run".into(), |v| format!("{v:.2}")),
                w(o).map_or("not run".into(), |v| format!("{v:.2}")),
                ratio(w(o), w(t)),
                w(s).map_or("not run".into(), |v| format!("{v:.2}")),
                ratio(w(s), w(t)),
            );
        }
        let _ = writeln!(md);
    }

    // One table per scenario.
    let _ = writeln!(md, "## Scenarios (clients on loopback)\n");
    let _ = writeln!(
        md,
        "### 1. Storage after pushing the whole corpus ({:.1} MiB of files)\n",
        mib(corpus_bytes)
    );
    let _ = writeln!(md, "| system | stored MiB | stored ÷ files | × thaw |\n|---|---:|---:|---:|");
    for k in Kind::ALL {
        let v = stored(k);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            k.label(),
            cell_mib(v),
            v.map_or("–".into(), |v| format!("{:.3}", v / corpus_bytes as f64)),
            ratio(v, ts)
        );
    }
    let _ = writeln!(md);
    let titles = [
        (PUSH_BASE, "1b. Pushing the corpus without the new revision (bytes sent)"),
        (PUSH_NEW, "2. Pushing the new revision after the previous one is stored (bytes sent)"),
        (PULL_EMPTY, "3. Restoring the new revision onto an empty node (bytes fetched)"),
        (PULL_SEEDED, "4. Restoring the new revision onto a node holding the previous one (bytes fetched)"),
    ];
    for (sc, title) in titles {
        let _ = writeln!(md, "### {title}\n");
        let _ = writeln!(
            md,
            "| system | up MiB | down MiB | wall s (range) | bytes × thaw | time × thaw |\n|---|---:|---:|---:|---:|---:|"
        );
        let t = get(Kind::Thaw, sc);
        for k in Kind::ALL {
            let m = get(k, sc);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                k.label(),
                cell_mib(m.map(|m| m.up)),
                cell_mib(m.map(|m| m.down)),
                cell_secs(m, args.reps),
                ratio(m.map(|m| moved(sc, &m)), t.map(|t| moved(sc, &t))),
                ratio(m.map(|m| m.secs), t.map(|t| t.secs)),
            );
        }
        if let Some(Med { client_up: Some(cu), client_down: Some(cd), .. }) = t {
            let _ = writeln!(
                md,
                "\nthaw's own counters (`--json` `bytes_sent`/`bytes_received`): {:.1} MiB sent, \
                 {:.1} MiB received.",
                cu / (1u64 << 20) as f64,
                cd / (1u64 << 20) as f64
            );
        }
        let _ = writeln!(md);
    }

    // Ingest.
    crate::ingest::write_section(&mut md, &plan.new.label(), args.reps, ingest);
    let out_dir = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let plot_dir = out_dir.join("benchmarks");
    std::fs::create_dir_all(&plot_dir)?;
    crate::nodes_report::write(&mut md, args, measured, &plot_dir);
    crate::lazy_report::write(&mut md, args, measured, &plot_dir);
    if args.link_mbit.is_none() {
        let _ = writeln!(md, "### Not measured yet\n");
        let _ = writeln!(
            md,
            "- A bandwidth-limited link: this run is loopback only (`--link-mbit 1000` adds one).\n"
        );
    }

    // Plots.
    let _ = writeln!(md, "## Plots\n");
    let series = |f: &dyn Fn(Kind) -> Option<f64>| -> Vec<Series> {
        Kind::ALL
            .iter()
            .zip(COLORS)
            .map(|(k, color)| {
                let label = if measured.skipped.contains_key(k) {
                    format!("{} (not run)", k.label())
                } else {
                    k.label().to_owned()
                };
                Series { label, color, values: vec![f(*k)] }
            })
            .collect()
    };
    let mut bytes_series = series(&|k| stored(k).map(|b| b / (1u64 << 20) as f64));
    for sc in scenarios {
        for (s, k) in bytes_series.iter_mut().zip(Kind::ALL) {
            s.values.push(get(k, sc).map(|m| moved(sc, &m) / (1u64 << 20) as f64));
        }
    }
    let groups_b =
        ["stored (all)", "push corpus", "push new rev.", "restore (empty)", "restore (prev. held)"];
    let groups_t = ["push corpus", "push new rev.", "restore (empty)", "restore (prev. held)"];
    let mut plots = vec![(
        "bytes.png".to_owned(),
        "bytes stored and moved".to_owned(),
        plot::bars(
            &plot_dir.join("bytes.png"),
            "Bytes stored / moved on the wire (MiB)",
            "MiB",
            &groups_b,
            &bytes_series,
        ),
    )];
    for (ni, net) in measured.nets.iter().enumerate() {
        let mut time_series = series(&|_| None);
        for (s, k) in time_series.iter_mut().zip(Kind::ALL) {
            s.values = scenarios.iter().map(|sc| get_on(ni, k, sc).map(|m| m.secs)).collect();
        }
        let file = if ni == 0 { "time.png".to_owned() } else { format!("time-net{ni}.png") };
        let drawn = plot::bars(
            &plot_dir.join(&file),
            &format!("Wall time (s, median), clients on {net}"),
            "seconds",
            &groups_t,
            &time_series,
        );
        plots.push((file, format!("wall time per scenario, {net}"), drawn));
    }
    for (file, alt, drawn) in plots {
        plot::embed(&mut md, &file, &alt, drawn);
    }
    component_reports(&mut md, args.out.parent().unwrap_or(Path::new("")));
    if let Some(dir) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, md).with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

/// Component benchmarks with a bench binary of their own (node cache, P2P, extender, the
/// load test) leave their Markdown in `benchmarks/<name>.md` beside the report; they are
/// included as they are, marked as not regenerated by this run.
const COMPONENT_REPORTS: [(&str, &str); 4] = [
    (
        "node-cache.md",
        "THAW_BENCH_REPORT=docs/benchmarks/node-cache.md cargo bench -p thaw-node-cache --bench ensure",
    ),
    ("p2p.md", "THAW_BENCH_REPORT=docs/benchmarks/p2p.md cargo bench -p thaw-node-cache --bench p2p"),
    (
        "extender.md",
        "cargo bench -p thaw-extender --bench prioritize > docs/benchmarks/extender.md (heading level 3)",
    ),
    ("load.md", "cargo run -p thaw-integration --release --bin loadtest (writes docs/benchmarks/load.md)"),
];

fn component_reports(md: &mut String, out_dir: &Path) {
    let reports: Vec<(&str, Option<String>, &str)> = COMPONENT_REPORTS
        .iter()
        .map(|(file, command)| {
            (*file, std::fs::read_to_string(out_dir.join("benchmarks").join(file)).ok(), *command)
        })
        .collect();
    let _ = writeln!(
        md,
        "## Component benchmarks\n\nMeasured by their own bench binaries (commands below), not by this run; \
         each report is included as it was written.\n"
    );
    for (file, text, command) in reports {
        let _ = writeln!(md, "`{command}`\n");
        match text {
            Some(text) => {
                let _ = writeln!(md, "{}\n", beside_report(text.trim_end()));
            }
            None => {
                let _ = writeln!(md, "`benchmarks/{file}` is absent: that command has not written it yet.\n");
            }
        }
    }
}

/// `text` of a component report with its images (`![..](name.png)`, written beside it in
/// `benchmarks/`) linked from the main report, which sits one directory up.
fn beside_report(text: &str) -> String {
    text.lines()
        .map(|line| match (line.starts_with("!["), line.find("](")) {
            (true, Some(i)) if !line[i + 2..].contains('/') => {
                format!("{}](benchmarks/{}", &line[..i], &line[i + 2..])
            }
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::beside_report;

    #[test]
    fn component_images_are_linked_from_the_main_report() {
        let text = "| a | b |\n![egress](p2p.png)\n![kept](benchmarks/x.png)";
        assert_eq!(
            beside_report(text),
            "| a | b |\n![egress](benchmarks/p2p.png)\n![kept](benchmarks/x.png)"
        );
    }
}
