//! Ingest without a registry: exactly what a push does to a file before anything is sent
//! (cut, hash, compress the distinct non-zero chunks, on all cores). For benchmarks and
//! dry runs.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use thaw_schema::{ChunkerParams, Sha256Digest};

use crate::error::Result;
use crate::scan::scan_file;
use crate::stats::Stats;
use crate::upload::{compress_batches, ChunkSource};

/// What ingesting one file produced.
#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    /// File size.
    pub size: u64,
    /// Its SHA-256.
    pub digest: Sha256Digest,
    /// Chunks (with repeats, zero chunks included).
    pub chunks: usize,
    /// Zero chunks.
    pub zero_chunks: usize,
    /// Distinct non-zero chunks.
    pub distinct_chunks: usize,
    /// Uncompressed bytes of the distinct non-zero chunks.
    pub distinct_bytes: u64,
    /// Compressed payload bytes of the distinct non-zero chunks: what a push to an empty
    /// registry sends, before framing.
    pub compressed_bytes: u64,
    /// Seconds spent cutting and hashing.
    pub scan_seconds: f64,
    /// Seconds spent reading back and compressing.
    pub compress_seconds: f64,
}

/// Cuts, hashes and compresses `path` as a push would, without sending anything.
pub fn ingest_file(path: &Path, params: ChunkerParams, zstd_level: i32) -> Result<IngestReport> {
    let stats = Stats::new();
    let started = std::time::Instant::now();
    let scan = scan_file(path, params, true, &stats)?;
    let scan_seconds = started.elapsed().as_secs_f64();
    let shared = Arc::new(path.to_owned());
    let mut seen = HashSet::new();
    let sources: Vec<ChunkSource> = scan
        .chunks
        .iter()
        .filter_map(|c| {
            let id = c.id?;
            seen.insert(id).then(|| ChunkSource { id, path: shared.clone(), offset: c.offset, len: c.len })
        })
        .collect();
    let started = std::time::Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let drain = std::thread::spawn(move || while rx.blocking_recv().is_some() {});
    compress_batches(&sources, zstd_level, &stats, &tx)?;
    drop(tx);
    let _ = drain.join();
    let compress_seconds = started.elapsed().as_secs_f64();
    let s = stats.snapshot();
    Ok(IngestReport {
        size: scan.size,
        digest: scan.sha256.expect("scanned with SHA-256"),
        chunks: scan.chunks.len(),
        zero_chunks: scan.chunks.iter().filter(|c| c.id.is_none()).count(),
        distinct_chunks: sources.len(),
        distinct_bytes: s.chunk_raw_bytes_transferred,
        compressed_bytes: s.chunk_compressed_bytes_transferred,
        scan_seconds,
        compress_seconds,
    })
}
