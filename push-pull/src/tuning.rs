//! Chunking, compression and transfer parameters, kept in one place. The chunker and zstd
//! choices are docs/DECISIONS.md D7 and D20; readers never depend on them, because every
//! recipe records the parameters it was cut with.

use thaw_schema::media::FileRole;
use thaw_schema::ChunkerParams;

/// zstd level for chunks the client compresses. Level 1 over 3 on real guest memory: 3%
/// more compressed bytes, 17% less CPU per byte, which is what brings ingest past
/// 400 MiB/s per core (D20).
pub const ZSTD_LEVEL: i32 = 1;

/// The chunker for a file of the given role (`None`: a blob of unknown role, e.g. one copied
/// from a foreign artifact). Memory and disk are page-structured: page-aligned fixed chunks.
pub fn chunker_for(role: Option<FileRole>) -> ChunkerParams {
    match role {
        Some(FileRole::Memory | FileRole::Disk) => ChunkerParams::fixed(64 * 1024),
        _ => ChunkerParams::REGISTRY_DEFAULT,
    }
}

/// A chunk upload batch is sent once its body reaches this many bytes (the registry takes
/// up to 64 MiB; one chunk adds at most 4 MiB + 64 KiB, so bodies stay under ~17 MiB).
pub const UPLOAD_BATCH_BYTES: usize = 12 * 1024 * 1024;

/// A chunk upload batch is also sent once its chunks add up to this many uncompressed
/// bytes: the registry refuses batches past `thaw_schema::batch::MAX_BATCH_RAW_LEN`
/// (256 MiB), and one more chunk adds at most 4 MiB.
pub const UPLOAD_BATCH_RAW_BYTES: u64 = 64 * 1024 * 1024;

/// A chunk fetch asks for at most this many uncompressed bytes at once.
pub const FETCH_BATCH_RAW_BYTES: u64 = 16 * 1024 * 1024;

/// Requests of one kind (chunk batches, blob uploads) in flight at once.
pub const TRANSFER_CONCURRENCY: usize = 3;

/// Plain OCI uploads up to this size go in one PUT; larger ones in PATCH pieces of this size.
pub const UPLOAD_PIECE_BYTES: u64 = 32 * 1024 * 1024;

/// Granularity of hole detection when writing files: aligned all-zero blocks of this size
/// are skipped (left as holes) instead of written.
pub const HOLE_BLOCK: usize = 4096;

/// Worker threads for hashing and compressing: one per core.
pub fn cpu_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
