//! Working sets (`application/vnd.thaw.working-set.v1`): the order in which a lazily
//! restored VM first touched the chunks of its memory file, attached to the snapshot's
//! manifest through the referrers API so that later restores fetch those chunks first
//! (docs/FORMAT.md, "Working set").
//!
//! A working set names recipe entries by index, never bytes: a reader checks it against the
//! recipe it already trusts ([`WorkingSet::order_in`]) and uses it only to order fetches.

use oci_spec::image::{DescriptorBuilder, ImageManifestBuilder, MediaType};

use crate::manifest::{ManifestError, Reference};
use crate::media;
use crate::{Recipe, RecipeEntry, Sha256Digest};

/// Magic and version that open every working-set blob.
pub const WORKING_SET_MAGIC: &[u8; 8] = b"THAWWST\x01";
/// Bytes before the entry indexes.
pub const HEADER_LEN: usize = 8 + 32 + 4 + 4;
/// The OCI empty config blob (`application/vnd.oci.empty.v1+json`) the manifest names.
pub const EMPTY_CONFIG: &[u8] = b"{}";

/// A decoded working set: recipe entry indexes of one memory file, first touch first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// SHA-256 of the memory file whose recipe the indexes refer to.
    pub memory: Sha256Digest,
    /// The number of entries of that recipe.
    pub entry_count: u32,
    /// Recipe entry indexes (of data entries), in the order they were first touched.
    pub order: Vec<u32>,
}

/// Why a working set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkingSetError {
    /// Bytes that are not a working set of a version this reader knows.
    #[error("malformed working set: {0}")]
    Malformed(&'static str),
    /// A well-formed working set that does not fit the memory file's recipe.
    #[error("working set does not fit the recipe: {0}")]
    Mismatch(String),
}

impl WorkingSet {
    /// The longest blob a working set of a recipe with `entry_count` entries can be: a reader
    /// refuses a larger one before downloading it.
    pub const fn max_len(entry_count: usize) -> u64 {
        HEADER_LEN as u64 + 4 * entry_count as u64
    }

    /// Encodes to the binary form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 4 * self.order.len());
        out.extend_from_slice(WORKING_SET_MAGIC);
        out.extend_from_slice(self.memory.as_bytes());
        out.extend_from_slice(&self.entry_count.to_le_bytes());
        out.extend_from_slice(&(self.order.len() as u32).to_le_bytes());
        for i in &self.order {
            out.extend_from_slice(&i.to_le_bytes());
        }
        out
    }

    /// Decodes the binary form: the layout only, and no more indexes than entries. Check it
    /// against the recipe with [`WorkingSet::order_in`] before use.
    pub fn decode(bytes: &[u8]) -> Result<Self, WorkingSetError> {
        let malformed = WorkingSetError::Malformed;
        if bytes.len() < HEADER_LEN {
            return Err(malformed("shorter than its header"));
        }
        if &bytes[..8] != WORKING_SET_MAGIC {
            return Err(malformed("bad magic or unknown version"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let memory = Sha256Digest::from_bytes(bytes[8..40].try_into().expect("32 bytes"));
        let entry_count = u32_at(40);
        let n = u32_at(44) as usize;
        if n > entry_count as usize {
            return Err(malformed("more indexes than the recipe has entries"));
        }
        if bytes.len() - HEADER_LEN != 4 * n {
            return Err(malformed("length does not match the index count"));
        }
        let order = (0..n).map(|k| u32_at(HEADER_LEN + 4 * k)).collect();
        Ok(Self { memory, entry_count, order })
    }

    /// The entry indexes to fetch first, checked against `recipe`: the set must name this
    /// memory file and recipe, and every index a data entry of it. Repeats are dropped.
    pub fn order_in(&self, recipe: &Recipe) -> Result<Vec<usize>, WorkingSetError> {
        let mismatch = |why: String| Err(WorkingSetError::Mismatch(why));
        if self.memory != recipe.digest {
            return mismatch(format!("it is of memory file {}, not {}", self.memory, recipe.digest));
        }
        if self.entry_count as usize != recipe.entries.len() {
            return mismatch(format!(
                "it counts {} recipe entries, the recipe has {}",
                self.entry_count,
                recipe.entries.len()
            ));
        }
        let mut seen = vec![false; recipe.entries.len()];
        let mut out = Vec::with_capacity(self.order.len());
        for &i in &self.order {
            let i = i as usize;
            match recipe.entries.get(i) {
                Some(RecipeEntry::Data { .. }) => {}
                Some(RecipeEntry::Zero { .. }) => return mismatch(format!("entry {i} is a zero run")),
                None => return mismatch(format!("entry {i} is past the recipe's end")),
            }
            if !std::mem::replace(&mut seen[i], true) {
                out.push(i);
            }
        }
        Ok(out)
    }
}

/// The manifest of a working set: `artifactType` thaw's working set, the OCI empty config,
/// one layer (the working-set blob, `blob` of `size` bytes), `subject` the snapshot manifest.
pub fn working_set_manifest(
    subject: &Reference,
    blob: Sha256Digest,
    size: u64,
) -> Result<Vec<u8>, ManifestError> {
    let invalid = |e: String| ManifestError::Invalid(e);
    let digest = |d: Sha256Digest| {
        d.to_string().parse::<oci_spec::image::Digest>().map_err(|e| invalid(e.to_string()))
    };
    let descriptor = |media_type: &str, d: Sha256Digest, size: u64| {
        DescriptorBuilder::default()
            .media_type(MediaType::Other(media_type.to_owned()))
            .digest(digest(d)?)
            .size(size)
            .build()
            .map_err(|e| invalid(e.to_string()))
    };
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .artifact_type(MediaType::Other(media::WORKING_SET_ARTIFACT.to_owned()))
        .config(descriptor(media::OCI_EMPTY, Sha256Digest::of(EMPTY_CONFIG), EMPTY_CONFIG.len() as u64)?)
        .layers(vec![descriptor(media::WORKING_SET_LAYER, blob, size)?])
        .subject(descriptor(&subject.media_type, subject.digest, subject.size)?)
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    serde_json::to_vec(&manifest).map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::summarize;
    use crate::recipe::RecipeBuilder;
    use crate::{ChunkId, ChunkerParams};

    fn recipe() -> Recipe {
        let mut b = RecipeBuilder::new(ChunkerParams::fixed(65536));
        b.push_data(65536, ChunkId::of(b"a"));
        b.push_zero(65536);
        b.push_data(65536, ChunkId::of(b"b"));
        b.push_data(65536, ChunkId::of(b"a"));
        b.finish(Sha256Digest::of(b"memory"))
    }

    fn set(order: Vec<u32>) -> WorkingSet {
        WorkingSet { memory: Sha256Digest::of(b"memory"), entry_count: 4, order }
    }

    #[test]
    fn round_trip_and_order() {
        let ws = set(vec![3, 2, 3, 0]);
        let bytes = ws.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 16);
        assert_eq!(&bytes[..8], WORKING_SET_MAGIC);
        let back = WorkingSet::decode(&bytes).unwrap();
        assert_eq!(back, ws);
        assert_eq!(back.order_in(&recipe()).unwrap(), vec![3, 2, 0], "repeats dropped, order kept");
        assert!(bytes.len() as u64 <= WorkingSet::max_len(4));
    }

    #[test]
    fn malformed_and_mismatched_sets_are_refused() {
        let good = set(vec![0]).encode();
        assert!(WorkingSet::decode(&good[..HEADER_LEN - 1]).is_err(), "short");
        assert!(WorkingSet::decode(&good[..good.len() - 1]).is_err(), "cut inside an index");
        let mut bad_magic = good.clone();
        bad_magic[7] = 2;
        assert!(WorkingSet::decode(&bad_magic).is_err(), "another version");
        let too_many = set(vec![0; 5]).encode();
        assert!(WorkingSet::decode(&too_many).is_err(), "more indexes than entries");

        let r = recipe();
        assert!(set(vec![1]).order_in(&r).is_err(), "a zero run");
        assert!(set(vec![4]).order_in(&r).is_err(), "past the end");
        assert!(WorkingSet { entry_count: 5, ..set(vec![0]) }.order_in(&r).is_err(), "another recipe");
        assert!(WorkingSet { memory: Sha256Digest::of(b"x"), ..set(vec![0]) }.order_in(&r).is_err());
    }

    #[test]
    fn the_manifest_refers_to_its_subject() {
        let subject = Reference {
            digest: Sha256Digest::of(b"snapshot manifest"),
            size: 1234,
            media_type: media::OCI_MANIFEST.into(),
            recipe: None,
        };
        let body = working_set_manifest(&subject, Sha256Digest::of(b"ws"), 52).unwrap();
        let s = summarize(&body, None).unwrap();
        assert_eq!(s.artifact_type.as_deref(), Some(media::WORKING_SET_ARTIFACT));
        assert_eq!(s.subject, Some(subject));
        assert_eq!(s.blobs.len(), 2);
        assert_eq!(s.blobs[0].media_type, media::OCI_EMPTY);
        assert_eq!(s.blobs[1].media_type, media::WORKING_SET_LAYER);
        assert_eq!(s.blobs[1].size, 52);
    }
}
