//! Cutting a byte stream into chunks. Chunking is a pure function of the bytes and of
//! [`ChunkerParams`], which every recipe records, so the client and the registry always
//! cut the same bytes the same way.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::MAX_CHUNK_LEN;

/// Which cutting algorithm a recipe used. The byte values are part of the recipe format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChunkerKind {
    /// Fixed-size chunks; the last one may be shorter.
    Fixed = 0,
    /// Content-defined chunking, FastCDC 2020 (`fastcdc` crate, normalization level 1).
    FastCdc = 1,
}

/// Chunker parameters, as written into every recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// The algorithm.
    pub kind: ChunkerKind,
    /// Smallest chunk (except the last). Equal to `avg` and `max` for [`ChunkerKind::Fixed`].
    pub min: u32,
    /// Target average chunk size.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

/// Why a set of chunker parameters is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunker parameters {0:?}: {1}")]
pub struct InvalidChunkerParams(pub ChunkerParams, pub &'static str);

impl ChunkerParams {
    /// Page-aligned fixed-size chunks of `size` bytes.
    pub const fn fixed(size: u32) -> Self {
        Self { kind: ChunkerKind::Fixed, min: size, avg: size, max: size }
    }

    /// FastCDC with the given bounds.
    pub const fn fastcdc(min: u32, avg: u32, max: u32) -> Self {
        Self { kind: ChunkerKind::FastCdc, min, avg, max }
    }

    /// The registry's chunker for blobs that arrive through plain OCI uploads, whose
    /// media type it does not know: FastCDC 16/64/256 KiB (see docs/DECISIONS.md).
    pub const REGISTRY_DEFAULT: Self = Self::fastcdc(16 * 1024, 64 * 1024, 256 * 1024);

    /// Checks the bounds every reader and writer relies on.
    pub fn validate(&self) -> Result<(), InvalidChunkerParams> {
        let bad = |why| Err(InvalidChunkerParams(*self, why));
        if self.max == 0 || self.max > MAX_CHUNK_LEN {
            return bad("max must be between 1 and 4 MiB");
        }
        match self.kind {
            ChunkerKind::Fixed => {
                if self.min != self.max || self.avg != self.max {
                    return bad("fixed chunking needs min = avg = max");
                }
                if !self.max.is_multiple_of(4096) {
                    return bad("fixed chunks must be a multiple of the 4 KiB page");
                }
            }
            ChunkerKind::FastCdc => {
                // The fastcdc crate's own limits (v2020: min 64 B..1 MiB, avg 256 B..4 MiB,
                // max 1 KiB..16 MiB) narrowed to ours; it panics outside them.
                let in_range = (64..=1024 * 1024).contains(&self.min)
                    && (256..=MAX_CHUNK_LEN).contains(&self.avg)
                    && self.max >= 1024
                    && self.min <= self.avg
                    && self.avg <= self.max;
                if !in_range {
                    return bad("fastcdc needs 64 B <= min <= avg <= max, min <= 1 MiB, max >= 1 KiB");
                }
            }
        }
        Ok(())
    }

    /// A streaming chunker over `reader`. Only the current chunk is held in memory (plus,
    /// for FastCDC, one `max`-sized look-ahead buffer).
    pub fn chunks<R: Read>(&self, reader: R) -> Result<Chunks<R>, InvalidChunkerParams> {
        self.validate()?;
        let inner = match self.kind {
            ChunkerKind::Fixed => ChunksInner::Fixed { reader, size: self.max as usize, done: false },
            ChunkerKind::FastCdc => ChunksInner::Cdc(Box::new(fastcdc::v2020::StreamCDC::new(
                reader, self.min, self.avg, self.max,
            ))),
        };
        Ok(Chunks { inner, offset: 0 })
    }
}

/// One cut chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Position of the chunk's first byte in the blob.
    pub offset: u64,
    /// The uncompressed bytes.
    pub data: Vec<u8>,
}

impl Chunk {
    /// True when every byte is zero: such a chunk is never stored, only marked in the recipe.
    pub fn is_zero(&self) -> bool {
        is_zero(&self.data)
    }
}

/// True when every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // A quick look at the head rejects most data chunks before the vectorizable full scan.
    let head = data.len().min(64);
    data[..head].iter().all(|&b| b == 0) && data[head..].iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// Iterator over the chunks of a reader; see [`ChunkerParams::chunks`].
pub struct Chunks<R: Read> {
    inner: ChunksInner<R>,
    offset: u64,
}

enum ChunksInner<R: Read> {
    Fixed { reader: R, size: usize, done: bool },
    Cdc(Box<fastcdc::v2020::StreamCDC<R>>),
}

impl<R: Read> Iterator for Chunks<R> {
    type Item = io::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        let data = match &mut self.inner {
            ChunksInner::Fixed { reader, size, done } => {
                if *done {
                    return None;
                }
                let mut buf = vec![0u8; *size];
                let mut filled = 0;
                while filled < buf.len() {
                    match reader.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            *done = true;
                            return Some(Err(e));
                        }
                    }
                }
                if filled < buf.len() {
                    *done = true;
                    if filled == 0 {
                        return None;
                    }
                    buf.truncate(filled);
                }
                buf
            }
            ChunksInner::Cdc(cdc) => match cdc.next()? {
                Ok(chunk) => chunk.data,
                Err(fastcdc::v2020::Error::IoError(e)) => return Some(Err(e)),
                Err(e) => return Some(Err(io::Error::other(e.to_string()))),
            },
        };
        let chunk = Chunk { offset: self.offset, data };
        self.offset += chunk.data.len() as u64;
        Some(Ok(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn cut(params: ChunkerParams, data: &[u8]) -> Vec<Chunk> {
        params.chunks(data).unwrap().collect::<io::Result<_>>().unwrap()
    }

    #[test]
    fn chunks_reassemble_and_respect_bounds() {
        let data = pseudo_random(3 * 1024 * 1024 + 123, 7);
        for params in [ChunkerParams::fixed(64 * 1024), ChunkerParams::REGISTRY_DEFAULT] {
            let chunks = cut(params, &data);
            let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
            assert_eq!(joined, data);
            for (i, c) in chunks.iter().enumerate() {
                assert!(c.data.len() <= params.max as usize);
                if i + 1 < chunks.len() {
                    assert!(c.data.len() >= params.min as usize);
                }
            }
            let mut expected_offset = 0;
            for c in &chunks {
                assert_eq!(c.offset, expected_offset);
                expected_offset += c.data.len() as u64;
            }
        }
    }

    #[test]
    fn cdc_boundaries_survive_an_insertion() {
        let data = pseudo_random(2 * 1024 * 1024, 11);
        let mut edited = data[..1_000_000].to_vec();
        edited.extend_from_slice(b"inserted bytes");
        edited.extend_from_slice(&data[1_000_000..]);
        let ids = |d: &[u8]| -> std::collections::HashSet<Vec<u8>> {
            cut(ChunkerParams::REGISTRY_DEFAULT, d).into_iter().map(|c| c.data).collect()
        };
        let before = ids(&data);
        let after = ids(&edited);
        let shared = before.intersection(&after).count();
        assert!(shared + 3 >= before.len(), "only {shared} of {} chunks survived", before.len());
    }

    #[test]
    fn zero_detection_and_empty_input() {
        assert!(is_zero(&[0; 5000]));
        let mut v = vec![0; 5000];
        v[4999] = 1;
        assert!(!is_zero(&v));
        assert!(cut(ChunkerParams::fixed(4096), &[]).is_empty());
        assert!(cut(ChunkerParams::REGISTRY_DEFAULT, &[]).is_empty());
    }

    #[test]
    fn bad_params_are_rejected_not_panicked() {
        assert!(ChunkerParams::fixed(1000).validate().is_err());
        assert!(ChunkerParams::fastcdc(10, 20, 30).validate().is_err());
        assert!(ChunkerParams::fastcdc(64, 256, 8 * 1024 * 1024).validate().is_err());
    }
}
