//! Chunk batches (`application/vnd.thaw.chunks.v1`): many encoded chunks in one body
//! (docs/FORMAT.md, "Chunk batch").

use crate::frame::{EncodedChunk, FrameError};
use crate::ChunkId;

/// Magic and version that open every batch.
pub const BATCH_MAGIC: &[u8; 8] = b"THAWCHK\x01";

/// Bytes of an entry before its payload: id, codec, uncompressed and payload lengths.
pub const ENTRY_HEADER_LEN: usize = 32 + 1 + 4 + 4;

/// Largest sum of the uncompressed lengths of the chunks of one uploaded batch: a frame of
/// a few hundred bytes may declare 4 MiB, so a batch is bounded in decoded bytes too, not
/// only in body bytes. Writers close a batch well before (thaw's client at 64 MiB).
pub const MAX_BATCH_RAW_LEN: u64 = 256 * 1024 * 1024;

/// Appends one batch entry to `out` (for writers that stream a batch instead of building
/// it with [`BatchWriter`]).
pub fn encode_entry(out: &mut Vec<u8>, id: &ChunkId, chunk: &EncodedChunk) {
    out.extend_from_slice(id.as_bytes());
    out.push(chunk.codec as u8);
    out.extend_from_slice(&chunk.raw_len.to_le_bytes());
    out.extend_from_slice(&(chunk.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&chunk.payload);
}

/// Appends chunks to a batch body.
#[derive(Debug, Clone)]
pub struct BatchWriter {
    buf: Vec<u8>,
    count: usize,
    raw_len: u64,
}

impl Default for BatchWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchWriter {
    /// An empty batch (magic only).
    pub fn new() -> Self {
        Self { buf: BATCH_MAGIC.to_vec(), count: 0, raw_len: 0 }
    }
    /// An empty batch with room for `bytes` of body, so that filling it does not move it.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(BATCH_MAGIC.len()));
        buf.extend_from_slice(BATCH_MAGIC);
        Self { buf, count: 0, raw_len: 0 }
    }
    /// Adds one chunk.
    pub fn push(&mut self, id: &ChunkId, chunk: &EncodedChunk) {
        encode_entry(&mut self.buf, id, chunk);
        self.count += 1;
        self.raw_len += u64::from(chunk.raw_len);
    }
    /// Adds the chunk `data` with id `id`, compressed at `level` straight into the batch (what
    /// [`BatchWriter::push`] of [`EncodedChunk::compress`] adds, without the chunk's own
    /// buffer); returns the payload's length.
    pub fn push_compressing(&mut self, id: &ChunkId, data: &[u8], level: i32) -> usize {
        let entry = self.buf.len();
        self.buf.extend_from_slice(id.as_bytes());
        self.buf.push(0); // codec, set below
        self.buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]); // payload length, set below
        let payload = self.buf.len();
        let codec = crate::frame::compress_into(data, level, &mut self.buf);
        let payload_len = self.buf.len() - payload;
        self.buf[entry + 32] = codec as u8;
        self.buf[payload - 4..payload].copy_from_slice(&(payload_len as u32).to_le_bytes());
        self.count += 1;
        self.raw_len += data.len() as u64;
        payload_len
    }
    /// Sum of the uncompressed lengths of the chunks added (see [`MAX_BATCH_RAW_LEN`]).
    pub fn raw_len(&self) -> u64 {
        self.raw_len
    }
    /// Body size so far, in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Number of chunks added.
    pub fn count(&self) -> usize {
        self.count
    }
    /// True when no chunk was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The finished body.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Parses a whole batch body into `(id, chunk)` pairs. The content of each chunk is not
/// verified here; callers call [`EncodedChunk::decode`] with the id.
pub fn parse_batch(body: &[u8]) -> Result<Vec<(ChunkId, EncodedChunk)>, FrameError> {
    let rest =
        body.strip_prefix(BATCH_MAGIC.as_slice()).ok_or(FrameError::Malformed("missing batch magic"))?;
    let mut rest = rest;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < ENTRY_HEADER_LEN {
            return Err(FrameError::Malformed("batch ends inside an entry header"));
        }
        let id = ChunkId::from_bytes(rest[..32].try_into().expect("32 bytes"));
        let codec = rest[32];
        let raw_len = u32::from_le_bytes(rest[33..37].try_into().expect("4 bytes"));
        let payload_len = u32::from_le_bytes(rest[37..41].try_into().expect("4 bytes")) as usize;
        rest = &rest[ENTRY_HEADER_LEN..];
        if payload_len > rest.len() {
            return Err(FrameError::Malformed("batch ends inside a chunk payload"));
        }
        let chunk = EncodedChunk::from_parts(codec, raw_len, rest[..payload_len].to_vec())?;
        rest = &rest[payload_len..];
        out.push((id, chunk));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressing_into_the_batch_writes_the_same_bytes() {
        let text = b"thaw thaw thaw thaw thaw thaw thaw thaw".repeat(100);
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let (mut one, mut other) = (BatchWriter::new(), BatchWriter::with_capacity(1 << 16));
        for d in [&text[..], &noise[..], b"x"] {
            let id = ChunkId::of(d);
            let chunk = EncodedChunk::compress(d, 1);
            one.push(&id, &chunk);
            assert_eq!(other.push_compressing(&id, d, 1), chunk.payload.len());
        }
        assert_eq!((other.count(), other.raw_len(), other.len()), (one.count(), one.raw_len(), one.len()));
        assert_eq!(other.finish(), one.finish());
    }

    #[test]
    fn batch_round_trip_and_truncation() {
        let a = b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec();
        let b = b"bbbb".to_vec();
        let mut w = BatchWriter::new();
        for d in [&a, &b] {
            w.push(&ChunkId::of(d), &EncodedChunk::compress(d, 1));
        }
        assert_eq!(w.count(), 2);
        let body = w.finish();
        let parsed = parse_batch(&body).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].1.decode(&parsed[0].0).unwrap(), a);
        assert_eq!(parsed[1].1.decode(&parsed[1].0).unwrap(), b);
        // Cutting exactly after the magic or after a whole entry leaves a valid, shorter batch.
        let first_entry_end = 8 + ENTRY_HEADER_LEN + parsed[0].1.payload.len();
        for cut in 1..body.len() {
            if cut == 8 || cut == first_entry_end {
                continue;
            }
            assert!(parse_batch(&body[..cut]).is_err(), "truncation at {cut} accepted");
        }
        assert!(parse_batch(b"garbage!").is_err());
        assert!(parse_batch(BATCH_MAGIC).unwrap().is_empty());
    }
}
