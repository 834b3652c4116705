//! Ingest throughput (section 5 of the report): thaw's cut + hash + compress on every file
//! of the new revision, and on the memory file's non-zero pages against its own limit,
//! zstd alone on the same bytes, in the same run.

use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use thaw_client::ingest::{ingest_file, IngestReport};
use thaw_client::tuning::{chunker_for, ZSTD_LEVEL};
use thaw_integration::corpus::Snapshot;
use thaw_schema::digest::Sha256Hasher;
use thaw_schema::media::FileRole;
use thaw_schema::{ChunkId, ChunkerKind, ChunkerParams};

use crate::mib;
use crate::report::median;
use crate::systems::snapshot_files;

/// Ingest runs are cheap (about a second): at least this many, whatever `--reps` says.
pub(crate) const INGEST_MIN_REPS: usize = 3;

/// Pairs of runs (thaw's ingest, then zstd alone) behind the ratio to the limit: each pair
/// is about half a CPU-second, and the two halves of a pair see the same machine.
pub(crate) const LIMIT_PAIRS: usize = 7;

/// Ingest of one file: median over the repetitions.
pub(crate) struct IngestRow {
    pub(crate) name: String,
    pub(crate) chunker: String,
    pub(crate) size: u64,
    pub(crate) nonzero: u64,
    pub(crate) compressed: u64,
    pub(crate) cpu_secs: f64,
    pub(crate) wall_secs: f64,
}

/// The memory file's non-zero pages: thaw's ingest against zstd alone on the same bytes.
pub(crate) struct Limit {
    /// Bytes of the packed pages (all non-zero).
    pub(crate) bytes: u64,
    /// Of those, bytes in distinct chunks (what thaw compresses; repeats are compressed once).
    pub(crate) distinct: u64,
    /// Pieces zstd alone compressed (the chunks thaw cuts, repeats included).
    pub(crate) pieces: usize,
    /// Compressed payload bytes: thaw's (distinct chunks), zstd alone's (every piece).
    pub(crate) thaw_compressed: u64,
    pub(crate) zstd_compressed: u64,
    /// Medians over the pairs: thaw's CPU seconds (all its threads), zstd alone's (one thread).
    pub(crate) thaw_cpu: f64,
    pub(crate) zstd_cpu: f64,
    /// Medians, one thread each: zstd alone of the distinct pieces only, BLAKE3 of every
    /// piece, SHA-256 of the whole: together the work no ingest can skip (what it must send,
    /// the chunk ids and the layer digest).
    pub(crate) zstd_distinct_cpu: f64,
    pub(crate) blake3_cpu: f64,
    pub(crate) sha256_cpu: f64,
    /// thaw ÷ zstd-alone per-core rate of each pair, lowest and highest.
    pub(crate) pair_ratios: (f64, f64),
}

/// Everything section 5 shows.
pub(crate) struct Ingest {
    pub(crate) rows: Vec<IngestRow>,
    pub(crate) limit: Option<Limit>,
}

fn role_of(name: &str) -> Option<FileRole> {
    match name {
        "memory" => Some(FileRole::Memory),
        "vmstate" => Some(FileRole::Vmstate),
        "disk.ext4" | "disk" => Some(FileRole::Disk),
        "info.json" | "info" => Some(FileRole::Info),
        _ => None,
    }
}

/// CPU seconds this process has used, all threads, user + system
/// (`CLOCK_PROCESS_CPUTIME_ID`: nanoseconds, where `/proc/self/stat` counts 10 ms ticks).
fn cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Bytes in non-zero 4 KiB pages.
pub(crate) fn nonzero_bytes(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total +=
            buf[..n].chunks(4096).filter(|p| p.iter().any(|&b| b != 0)).map(|p| p.len() as u64).sum::<u64>();
    }
}

/// Cuts, hashes and compresses every file of `snap` exactly as `thaw push` does
/// (`thaw_client::ingest`, on all cores), `reps` times, timing CPU and wall clock. The memory
/// file is measured a second time with only its non-zero pages, packed into one file,
/// alternating with zstd alone on the same pages: the pipeline against its own limit.
pub(crate) fn measure_ingest(snap: &Snapshot, reps: usize) -> Result<Ingest> {
    let reps = reps.max(INGEST_MIN_REPS);
    let mut rows = Vec::new();
    let mut limit = None;
    for name in snapshot_files(&snap.dir)? {
        let path = snap.dir.join(&name);
        let params = chunker_for(role_of(&name));
        rows.push(ingest_row(name.clone(), &path, params, reps)?);
        if role_of(&name) == Some(FileRole::Memory) {
            let packed = tempfile::NamedTempFile::new().context("creating a file for the packed pages")?;
            pack_nonzero_pages(&path, packed.path())?;
            let (row, l) = measure_limit(format!("{name}, non-zero pages packed"), packed.path(), params)?;
            rows.push(row);
            limit = Some(l);
        }
    }
    Ok(Ingest { rows, limit })
}

fn chunker_label(params: ChunkerParams) -> String {
    match params.kind {
        ChunkerKind::Fixed => format!("fixed {} KiB", params.avg / 1024),
        _ => format!("FastCDC {}/{}/{} KiB", params.min / 1024, params.avg / 1024, params.max / 1024),
    }
}

/// One timed ingest: the report, CPU seconds, wall seconds.
fn timed_ingest(path: &Path, params: ChunkerParams) -> Result<(IngestReport, f64, f64)> {
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    let r = ingest_file(path, params, ZSTD_LEVEL).with_context(|| format!("ingesting {}", path.display()))?;
    Ok((r, cpu_seconds() - cpu, wall.elapsed().as_secs_f64()))
}

fn ingest_row(name: String, path: &Path, params: ChunkerParams, reps: usize) -> Result<IngestRow> {
    let nonzero = nonzero_bytes(path)?; // also warms the page cache
    let mut runs = Vec::new();
    let mut last = None;
    for _ in 0..reps {
        let (r, cpu, wall) = timed_ingest(path, params)?;
        runs.push((cpu, wall));
        last = Some(r);
    }
    let r = last.expect("one run at least");
    let mut cpu: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let mut wall: Vec<f64> = runs.iter().map(|r| r.1).collect();
    Ok(IngestRow {
        name,
        chunker: chunker_label(params),
        size: r.size,
        nonzero,
        compressed: r.compressed_bytes,
        cpu_secs: median(&mut cpu),
        wall_secs: median(&mut wall),
    })
}

/// thaw's ingest of the packed pages at `path`, alternating with zstd alone on the same
/// bytes cut into the same pieces, [`LIMIT_PAIRS`] times each.
///
/// zstd alone is the pipeline's limit: the one thing ingest must do that nothing can take
/// away. It compresses the chunks thaw cuts (every one, repeats included), each on its own
/// as thaw's frames require, at `ZSTD_LEVEL` in one reused `zstd::bulk::Compressor` (what
/// `EncodedChunk::compress` uses), into one reused output buffer, from bytes already in
/// memory: no reading, no hashing, no allocation, one thread. Not the whole buffer in one
/// frame: that is another format (a 64 KiB chunk is a frame of its own so it can be stored,
/// deduplicated and fetched alone), and measures zstd's window, not the pipeline.
fn measure_limit(name: String, path: &Path, params: ChunkerParams) -> Result<(IngestRow, Limit)> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let pieces: Vec<std::ops::Range<usize>> = params
        .chunks(&data[..])
        .context("cutting the packed pages")?
        .map(|c| c.map(|c| c.offset as usize..c.offset as usize + c.data.len()))
        .collect::<std::io::Result<_>>()?;
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).context("making a zstd context")?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(params.max as usize));
    // The pieces thaw compresses: one of each distinct non-zero chunk.
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<std::ops::Range<usize>> =
        pieces.iter().filter(|r| seen.insert(ChunkId::of(&data[(*r).clone()]))).cloned().collect();
    let mut zstd_alone = |pieces: &[std::ops::Range<usize>]| -> Result<(u64, f64)> {
        let cpu = cpu_seconds();
        let mut compressed = 0u64;
        for r in pieces {
            out.clear();
            compressor.compress_to_buffer(&data[r.clone()], &mut out).context("zstd")?;
            compressed += out.len() as u64;
        }
        Ok((compressed, cpu_seconds() - cpu))
    };
    let hashes_alone = || {
        let cpu = cpu_seconds();
        let mut ids = 0u8;
        for r in &pieces {
            ids ^= ChunkId::of(&data[r.clone()]).as_bytes()[0];
        }
        let blake3 = cpu_seconds();
        let mut hasher = Sha256Hasher::new();
        hasher.update(&data);
        std::hint::black_box((ids, hasher.finish()));
        (blake3 - cpu, cpu_seconds() - blake3)
    };
    zstd_alone(&pieces)?; // warm-up: the context's tables, the output buffer
    timed_ingest(path, params)?; // warm-up: the page cache
    let (mut thaw, mut zstd, mut walls, mut ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut blake3, mut sha256, mut zstd_distinct) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    let mut zstd_compressed = 0;
    for _ in 0..LIMIT_PAIRS {
        let (r, cpu, wall) = timed_ingest(path, params)?;
        let (compressed, z) = zstd_alone(&pieces)?;
        let (_, zd) = zstd_alone(&distinct)?;
        let (b, h) = hashes_alone();
        zstd_distinct.push(zd);
        blake3.push(b);
        sha256.push(h);
        ratios.push(z / cpu);
        thaw.push(cpu);
        zstd.push(z);
        walls.push(wall);
        zstd_compressed = compressed;
        last = Some(r);
    }
    let r = last.expect("one pair at least");
    let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = ratios.iter().copied().fold(0.0, f64::max);
    let (thaw_cpu, zstd_cpu) = (median(&mut thaw), median(&mut zstd));
    let row = IngestRow {
        name,
        chunker: chunker_label(params),
        size: r.size,
        nonzero: r.size,
        compressed: r.compressed_bytes,
        cpu_secs: thaw_cpu,
        wall_secs: median(&mut walls),
    };
    let limit = Limit {
        bytes: r.size,
        distinct: r.distinct_bytes,
        pieces: pieces.len(),
        thaw_compressed: r.compressed_bytes,
        zstd_compressed,
        thaw_cpu,
        zstd_cpu,
        zstd_distinct_cpu: median(&mut zstd_distinct),
        blake3_cpu: median(&mut blake3),
        sha256_cpu: median(&mut sha256),
        pair_ratios: (lowest, highest),
    };
    Ok((row, limit))
}

/// Writes the non-zero 4 KiB pages of `from`, in order, to `to`.
fn pack_nonzero_pages(from: &Path, to: &Path) -> Result<()> {
    let mut input = std::io::BufReader::new(
        std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?,
    );
    let mut output = std::io::BufWriter::new(
        std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?,
    );
    let mut page = vec![0u8; 4096];
    loop {
        let n = read_full(&mut input, &mut page)?;
        if n == 0 {
            break;
        }
        if page[..n].iter().any(|&b| b != 0) {
            output.write_all(&page[..n])?;
        }
    }
    output.flush()?;
    Ok(())
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Section 5 of the report: `label` names the snapshot, `reps` the repetitions per file.
pub(crate) fn write_section(md: &mut String, label: &str, reps: usize, ingest: &Ingest) {
    let _ = writeln!(md, "### 5. Ingest throughput per core (chunk + hash + compress)\n");
    let _ = writeln!(
        md,
        "`thaw_client::ingest::ingest_file` on each file of {label} with the chunker `thaw push` \
         uses for it and zstd level {ZSTD_LEVEL}, on all cores: cut, BLAKE3 and SHA-256, then \
         zstd of each distinct non-zero chunk, nothing sent. Per-core rate = bytes ÷ CPU time \
         of the process (user + system, every thread), median of {} run(s). *non-zero* counts \
         the file's non-zero 4 KiB pages (zero chunks cost only a scan). The *non-zero pages \
         packed* row ingests the memory file's non-zero pages written one after another into a \
         file of their own ({LIMIT_PAIRS} runs), and is compared below with its limit. The \
         baselines do no such work (they hash whole files), so this table has no comparison.\n",
        reps.max(INGEST_MIN_REPS)
    );
    let _ = writeln!(
        md,
        "| file | chunker | MiB | non-zero MiB | compressed MiB | CPU s | wall s | MiB / CPU-s | non-zero MiB / CPU-s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &ingest.rows {
        // Under 5 ms of CPU (the small files) the rate says nothing.
        let per =
            |b: u64| if r.cpu_secs >= 0.005 { format!("{:.0}", mib(b) / r.cpu_secs) } else { "–".into() };
        let _ = writeln!(
            md,
            "| {} | `{}` | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {} | {} |",
            r.name,
            r.chunker,
            mib(r.size),
            mib(r.nonzero),
            mib(r.compressed),
            r.cpu_secs,
            r.wall_secs,
            per(r.size),
            per(r.nonzero)
        );
    }
    let _ = writeln!(md, "\nCPU time is the process's CPU clock (`CLOCK_PROCESS_CPUTIME_ID`).\n");
    let Some(l) = &ingest.limit else { return };
    let (thaw, zstd) = (mib(l.bytes) / l.thaw_cpu, mib(l.bytes) / l.zstd_cpu);
    let _ = writeln!(
        md,
        "**Against its limit.** The same {:.1} MiB of non-zero pages, in the same run: thaw's \
         ingest (above: cut, zero test, BLAKE3 per chunk, SHA-256 of the whole, zstd of the \
         {:.1} MiB in distinct chunks, on all cores; rate = bytes ÷ the CPU time of all its \
         threads, i.e. per core) against zstd level {ZSTD_LEVEL} alone (the same crate, level \
         and reused context, on the {} chunk-sized pieces thaw cuts, every one, each its own \
         frame as thaw's format requires, from memory into a reused buffer, one thread). \
         Medians of {LIMIT_PAIRS} pairs run back to back; the ratio's range is over the pairs.\n",
        mib(l.bytes),
        mib(l.distinct),
        l.pieces
    );
    let floor = l.zstd_distinct_cpu + l.blake3_cpu + l.sha256_cpu;
    let _ = writeln!(
        md,
        "| non-zero MiB | thaw ingest MiB / CPU-s | zstd-{ZSTD_LEVEL} alone MiB / CPU-s | **thaw ÷ zstd alone** (range) | compressed MiB thaw / zstd alone |\n\
         |---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        md,
        "| {:.1} | {:.0} | {:.0} | **{:.2}x** ({:.2}–{:.2}) | {:.1} / {:.1} |\n",
        mib(l.bytes),
        thaw,
        zstd,
        thaw / zstd,
        l.pair_ratios.0,
        l.pair_ratios.1,
        mib(l.thaw_compressed),
        mib(l.zstd_compressed)
    );
    let _ = writeln!(
        md,
        "The work no ingest can skip, each measured alone on the same bytes in the same pairs \
         (one thread, medians): zstd of the distinct pieces only {:.0} MiB/CPU-s (per byte of \
         all the pages), BLAKE3 of every piece (the chunk ids) {:.0}, SHA-256 of the whole (the \
         layer digest) {:.0}. One after another: {:.0} MiB/CPU-s, {:.2}x of zstd alone: the \
         ceiling of a pipeline that computes what a push needs, on this machine. thaw reaches \
         **{:.2}x of that ceiling**.\n",
        mib(l.bytes) / l.zstd_distinct_cpu,
        mib(l.bytes) / l.blake3_cpu,
        mib(l.bytes) / l.sha256_cpu,
        mib(l.bytes) / floor,
        l.zstd_cpu / floor,
        floor / l.thaw_cpu
    );
}
