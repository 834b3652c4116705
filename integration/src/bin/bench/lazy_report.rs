//! The report's lazy-restore section (measured by `lazy.rs`): per snapshot, ready to resume,
//! working set served and fill complete against the eager `ensure` and the whole-file S3
//! restore of the same run; fault service times; the targets; a plot.

use std::fmt::Write as _;
use std::path::Path;

use plotters::style::RGBColor;

use crate::cluster::percentile;
use crate::lazy::{local_histograms, Histogram, LazySample, LazySnapshot, VCPUS};
use crate::plot::{self, Series, COLORS};
use crate::report::median;
use crate::{mib, Args, Measured};

/// Targets of issue #20.
const READY_TARGET_MS: f64 = 50.0;
const WORKING_SET_TARGET: f64 = 0.3;
const LOCAL_P50_TARGET_US: f64 = 10.0;
const LOCAL_P99_TARGET_US: f64 = 100.0;

fn med(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    median(&mut v)
}

/// Medians of one snapshot's samples.
struct Row<'a> {
    r: &'a LazySnapshot,
    eager_s: f64,
    eager_down: f64,
    s3_s: Option<f64>,
    answered_ms: f64,
    ready_ms: f64,
    working_set_s: f64,
    fill_s: f64,
    lazy_down: f64,
    hit_ready_ms: f64,
    hit_working_set_s: f64,
    /// On a node that fetched the published working set first; `None` when not measured.
    ws_ready_ms: Option<f64>,
    ws_working_set_s: Option<f64>,
    ws_fill_s: Option<f64>,
    ws_down: Option<f64>,
}

fn rows<'a>(measured: &Measured, net: usize, lazy: &'a [LazySnapshot]) -> Vec<Row<'a>> {
    lazy.iter()
        .filter(|r| !r.lazy.is_empty())
        .map(|r| Row {
            r,
            eager_s: med(r.eager.iter().map(|e| e.secs)),
            eager_down: med(r.eager.iter().map(|e| e.wire.down as f64)),
            s3_s: measured.s3_each.get(&(net, r.label.clone())).map(|v| med(v.iter().copied())),
            answered_ms: med(r.lazy.iter().map(|s| s.answered_s * 1e3)),
            ready_ms: med(r.lazy.iter().map(|s| s.ready_s * 1e3)),
            working_set_s: med(r.lazy.iter().map(|s| s.working_set_s)),
            fill_s: med(r.lazy.iter().map(|s| s.fill_s)),
            lazy_down: med(r.lazy.iter().map(|s| s.wire.down as f64)),
            hit_ready_ms: med(r.lazy.iter().map(|s| s.hit_ready_s * 1e3)),
            hit_working_set_s: med(r.lazy.iter().map(|s| s.hit_working_set_s)),
            ws_ready_ms: measured_med(&r.with_working_set, |s| s.ready_s * 1e3),
            ws_working_set_s: measured_med(&r.with_working_set, |s| s.working_set_s),
            ws_fill_s: measured_med(&r.with_working_set, |s| s.fill_s),
            ws_down: measured_med(&r.with_working_set, |s| s.wire.down as f64),
        })
        .collect()
}

/// The median of `f` over `samples`, `None` when there are none.
fn measured_med(samples: &[LazySample], f: impl Fn(&LazySample) -> f64) -> Option<f64> {
    (!samples.is_empty()).then(|| med(samples.iter().map(f)))
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn micros(ns: &[f64], q: f64) -> String {
    if ns.is_empty() {
        "–".into()
    } else {
        format!("{:.1}", percentile(ns, q) / 1e3)
    }
}

fn hist_cell(h: &Histogram, q: f64) -> String {
    match h.quantile_micros(q) {
        Some(v) if v.is_finite() => format!("≈{v:.1}"),
        Some(_) => "> 60 s".into(),
        None => "–".into(),
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

pub(crate) fn write(md: &mut String, args: &Args, measured: &Measured, plot_dir: &Path) {
    if measured.lazy.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Lazy restore: guest memory by page fault\n");
    let _ = writeln!(
        md,
        "Issue #20. Against the same thaw-registry as the node-side scenarios, per corpus snapshot, \
         each repetition on fresh node caches (the real `thaw-node-cache`, where the clients run: \
         with a link, in its namespace, so registry bytes cross it). *Eager*: an ordinary `ensure` \
         (all four files complete and verified). *Lazy*: `ensure` with `\"memory\": \"uffd\"`, then \
         a stand-in for Firecracker (`node-cache/tests/support/firecracker_stand_in.rs`, the one \
         the tests use; no KVM here) maps guest memory, registers it on a userfaultfd and hands \
         both to the answer's socket exactly as Firecracker's `PUT /snapshot/load` with a `Uffd` \
         backend does: from then on the VM **could resume**. {VCPUS} vCPU threads then touch the \
         pages of the snapshot's recorded fault trace (the pages its restored QEMU guest touched \
         while serving one request, in first-touch order; `integration/corpus/README.md`), each \
         page compared with the memory file: the **working set served**. The **fill completes** \
         when the background fill has written and verified the memory file and the node lists \
         the snapshot as cached. Every other page is then touched and compared too; a wrong page \
         fails the run. All times run from the `ensure` call. *Registry MiB*: the proxy's count \
         from the call until the fill completed (eager: the call). *S3 whole files*: the \
         reference system's GET of the four files, each snapshot, in the same run. Medians of \
         {} repetition(s). Then, on the same node with the snapshot cached, a second lazy \
         `ensure` (a hit, served by a page server over the cached file) replays the trace \
         again: every fault there is a **locally held chunk**. The rows above are first \
         restores (`--working-sets off`: no working set in the registry). Then one more node \
         restores each snapshot, touches its trace and publishes the working set it recorded \
         (D29), and the same measurement runs on fresh nodes that fetch that working set first \
         (`--working-sets use`): the **with its working set** table.\n",
        args.reps
    );
    for (ni, net) in measured.nets.iter().enumerate() {
        let Some(lazy) = measured.lazy.get(&ni) else { continue };
        let rows = rows(measured, ni, lazy);
        let _ = writeln!(md, "### 9. Lazy restore per snapshot ({net})\n");
        let _ = writeln!(
            md,
            "| snapshot | memory MiB | working set: pages (MiB, % of memory) | S3 whole files s | eager `ensure` s | \
             lazy: answer ms | ready to resume ms | eager ÷ ready | working set served s | ÷ eager | fill complete s | \
             registry MiB lazy / eager |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for w in &rows {
            let ws_bytes = w.r.trace_pages as u64 * 4096;
            let _ = writeln!(
                md,
                "| {} | {:.0} | {} ({:.1}, {:.1}%) | {} | {:.3} | {:.1} | **{:.1}** | {:.0}× | **{:.3}** | {:.2} | {:.3} | {:.1} / {:.1} |",
                w.r.label,
                mib(w.r.memory_bytes),
                w.r.trace_pages,
                mib(ws_bytes),
                100.0 * ws_bytes as f64 / w.r.memory_bytes as f64,
                w.s3_s.map_or("not run".into(), |s| format!("{s:.3}")),
                w.eager_s,
                w.answered_ms,
                w.ready_ms,
                w.eager_s * 1e3 / w.ready_ms,
                w.working_set_s,
                w.working_set_s / w.eager_s,
                w.fill_s,
                w.lazy_down / (1u64 << 20) as f64,
                w.eager_down / (1u64 << 20) as f64,
            );
        }
        let _ = writeln!(
            md,
            "\nWith its working set (a fresh node whose background fill fetched the working set an \
             earlier node published first, in its order):\n\n\
             | snapshot | eager `ensure` s | ready to resume ms | working set served s | ÷ eager | fill complete s | registry MiB |\n\
             |---|---:|---:|---:|---:|---:|---:|"
        );
        for w in &rows {
            let _ = writeln!(
                md,
                "| {} | {:.3} | {} | **{}** | {} | {} | {} |",
                w.r.label,
                w.eager_s,
                cell(w.ws_ready_ms, 1),
                cell(w.ws_working_set_s, 3),
                cell(w.ws_working_set_s.map(|v| v / w.eager_s), 2),
                cell(w.ws_fill_s, 3),
                cell(w.ws_down.map(|v| v / (1u64 << 20) as f64), 1),
            );
        }
        let _ = writeln!(
            md,
            "\nThe snapshot cached (a lazy `ensure` that is a hit; every fault a locally held chunk):\n\n\
             | snapshot | ready to resume ms | working set served s | traced guest: resume to answer, ms (TCG) |\n\
             |---|---:|---:|---:|"
        );
        for w in &rows {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.3} | {} |",
                w.r.label,
                w.hit_ready_ms,
                w.hit_working_set_s,
                w.r.traced_answer_ms.map_or("–".into(), |v| format!("{v:.0}"))
            );
        }

        let (data, zero) = local_histograms(lazy);
        let local: Vec<f64> =
            lazy.iter().flat_map(|r| &r.lazy).flat_map(|s| &s.local_faults_ns).map(|n| *n as f64).collect();
        let cold: Vec<f64> =
            lazy.iter().flat_map(|r| &r.lazy).flat_map(|s| &s.cold_faults_ns).map(|n| *n as f64).collect();
        let _ = writeln!(md, "\n### 10. Fault service time ({net})\n");
        let _ = writeln!(
            md,
            "*Page server*: `thaw_lazy_fault_service_seconds` from the node cache's `/metrics`, the \
             difference over the cached-snapshot replays: from reading a unit's first fault off the \
             userfaultfd until the `UFFDIO_COPY` of the faulting page (`UFFDIO_ZEROPAGE` of a zero \
             unit) returned and woke the vCPU, the page read from the cached memory file included; \
             one unit is one 64 KiB chunk (16 pages) or one zero run, and its other pages are filled \
             right after, so one fault still fills 16 pages or more. Quantiles are interpolated \
             inside the histogram's buckets (≈). *Stand-in*: how long a vCPU thread's touch of a page \
             that was not present blocked (read from `/proc/self/pagemap` just before), kernel \
             fault and wake-up included; a touch that waits for a unit another thread's fault \
             already asked for counts too. FaaSnap's figures are per 4 KiB page.\n"
        );
        let _ = writeln!(
            md,
            "| where | faults | p50 µs | p90 µs | p99 µs | max µs |\n|---|---:|---:|---:|---:|---:|"
        );
        for (what, h) in [
            ("page server, cached snapshot, data units", &data),
            ("page server, cached snapshot, zero units", &zero),
        ] {
            let _ = writeln!(
                md,
                "| {what} | {} | {} | {} | {} | – |",
                h.count(),
                hist_cell(h, 0.5),
                hist_cell(h, 0.9),
                hist_cell(h, 0.99)
            );
        }
        let minor: Vec<f64> = lazy.iter().flat_map(|r| &r.minor_faults_ns).map(|n| *n as f64).collect();
        for (what, v) in [
            ("stand-in, cached snapshot (locally held chunks)", &local),
            ("stand-in, empty node (chunks fetched; faults wait for their fetch)", &cold),
            (
                "this machine, no handler: a first write to fresh anonymous memory (one minor fault, per 4 KiB page)",
                &minor,
            ),
        ] {
            let _ = writeln!(
                md,
                "| {what} | {} | {} | {} | {} | {} |",
                v.len(),
                micros(v, 0.5),
                micros(v, 0.9),
                micros(v, 0.99),
                micros(v, 1.0)
            );
        }
        let _ = writeln!(
            md,
            "| published: FaaSnap, a page from the page cache (minor fault) | – | 3.7 | – | – | – |\n\
             | published: FaaSnap, a page from disk | – | 13.3 | – | – | – |\n"
        );

        // Targets.
        let worst = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).fold(f64::MIN, f64::max);
        let best = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).fold(f64::MAX, f64::min);
        let ready = worst(&|w| w.ready_ms);
        let speedup = best(&|w| w.eager_s * 1e3 / w.ready_ms);
        let ws = worst(&|w| w.working_set_s / w.eager_s);
        let ws_second = worst(&|w| w.ws_working_set_s.map_or(f64::INFINITY, |v| v / w.eager_s));
        let bytes = worst(&|w| w.lazy_down / w.eager_down);
        let extra = worst(&|w| w.lazy_down - w.eager_down);
        let (p50, p99) = (data.quantile_micros(0.5), data.quantile_micros(0.99));
        let (sp50, sp99) = (percentile(&local, 0.5) / 1e3, percentile(&local, 0.99) / 1e3);
        let _ = writeln!(md, "Issue #20's targets, worst snapshot ({net}):\n");
        let _ = writeln!(md, "| target | measured | |\n|---|---|---|");
        let _ = writeln!(
            md,
            "| ready to resume within {READY_TARGET_MS:.0} ms of the call, empty node | {ready:.1} ms | {} |",
            verdict(ready <= READY_TARGET_MS)
        );
        let _ =
            writeln!(md, "| about 12× faster than eager | {speedup:.0}× | {} |", verdict(speedup >= 12.0));
        let _ = writeln!(
            md,
            "| working set served in at most {WORKING_SET_TARGET}× an eager `ensure`, first restore | {ws:.2}× | {} |",
            verdict(ws <= WORKING_SET_TARGET)
        );
        let _ = writeln!(
            md,
            "| the same, on a node fetching the published working set first | {ws_second:.2}× | {} |",
            verdict(ws_second <= WORKING_SET_TARGET)
        );
        let _ = writeln!(
            md,
            "| registry bytes no more than eager | {bytes:.4}× eager ({} {:.1} KiB) | {} |",
            if extra > 0.0 { "+" } else { "" },
            extra / 1024.0,
            verdict(bytes <= 1.0)
        );
        let _ = writeln!(
            md,
            "| fault service for a locally held chunk under {LOCAL_P50_TARGET_US:.0} µs at p50, \
             {LOCAL_P99_TARGET_US:.0} µs at p99 (page server) | p50 {} µs, p99 {} µs | {} |",
            hist_cell(&data, 0.5),
            hist_cell(&data, 0.99),
            verdict(
                p50.is_some_and(|v| v < LOCAL_P50_TARGET_US) && p99.is_some_and(|v| v < LOCAL_P99_TARGET_US)
            )
        );
        let _ = writeln!(
            md,
            "| the same, as the vCPU sees it (stand-in) | p50 {sp50:.1} µs, p99 {sp99:.1} µs | {} |\n",
            verdict(sp50 < LOCAL_P50_TARGET_US && sp99 < LOCAL_P99_TARGET_US)
        );
        let _ = writeln!(
            md,
            "Published: REAP and FaaSnap restored a hello-world function in 62–65 ms from the page \
             cache (Firecracker's snapshot load, resume and one invocation, on KVM). The nearest \
             figure here is the cached snapshot's *working set served* above, which has no guest \
             running (the stand-in only touches the pages) and no vmstate load, but a working set \
             recorded from a Python function rather than hello-world.\n"
        );
    }

    // The plot: the last network measured (the link, when there is one).
    let Some((&ni, lazy)) = measured.lazy.iter().next_back() else { return };
    let rows = rows(measured, ni, lazy);
    let labels: Vec<String> = rows.iter().map(|w| w.r.label.clone()).collect();
    let groups: Vec<&str> = labels.iter().map(String::as_str).collect();
    let series = vec![
        Series {
            label: "S3 whole files".into(),
            color: COLORS[2],
            values: rows.iter().map(|w| w.s3_s).collect(),
        },
        Series {
            label: "eager ensure".into(),
            color: COLORS[0],
            values: rows.iter().map(|w| Some(w.eager_s)).collect(),
        },
        Series {
            label: "lazy: ready to resume".into(),
            color: RGBColor(0x94, 0x67, 0xbd),
            values: rows.iter().map(|w| Some(w.ready_ms / 1e3)).collect(),
        },
        Series {
            label: "lazy: working set served".into(),
            color: COLORS[1],
            values: rows.iter().map(|w| Some(w.working_set_s)).collect(),
        },
        Series {
            label: "lazy: fill complete".into(),
            color: RGBColor(0x8c, 0x56, 0x4b),
            values: rows.iter().map(|w| Some(w.fill_s)).collect(),
        },
    ];
    let net = &measured.nets[ni];
    let drawn = plot::bars(
        &plot_dir.join("lazy.png"),
        &format!("Restore of each snapshot, seconds from the call (median, {net})"),
        "seconds",
        &groups,
        &series,
    );
    plot::embed(md, "lazy.png", &format!("lazy restore against eager and S3, {net}"), drawn);
}
