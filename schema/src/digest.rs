//! Typed digests, parsed once at the boundary and passed around as values.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

/// Why a digest string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// The algorithm prefix is not one thaw accepts.
    #[error("unsupported digest algorithm in {0:?} (only sha256 is accepted)")]
    UnsupportedAlgorithm(String),
    /// The encoded part is not 64 lowercase hex characters.
    #[error("malformed digest {0:?}: expected 64 lowercase hex characters")]
    Malformed(String),
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// An OCI content digest of the form `sha256:<64 hex>`: the SHA-256 of a whole blob or manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }
    /// The 64 hex characters after `sha256:`.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Sha256Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algorithm, encoded)) = s.split_once(':') else {
            return Err(DigestError::Malformed(s.to_owned()));
        };
        if algorithm != "sha256" {
            let well_formed = !algorithm.is_empty()
                && algorithm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
            return Err(if well_formed {
                DigestError::UnsupportedAlgorithm(s.to_owned())
            } else {
                DigestError::Malformed(s.to_owned())
            });
        }
        parse_hex32(encoded).map(Self).ok_or_else(|| DigestError::Malformed(s.to_owned()))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

serde_via_str!(Sha256Digest);

/// Incremental SHA-256 for streamed blobs.
#[derive(Clone, Default)]
pub struct Sha256Hasher(sha2::Sha256);

impl Sha256Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// The digest of everything fed so far.
    pub fn finish(self) -> Sha256Digest {
        Sha256Digest(self.0.finalize().into())
    }
}

/// A chunk id: the BLAKE3-256 of a chunk's uncompressed bytes, written as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    /// Wraps raw id bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    /// The raw id bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// The id of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
    /// Lowercase hex, as used in storage keys and JSON.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for ChunkId {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s).map(Self).ok_or_else(|| DigestError::Malformed(s.to_owned()))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunk:{}", hex::encode(&self.0[..8]))
    }
}

serde_via_str!(ChunkId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_round_trips_and_rejects_bad_forms() {
        let d = Sha256Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(s, "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(s.parse::<Sha256Digest>().unwrap(), d);
        assert!(matches!("sha512:ab".parse::<Sha256Digest>(), Err(DigestError::UnsupportedAlgorithm(_))));
        assert!(matches!("sha256:ABC".parse::<Sha256Digest>(), Err(DigestError::Malformed(_))));
        assert!("sha256".parse::<Sha256Digest>().is_err());
        assert!(s.to_uppercase().parse::<Sha256Digest>().is_err());
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Sha256Digest>(&json).unwrap(), d);
    }

    #[test]
    fn chunk_id_is_blake3_hex() {
        let id = ChunkId::of(b"abc");
        assert_eq!(id.to_string(), blake3::hash(b"abc").to_hex().as_str());
        assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
        assert!("zz".parse::<ChunkId>().is_err());
    }
}
