//! The chunking study: compares fixed-size and FastCDC chunking (and 4 KiB dedup with grouped
//! compression) on a snapshot corpus and writes the tables of docs/CHUNKING.md.
//!
//! ```text
//! integration/corpus/make-corpus.sh
//! cargo run -p thaw-integration --release --bin chunking_study -- target/corpus --out docs/CHUNKING.md
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thaw_integration::chunk_study::{
    default_strategies, nonzero_sample, throughput, Analysis, Blob, Strategy, Study, Throughput, LEVELS,
};
use thaw_integration::corpus::{self, Media, Snapshot};

const USAGE: &str = "usage: chunking_study CORPUS_DIR [--out FILE] [--sample-mib N] [--reps N] [--threads N]

  CORPUS_DIR      made by integration/corpus/make-corpus.sh (FUNCTION/REVISION/{memory,disk.ext4,...})
  --out FILE      write the Markdown report there (default: stdout)
  --sample-mib N  non-zero bytes the throughput runs use per media type (default 64)
  --reps N        throughput repetitions, the median is reported (default 3)
  --threads N     threads for the untimed analysis (default: all cores)";

struct Args {
    corpus: PathBuf,
    out: Option<PathBuf>,
    sample_mib: usize,
    reps: usize,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut corpus = None;
    let mut args = Args {
        corpus: PathBuf::new(),
        out: None,
        sample_mib: 64,
        reps: 3,
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let number = |v: Option<String>, flag: &str| -> Result<usize, String> {
        v.and_then(|s| s.parse().ok()).filter(|&n| n > 0).ok_or(format!("{flag} needs a positive number"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => args.out = Some(it.next().ok_or("--out needs a file")?.into()),
            "--sample-mib" => args.sample_mib = number(it.next(), "--sample-mib")?,
            "--reps" => args.reps = number(it.next(), "--reps")?,
            "--threads" => args.threads = number(it.next(), "--threads")?,
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s if corpus.is_none() => corpus = Some(PathBuf::from(s)),
            s => return Err(format!("unexpected argument {s}")),
        }
    }
    args.corpus = corpus.ok_or("missing CORPUS_DIR")?;
    Ok(args)
}

/// Everything measured for one media type.
struct MediaResult {
    media: Media,
    analyses: Vec<Analysis>,
    speeds: Vec<Throughput>,
    sample_bytes: usize,
    labels: Vec<String>,
    seconds: f64,
}

fn study_media(snapshots: &[Snapshot], media: Media, args: &Args) -> Result<MediaResult, String> {
    let started = Instant::now();
    let mut blobs = Vec::new();
    for s in snapshots {
        let path = s.file(media);
        let data = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        blobs.push(Blob { function: s.function.clone(), revision: s.revision.clone(), data });
    }
    let mut study = Study::new(&blobs, args.threads);
    let mut analyses = Vec::new();
    for strategy in default_strategies() {
        let t = Instant::now();
        analyses.push(study.run(strategy));
        eprintln!("  {media}: {:<22} analysed in {:.1} s", strategy.name(), t.elapsed().as_secs_f64());
    }
    let sample = nonzero_sample(&blobs, args.sample_mib << 20);
    let mut speeds = Vec::new();
    for strategy in default_strategies() {
        let t = Instant::now();
        speeds.push(throughput(strategy, &sample, args.reps, Duration::from_millis(300)));
        eprintln!("  {media}: {:<22} timed in {:.1} s", strategy.name(), t.elapsed().as_secs_f64());
    }
    Ok(MediaResult {
        media,
        analyses,
        speeds,
        sample_bytes: sample.len(),
        labels: blobs.iter().map(Blob::label).collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("chunking_study: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let snapshots = match corpus::load(&args.corpus) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chunking_study: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("chunking_study: {} snapshots in {}", snapshots.len(), args.corpus.display());
    let load_before = read_trimmed("/proc/loadavg");
    let mut results = Vec::new();
    for media in [Media::Memory, Media::Disk] {
        match study_media(&snapshots, media, &args) {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("chunking_study: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let report = render(&args, &snapshots, &results, &load_before);
    match &args.out {
        Some(path) => {
            if let Err(e) = std::fs::write(path, report) {
                eprintln!("chunking_study: writing {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!("chunking_study: wrote {}", path.display());
        }
        None => print!("{report}"),
    }
    ExitCode::SUCCESS
}

// ---- rendering ---------------------------------------------------------------------------------

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "–".into();
    }
    format!("{:.1}%", 100.0 * part as f64 / whole as f64)
}

fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        return "–".into();
    }
    format!("{:.2}×", a as f64 / b as f64)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_else(|_| "?".into())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("?", str::trim)
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!(
        "{model}, {cores} cores, {:.0} GiB RAM, Linux {}, {rustc}",
        mem_kib as f64 / (1024.0 * 1024.0),
        read_trimmed("/proc/sys/kernel/osrelease")
    )
}

/// `YYYY-MM-DD HH:MM UTC` without a date crate (Howard Hinnant's civil-from-days).
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

fn info_str(s: &Snapshot, key: &str) -> String {
    match &s.info[key] {
        serde_json::Value::String(v) => v.clone(),
        serde_json::Value::Null => "?".into(),
        v => v.to_string(),
    }
}

fn render(args: &Args, snapshots: &[Snapshot], results: &[MediaResult], load_before: &str) -> String {
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "# Chunking study\n");
    let _ = writeln!(
        w,
        "Generated by `cargo run -p thaw-integration --release --bin chunking_study -- {} --out \
         docs/CHUNKING.md` on {}. Regenerate rather than edit; the decision drawn from these \
         numbers is recorded in docs/DECISIONS.md (\"Chunking per media type\").\n",
        args.corpus.display(),
        utc_now()
    );
    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "- {}", machine());
    let _ = writeln!(
        w,
        "- Load average before / after the run: `{load_before}` / `{}`. The machine is shared (2 \
         cores, other builds running), so throughput numbers are noisy: read them as an order of \
         magnitude and compare rows of one table with each other, not with other machines.",
        read_trimmed("/proc/loadavg")
    );
    let _ = writeln!(
        w,
        "- Untimed analysis on {} threads; throughput runs on one thread, median of {} runs over \
         {} MiB of non-zero pages per media type (repeated for at least 0.3 s per run), timed \
         by the thread's own CPU time \
         (`/proc/thread-self/schedstat`) so that other processes distort it less; the wall-clock \
         ingest column shows how much the shared machine took away.\n",
        args.threads, args.reps, args.sample_mib
    );
    render_corpus(w, snapshots, results);
    render_method(w);
    for r in results {
        render_media(w, r);
    }
    o
}

fn render_corpus(w: &mut String, snapshots: &[Snapshot], results: &[MediaResult]) {
    let _ = writeln!(w, "## Corpus\n");
    if let Some(first) = snapshots.first() {
        let _ = writeln!(
            w,
            "Made by `integration/corpus/make-corpus.sh`: each snapshot is a Linux guest ({}, {}, \
             command line `{}`) booted under {} with {} MiB of file-backed RAM. Its root is the \
             function's `disk.ext4` ({}), holding busybox, {} with the stdlib modules the function \
             imports, and the function, which runs until warm (20 invocations); then the guest is \
             paused. `memory` is the raw guest RAM file, `disk.ext4` made with `mke2fs -d` (4 KiB \
             blocks), `vmstate` QEMU's device state. Every snapshot is its own boot, so what differs \
             between any two boots (heap and kernel addresses, allocation order) shows up in the \
             revision numbers too, as it does between real snapshots. Non-zero is counted in 4 KiB \
             pages.\n",
            info_str(first, "kernel"),
            info_str(first, "kernel_package"),
            info_str(first, "kernel_cmdline"),
            info_str(first, "hypervisor"),
            info_str(first, "guest_mem_mib"),
            info_str(first, "root"),
            info_str(first, "runtime"),
        );
    }
    let page_cut = |media: Media| {
        results.iter().find(|r| r.media == media).and_then(|r| {
            r.analyses.iter().find(|a| a.strategy.name() == "fixed 4K").map(|a| a.shared.clone())
        })
    };
    let (mem, disk) = (page_cut(Media::Memory), page_cut(Media::Disk));
    let _ = writeln!(
        w,
        "| snapshot | memory MiB | memory distinct non-zero MiB | disk MiB | disk distinct non-zero MiB | vmstate KiB | warm-up |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---|");
    for (i, s) in snapshots.iter().enumerate() {
        let size = |m: Media| std::fs::metadata(s.file(m)).map(|m| m.len()).unwrap_or(0);
        let own = |t: &Option<Vec<Vec<u64>>>| t.as_ref().map_or("?".into(), |t| mib(t[i][i]));
        let warm = info_str(s, "warm");
        let warm = warm.split_whitespace().filter(|p| p.starts_with("seconds=") || p.starts_with("rss_kib="));
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {:.0} | {} |",
            s.label(),
            mib(size(Media::Memory)),
            own(&mem),
            mib(size(Media::Disk)),
            own(&disk),
            size(Media::Vmstate) as f64 / 1024.0,
            warm.collect::<Vec<_>>().join(" "),
        );
    }
    let _ = writeln!(w);
}

fn render_method(w: &mut String) {
    let _ = writeln!(
        w,
        "## Method\n\n\
         Every number goes through thaw-schema: `ChunkerParams::chunks` cuts, `ChunkId::of` \
         (BLAKE3) identifies, `EncodedChunk::compress` makes the stored frame (zstd, raw when it \
         does not shrink; 5-byte frame header counted), `Recipe::encode` gives recipe sizes. \
         Zero chunks are never stored. MiB = 2^20 bytes.\n\n\
         - **distinct**: each distinct non-zero chunk counted once, as a store holding the whole \
         corpus would. *dedup* = non-zero bytes ÷ distinct bytes; *total ÷ stored* = all file \
         bytes ÷ stored bytes at zstd 3.\n\
         - **new revision**: the chunks of revision 2 that a store holding only revision 1 lacks \
         (what `thaw push` of the new revision uploads), and those missing when everything else \
         in the corpus is stored.\n\
         - **between functions**: distinct bytes that occur in two or more different functions; \
         *alone* stores each function's files in a store of its own, *together* in one.\n\
         - **4K pages, N groups**: dedup by 4 KiB page, but the pages a store lacks are packed in \
         file order into N-byte groups compressed as one zstd frame (DESIGN.md's idea; not a \
         thaw format today). Its recipe would be the fixed-4K recipe plus a page-to-group map.\n\
         - **throughput**: single thread, on non-zero pages only (zero chunks cost a scan). \
         *ingest* = cut + BLAKE3 + zstd, as `thaw push` and the registry do for each new chunk; \
         *decode* = zstd-3 frame decompression + BLAKE3 verification, as a restore does. \
         *reused context*: the same with one zstd context kept for all chunks \
         (`zstd::bulk::Compressor`/`Decompressor`); `EncodedChunk` today makes a new context per \
         chunk, which costs most for small chunks.\n"
    );
}

fn render_media(w: &mut String, r: &MediaResult) {
    let title = match r.media {
        Media::Memory => "Memory files",
        Media::Disk => "Disk images",
        Media::Vmstate => "Device state",
    };
    let Some(first) = r.analyses.first() else { return };
    let _ = writeln!(w, "## {title}\n");
    let _ = writeln!(
        w,
        "{} files, {} MiB in all; at 4 KiB granularity {} MiB ({}) are zero pages. Analysed in {:.0} s.\n",
        r.labels.len(),
        mib(first.total),
        mib(first.zero),
        pct(first.zero, first.total),
        r.seconds
    );

    let _ = writeln!(w, "### Stored bytes for the whole corpus\n");
    let _ = writeln!(w, "| strategy | zero MiB | non-zero chunks | distinct | avg distinct KiB | distinct MiB | dedup | zstd -1 MiB | zstd 1 MiB | zstd 3 MiB | total ÷ stored |");
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for a in &r.analyses {
        let nonzero = a.total - a.zero;
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            a.strategy.name(),
            mib(a.zero),
            a.chunks,
            a.unique_chunks,
            a.corpus.raw as f64 / 1024.0 / a.unique_chunks.max(1) as f64,
            mib(a.corpus.raw),
            ratio(nonzero, a.corpus.raw),
            mib(a.corpus.at(-1)),
            mib(a.corpus.at(1)),
            mib(a.corpus.at(3)),
            ratio(a.total, a.corpus.at(3)),
        );
    }
    let _ = writeln!(w);

    let deltas: Vec<_> =
        first.revisions.iter().map(|d| (d.function.clone(), d.from.clone(), d.to.clone())).collect();
    for (i, (function, from, to)) in deltas.iter().enumerate() {
        let _ = writeln!(w, "### A new revision: {function} {from} → {to}\n");
        let _ = writeln!(w, "| strategy | {to} distinct MiB | adds given {from}: MiB | % of {to} | zstd 1 MiB | zstd 3 MiB | adds given all else: MiB | zstd 3 MiB |");
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for a in &r.analyses {
            let d = &a.revisions[i];
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                a.strategy.name(),
                mib(d.new_unique),
                mib(d.given_previous.raw),
                pct(d.given_previous.raw, d.new_unique),
                mib(d.given_previous.at(1)),
                mib(d.given_previous.at(3)),
                mib(d.given_rest.raw),
                mib(d.given_rest.at(3)),
            );
        }
        let _ = writeln!(w);
    }

    let _ = writeln!(w, "### Sharing between different functions\n");
    let _ = writeln!(w, "| strategy | distinct MiB in ≥2 functions | share of distinct | stored alone, zstd 3 MiB | stored together, zstd 3 MiB | saved |");
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|");
    for a in &r.analyses {
        let c = &a.cross;
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            a.strategy.name(),
            mib(c.shared_raw),
            pct(c.shared_raw, a.corpus.raw),
            mib(c.isolated.at(3)),
            mib(c.together.at(3)),
            pct(c.isolated.at(3).saturating_sub(c.together.at(3)), c.isolated.at(3)),
        );
    }
    let _ = writeln!(w);
    for name in ["fixed 4K", "cdc 16/64/256K"] {
        if let Some(a) = r.analyses.iter().find(|a| a.strategy.name() == name) {
            render_matrix(w, r, a);
        }
    }

    let _ = writeln!(w, "### Recipes\n");
    let _ = writeln!(
        w,
        "| strategy | entries (all files) | recipe KiB (all files) | recipe KiB per GiB of file |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|");
    for a in &r.analyses {
        if matches!(a.strategy, Strategy::PageGroups { .. }) {
            continue;
        }
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} | {:.0} |",
            a.strategy.name(),
            a.recipe_entries,
            a.recipe_bytes as f64 / 1024.0,
            a.recipe_bytes as f64 / 1024.0 / (a.total as f64 / (1u64 << 30) as f64),
        );
    }
    let _ = writeln!(w, "\nA page-group store needs the fixed-4K recipe plus its page-to-group map.\n");

    let clock = if r.speeds.iter().all(|t| t.cpu_clock) { "CPU-second of the thread" } else { "wall-second" };
    let _ = writeln!(
        w,
        "### Throughput, one thread, MiB of non-zero input per {clock} ({} MiB sample)\n",
        mib(r.sample_bytes as u64)
    );
    let _ = writeln!(w, "| strategy | cut | cut + BLAKE3 | ingest zstd -1 | ingest zstd 1 | ingest zstd 3 | ingest zstd 3, wall clock | ingest zstd 3, reused context | decode + verify (zstd 3) | decode, reused context |");
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for t in &r.speeds {
        let at = |v: &[f64; 3], l: i32| v[LEVELS.iter().position(|&x| x == l).expect("level")];
        let _ = writeln!(
            w,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            t.strategy.name(),
            t.cut,
            t.hash,
            at(&t.ingest, -1),
            at(&t.ingest, 1),
            at(&t.ingest, 3),
            at(&t.ingest_wall, 3),
            t.ingest_reused,
            t.decode,
            t.decode_reused
        );
    }
    let _ = writeln!(w);
}

fn render_matrix(w: &mut String, r: &MediaResult, a: &Analysis) {
    let _ = writeln!(
        w,
        "Pairwise, {}: share of the row's distinct non-zero bytes also present in the column.\n",
        a.strategy.name()
    );
    let _ = writeln!(w, "| | {} |", r.labels.join(" | "));
    let _ = writeln!(w, "|---|{}", "---:|".repeat(r.labels.len()));
    for (i, row) in a.shared.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|&v| pct(v, row[i])).collect();
        let _ = writeln!(w, "| {} | {} |", r.labels[i], cells.join(" | "));
    }
    let _ = writeln!(w);
}
