//! How a memory file's recipe is cut into fill units: the page-aligned ranges one fault
//! fills at once.
//!
//! A unit ends at the first page boundary at or after the end of a recipe entry, so a
//! fault fills at least the whole chunk it falls in — one `UFFDIO_COPY` for a 64 KiB chunk,
//! not sixteen faults. Units are disjoint and cover the file (rounded up to a page), so
//! every page belongs to exactly one unit and no two copies ever race for one page. With
//! page-aligned chunks (fixed 4 KiB or 64 KiB, the client's memory chunkers) a unit is one
//! chunk or one zero run; with chunks that end mid-page (FastCDC, for blobs pushed by plain
//! OCI clients) a unit also needs the head of the next chunk for its last page. With
//! 2 MiB pages a unit spans every chunk of its huge page.

use std::ops::Range;

use thaw_schema::{ChunkId, Recipe, RecipeEntry};

/// A memory file's fill units.
#[derive(Debug)]
pub(crate) struct Layout {
    /// The recipe's entries.
    entries: Vec<RecipeEntry>,
    /// Start offset of each entry, and the file size last.
    entry_starts: Vec<u64>,
    /// Start offset of each unit, and the end of the last unit last.
    unit_starts: Vec<u64>,
    page: u64,
}

impl Layout {
    /// Cuts `recipe` into units of whole `page`-byte pages.
    pub(crate) fn new(recipe: &Recipe, page: u64) -> Self {
        let mut entry_starts = Vec::with_capacity(recipe.entries.len() + 1);
        let mut unit_starts = vec![0];
        let mut offset = 0u64;
        for entry in &recipe.entries {
            entry_starts.push(offset);
            offset += u64::from(entry.byte_len());
            let end = offset.div_ceil(page) * page;
            if end > *unit_starts.last().expect("not empty") {
                unit_starts.push(end);
            }
        }
        entry_starts.push(offset);
        Self { entries: recipe.entries.clone(), entry_starts, unit_starts, page }
    }

    /// The page size units are cut in.
    pub(crate) fn page(&self) -> u64 {
        self.page
    }

    /// How many units there are.
    pub(crate) fn units(&self) -> usize {
        self.unit_starts.len() - 1
    }

    /// The file range of unit `u` (page-aligned; the last may reach past the file's end).
    pub(crate) fn unit_range(&self, u: usize) -> Range<u64> {
        self.unit_starts[u]..self.unit_starts[u + 1]
    }

    /// The unit holding byte `offset` of the file, if any.
    pub(crate) fn unit_at(&self, offset: u64) -> Option<usize> {
        if offset >= *self.unit_starts.last().expect("not empty") {
            return None;
        }
        Some(self.unit_starts.partition_point(|&s| s <= offset) - 1)
    }

    /// The recipe entries overlapping unit `u`, each with its start offset in the file.
    pub(crate) fn entries_of(&self, u: usize) -> impl Iterator<Item = (u64, RecipeEntry)> + '_ {
        self.entry_indexes_of(u).map(|i| (self.entry_starts[i], self.entries[i]))
    }

    /// The indexes of the data entries overlapping unit `u` (what a working set records).
    /// Allocates nothing: the page server calls it on a unit's first fault.
    pub(crate) fn data_entries_of(&self, u: usize) -> impl Iterator<Item = usize> + '_ {
        self.entry_indexes_of(u).filter(move |&i| matches!(self.entries[i], RecipeEntry::Data { .. }))
    }

    fn entry_indexes_of(&self, u: usize) -> impl Iterator<Item = usize> + '_ {
        let range = self.unit_range(u);
        let first = self.entry_starts.partition_point(|&s| s <= range.start).saturating_sub(1);
        (first..self.entries.len())
            .take_while(move |&i| self.entry_starts[i] < range.end)
            .filter(move |&i| self.entry_starts[i + 1] > range.start)
    }

    /// Whether unit `u` is all zeros (no data entry overlaps it). Allocates nothing.
    pub(crate) fn is_zero(&self, u: usize) -> bool {
        self.data_entries_of(u).next().is_none()
    }

    /// The distinct chunks unit `u` needs (none: it is all zeros).
    pub(crate) fn chunks_of(&self, u: usize) -> Vec<(ChunkId, u32)> {
        let mut out: Vec<(ChunkId, u32)> = Vec::new();
        for (_, entry) in self.entries_of(u) {
            if let RecipeEntry::Data { len, id } = entry {
                if !out.iter().any(|(have, _)| *have == id) {
                    out.push((id, len));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use thaw_schema::recipe::RecipeBuilder;
    use thaw_schema::{ChunkerParams, Sha256Digest};

    use super::*;

    fn recipe(entries: &[(u32, bool)]) -> Recipe {
        let mut b = RecipeBuilder::new(ChunkerParams::fixed(65536));
        for (i, (len, data)) in entries.iter().enumerate() {
            if *data {
                b.push_data(*len, ChunkId::of(&i.to_le_bytes()));
            } else {
                b.push_zero(*len);
            }
        }
        b.finish(Sha256Digest::of(b""))
    }

    #[test]
    fn page_aligned_chunks_are_one_unit_each() {
        let r = recipe(&[(65536, true), (65536, false), (65536, true)]);
        let l = Layout::new(&r, 4096);
        assert_eq!(l.units(), 3);
        assert_eq!(l.unit_range(1), 65536..131072);
        assert_eq!(l.unit_at(65536 + 4095), Some(1));
        assert_eq!(l.unit_at(3 * 65536), None);
        assert!(l.chunks_of(1).is_empty(), "a zero run needs no chunk");
        assert_eq!(l.chunks_of(2).len(), 1);
        assert_eq!(l.data_entries_of(0).collect::<Vec<_>>(), vec![0]);
        assert_eq!(l.data_entries_of(1).count(), 0, "a zero run is no working-set entry");
    }

    #[test]
    fn chunks_ending_mid_page_take_the_next_chunks_head() {
        // 5000 + 7000 + 4288 = 16288: boundaries at 5000 and 12000 fall inside pages.
        let r = recipe(&[(5000, true), (7000, true), (4288, true)]);
        let l = Layout::new(&r, 4096);
        // Units end at the page boundary after each entry: 8192, 12288, 16384.
        assert_eq!(l.units(), 3);
        assert_eq!(l.unit_range(0), 0..8192);
        assert_eq!(l.chunks_of(0).len(), 2, "the first unit's last page holds chunk 1's head");
        assert_eq!(l.data_entries_of(0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(l.unit_range(2), 12288..16384);
        assert_eq!(l.chunks_of(2).len(), 1);
        // Every page is in exactly one unit.
        for page in 0..4u64 {
            assert!(l.unit_at(page * 4096).is_some());
        }
    }

    #[test]
    fn huge_pages_span_many_chunks() {
        let entries: Vec<(u32, bool)> = (0..64).map(|i| (65536, i % 3 != 0)).collect();
        let l = Layout::new(&recipe(&entries), 2 * 1024 * 1024);
        assert_eq!(l.units(), 2);
        assert_eq!(l.chunks_of(0).len(), 32 - 11, "32 chunks, 11 of them zero runs");
    }
}
