//! Cutting a file into chunks and hashing them on all cores, streaming: one thread reads,
//! cuts and feeds the whole-file SHA-256; workers test for zero chunks and BLAKE3 the rest.
//! Only a bounded number of chunks is in memory at once.

use std::fs::File;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use thaw_schema::chunker::is_zero;
use thaw_schema::digest::Sha256Hasher;
use thaw_schema::recipe::RecipeBuilder;
use thaw_schema::{ChunkId, ChunkerParams, Recipe, Sha256Digest};

use crate::error::{Error, Result};
use crate::stats::{Counter, Stats};
use crate::tuning::cpu_workers;

/// One chunk of a scanned file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScannedChunk {
    pub(crate) offset: u64,
    pub(crate) len: u32,
    /// `None` for an all-zero chunk.
    pub(crate) id: Option<ChunkId>,
}

/// A scanned file: its chunks in order, and its SHA-256 when asked for.
#[derive(Debug, Clone)]
pub(crate) struct Scan {
    pub(crate) params: ChunkerParams,
    pub(crate) size: u64,
    pub(crate) sha256: Option<Sha256Digest>,
    pub(crate) chunks: Vec<ScannedChunk>,
}

impl Scan {
    /// The file's recipe (needs the SHA-256).
    pub(crate) fn recipe(&self) -> Recipe {
        let mut b = RecipeBuilder::new(self.params);
        for c in &self.chunks {
            match c.id {
                Some(id) => b.push_data(c.len, id),
                None => b.push_zero(c.len),
            }
        }
        b.finish(self.sha256.expect("recipe of a scan made with its SHA-256"))
    }
}

/// Chunks are handed to the threads in groups of about this many bytes: one hand-off per
/// chunk cost a fifth of the CPU in futex wake-ups on a two-core machine (D20).
const GROUP_BYTES: usize = 1024 * 1024;

/// Consecutive chunks of the file, numbered from `first`.
struct ChunkGroup {
    first: usize,
    chunks: Vec<thaw_schema::chunker::Chunk>,
}

/// Scans `path` with `params`. Progress goes to `stats` as work done (bytes).
///
/// Threads: this one reads and cuts (no extra buffering: the fixed chunker reads straight
/// into each chunk, FastCDC has its own buffer) and groups the chunks; one thread feeds the
/// whole-file SHA-256 in order; the workers test for zero and BLAKE3 the rest, a group at a
/// time, in any order.
pub(crate) fn scan_file(
    path: &Path,
    params: ChunkerParams,
    want_sha256: bool,
    stats: &Stats,
) -> Result<Scan> {
    let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let chunks = params.chunks(file).map_err(|e| Error::Usage(e.to_string()))?;
    let workers = cpu_workers();
    let (work_tx, work_rx) = mpsc::sync_channel::<Arc<ChunkGroup>>(workers * 2);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, Vec<ScannedChunk>)>();
    let (hash_tx, hash_rx) = mpsc::sync_channel::<Arc<ChunkGroup>>(workers * 2);
    let mut count = 0usize;
    let mut size = 0u64;
    let (read_result, sha256) = std::thread::scope(|s| {
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let work_rx = &work_rx;
            s.spawn(move || loop {
                let next = work_rx.lock().expect("work queue lock").recv();
                let Ok(group) = next else { return };
                let scanned: Vec<ScannedChunk> = group
                    .chunks
                    .iter()
                    .map(|c| ScannedChunk {
                        offset: c.offset,
                        len: c.data.len() as u32,
                        id: (!is_zero(&c.data)).then(|| ChunkId::of(&c.data)),
                    })
                    .collect();
                stats.add(Counter::WorkDone, scanned.iter().map(|c| u64::from(c.len)).sum());
                if done_tx.send((group.first, scanned)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        let hasher = s.spawn(move || {
            let mut hasher = Sha256Hasher::new();
            for group in hash_rx.iter() {
                for c in &group.chunks {
                    hasher.update(&c.data);
                }
            }
            hasher.finish()
        });
        let (work_tx, hash_tx) = (work_tx, hash_tx); // dropped below, which stops the other threads
        let read = (|| {
            let mut group = ChunkGroup { first: 0, chunks: Vec::new() };
            let mut group_bytes = 0usize;
            let send = |group: ChunkGroup| {
                let group = Arc::new(group);
                !(want_sha256 && hash_tx.send(group.clone()).is_err()) && work_tx.send(group).is_ok()
            };
            for chunk in chunks {
                let chunk = chunk?;
                size += chunk.data.len() as u64;
                group_bytes += chunk.data.len();
                group.chunks.push(chunk);
                count += 1;
                if group_bytes >= GROUP_BYTES {
                    let full = std::mem::replace(&mut group, ChunkGroup { first: count, chunks: Vec::new() });
                    group_bytes = 0;
                    if !send(full) {
                        return Ok(());
                    }
                }
            }
            if !group.chunks.is_empty() {
                send(group);
            }
            Ok::<(), std::io::Error>(())
        })();
        drop((work_tx, hash_tx));
        (read, hasher.join().expect("hash thread"))
    });
    read_result.map_err(|e| Error::io("reading", path, e))?;
    let mut out: Vec<Option<ScannedChunk>> = vec![None; count];
    for (first, scanned) in done_rx.iter() {
        for (slot, c) in out[first..].iter_mut().zip(scanned) {
            *slot = Some(c);
        }
    }
    let chunks: Vec<ScannedChunk> = out.into_iter().collect::<Option<_>>().expect("every chunk was hashed");
    Ok(Scan { params, size, sha256: want_sha256.then_some(sha256), chunks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_matches_the_sequential_chunker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut data = vec![0u8; 3 * 1024 * 1024 + 77];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (i, b) in data.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Zero pages between 1 MiB and 1.5 MiB.
            *b = if (1 << 20..3 << 19).contains(&i) { 0 } else { x as u8 };
        }
        std::fs::write(&path, &data).unwrap();
        for params in [ChunkerParams::fixed(64 * 1024), ChunkerParams::REGISTRY_DEFAULT] {
            let scan = scan_file(&path, params, true, &Stats::new()).unwrap();
            assert_eq!(scan.size, data.len() as u64);
            assert_eq!(scan.sha256, Some(Sha256Digest::of(&data)));
            let expected: Vec<_> = params.chunks(&data[..]).unwrap().map(|c| c.unwrap()).collect();
            assert_eq!(scan.chunks.len(), expected.len());
            for (s, e) in scan.chunks.iter().zip(&expected) {
                assert_eq!((s.offset, s.len as usize), (e.offset, e.data.len()));
                assert_eq!(s.id, (!e.is_zero()).then(|| ChunkId::of(&e.data)));
            }
            let recipe = scan.recipe();
            recipe.validate().unwrap();
            if params == ChunkerParams::fixed(64 * 1024) {
                assert_eq!(recipe.zero_bytes(), 512 * 1024);
            }
        }
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let scan = scan_file(&empty, ChunkerParams::fixed(4096), true, &Stats::new()).unwrap();
        assert!(scan.chunks.is_empty());
        assert_eq!(scan.recipe().size, 0);
    }
}
