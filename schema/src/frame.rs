//! The chunk frame: how one chunk is stored and sent (docs/FORMAT.md, "Chunk frame").

use crate::{ChunkId, MAX_CHUNK_LEN};

/// How a frame's payload encodes the chunk. The byte values are part of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The payload is the chunk itself (it did not shrink under zstd).
    Raw = 0,
    /// The payload is one zstd frame.
    Zstd = 1,
}

impl Codec {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Raw),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// Length of the frame header: codec byte plus u32 uncompressed length.
pub const FRAME_HEADER_LEN: usize = 5;

/// Largest payload a frame may carry: zstd may grow incompressible input slightly, but such
/// input is stored raw, so anything beyond this bound is malformed.
pub const MAX_PAYLOAD_LEN: u32 = MAX_CHUNK_LEN + 64 * 1024;

/// Why a frame could not be decoded into the chunk it claims to be.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame's structure is wrong.
    #[error("malformed chunk frame: {0}")]
    Malformed(&'static str),
    /// The zstd payload did not decode.
    #[error("chunk payload does not decompress: {0}")]
    Decompress(std::io::Error),
    /// The decoded bytes have another length than the frame says.
    #[error("chunk decompressed to {actual} bytes, frame says {declared}")]
    LengthMismatch {
        /// Length the frame declared.
        declared: u32,
        /// Length actually decoded.
        actual: usize,
    },
    /// The decoded bytes do not hash to the expected chunk id.
    #[error("chunk content does not match its id {expected} (hashes to {actual})")]
    IdMismatch {
        /// The id the chunk was stored or requested under.
        expected: ChunkId,
        /// The BLAKE3 of the decoded bytes.
        actual: ChunkId,
    },
}

thread_local! {
    /// One zstd compression context per thread, kept with the level it was made for.
    /// Making a context per chunk cost 8% of a push's CPU on real guest memory (D20).
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    /// One zstd decompression context per thread: making one per chunk was 1.2 % of all CPU in
    /// the 8-node swarm benchmark (D20).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd of `data` at `level` in this thread's reused context; `None` if zstd failed.
fn compress_reusing_context(data: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(made_for, _)| *made_for != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, compressor) = slot.as_mut().expect("set above");
        compressor.compress(data).ok()
    })
}

/// Appends zstd of `data` at `level` to `out`, in this thread's reused context, straight into
/// `out`'s spare room (no buffer of its own); returns the bytes appended, `None` (and `out` as
/// it was) if zstd failed.
fn compress_appending(data: &[u8], level: i32, out: &mut Vec<u8>) -> Option<usize> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(made_for, _)| *made_for != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, compressor) = slot.as_mut().expect("set above");
        let start = out.len();
        out.reserve(zstd::zstd_safe::compress_bound(data.len()));
        // A cursor at the end of the initialized bytes: zstd writes into the spare capacity.
        let mut cursor = std::io::Cursor::new(std::mem::take(out));
        cursor.set_position(start as u64);
        let written = compressor.compress_to_buffer(data, &mut cursor);
        *out = cursor.into_inner();
        match written {
            Ok(n) => Some(n),
            Err(_) => {
                out.truncate(start);
                None
            }
        }
    })
}

/// Appends the payload of `data`'s frame to `out`, as [`EncodedChunk::compress`] would make
/// it (zstd at `level`, or the bytes as they are when zstd does not shrink them), without an
/// allocation per chunk; returns its codec.
pub fn compress_into(data: &[u8], level: i32, out: &mut Vec<u8>) -> Codec {
    assert!(!data.is_empty() && data.len() <= MAX_CHUNK_LEN as usize, "chunk length out of range");
    let start = out.len();
    match compress_appending(data, level, out) {
        Some(n) if n < data.len() => Codec::Zstd,
        _ => {
            out.truncate(start);
            out.extend_from_slice(data);
            Codec::Raw
        }
    }
}

/// zstd decompression of `payload` into at most `capacity` bytes, in this thread's reused
/// context.
fn decompress_reusing_context(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut().expect("set above").decompress(payload, capacity)
    })
}

/// A compressed (or raw) chunk ready to store or send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChunk {
    /// How `payload` encodes the chunk.
    pub codec: Codec,
    /// Uncompressed length.
    pub raw_len: u32,
    /// The encoded bytes.
    pub payload: Vec<u8>,
}

impl EncodedChunk {
    /// Compresses `data` with zstd at `level`, keeping it raw when that does not shrink it.
    pub fn compress(data: &[u8], level: i32) -> Self {
        assert!(!data.is_empty() && data.len() <= MAX_CHUNK_LEN as usize, "chunk length out of range");
        let raw_len = data.len() as u32;
        match compress_reusing_context(data, level) {
            Some(z) if z.len() < data.len() => Self { codec: Codec::Zstd, raw_len, payload: z },
            _ => Self { codec: Codec::Raw, raw_len, payload: data.to_vec() },
        }
    }

    /// The stored form: header followed by payload.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + self.payload.len());
        out.push(self.codec as u8);
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Parses a stored frame (without verifying content; see [`EncodedChunk::decode`]).
    pub fn from_frame(frame: &[u8]) -> Result<Self, FrameError> {
        if frame.len() < FRAME_HEADER_LEN {
            return Err(FrameError::Malformed("shorter than its header"));
        }
        let codec = Codec::from_byte(frame[0]).ok_or(FrameError::Malformed("unknown codec"))?;
        let raw_len = u32::from_le_bytes(frame[1..5].try_into().expect("4 bytes"));
        Self::from_parts(codec as u8, raw_len, frame[FRAME_HEADER_LEN..].to_vec())
    }

    /// Builds a chunk from its header fields, checking their ranges.
    pub fn from_parts(codec: u8, raw_len: u32, payload: Vec<u8>) -> Result<Self, FrameError> {
        let codec = Codec::from_byte(codec).ok_or(FrameError::Malformed("unknown codec"))?;
        if raw_len == 0 || raw_len > MAX_CHUNK_LEN {
            return Err(FrameError::Malformed("uncompressed length out of range"));
        }
        if payload.is_empty() || payload.len() > MAX_PAYLOAD_LEN as usize {
            return Err(FrameError::Malformed("payload length out of range"));
        }
        if codec == Codec::Raw && payload.len() != raw_len as usize {
            return Err(FrameError::Malformed("raw payload length differs from chunk length"));
        }
        // Encoders keep zstd only when it shrinks the chunk, so readers may budget frames by
        // their uncompressed length.
        if codec == Codec::Zstd && payload.len() >= raw_len as usize {
            return Err(FrameError::Malformed("zstd payload not smaller than the chunk"));
        }
        Ok(Self { codec, raw_len, payload })
    }

    /// Decodes the chunk and checks that it is the chunk `expected`. Every reader of bytes
    /// from storage, a peer or the network goes through here.
    pub fn decode(&self, expected: &ChunkId) -> Result<Vec<u8>, FrameError> {
        let data = match self.codec {
            Codec::Raw => self.payload.clone(),
            Codec::Zstd => {
                // Cap the output at the declared length: a lying frame cannot make us allocate more.
                decompress_reusing_context(&self.payload, self.raw_len as usize)
                    .map_err(FrameError::Decompress)?
            }
        };
        if data.len() != self.raw_len as usize {
            return Err(FrameError::LengthMismatch { declared: self.raw_len, actual: data.len() });
        }
        let actual = ChunkId::of(&data);
        if &actual != expected {
            return Err(FrameError::IdMismatch { expected: *expected, actual });
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_and_incompressible_round_trip() {
        let text = b"thaw thaw thaw thaw thaw thaw thaw thaw".repeat(100);
        let z = EncodedChunk::compress(&text, 1);
        assert_eq!(z.codec, Codec::Zstd);
        let back = EncodedChunk::from_frame(&z.to_frame()).unwrap();
        assert_eq!(back.decode(&ChunkId::of(&text)).unwrap(), text);

        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let r = EncodedChunk::compress(&noise, 1);
        let back = EncodedChunk::from_frame(&r.to_frame()).unwrap();
        assert_eq!(back.decode(&ChunkId::of(&noise)).unwrap(), noise);
    }

    #[test]
    fn compress_into_appends_what_compress_makes() {
        let text = b"thaw thaw thaw thaw thaw thaw thaw thaw".repeat(100);
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut out = b"before".to_vec();
        for data in [&text[..], &noise[..], &text[..]] {
            let start = out.len();
            let codec = compress_into(data, 1, &mut out);
            let whole = EncodedChunk::compress(data, 1);
            assert_eq!((codec, &out[start..]), (whole.codec, &whole.payload[..]));
        }
        assert!(out.starts_with(b"before"));
    }

    #[test]
    fn lies_are_caught() {
        let data = b"hello world hello world hello world".repeat(10);
        let frame = EncodedChunk::compress(&data, 1).to_frame();
        let other = ChunkId::of(b"other");
        assert!(matches!(
            EncodedChunk::from_frame(&frame).unwrap().decode(&other),
            Err(FrameError::IdMismatch { .. })
        ));
        let mut lying_len = frame.clone();
        lying_len[1] = lying_len[1].wrapping_add(1);
        assert!(EncodedChunk::from_frame(&lying_len).unwrap().decode(&ChunkId::of(&data)).is_err());
        assert!(EncodedChunk::from_frame(&frame[..3]).is_err());
        let mut bad_codec = frame;
        bad_codec[0] = 9;
        assert!(EncodedChunk::from_frame(&bad_codec).is_err());
    }

    #[test]
    fn a_zstd_payload_never_exceeds_its_chunk() {
        // Readers budget frames by their uncompressed length; an encoder keeps zstd only
        // when it shrinks the chunk, so a frame saying otherwise is malformed.
        assert!(matches!(EncodedChunk::from_parts(1, 10, vec![0; 10]), Err(FrameError::Malformed(_))));
        assert!(EncodedChunk::from_parts(1, 11, vec![0; 10]).is_ok());
    }
}
