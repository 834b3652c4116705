//! Ingest throughput (chunk + hash + compress, as `thaw push` does before sending) on
//! guest-memory-like data without zero pages, per chunker. Run with
//! `cargo bench -p thaw-client --bench ingest`; prints a table. Not a test: nothing is asserted.

use std::io::Write as _;

use thaw_client::ingest::ingest_file;
use thaw_client::tuning::{cpu_workers, ZSTD_LEVEL};
use thaw_schema::ChunkerParams;

const PAGE: usize = 4096;

/// Each configuration is ingested repeatedly until it has used this much CPU time.
const MIN_CPU_SECONDS: f64 = 2.0;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Non-zero pages: 40% from a shared pool, 25% program text, 35% unique random.
fn memory(pages: usize) -> Vec<u8> {
    let mut rng = Rng(0x1234_5678);
    let mut pool = vec![0u8; 512 * PAGE];
    for w in pool.chunks_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes());
    }
    let mut out = vec![0u8; pages * PAGE];
    for (i, page) in out.chunks_mut(PAGE).enumerate() {
        match rng.next() % 20 {
            0..=7 => {
                let p = (rng.next() % 512) as usize;
                page.copy_from_slice(&pool[p * PAGE..(p + 1) * PAGE]);
            }
            8..=12 => {
                let line = format!("    ldr x{}, [sp, #{}] // fn_{i}\n", i % 31, i % 4096);
                for (d, s) in page.iter_mut().zip(line.bytes().cycle()) {
                    *d = s;
                }
            }
            _ => {
                for w in page.chunks_mut(8) {
                    w.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
        }
    }
    out
}

/// CPU seconds used by this process so far (user + system, from /proc/self/stat).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are the 12th and 13th after the name.
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

fn main() {
    let mib: usize = std::env::var("THAW_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let dir = tempfile::tempdir().expect("temporary directory");
    // THAW_BENCH_FILE: ingest a real memory image (e.g. target/corpus/fn-json/v2/memory).
    let path = match std::env::var_os("THAW_BENCH_FILE") {
        Some(file) => std::path::PathBuf::from(file),
        None => {
            let path = dir.path().join("memory");
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(&memory(mib * 256)))
                .expect("writing test data");
            path
        }
    };
    let cores = cpu_workers();
    println!(
        "ingest of {mib} MiB of non-zero guest-memory-like pages, {cores} cores; \
         MiB/cpu-s is the per-core rate (bytes over CPU time, load-independent)"
    );
    println!(
        "{:<24} {:>5} {:>7} {:>13} {:>11} {:>15} {:>12} {:>9}",
        "chunker", "zstd", "ratio", "compressed", "scan MiB/s", "compress MiB/s", "total MiB/s", "MiB/cpu-s"
    );
    let runs = [
        ("fixed 4 KiB", ChunkerParams::fixed(4096), ZSTD_LEVEL),
        ("fixed 16 KiB", ChunkerParams::fixed(16 * 1024), ZSTD_LEVEL),
        ("fixed 64 KiB", ChunkerParams::fixed(64 * 1024), -1),
        ("fixed 64 KiB", ChunkerParams::fixed(64 * 1024), 1),
        ("fixed 64 KiB", ChunkerParams::fixed(64 * 1024), 3),
        ("fastcdc 16/64/256 KiB", ChunkerParams::REGISTRY_DEFAULT, 1),
        ("fastcdc 16/64/256 KiB", ChunkerParams::REGISTRY_DEFAULT, 3),
    ];
    let _ = ingest_file(&path, ChunkerParams::fixed(64 * 1024), ZSTD_LEVEL); // warm the page cache
    let mut per_core_64k = None;
    for (name, params, level) in runs {
        // CPU time comes in 10 ms ticks: one ingest of a 100 MiB file is ~25 of them, so a
        // single run reads only to ±4%. Repeat until the runs used MIN_CPU_SECONDS.
        let started = cpu_seconds();
        let mut repeats = 0u32;
        let r = loop {
            let r = ingest_file(&path, params, level).expect("ingest");
            repeats += 1;
            if cpu_seconds() - started >= MIN_CPU_SECONDS {
                break r;
            }
        };
        let cpu = (cpu_seconds() - started) / f64::from(repeats);
        let size = r.size as f64 / (1024.0 * 1024.0);
        let total = r.scan_seconds + r.compress_seconds;
        if params == ChunkerParams::fixed(64 * 1024) && level == ZSTD_LEVEL {
            per_core_64k = Some(size / cpu);
        }
        println!(
            "{name:<24} {level:>5} {:>7.3} {:>13} {:>11.0} {:>15.0} {:>12.0} {:>9.0}",
            r.compressed_bytes as f64 / r.size as f64,
            r.compressed_bytes,
            size / r.scan_seconds,
            r.distinct_bytes as f64 / (1024.0 * 1024.0) / r.compress_seconds,
            size / total,
            size / cpu
        );
    }
    // The same machine's zstd alone, for a figure that survives a slower or busier host:
    // the absolute rate of these shared machines moves by a third from day to day (D22).
    let zstd_alone = zstd_alone_rate(&path);
    println!(
        "\nreference: zstd level {ZSTD_LEVEL} alone on the file's non-zero 64 KiB chunks, one thread: \
         {zstd_alone:.0} MiB/cpu-s; fixed 64 KiB ingest per core is {} of it",
        per_core_64k.map_or("n/a".into(), |r| format!("{:.2}x", r / zstd_alone))
    );
}

/// MiB of non-zero 64 KiB chunks of `path` that zstd alone compresses per CPU-second, in
/// this thread (chunks read into memory first, so nothing but zstd is timed).
fn zstd_alone_rate(path: &std::path::Path) -> f64 {
    let data = std::fs::read(path).expect("reading the file");
    let chunks: Vec<&[u8]> = data.chunks(64 * 1024).filter(|c| !thaw_schema::chunker::is_zero(c)).collect();
    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
    let started = cpu_seconds();
    let mut repeats = 0u32;
    let mut sink = 0usize;
    while repeats == 0 || cpu_seconds() - started < MIN_CPU_SECONDS {
        for c in &chunks {
            sink += thaw_schema::frame::EncodedChunk::compress(c, ZSTD_LEVEL).payload.len();
        }
        repeats += 1;
    }
    std::hint::black_box(sink);
    let cpu = cpu_seconds() - started;
    bytes as f64 * f64::from(repeats) / (1024.0 * 1024.0) / cpu
}
