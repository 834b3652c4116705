//! Chunks available without the network: seed files (cut with a recipe's chunker and
//! indexed by chunk id) and a chunk cache directory (one frame per chunk). Whatever is read
//! from either is checked against its chunk id before use.

use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thaw_schema::chunker::is_zero;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::media::FileRole;
use thaw_schema::{ChunkId, ChunkerKind, ChunkerParams};

use crate::error::{Error, Result};
use crate::scan::scan_file;
use crate::snapshot::role_for_name;
use crate::stats::{Counter, Stats};
use crate::tuning::cpu_workers;

/// Where a chunk's bytes are in a local file.
#[derive(Debug, Clone)]
pub(crate) struct Location {
    pub(crate) path: Arc<PathBuf>,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl Location {
    /// Reads the chunk and checks its id.
    pub(crate) fn read(&self, id: &ChunkId, files: &mut OpenFiles) -> Result<Vec<u8>> {
        let file = files.get(&self.path)?;
        let mut buf = vec![0u8; self.len as usize];
        file.read_exact_at(&mut buf, self.offset)
            .map_err(|e| Error::io("reading", self.path.as_path(), e))?;
        if ChunkId::of(&buf) != *id {
            return Err(Error::integrity(
                format!("seed file {}", self.path.display()),
                format!("the chunk at byte {} changed since it was indexed; pull again", self.offset),
            ));
        }
        Ok(buf)
    }
}

/// Open read handles, so a file is opened once per transfer.
#[derive(Debug, Default)]
pub(crate) struct OpenFiles(HashMap<Arc<PathBuf>, std::fs::File>);

impl OpenFiles {
    pub(crate) fn get(&mut self, path: &Arc<PathBuf>) -> Result<&std::fs::File> {
        if !self.0.contains_key(path) {
            let f =
                std::fs::File::open(path.as_path()).map_err(|e| Error::io("opening", path.as_path(), e))?;
            self.0.insert(path.clone(), f);
        }
        Ok(&self.0[path])
    }
}

/// Chunk id → where the chunk's bytes are in a seed file.
pub(crate) type ChunkIndex = Arc<HashMap<ChunkId, Location>>;

/// Chunk id → location, over a set of seed files, built per chunker on first use.
#[derive(Debug, Default)]
pub(crate) struct SeedIndex {
    files: Vec<PathBuf>,
    built: HashMap<(ChunkerParams, Option<FileRole>), ChunkIndex>,
}

/// True for names thaw itself writes while pulling (never a seed).
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(".thaw-")
}

impl SeedIndex {
    /// Seeds from paths: a file is a seed; a directory contributes its regular, non-hidden
    /// files (not recursively). A path that does not exist is an error.
    pub(crate) fn new(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        for p in paths {
            let meta = std::fs::metadata(p).map_err(|e| Error::io("reading seed", p, e))?;
            if meta.is_file() {
                files.push(p.clone());
                continue;
            }
            let entries = std::fs::read_dir(p).map_err(|e| Error::io("listing seed directory", p, e))?;
            let mut found: Vec<PathBuf> = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| Error::io("listing seed directory", p, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_file = entry.metadata().is_ok_and(|m| m.is_file() && m.len() > 0);
                if is_file && !name.starts_with('.') && !is_temporary(&name) {
                    found.push(entry.path());
                }
            }
            found.sort();
            files.extend(found);
        }
        files.dedup();
        Ok(Self { files, built: HashMap::new() })
    }

    /// Adds a directory's files if it exists (the destination of a pull).
    pub(crate) fn add_if_exists(&mut self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            let more = Self::new(&[dir.to_owned()])?;
            for f in more.files {
                if !self.files.contains(&f) {
                    self.files.push(f);
                }
            }
        }
        Ok(())
    }

    /// True when there are no seed files.
    pub(crate) fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The index of seed files likely to share chunks with a file of `role`, cut with
    /// `params`: the seeds whose names give them that role, or all seeds when none does.
    pub(crate) fn index(
        &mut self,
        params: ChunkerParams,
        role: Option<FileRole>,
        stats: &Stats,
    ) -> Result<ChunkIndex> {
        if let Some(built) = self.built.get(&(params, role)) {
            return Ok(built.clone());
        }
        let same_role: Vec<&PathBuf> = self
            .files
            .iter()
            .filter(|f| {
                role.is_some() && f.file_name().and_then(|n| n.to_str()).and_then(role_for_name) == role
            })
            .collect();
        let candidates: Vec<&PathBuf> =
            if same_role.is_empty() { self.files.iter().collect() } else { same_role };
        let mut index = HashMap::new();
        for path in candidates {
            stats.set_phase(format!("indexing seed {}", path.display()));
            let size = std::fs::metadata(path).map_err(|e| Error::io("reading seed", path, e))?.len();
            stats.add(Counter::WorkTotal, size);
            let chunks = if params.kind == ChunkerKind::Fixed {
                fixed_data_chunks(path, params.max, stats)?
            } else {
                scan_file(path, params, false, stats)?
                    .chunks
                    .into_iter()
                    .filter_map(|c| Some((c.offset, c.len, c.id?)))
                    .collect()
            };
            let shared = Arc::new(path.clone());
            for (offset, len, id) in chunks {
                index.entry(id).or_insert(Location { path: shared.clone(), offset, len });
            }
        }
        let index = Arc::new(index);
        self.built.insert((params, role), index.clone());
        Ok(index)
    }
}

/// The non-zero chunks of `path` cut at fixed `size`, as (offset, length, id), reading only
/// its data regions (`SEEK_DATA`/`SEEK_HOLE`): a chunk inside a hole is zero, and a seed
/// written by a restore is mostly holes (its zero chunks), so reading them and testing them
/// for zero was most of a seed's indexing. The chunks are hashed on all cores. On a
/// filesystem without hole reporting the whole file is one data region.
fn fixed_data_chunks(path: &Path, size: u32, stats: &Stats) -> Result<Vec<(u64, u32, ChunkId)>> {
    use rustix::fs::{seek, SeekFrom};
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening seed", path, e))?;
    let len = file.metadata().map_err(|e| Error::io("reading seed", path, e))?.len();
    let size = u64::from(size.max(1));
    // Offsets of the chunks that overlap a data region, in file order.
    let mut offsets: Vec<u64> = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(&file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // only a hole is left
            Err(e) => return Err(Error::io("finding data in seed", path, e.into())),
        };
        let hole = seek(&file, SeekFrom::Hole(data))
            .map_err(|e| Error::io("finding holes in seed", path, e.into()))?
            .min(len);
        let mut chunk = data / size * size;
        while chunk < hole {
            if offsets.last() != Some(&chunk) {
                offsets.push(chunk);
            }
            chunk += size;
        }
        pos = hole.max(data + 1);
    }
    let workers = cpu_workers().min(offsets.len().max(1));
    let per_worker = offsets.len().div_ceil(workers).max(1);
    let found: Vec<Result<Vec<(u64, u32, ChunkId)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = offsets
            .chunks(per_worker)
            .map(|part| {
                let file = &file;
                s.spawn(move || {
                    let mut buf = vec![0u8; size as usize];
                    let mut out = Vec::with_capacity(part.len());
                    for &offset in part {
                        let n = (len - offset).min(size) as usize;
                        file.read_exact_at(&mut buf[..n], offset)
                            .map_err(|e| Error::io("reading seed", path, e))?;
                        if !is_zero(&buf[..n]) {
                            out.push((offset, n as u32, ChunkId::of(&buf[..n])));
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("seed index worker")).collect()
    });
    let mut chunks = Vec::with_capacity(offsets.len());
    for part in found {
        chunks.extend(part?);
    }
    stats.add(Counter::WorkDone, len);
    Ok(chunks)
}

/// A directory of chunk frames, `<dir>/<first two hex>/<hex id>`.
#[derive(Debug, Clone)]
pub struct ChunkCache {
    dir: PathBuf,
}

impl ChunkCache {
    /// A cache in `dir` (created when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// True when the cache has a frame for `id` (not yet checked).
    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        self.path(id).is_file()
    }

    /// The chunk's bytes, checked against `id`. A corrupt entry is removed and reported.
    pub(crate) fn read(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let path = self.path(id);
        let frame = std::fs::read(&path).map_err(|e| Error::io("reading cached chunk", &path, e))?;
        let decoded = EncodedChunk::from_frame(&frame).and_then(|c| c.decode(id));
        decoded.map_err(|e| {
            let _ = std::fs::remove_file(&path);
            Error::integrity(
                format!("cached chunk {}", path.display()),
                format!("{e}; the entry was removed, pull again"),
            )
        })
    }

    /// Stores a chunk frame (atomically; an existing entry is kept).
    pub(crate) fn put(&self, id: &ChunkId, chunk: &EncodedChunk) -> Result<()> {
        let path = self.path(id);
        if path.is_file() {
            return Ok(());
        }
        let dir = path.parent().expect("cache paths have a parent");
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating cache directory", dir, e))?;
        let tmp = dir.join(format!(".{}.tmp-{}", id.hex(), std::process::id()));
        std::fs::write(&tmp, chunk.to_frame()).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io("writing cached chunk", &path, e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_seed_indexes_the_same_chunks_as_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let size = 64 * 1024u32;
        let file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
        // Holes, data that straddles a chunk boundary, an explicitly written zero chunk, and
        // a short last chunk with data.
        let len = 40 * u64::from(size) + 1000;
        file.set_len(len).unwrap();
        let block = |seed: u8| -> Vec<u8> { (0..9000u32).map(|i| (i as u8) ^ seed).collect() };
        file.write_all_at(&block(1), 3 * u64::from(size) - 4000).unwrap();
        file.write_all_at(&vec![0u8; size as usize], 10 * u64::from(size)).unwrap();
        file.write_all_at(&block(2), 25 * u64::from(size) + 17).unwrap();
        file.write_all_at(b"tail", len - 4).unwrap();
        drop(file);
        let stats = Stats::new();
        let mut fast = fixed_data_chunks(&path, size, &stats).unwrap();
        let mut full: Vec<(u64, u32, ChunkId)> = scan_file(&path, ChunkerParams::fixed(size), false, &stats)
            .unwrap()
            .chunks
            .into_iter()
            .filter_map(|c| Some((c.offset, c.len, c.id?)))
            .collect();
        fast.sort_by_key(|c| c.0);
        full.sort_by_key(|c| c.0);
        assert_eq!(fast, full);
        assert_eq!(full.len(), 4, "two chunks for the straddling block, one more block, the tail");
    }
}
