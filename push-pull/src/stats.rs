//! Transfer counters. Every request and response body byte goes through them, so tests and
//! benchmarks can state exactly what a push or pull put on the wire, and the CLI draws its
//! progress line from them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Live counters, shared (`Arc<Stats>`) between the client and whoever shows progress.
/// HTTP headers are not counted: only body bytes.
#[derive(Debug, Default)]
pub struct Stats {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    chunks_total: AtomicU64,
    chunks_zero: AtomicU64,
    chunks_present: AtomicU64,
    chunks_local: AtomicU64,
    chunks_transferred: AtomicU64,
    chunk_raw_bytes_transferred: AtomicU64,
    chunk_compressed_bytes_transferred: AtomicU64,
    bytes_local: AtomicU64,
    blobs_skipped: AtomicU64,
    blobs_transferred: AtomicU64,
    work_total: AtomicU64,
    work_done: AtomicU64,
    phase: Mutex<String>,
}

/// A point-in-time copy of [`Stats`], for reports and `--json` output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Request body bytes sent to registries.
    pub bytes_sent: u64,
    /// Response body bytes received from registries.
    pub bytes_received: u64,
    /// Chunks in the recipes handled (with repeats).
    pub chunks_total: u64,
    /// Of those, all-zero chunks (never sent, written as holes).
    pub chunks_zero: u64,
    /// Distinct chunks the destination registry already held (push) and so were not sent.
    pub chunks_present: u64,
    /// Distinct chunks found locally (seed files, chunk cache) and so not fetched (pull).
    pub chunks_local: u64,
    /// Distinct chunks sent or fetched over the network.
    pub chunks_transferred: u64,
    /// Uncompressed bytes of the chunks transferred.
    pub chunk_raw_bytes_transferred: u64,
    /// Compressed (frame payload) bytes of the chunks transferred.
    pub chunk_compressed_bytes_transferred: u64,
    /// Bytes copied from local seeds or the chunk cache instead of fetched.
    pub bytes_local: u64,
    /// Blobs skipped because the destination already had them.
    pub blobs_skipped: u64,
    /// Blobs transferred (chunk by chunk or whole).
    pub blobs_transferred: u64,
}

/// Which counter to add to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    BytesSent,
    BytesReceived,
    ChunksTotal,
    ChunksZero,
    ChunksPresent,
    ChunksLocal,
    ChunksTransferred,
    ChunkRawBytes,
    ChunkCompressedBytes,
    BytesLocal,
    BlobsSkipped,
    BlobsTransferred,
    WorkTotal,
    WorkDone,
}

impl Stats {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    fn cell(&self, c: Counter) -> &AtomicU64 {
        match c {
            Counter::BytesSent => &self.bytes_sent,
            Counter::BytesReceived => &self.bytes_received,
            Counter::ChunksTotal => &self.chunks_total,
            Counter::ChunksZero => &self.chunks_zero,
            Counter::ChunksPresent => &self.chunks_present,
            Counter::ChunksLocal => &self.chunks_local,
            Counter::ChunksTransferred => &self.chunks_transferred,
            Counter::ChunkRawBytes => &self.chunk_raw_bytes_transferred,
            Counter::ChunkCompressedBytes => &self.chunk_compressed_bytes_transferred,
            Counter::BytesLocal => &self.bytes_local,
            Counter::BlobsSkipped => &self.blobs_skipped,
            Counter::BlobsTransferred => &self.blobs_transferred,
            Counter::WorkTotal => &self.work_total,
            Counter::WorkDone => &self.work_done,
        }
    }

    pub(crate) fn add(&self, c: Counter, n: u64) {
        self.cell(c).fetch_add(n, Ordering::Relaxed);
    }

    /// Names the current phase (shown by progress displays).
    pub(crate) fn set_phase(&self, phase: impl Into<String>) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase.into();
        }
    }

    /// The current phase, e.g. `hashing memory` or `uploading chunks`.
    pub fn phase(&self) -> String {
        self.phase.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Work units (bytes) of the current operation done so far and expected in all, for
    /// progress bars. Phases add to both, so the ratio only grows within a phase.
    pub fn work(&self) -> (u64, u64) {
        (self.work_done.load(Ordering::Relaxed), self.work_total.load(Ordering::Relaxed))
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: Counter| self.cell(c).load(Ordering::Relaxed);
        StatsSnapshot {
            bytes_sent: get(Counter::BytesSent),
            bytes_received: get(Counter::BytesReceived),
            chunks_total: get(Counter::ChunksTotal),
            chunks_zero: get(Counter::ChunksZero),
            chunks_present: get(Counter::ChunksPresent),
            chunks_local: get(Counter::ChunksLocal),
            chunks_transferred: get(Counter::ChunksTransferred),
            chunk_raw_bytes_transferred: get(Counter::ChunkRawBytes),
            chunk_compressed_bytes_transferred: get(Counter::ChunkCompressedBytes),
            bytes_local: get(Counter::BytesLocal),
            blobs_skipped: get(Counter::BlobsSkipped),
            blobs_transferred: get(Counter::BlobsTransferred),
        }
    }
}

impl StatsSnapshot {
    /// The counters accumulated between `earlier` and `self`.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_received: self.bytes_received - earlier.bytes_received,
            chunks_total: self.chunks_total - earlier.chunks_total,
            chunks_zero: self.chunks_zero - earlier.chunks_zero,
            chunks_present: self.chunks_present - earlier.chunks_present,
            chunks_local: self.chunks_local - earlier.chunks_local,
            chunks_transferred: self.chunks_transferred - earlier.chunks_transferred,
            chunk_raw_bytes_transferred: self.chunk_raw_bytes_transferred
                - earlier.chunk_raw_bytes_transferred,
            chunk_compressed_bytes_transferred: self.chunk_compressed_bytes_transferred
                - earlier.chunk_compressed_bytes_transferred,
            bytes_local: self.bytes_local - earlier.bytes_local,
            blobs_skipped: self.blobs_skipped - earlier.blobs_skipped,
            blobs_transferred: self.blobs_transferred - earlier.blobs_transferred,
        }
    }
}
