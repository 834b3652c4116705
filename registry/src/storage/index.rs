//! The in-memory chunk index: chunk id → (pack, frame range), the union of the pack
//! indexes in the bucket that this process has read.
//!
//! It is a cache of what the bucket says, rebuilt by listing `chunks/index/` and reading
//! the pack indexes found there, so any number of replicas can share one bucket. It is only
//! ever filled from pack indexes, which are written after their packs: it never claims a
//! chunk that is not stored. It may lack chunks another replica stored since the last
//! refresh; callers that find an id missing refresh it once (see `Store::refresh_index`)
//! before believing that.
//!
//! Memory: one entry per distinct stored chunk, about 56 bytes with the table's overhead,
//! so per GiB of distinct chunk data (before compression) ~0.9 MB at the 64 KiB average
//! chunk and ~14 MB at 4 KiB pages (docs/DECISIONS.md D6).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;

use thaw_schema::ChunkId;

use super::pack::{IndexEntry, PackId};

/// Chunk ids are BLAKE3 outputs, already uniformly distributed: their first eight bytes
/// are as good a hash as any, and much cheaper than SipHash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        if let Some(head) = bytes.get(..8) {
            self.0 ^= u64::from_le_bytes(head.try_into().expect("8 bytes"));
        } else {
            for b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(*b);
            }
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Where a chunk's frame is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    /// Number of the pack in [`ChunkIndex::pack`].
    pub(crate) pack: u32,
    pub(crate) len: u32,
    pub(crate) offset: u64,
}

impl Location {
    pub(crate) fn range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }
}

/// See the module docs.
#[derive(Default)]
pub(crate) struct ChunkIndex {
    chunks: HashMap<ChunkId, Location, BuildHasherDefault<IdHasher>>,
    packs: Vec<PackId>,
    /// Packs whose index was read (or found unreadable): never read again.
    seen: HashSet<PackId>,
    /// Chunks of packs an open GC sweep will delete: gone for commits and `missing`
    /// ([`ChunkIndex::contains`]), still readable until the pack is deleted
    /// ([`ChunkIndex::get`]), so a pull of a live blob does not fail while GC copies its
    /// chunks out of a doomed pack.
    doomed: HashMap<ChunkId, Location, BuildHasherDefault<IdHasher>>,
}

impl ChunkIndex {
    /// Where to read `id`: its live location, else its place in a pack a sweep will delete.
    pub(crate) fn get(&self, id: &ChunkId) -> Option<Location> {
        self.chunks.get(id).or_else(|| self.doomed.get(id)).copied()
    }

    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(id)
    }

    pub(crate) fn pack(&self, number: u32) -> &PackId {
        &self.packs[number as usize]
    }

    pub(crate) fn has_seen(&self, pack: &PackId) -> bool {
        self.seen.contains(pack)
    }

    /// Records a pack index that could not be read, so it is not fetched again.
    pub(crate) fn skip(&mut self, pack: PackId) {
        self.seen.insert(pack);
    }

    /// Adds the chunks of one pack. A chunk already located elsewhere keeps its location:
    /// both copies are valid, and readers keep reading from where they started.
    pub(crate) fn insert(&mut self, pack: PackId, entries: &[IndexEntry]) {
        if !self.seen.insert(pack.clone()) {
            return;
        }
        let number = u32::try_from(self.packs.len()).expect("fewer than 2^32 packs");
        self.packs.push(pack);
        self.chunks.reserve(entries.len());
        for e in entries {
            self.chunks.entry(e.id).or_insert(Location { pack: number, len: e.len, offset: e.offset });
        }
    }

    /// Forgets those of `ids` located in `pack` (their frames there are unreadable, see
    /// `storage::heal`); a chunk located in another pack keeps that location. The pack
    /// stays seen, so a refresh never brings them back.
    pub(crate) fn forget_in_pack(&mut self, pack: &PackId, ids: &HashSet<ChunkId>) {
        let Some(number) = self.packs.iter().position(|p| p == pack) else { return };
        for id in ids {
            if self.chunks.get(id).is_some_and(|loc| loc.pack as usize == number) {
                self.chunks.remove(id);
            }
        }
    }

    /// Forgets every chunk located in `packs` (a GC sweep deletes them) and marks them seen,
    /// so a refresh never reads them again; chunks they hold that are still live are found
    /// in GC's copies, which are new packs.
    pub(crate) fn forget_packs(&mut self, packs: &[PackId]) {
        let wanted: HashSet<&PackId> = packs.iter().collect();
        let numbers: HashSet<u32> = self
            .packs
            .iter()
            .enumerate()
            .filter(|(_, p)| wanted.contains(p))
            .map(|(n, _)| n as u32)
            .collect();
        if !numbers.is_empty() {
            let doomed = &mut self.doomed;
            self.chunks.retain(|id, loc| {
                let keep = !numbers.contains(&loc.pack);
                if !keep {
                    doomed.insert(*id, *loc);
                }
                keep
            });
        }
        self.seen.extend(packs.iter().cloned());
    }

    /// Lets a refresh read `packs` again (their sweep ended: they are deleted, or their
    /// run died and left them, live chunks included).
    pub(crate) fn unforget_packs(&mut self, packs: &[PackId]) {
        for pack in packs {
            self.seen.remove(pack);
        }
    }

    /// Drops the read-only locations [`ChunkIndex::forget_packs`] kept, once no sweep is
    /// open (their packs are deleted).
    pub(crate) fn drop_doomed(&mut self) {
        self.doomed = HashMap::default();
    }

    /// Points the chunks of `entries` at `pack` (GC's rewritten copy of an older pack),
    /// wherever they were located before.
    pub(crate) fn relocate(&mut self, pack: PackId, entries: &[IndexEntry]) {
        self.seen.insert(pack.clone());
        let number = u32::try_from(self.packs.len()).expect("fewer than 2^32 packs");
        self.packs.push(pack);
        for e in entries {
            self.chunks.insert(e.id, Location { pack: number, len: e.len, offset: e.offset });
        }
    }

    /// Number of chunks located.
    pub(crate) fn len(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_location_wins_and_packs_are_read_once() {
        let id = ChunkId::of(b"x");
        let (a, b) = (PackId::generate(), PackId::generate());
        let mut index = ChunkIndex::default();
        index.insert(a.clone(), &[IndexEntry { id, offset: 8, len: 10 }]);
        index.insert(
            b.clone(),
            &[
                IndexEntry { id, offset: 100, len: 10 },
                IndexEntry { id: ChunkId::of(b"y"), offset: 8, len: 5 },
            ],
        );
        index.insert(b.clone(), &[IndexEntry { id: ChunkId::of(b"z"), offset: 8, len: 5 }]);
        let loc = index.get(&id).unwrap();
        assert_eq!((index.pack(loc.pack), loc.range()), (&a, 8..18));
        assert!(index.contains(&ChunkId::of(b"y")));
        assert!(!index.contains(&ChunkId::of(b"z")), "a pack seen before is not inserted again");
        assert_eq!(index.len(), 2);
        assert!(index.has_seen(&b));
    }
}
