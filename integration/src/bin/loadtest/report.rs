//! The load test's Markdown report: the setup, the latency table and the totals.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use thaw_integration::corpus;

use crate::workload::{Counters, Kind, Outcome, MIX};
use crate::{workspace_root, Args, CHANGED_PAGES, PER_CLIENT_CAP};

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.0}")
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok())
        })
        .map_or("?".into(), |k| format!("{:.0} GiB", k as f64 / 1048576.0));
    format!("{cores} cores ({cpu}), {mem} RAM, Linux {}", command_line("uname", &["-r"]))
}

pub(crate) fn report(
    args: &Args,
    snapshots: &[corpus::Snapshot],
    outcome: &Outcome,
    counters: &Counters,
    elapsed: Duration,
    base_push: Duration,
    revisions: usize,
) -> (String, bool) {
    let total_ops: usize = outcome.latencies.values().map(Vec::len).sum();
    let secs = elapsed.as_secs_f64();
    let mut md = String::new();
    let ok = outcome.errors.is_empty() && outcome.corrupt.is_empty();
    md.push_str("### Load test: concurrent clients pushing and pulling mixed snapshots\n\n");
    md.push_str(&format!(
        "Written by `cargo run -p thaw-integration --release --bin loadtest{}` (issue #9). {} concurrent clients \
         (tokio tasks, each with its own `thaw_client::Registry`) against one `thaw-registry` process \
         (filesystem storage, `--auth-config` with one user whom every client logs in as, default limits but \
         {PER_CLIENT_CAP} requests in flight per client address, as all honest clients share 127.0.0.1: {} requests \
         in flight, then a {} s wait before 503). Clients start \
         operations for {} s; the run ends when the last one finishes ({:.0} s), and rates are over that time. \
         Clients and registry share the machine's cores, so latencies include the clients' own chunking, \
         hashing and verification.\n\n",
        if args.quick { " -- --quick" } else { "" },
        args.clients,
        thaw_registry_limits().0,
        thaw_registry_limits().1,
        args.seconds,
        secs
    ));
    md.push_str(&format!(
        "- Machine: {}\n- Versions: thaw {} (git {}), {}\n- Corpus: `{}` ({} snapshots: {}), pushed first in {:.1} s\n\
         - Mix (weights of 100): {}\n- Revisions rewrite {CHANGED_PAGES} memory pages of a base and push with it as `base`\n\n",
        machine(),
        env!("CARGO_PKG_VERSION"),
        command_line("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]),
        command_line("rustc", &["--version"]),
        args.corpus.strip_prefix(workspace_root()).unwrap_or(&args.corpus).display(),
        snapshots.len(),
        snapshots.iter().map(|s| s.label()).collect::<Vec<_>>().join(", "),
        base_push.as_secs_f64(),
        MIX.iter().map(|(k, w)| format!("{} {w}", k.name())).collect::<Vec<_>>().join(", "),
    ));
    md.push_str("| Operation | Count | Per second | p50 ms | p95 ms | p99 ms | max ms |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for (kind, _) in MIX {
        let mut l = outcome.latencies.get(&kind).cloned().unwrap_or_default();
        l.sort();
        md.push_str(&format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} |\n",
            kind.name(),
            l.len(),
            l.len() as f64 / secs,
            ms(percentile(&l, 50.0)),
            ms(percentile(&l, 95.0)),
            ms(percentile(&l, 99.0)),
            ms(l.last().copied().unwrap_or_default()),
        ));
    }
    md.push_str(&format!(
        "\n- Operations: {total_ops} ({:.1}/s); pulled and verified {:.1} GiB ({:.0} MiB/s of snapshot files)\n\
         - Revisions pushed: {}; still listed at the end: {revisions}\n\
         - Errors: **{}**; corrupt answers: **{}**\n\
         - 503s seen (and retried) by the raw HTTP operations: {}; 429s: {} (thaw-client retries transient answers \
         itself and does not count them)\n- Registry peak RSS (`VmHWM`): {{RSS_PEAK}}\n",
        total_ops as f64 / secs,
        outcome.bytes_pulled as f64 / (1u64 << 30) as f64,
        outcome.bytes_pulled as f64 / (1u64 << 20) as f64 / secs,
        outcome.latencies.get(&Kind::PushRevision).map_or(0, Vec::len),
        outcome.errors.len(),
        outcome.corrupt.len(),
        counters.raw_503.load(Ordering::Relaxed),
        counters.raw_429.load(Ordering::Relaxed),
    ));
    for e in outcome.corrupt.iter().chain(&outcome.errors).take(20) {
        md.push_str(&format!("  - {e}\n"));
    }
    (md, ok)
}

/// The registry's default inflight limit and wait, as documented in its limits module.
fn thaw_registry_limits() -> (usize, u64) {
    (128, 5)
}
