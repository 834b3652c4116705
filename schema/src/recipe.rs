//! Recipes (`application/vnd.thaw.recipe.v1`): how a blob is put together from chunks
//! (docs/FORMAT.md, "Recipe").

use crate::chunker::{ChunkerKind, ChunkerParams};
use crate::{ChunkId, Sha256Digest};

/// Magic and version that open every recipe.
pub const RECIPE_MAGIC: &[u8; 8] = b"THAWRCP\x01";
const HEADER_LEN: usize = 8 + 32 + 8 + 1 + 12 + 4;
const TRAILER_LEN: usize = 32;

/// One piece of a blob, in blob order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecipeEntry {
    /// A stored chunk.
    Data {
        /// Uncompressed length.
        len: u32,
        /// BLAKE3 of the uncompressed bytes.
        id: ChunkId,
    },
    /// A run of zero bytes, never stored.
    Zero {
        /// Length of the run.
        len: u32,
    },
}

impl RecipeEntry {
    /// Length in bytes of this piece.
    pub const fn byte_len(&self) -> u32 {
        match self {
            Self::Data { len, .. } | Self::Zero { len } => *len,
        }
    }
    /// The chunk id, for data entries.
    pub const fn chunk_id(&self) -> Option<&ChunkId> {
        match self {
            Self::Data { id, .. } => Some(id),
            Self::Zero { .. } => None,
        }
    }
}

/// A blob's recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// SHA-256 of the whole blob.
    pub digest: Sha256Digest,
    /// Blob size in bytes.
    pub size: u64,
    /// How the blob was cut.
    pub chunker: ChunkerParams,
    /// The pieces, in order.
    pub entries: Vec<RecipeEntry>,
}

/// Why a recipe was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecipeError {
    /// Bytes that are not a recipe of a version this reader knows.
    #[error("malformed recipe: {0}")]
    Malformed(&'static str),
    /// A structurally valid recipe that describes an impossible blob.
    #[error("inconsistent recipe: {0}")]
    Inconsistent(String),
}

impl Recipe {
    /// Checks the invariants every encoder and decoder relies on.
    pub fn validate(&self) -> Result<(), RecipeError> {
        self.chunker.validate().map_err(|e| RecipeError::Inconsistent(e.to_string()))?;
        let mut total = 0u64;
        for e in &self.entries {
            if e.byte_len() == 0 || e.byte_len() > self.chunker.max {
                return Err(RecipeError::Inconsistent(format!(
                    "entry length {} outside 1..={}",
                    e.byte_len(),
                    self.chunker.max
                )));
            }
            total += u64::from(e.byte_len());
        }
        if total != self.size {
            return Err(RecipeError::Inconsistent(format!(
                "entries add up to {total} bytes, header says {}",
                self.size
            )));
        }
        Ok(())
    }

    /// SHA-256 of [`Self::encode`]: what a layer's [`crate::media::ANNOTATION_RECIPE`] names.
    /// The encoding is canonical (one recipe, one byte string), so this identifies the recipe.
    pub fn encoded_digest(&self) -> Sha256Digest {
        Sha256Digest::of(&self.encode())
    }

    /// Encodes to the binary form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.entries.len() * 37 + TRAILER_LEN);
        out.extend_from_slice(RECIPE_MAGIC);
        out.extend_from_slice(self.digest.as_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.push(self.chunker.kind as u8);
        for v in [self.chunker.min, self.chunker.avg, self.chunker.max] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            match e {
                RecipeEntry::Data { len, id } => {
                    out.push(0);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(id.as_bytes());
                }
                RecipeEntry::Zero { len } => {
                    out.push(1);
                    out.extend_from_slice(&len.to_le_bytes());
                }
            }
        }
        let check = blake3::hash(&out);
        out.extend_from_slice(check.as_bytes());
        out
    }

    /// Decodes and validates the binary form.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecipeError> {
        let malformed = RecipeError::Malformed;
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(malformed("shorter than header and trailer"));
        }
        if &bytes[..8] != RECIPE_MAGIC {
            return Err(malformed("bad magic or unknown version"));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(malformed("checksum mismatch"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let digest = Sha256Digest::from_bytes(body[8..40].try_into().expect("32 bytes"));
        let size = u64::from_le_bytes(body[40..48].try_into().expect("8 bytes"));
        let kind = match body[48] {
            0 => ChunkerKind::Fixed,
            1 => ChunkerKind::FastCdc,
            _ => return Err(malformed("unknown chunker kind")),
        };
        let chunker = ChunkerParams { kind, min: u32_at(49), avg: u32_at(53), max: u32_at(57) };
        let count = u32_at(61) as usize;
        // Every entry takes at least 5 bytes: refuse counts the body cannot hold before allocating.
        if count > (body.len() - HEADER_LEN) / 5 {
            return Err(malformed("entry count larger than the body"));
        }
        let mut entries = Vec::with_capacity(count);
        let mut at = HEADER_LEN;
        for _ in 0..count {
            if at + 5 > body.len() {
                return Err(malformed("ends inside an entry"));
            }
            let len = u32_at(at + 1);
            entries.push(match body[at] {
                0 => {
                    if at + 37 > body.len() {
                        return Err(malformed("ends inside a chunk id"));
                    }
                    let id = ChunkId::from_bytes(body[at + 5..at + 37].try_into().expect("32 bytes"));
                    at += 37;
                    RecipeEntry::Data { len, id }
                }
                1 => {
                    at += 5;
                    RecipeEntry::Zero { len }
                }
                _ => return Err(malformed("unknown entry kind")),
            });
        }
        if at != body.len() {
            return Err(malformed("bytes after the last entry"));
        }
        let recipe = Self { digest, size, chunker, entries };
        recipe.validate()?;
        Ok(recipe)
    }

    /// Distinct chunk ids of the data entries, in first-use order.
    pub fn distinct_chunks(&self) -> Vec<ChunkId> {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .iter()
            .filter_map(RecipeEntry::chunk_id)
            .filter(|id| seen.insert(**id))
            .copied()
            .collect()
    }

    /// Bytes of the blob held in zero entries.
    pub fn zero_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| matches!(e, RecipeEntry::Zero { .. }))
            .map(|e| u64::from(e.byte_len()))
            .sum()
    }

    /// The index of the entry containing byte `offset`, and that entry's start offset.
    /// `None` when `offset` is at or past the end.
    pub fn entry_at(&self, offset: u64) -> Option<(usize, u64)> {
        let mut start = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            let end = start + u64::from(e.byte_len());
            if offset < end {
                return Some((i, start));
            }
            start = end;
        }
        None
    }
}

/// Builds a recipe chunk by chunk while the blob streams through.
#[derive(Debug)]
pub struct RecipeBuilder {
    chunker: ChunkerParams,
    entries: Vec<RecipeEntry>,
    size: u64,
}

impl RecipeBuilder {
    /// Starts a recipe for a blob cut with `chunker`.
    pub fn new(chunker: ChunkerParams) -> Self {
        Self { chunker, entries: Vec::new(), size: 0 }
    }
    /// Appends a data chunk.
    pub fn push_data(&mut self, len: u32, id: ChunkId) {
        self.entries.push(RecipeEntry::Data { len, id });
        self.size += u64::from(len);
    }
    /// Appends a zero chunk.
    pub fn push_zero(&mut self, len: u32) {
        self.entries.push(RecipeEntry::Zero { len });
        self.size += u64::from(len);
    }
    /// Finishes with the blob's digest.
    pub fn finish(self, digest: Sha256Digest) -> Recipe {
        Recipe { digest, size: self.size, chunker: self.chunker, entries: self.entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Recipe {
        let mut b = RecipeBuilder::new(ChunkerParams::fixed(4096));
        b.push_data(4096, ChunkId::of(b"a"));
        b.push_zero(4096);
        b.push_data(100, ChunkId::of(b"b"));
        b.finish(Sha256Digest::of(b"blob"))
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let bytes = r.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 37 + 5 + 37 + TRAILER_LEN);
        assert_eq!(Recipe::decode(&bytes).unwrap(), r);
        assert_eq!(r.entry_at(0), Some((0, 0)));
        assert_eq!(r.entry_at(4096), Some((1, 4096)));
        assert_eq!(r.entry_at(8195), Some((2, 8192)));
        assert_eq!(r.entry_at(8292), None);
        assert_eq!(r.zero_bytes(), 4096);
    }

    #[test]
    fn every_single_byte_flip_and_truncation_is_rejected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Recipe::decode(&b).is_err(), "flip at {i} accepted");
            assert!(Recipe::decode(&bytes[..i]).is_err(), "truncation at {i} accepted");
        }
    }

    #[test]
    fn inconsistent_sizes_are_rejected_even_with_a_valid_checksum() {
        let mut r = sample();
        r.size += 1;
        assert!(matches!(Recipe::decode(&r.encode()), Err(RecipeError::Inconsistent(_))));
        let mut r = sample();
        r.entries.push(RecipeEntry::Zero { len: 8192 });
        r.size += 8192;
        assert!(Recipe::decode(&r.encode()).is_err(), "entry longer than chunker max accepted");
    }
}
