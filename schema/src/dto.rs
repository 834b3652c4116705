//! Bodies of the `_thaw` extension (docs/API.md): JSON DTOs, and the binary form of the
//! missing-chunks query (docs/FORMAT.md, "Missing-chunks query").

use serde::{Deserialize, Serialize};

use crate::{ChunkId, Sha256Digest};

/// Most chunk ids one missing-chunks or fetch query may name.
pub const MAX_IDS_PER_QUERY: usize = 100_000;

/// Largest body of `PUT /v2/_thaw/nodes/<node>` (a `holdings::NodeHoldings` record):
/// 1,024 snapshots of ~300 bytes each fit with room to spare.
pub const MAX_NODE_RECORD_LEN: usize = 1024 * 1024;

/// Body of `POST /v2/<name>/_thaw/chunks/missing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingChunksRequest {
    /// The ids to look up.
    pub chunks: Vec<ChunkId>,
}

/// Answer of `POST /v2/<name>/_thaw/chunks/missing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingChunksResponse {
    /// The ids the registry does not store, in request order.
    pub missing: Vec<ChunkId>,
}

/// Magic and version that open a binary missing-chunks query (`media::CHUNK_IDS`).
pub const CHUNK_IDS_MAGIC: &[u8; 8] = b"THAWIDS\x01";

/// Magic and version that open a binary missing-chunks answer (`media::MISSING_CHUNKS`).
pub const MISSING_MAGIC: &[u8; 8] = b"THAWMIS\x01";

/// Answer form byte: one bit per id asked.
const FORM_BITMAP: u8 = 0;
/// Answer form byte: the positions of the missing ids.
const FORM_POSITIONS: u8 = 1;

/// Why a binary query or answer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BinaryQueryError {
    /// The body does not start with the expected magic and version.
    #[error("the body does not start with {expected:?}")]
    BadMagic {
        /// The magic expected.
        expected: &'static str,
    },
    /// The ids after the magic are not whole 32-byte records.
    #[error("{0} bytes of chunk ids is not a multiple of 32")]
    RaggedIds(usize),
    /// More ids than one query may name.
    #[error("{0} chunk ids in one query; at most {MAX_IDS_PER_QUERY} are allowed")]
    TooManyIds(usize),
    /// The answer does not fit the query it answers, or breaks its own rules.
    #[error("malformed missing-chunks answer: {0}")]
    BadAnswer(&'static str),
}

/// Encodes a binary missing-chunks query: the magic, then each id's 32 raw bytes.
pub fn encode_chunk_id_query(ids: &[ChunkId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_IDS_MAGIC.len() + 32 * ids.len());
    out.extend_from_slice(CHUNK_IDS_MAGIC);
    for id in ids {
        out.extend_from_slice(id.as_bytes());
    }
    out
}

/// Decodes a binary missing-chunks query (at most [`MAX_IDS_PER_QUERY`] ids).
pub fn decode_chunk_id_query(body: &[u8]) -> Result<Vec<ChunkId>, BinaryQueryError> {
    let ids = body
        .strip_prefix(CHUNK_IDS_MAGIC.as_slice())
        .ok_or(BinaryQueryError::BadMagic { expected: "THAWIDS\\x01" })?;
    if !ids.len().is_multiple_of(32) {
        return Err(BinaryQueryError::RaggedIds(ids.len()));
    }
    if ids.len() / 32 > MAX_IDS_PER_QUERY {
        return Err(BinaryQueryError::TooManyIds(ids.len() / 32));
    }
    Ok(ids.chunks_exact(32).map(|b| ChunkId::from_bytes(b.try_into().expect("32 bytes"))).collect())
}

/// Encodes the answer to a binary query of `missing.len()` ids (`missing[i]`: the i-th id
/// asked is not stored), in whichever form is shorter: a bitmap (n/8 bytes) or the
/// positions of the missing ids (4 bytes each); the bitmap on a tie.
pub fn encode_missing_answer(missing: &[bool]) -> Vec<u8> {
    let n = missing.len();
    let positions: Vec<u32> =
        missing.iter().enumerate().filter(|(_, m)| **m).map(|(i, _)| i as u32).collect();
    let bitmap_len = n.div_ceil(8);
    let mut out = Vec::with_capacity(13 + bitmap_len.min(4 + 4 * positions.len()));
    out.extend_from_slice(MISSING_MAGIC);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    if bitmap_len <= 4 + 4 * positions.len() {
        out.push(FORM_BITMAP);
        let mut bits = vec![0u8; bitmap_len];
        for p in positions {
            bits[p as usize / 8] |= 1 << (p % 8);
        }
        out.extend_from_slice(&bits);
    } else {
        out.push(FORM_POSITIONS);
        out.extend_from_slice(&(positions.len() as u32).to_le_bytes());
        for p in positions {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    out
}

/// Decodes an answer to a binary query of `asked` ids into one flag per id (true:
/// missing). Anything that does not answer exactly `asked` ids, in either form, is refused.
pub fn decode_missing_answer(body: &[u8], asked: usize) -> Result<Vec<bool>, BinaryQueryError> {
    use BinaryQueryError::BadAnswer;
    let rest = body
        .strip_prefix(MISSING_MAGIC.as_slice())
        .ok_or(BinaryQueryError::BadMagic { expected: "THAWMIS\\x01" })?;
    let (count, rest) = take_u32(rest).ok_or(BadAnswer("it ends inside its header"))?;
    if count as usize != asked {
        return Err(BadAnswer("it answers a different number of ids than were asked"));
    }
    let (&form, rest) = rest.split_first().ok_or(BadAnswer("it ends inside its header"))?;
    let mut missing = vec![false; asked];
    match form {
        FORM_BITMAP => {
            if rest.len() != asked.div_ceil(8) {
                return Err(BadAnswer("the bitmap has the wrong length"));
            }
            for (i, m) in missing.iter_mut().enumerate() {
                *m = rest[i / 8] >> (i % 8) & 1 == 1;
            }
            if !asked.is_multiple_of(8) && rest[asked / 8] >> (asked % 8) != 0 {
                return Err(BadAnswer("bits past the last id are set"));
            }
        }
        FORM_POSITIONS => {
            let (m, rest) = take_u32(rest).ok_or(BadAnswer("it ends inside its header"))?;
            if m as usize > asked || rest.len() != 4 * m as usize {
                return Err(BadAnswer("the position list has the wrong length"));
            }
            let mut next = 0usize;
            for p in rest.chunks_exact(4) {
                let p = u32::from_le_bytes(p.try_into().expect("4 bytes")) as usize;
                if p < next || p >= asked {
                    return Err(BadAnswer("positions are not ascending and within the query"));
                }
                missing[p] = true;
                next = p + 1;
            }
        }
        _ => return Err(BadAnswer("unknown form byte")),
    }
    Ok(missing)
}

fn take_u32(b: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = b.split_first_chunk::<4>()?;
    Some((u32::from_le_bytes(*head), rest))
}

/// Answer of `POST /v2/<name>/_thaw/chunks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkUploadResponse {
    /// Chunks newly written.
    pub stored: usize,
    /// Chunks that were already stored.
    pub present: usize,
}

/// Body of `POST /v2/<name>/_thaw/chunks/fetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchChunksRequest {
    /// A blob readable in the repository; every requested chunk must belong to it.
    pub blob: Sha256Digest,
    /// The chunks wanted, answered in this order.
    pub chunks: Vec<ChunkId>,
}

/// Answer of `GET /v2/_oci/ext/discover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoverResponse {
    /// Extensions the registry serves.
    pub extensions: Vec<ExtensionInfo>,
}

/// One extension in the discover answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionInfo {
    /// Extension name, `_thaw` for thaw's.
    pub name: String,
    /// Where it is documented.
    pub url: String,
    /// What it does.
    pub description: String,
    /// Endpoint paths relative to `/v2/<name>/`.
    pub endpoints: Vec<String>,
}

/// Name of thaw's extension.
pub const THAW_EXTENSION: &str = "_thaw";

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<ChunkId> {
        (0..n).map(|i| ChunkId::of(&(i as u64).to_le_bytes())).collect()
    }

    #[test]
    fn queries_round_trip_and_ragged_bodies_are_refused() {
        let q = ids(3);
        let body = encode_chunk_id_query(&q);
        assert_eq!(body.len(), 8 + 96);
        assert_eq!(decode_chunk_id_query(&body).unwrap(), q);
        assert_eq!(decode_chunk_id_query(CHUNK_IDS_MAGIC).unwrap(), vec![]);
        assert_eq!(decode_chunk_id_query(&body[..body.len() - 1]), Err(BinaryQueryError::RaggedIds(95)));
        assert!(matches!(decode_chunk_id_query(&body[1..]), Err(BinaryQueryError::BadMagic { .. })));
        let mut too_many = CHUNK_IDS_MAGIC.to_vec();
        too_many.resize(8 + 32 * (MAX_IDS_PER_QUERY + 1), 7);
        assert_eq!(
            decode_chunk_id_query(&too_many),
            Err(BinaryQueryError::TooManyIds(MAX_IDS_PER_QUERY + 1))
        );
    }

    #[test]
    fn answers_take_the_shorter_form_and_round_trip() {
        for n in [0usize, 1, 7, 8, 9, 100, 1000] {
            for every in [1usize, 2, 31, 32, 33, 100, usize::MAX] {
                let missing: Vec<bool> = (0..n).map(|i| every != usize::MAX && i % every == 0).collect();
                let body = encode_missing_answer(&missing);
                let m = missing.iter().filter(|x| **x).count();
                assert_eq!(body.len(), 13 + n.div_ceil(8).min(4 + 4 * m), "n {n} every {every}");
                assert_eq!(decode_missing_answer(&body, n).unwrap(), missing, "n {n} every {every}");
                if n > 0 {
                    assert!(decode_missing_answer(&body, n - 1).is_err());
                }
                assert!(decode_missing_answer(&body[..body.len() - 1], n).is_err() || body.len() == 13);
            }
        }
        // Exact bytes: 9 ids, the 2nd and 9th missing: positions (13 + 4 + 8 = 25) lose to
        // the bitmap (13 + 2).
        let mut missing = vec![false; 9];
        missing[1] = true;
        missing[8] = true;
        assert_eq!(encode_missing_answer(&missing), b"THAWMIS\x01\x09\0\0\0\x00\x02\x01");
        // 1000 ids, one missing (position 700): 13 + 8 bytes instead of 13 + 125.
        let mut missing = vec![false; 1000];
        missing[700] = true;
        assert_eq!(encode_missing_answer(&missing), b"THAWMIS\x01\xe8\x03\0\0\x01\x01\0\0\0\xbc\x02\0\0");
    }

    #[test]
    fn lying_answers_are_refused() {
        let mut padded = encode_missing_answer(&[false; 9]);
        *padded.last_mut().unwrap() |= 0x80;
        assert!(decode_missing_answer(&padded, 9).is_err(), "bit past the end");
        let mut answer = MISSING_MAGIC.to_vec();
        answer.extend_from_slice(&[100, 0, 0, 0, 1, 2, 0, 0, 0, 5, 0, 0, 0, 5, 0, 0, 0]);
        assert!(decode_missing_answer(&answer, 100).is_err(), "repeated position");
        let mut answer = MISSING_MAGIC.to_vec();
        answer.extend_from_slice(&[10, 0, 0, 0, 1, 1, 0, 0, 0, 10, 0, 0, 0]);
        assert!(decode_missing_answer(&answer, 10).is_err(), "position past the query");
        let mut answer = MISSING_MAGIC.to_vec();
        answer.extend_from_slice(&[1, 0, 0, 0, 2, 0]);
        assert!(decode_missing_answer(&answer, 1).is_err(), "unknown form");
    }
}
