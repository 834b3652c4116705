//! The cache's persistent index (redb, `index.redb` in the cache directory): which snapshots
//! are complete, where each of their chunks lies, leases, and tag resolutions.
//!
//! Tables (keys and values are bytes or strings; layouts below are the only place they are
//! spelled):
//!
//! | table | key | value |
//! |---|---|---|
//! | `snapshots` | manifest digest `sha256:…` | JSON [`SnapshotRecord`] |
//! | `snapshot_chunks` | manifest digest | the snapshot's chunk locations, [`LOCATION_LEN`] bytes each: chunk id (32), file index (u16 LE), offset (u64 LE), length (u32 LE) |
//! | `chunks` (multimap) | chunk id (32 bytes) | manifest digest (32 raw bytes), file index (u16 LE), offset (u64 LE), length (u32 LE) |
//! | `leases` | lease id | JSON [`LeaseRecord`], copied from the lease log (`lease_log.rs`) by the flusher |
//! | `refs` | reference as resolved | JSON [`RefRecord`] |
//!
//! A snapshot's record and its chunk locations are written in one transaction, after its
//! files are complete, verified and renamed into place, and removed in one transaction
//! before its files are deleted: an entry never points at bytes that are not there.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, MultimapTableDefinition, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};
use thaw_schema::{ChunkId, Sha256Digest};

use crate::error::{CacheError, Result};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const SNAPSHOT_CHUNKS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot_chunks");
const CHUNKS: MultimapTableDefinition<&[u8], &[u8]> = MultimapTableDefinition::new("chunks");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const REFS: TableDefinition<&str, &[u8]> = TableDefinition::new("refs");

/// Bytes of one entry in `snapshot_chunks`.
pub(crate) const LOCATION_LEN: usize = 32 + 2 + 8 + 4;

/// One file of a cached snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileRecord {
    /// The file name (layer title).
    pub(crate) title: String,
    /// Role key (`memory`, `vmstate`, `disk`, `info`) for thaw layers.
    pub(crate) role: Option<String>,
    /// sha256 of the file.
    pub(crate) digest: Sha256Digest,
    /// Its size.
    pub(crate) size: u64,
    /// Modification time when committed (ns since the epoch): a changed time means someone
    /// wrote the file, and the snapshot is checked before it is handed out again.
    pub(crate) mtime_ns: i128,
}

/// A complete, verified snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    /// Manifest digest.
    pub(crate) digest: Sha256Digest,
    /// The registry host it came from.
    pub(crate) registry: String,
    /// The repository it came from.
    pub(crate) repository: String,
    /// References it was ensured by.
    pub(crate) references: Vec<String>,
    /// Its files, in manifest order.
    pub(crate) files: Vec<FileRecord>,
    /// Disk blocks allocated to its files, in bytes.
    pub(crate) allocated_bytes: u64,
    /// Last use, Unix milliseconds.
    pub(crate) last_used_ms: u64,
}

impl SnapshotRecord {
    /// Sum of its file sizes.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A lease taken by `ensure`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaseRecord {
    /// The leased snapshot.
    pub(crate) digest: Sha256Digest,
    /// The reference it was ensured by.
    pub(crate) reference: String,
    /// When it was taken, Unix milliseconds.
    pub(crate) created_ms: u64,
    /// When it ends unless renewed, Unix milliseconds. Records written before leases had a
    /// TTL have none (0): they are given one full TTL from the start that loads them.
    #[serde(default)]
    pub(crate) expires_ms: u64,
}

/// What a tag resolved to, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RefRecord {
    /// The manifest digest.
    pub(crate) digest: Sha256Digest,
    /// When it was resolved, Unix milliseconds.
    pub(crate) resolved_ms: u64,
}

/// Where a chunk's bytes are: file `file` of snapshot `snapshot`, at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkLocation {
    pub(crate) snapshot: Sha256Digest,
    pub(crate) file: u16,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl ChunkLocation {
    fn encode(&self) -> [u8; LOCATION_LEN] {
        let mut out = [0u8; LOCATION_LEN];
        out[..32].copy_from_slice(self.snapshot.as_bytes());
        out[32..34].copy_from_slice(&self.file.to_le_bytes());
        out[34..42].copy_from_slice(&self.offset.to_le_bytes());
        out[42..46].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != LOCATION_LEN {
            return None;
        }
        Some(Self {
            snapshot: Sha256Digest::from_bytes(b[..32].try_into().ok()?),
            file: u16::from_le_bytes(b[32..34].try_into().ok()?),
            offset: u64::from_le_bytes(b[34..42].try_into().ok()?),
            len: u32::from_le_bytes(b[42..46].try_into().ok()?),
        })
    }
}

/// Everything the index holds, as loaded at start.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) snapshots: Vec<SnapshotRecord>,
    pub(crate) leases: Vec<(String, LeaseRecord)>,
    pub(crate) refs: Vec<(String, RefRecord)>,
}

/// The redb database.
#[derive(Debug)]
pub(crate) struct Index {
    db: Database,
}

fn db_err(e: impl Into<redb::Error>) -> CacheError {
    CacheError::Database(e.into())
}

fn from_json<T: for<'de> Deserialize<'de>>(what: &'static str, key: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|source| CacheError::Record { what, key: key.to_owned(), source })
}

impl Index {
    /// Opens (or creates) the index at `path`, with every table present.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(SNAPSHOTS).map_err(db_err)?;
        tx.open_table(SNAPSHOT_CHUNKS).map_err(db_err)?;
        tx.open_multimap_table(CHUNKS).map_err(db_err)?;
        tx.open_table(LEASES).map_err(db_err)?;
        tx.open_table(REFS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// Reads snapshot records, leases and tag resolutions.
    pub(crate) fn load(&self) -> Result<Loaded> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let mut out = Loaded::default();
        for row in tx.open_table(SNAPSHOTS).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.snapshots.push(from_json("snapshot", k.value(), v.value())?);
        }
        for row in tx.open_table(LEASES).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.leases.push((k.value().to_owned(), from_json("lease", k.value(), v.value())?));
        }
        for row in tx.open_table(REFS).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.refs.push((k.value().to_owned(), from_json("reference", k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Records a complete snapshot and where its chunks are, in one durable transaction.
    pub(crate) fn insert_snapshot(
        &self,
        record: &SnapshotRecord,
        chunks: &[(ChunkId, ChunkLocation)],
    ) -> Result<()> {
        let key = record.digest.to_string();
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let json = serde_json::to_vec(record).expect("serializes");
            tx.open_table(SNAPSHOTS)
                .map_err(db_err)?
                .insert(key.as_str(), json.as_slice())
                .map_err(db_err)?;
            let mut list = Vec::with_capacity(chunks.len() * LOCATION_LEN);
            let mut table = tx.open_multimap_table(CHUNKS).map_err(db_err)?;
            for (id, loc) in chunks {
                let enc = loc.encode();
                table.insert(id.as_bytes().as_slice(), enc.as_slice()).map_err(db_err)?;
                list.extend_from_slice(id.as_bytes());
                list.extend_from_slice(&enc[32..]);
            }
            tx.open_table(SNAPSHOT_CHUNKS)
                .map_err(db_err)?
                .insert(key.as_str(), list.as_slice())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Removes a snapshot, its chunk locations and its leases, in one durable transaction.
    pub(crate) fn remove_snapshot(&self, digest: &Sha256Digest) -> Result<()> {
        let key = digest.to_string();
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            tx.open_table(SNAPSHOTS).map_err(db_err)?.remove(key.as_str()).map_err(db_err)?;
            let list: Option<Vec<u8>> = {
                let mut table = tx.open_table(SNAPSHOT_CHUNKS).map_err(db_err)?;
                let removed = table.remove(key.as_str()).map_err(db_err)?;
                removed.map(|v| v.value().to_vec())
            };
            if let Some(list) = list {
                let mut table = tx.open_multimap_table(CHUNKS).map_err(db_err)?;
                for entry in list.chunks_exact(LOCATION_LEN) {
                    let mut value = [0u8; LOCATION_LEN];
                    value[..32].copy_from_slice(digest.as_bytes());
                    value[32..].copy_from_slice(&entry[32..]);
                    table.remove(&entry[..32], value.as_slice()).map_err(db_err)?;
                }
            }
            let mut leases = tx.open_table(LEASES).map_err(db_err)?;
            let mine: Vec<String> = leases
                .iter()
                .map_err(db_err)?
                .filter_map(|row| {
                    let (k, v) = row.ok()?;
                    let lease: LeaseRecord = serde_json::from_slice(v.value()).ok()?;
                    (lease.digest == *digest).then(|| k.value().to_owned())
                })
                .collect();
            for k in mine {
                leases.remove(k.as_str()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// For each id, the locations of cached chunks with that id.
    pub(crate) fn locate(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, Vec<ChunkLocation>>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_multimap_table(CHUNKS).map_err(db_err)?;
        let mut out = HashMap::new();
        for id in ids {
            let mut locs = Vec::new();
            for v in table.get(id.as_bytes().as_slice()).map_err(db_err)? {
                if let Some(loc) = ChunkLocation::decode(v.map_err(db_err)?.value()) {
                    locs.push(loc);
                }
            }
            if !locs.is_empty() {
                out.insert(*id, locs);
            }
        }
        Ok(out)
    }

    /// Counts chunk locations (for the consistency checks in tests and `/metrics`).
    pub(crate) fn chunk_location_count(&self) -> Result<u64> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(SNAPSHOT_CHUNKS).map_err(db_err)?;
        let mut n = 0u64;
        for row in table.iter().map_err(db_err)? {
            n += (row.map_err(db_err)?.1.value().len() / LOCATION_LEN) as u64;
        }
        Ok(n)
    }

    /// Writes what changes often (last use, leases taken and ended, tag resolutions) in one
    /// durable transaction. Leases are in the lease log (`lease_log.rs`) before they are
    /// handed out; this copies them here so the log can be dropped. A lease whose snapshot
    /// record is gone is not written.
    pub(crate) fn write_volatile(&self, batch: &VolatileBatch) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut snaps = tx.open_table(SNAPSHOTS).map_err(db_err)?;
            for record in &batch.snapshots {
                let key = record.digest.to_string();
                // Only update records still present: an eviction may have removed it.
                if snaps.get(key.as_str()).map_err(db_err)?.is_some() {
                    let json = serde_json::to_vec(record).expect("serializes");
                    snaps.insert(key.as_str(), json.as_slice()).map_err(db_err)?;
                }
            }
            let mut leases = tx.open_table(LEASES).map_err(db_err)?;
            for (id, lease) in &batch.leases_put {
                if snaps.get(lease.digest.to_string().as_str()).map_err(db_err)?.is_some() {
                    let json = serde_json::to_vec(lease).expect("serializes");
                    leases.insert(id.as_str(), json.as_slice()).map_err(db_err)?;
                }
            }
            for id in &batch.leases_removed {
                leases.remove(id.as_str()).map_err(db_err)?;
            }
            let mut refs = tx.open_table(REFS).map_err(db_err)?;
            for (reference, r) in &batch.refs {
                let json = serde_json::to_vec(r).expect("serializes");
                refs.insert(reference.as_str(), json.as_slice()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }
}

/// Changes to write by [`Index::write_volatile`].
#[derive(Debug, Default)]
pub(crate) struct VolatileBatch {
    pub(crate) snapshots: Vec<SnapshotRecord>,
    pub(crate) leases_put: Vec<(String, LeaseRecord)>,
    pub(crate) leases_removed: Vec<String>,
    pub(crate) refs: Vec<(String, RefRecord)>,
}

impl VolatileBatch {
    pub(crate) fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
            && self.leases_put.is_empty()
            && self.leases_removed.is_empty()
            && self.refs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(digest: Sha256Digest) -> SnapshotRecord {
        SnapshotRecord {
            digest,
            registry: "r".into(),
            repository: "fn".into(),
            references: vec!["r/fn:v1".into()],
            files: vec![],
            allocated_bytes: 4096,
            last_used_ms: 1,
        }
    }

    #[test]
    fn chunk_locations_go_with_their_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let (a, b) = (Sha256Digest::of(b"a"), Sha256Digest::of(b"b"));
        let shared = ChunkId::of(b"shared");
        let only_a = ChunkId::of(b"only a");
        let loc = |snapshot, offset| ChunkLocation { snapshot, file: 0, offset, len: 6 };
        index.insert_snapshot(&record(a), &[(shared, loc(a, 0)), (only_a, loc(a, 4096))]).unwrap();
        index.insert_snapshot(&record(b), &[(shared, loc(b, 8192))]).unwrap();
        let found = index.locate(&[shared, only_a]).unwrap();
        assert_eq!(found[&shared].len(), 2);
        assert_eq!(found[&only_a], vec![loc(a, 4096)]);
        assert_eq!(index.chunk_location_count().unwrap(), 3);

        index.remove_snapshot(&a).unwrap();
        let found = index.locate(&[shared, only_a]).unwrap();
        assert_eq!(found[&shared], vec![loc(b, 8192)]);
        assert!(!found.contains_key(&only_a));
        assert_eq!(index.load().unwrap().snapshots, vec![record(b)]);
        assert_eq!(index.chunk_location_count().unwrap(), 1);
    }

    fn lease_of(digest: Sha256Digest) -> LeaseRecord {
        LeaseRecord { digest, reference: "r/fn:v1".into(), created_ms: 5, expires_ms: 9 }
    }

    #[test]
    fn volatile_writes_skip_snapshots_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let a = Sha256Digest::of(b"a");
        let lease = LeaseRecord { digest: a, reference: "r/fn:v1".into(), created_ms: 5, expires_ms: 9 };
        let batch = VolatileBatch { snapshots: vec![record(a)], ..Default::default() };
        index.write_volatile(&batch).unwrap();
        let put = |id: &str, lease: &LeaseRecord| {
            let batch =
                VolatileBatch { leases_put: vec![(id.to_owned(), lease.clone())], ..Default::default() };
            index.write_volatile(&batch).unwrap();
        };
        put("l1", &lease);
        let loaded = index.load().unwrap();
        assert!(
            loaded.snapshots.is_empty() && loaded.leases.is_empty(),
            "no lease on a snapshot that is gone"
        );

        index.insert_snapshot(&record(a), &[]).unwrap();
        put("l1", &lease);
        assert_eq!(index.load().unwrap().leases, vec![("l1".to_string(), lease)]);
        index
            .write_volatile(&VolatileBatch { leases_removed: vec!["l1".into()], ..Default::default() })
            .unwrap();
        assert!(index.load().unwrap().leases.is_empty(), "an ended lease is removed");
        put("l1", &LeaseRecord { created_ms: 6, ..lease_of(a) });
        index.remove_snapshot(&a).unwrap();
        assert!(index.load().unwrap().leases.is_empty(), "a snapshot's leases go with it");
    }
}
