//! Healing: chunks whose stored frame is unreadable (a pack truncated by a power loss, a
//! flipped bit) are dropped from the chunk index, in memory and in the pack's stored index,
//! so they are reported missing and the next push of any blob holding them stores them
//! again in a new pack. Found on read (a pull that fails verification checks the packs it
//! touched) or by `thaw-registry scrub` ([`Store::scrub`]), which checks every pack.
//!
//! A pack's stored index is rewritten in place without the bad entries: readers that
//! already loaded it keep their (wrong) entries until they hit the same failure and heal
//! themselves; new readers never learn the bad chunks. An index whose pack body is gone
//! is deleted outright.

use std::collections::HashSet;

use object_store::PutPayload;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::ChunkId;

use super::pack::{self, IndexEntry, PackId};
use super::{keys, Result, Store, StoreError};

/// What one pack holds and which of its chunks are unreadable.
#[derive(Debug, Default)]
pub(crate) struct PackCheck {
    /// Every entry of the pack's stored index.
    pub(crate) entries: Vec<IndexEntry>,
    /// Entries whose frame is missing, truncated or fails verification.
    pub(crate) bad: Vec<IndexEntry>,
    /// Bytes of frames read and verified.
    pub(crate) bytes: u64,
    /// The pack body is gone while its index remains.
    pub(crate) body_missing: bool,
}

/// What a scrub found (and, unless dry, fixed).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScrubReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Packs checked.
    pub packs: u64,
    /// Chunk frames checked.
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Pack indexes that could not be decoded (their chunks were already treated as absent).
    pub unreadable_indexes: u64,
    /// Chunks whose frame failed verification, as `<pack>/<chunk id>`.
    pub bad_chunks: Vec<String>,
    /// Pack indexes rewritten (or deleted) without their bad chunks.
    pub packs_fixed: u64,
}

impl std::fmt::Display for ScrubReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "scrub checked {} packs, {} chunks, {} bytes", self.packs, self.chunks, self.bytes)?;
        writeln!(f, "  unreadable pack indexes {:>8}", self.unreadable_indexes)?;
        writeln!(f, "  bad chunks              {:>8}", self.bad_chunks.len())?;
        for bad in &self.bad_chunks {
            writeln!(f, "    {bad}")?;
        }
        if self.dry_run {
            write!(f, "  dry run: nothing changed; run without --dry-run to drop the bad chunks (pushes store them again)")
        } else {
            write!(f, "  pack indexes fixed      {:>8}", self.packs_fixed)
        }
    }
}

impl Store {
    /// Reads `pack` whole and verifies every frame its stored index names. `Ok(None)` when
    /// the index itself is gone (GC deleted the pack) or unreadable.
    pub(crate) async fn check_pack(&self, id: &PackId) -> Result<Option<PackCheck>> {
        let Some(index) = self.get_opt(&keys::pack_index(id)).await? else { return Ok(None) };
        let Ok(entries) = pack::decode_index(&index) else { return Ok(None) };
        let body = match self.objects.get(&keys::pack(id)).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                let bad = entries.clone();
                return Ok(Some(PackCheck { entries, bad, bytes: 0, body_missing: true }));
            }
            Err(e) => return Err(e.into()),
        };
        let verify = move || {
            let mut check = PackCheck { entries, ..Default::default() };
            for e in &check.entries {
                let frame = body.get(e.offset as usize..(e.offset + u64::from(e.len)) as usize);
                let ok =
                    frame.is_some_and(|f| EncodedChunk::from_frame(f).and_then(|c| c.decode(&e.id)).is_ok());
                check.bytes += frame.map_or(0, |f| f.len() as u64);
                if !ok {
                    check.bad.push(*e);
                }
            }
            check
        };
        tokio::task::spawn_blocking(verify).await.map(Some).map_err(|e| StoreError::Corrupt {
            key: keys::pack(id).to_string(),
            why: format!("verify task: {e}"),
        })
    }

    /// Drops the bad chunks of a checked pack: from the in-memory index (where it locates
    /// them in this pack) and from the stored index (rewritten without them, or deleted when
    /// nothing good is left or the body is gone).
    pub(crate) async fn drop_bad_chunks(&self, id: &PackId, check: &PackCheck) -> Result<()> {
        if check.bad.is_empty() {
            return Ok(());
        }
        let bad: HashSet<ChunkId> = check.bad.iter().map(|e| e.id).collect();
        self.index.write().expect("index lock").forget_in_pack(id, &bad);
        let good: Vec<IndexEntry> = check.entries.iter().filter(|e| !bad.contains(&e.id)).copied().collect();
        let key = keys::pack_index(id);
        if good.is_empty() || check.body_missing {
            self.delete(&key).await?;
            return Ok(());
        }
        self.objects.put(&key, PutPayload::from(pack::encode_index(&good))).await?;
        // GC in another process may have deleted the pack meanwhile: never leave an index
        // that names a missing body.
        if !self.exists(&keys::pack(id)).await? {
            self.delete(&key).await?;
        }
        Ok(())
    }

    /// After a read of frames in `packs` failed: checks those packs and drops what is
    /// unreadable, so the chunks count as missing and the next push stores them again.
    /// Returns how many chunks were dropped; failures to check are logged, not returned
    /// (the caller reports the read's own error).
    pub(crate) async fn heal_packs(&self, packs: HashSet<PackId>) -> usize {
        let mut dropped = 0;
        for id in packs {
            match self.check_pack(&id).await {
                Ok(Some(check)) if !check.bad.is_empty() => {
                    tracing::error!(
                        pack = %id,
                        bad = check.bad.len(),
                        body_missing = check.body_missing,
                        "corrupt chunks found on read: dropped from the index; pushing them again heals"
                    );
                    match self.drop_bad_chunks(&id, &check).await {
                        Ok(()) => dropped += check.bad.len(),
                        Err(e) => tracing::error!(pack = %id, error = %e, "could not drop corrupt chunks"),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(pack = %id, error = %e, "could not check a pack after a failed read")
                }
            }
        }
        dropped
    }

    /// Verifies every stored chunk (`thaw-registry scrub`); unless `dry_run`, drops the bad
    /// ones as [`Store::heal_packs`] does. `progress` is called after each pack with
    /// (packs done, packs total, report so far).
    pub async fn scrub(
        &self,
        dry_run: bool,
        progress: &(dyn Fn(u64, u64, &ScrubReport) + Sync),
    ) -> Result<ScrubReport> {
        let mut report = ScrubReport { dry_run, ..Default::default() };
        let mut ids: Vec<PackId> = self
            .list_keys(&object_store::path::Path::from(keys::PACK_INDEXES))
            .await?
            .iter()
            .filter_map(|k| k.filename().and_then(PackId::parse))
            .collect();
        ids.sort();
        let total = ids.len() as u64;
        for (n, id) in ids.iter().enumerate() {
            match self.check_pack(id).await? {
                None => {
                    // Gone since the listing (GC), or an index that does not decode.
                    if self.exists(&keys::pack_index(id)).await? {
                        report.unreadable_indexes += 1;
                    }
                }
                Some(check) => {
                    report.packs += 1;
                    report.chunks += check.entries.len() as u64;
                    report.bytes += check.bytes;
                    report.bad_chunks.extend(check.bad.iter().map(|e| format!("{id}/{}", e.id)));
                    if !dry_run && !check.bad.is_empty() {
                        self.drop_bad_chunks(id, &check).await?;
                        report.packs_fixed += 1;
                    }
                }
            }
            progress(n as u64 + 1, total, &report);
        }
        Ok(report)
    }
}
