//! Making room and dropping damage: least-recently-used eviction, verification against
//! file digests, quarantine of damaged snapshots and the scrub over all of them.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use thaw_schema::Sha256Digest;
use tokio::sync::OwnedMutexGuard;

use super::{Cache, State};
use crate::error::{CacheError, Result};
use crate::fsutil;
use crate::index::SnapshotRecord;

impl Cache {
    /// Evicts least-recently-used snapshots that are neither leased, pinned, nor busy until
    /// `needed` more bytes fit. Takes each victim out of `snapshots/` and the state now; the
    /// returned guards are held until [`Self::finish_evictions`] has removed its record.
    pub(super) fn make_room(
        &self,
        st: &mut State,
        needed: u64,
        exclude: Sha256Digest,
    ) -> Result<Vec<(Sha256Digest, PathBuf, OwnedMutexGuard<()>)>> {
        let mut evicted = Vec::new();
        // Spare disk copies go first: they are only a head start for the next hit.
        if st.used() + needed > self.config.capacity {
            for (_, spare) in st.spares.drain() {
                fsutil::remove_all(&spare.path);
            }
        }
        while st.used() + needed > self.config.capacity {
            let mut candidates: Vec<(u64, Sha256Digest)> = st
                .snapshots
                .values()
                .filter(|s| s.digest != exclude && !st.pins.contains_key(&s.digest) && !st.leased(&s.digest))
                .map(|s| (s.last_used_ms, s.digest))
                .collect();
            candidates.sort_unstable();
            let victim =
                candidates.into_iter().find_map(|(_, d)| Some((d, self.flight(d).try_lock_owned().ok()?)));
            let Some((victim, guard)) = victim else {
                let leased: u64 =
                    st.snapshots.values().filter(|s| st.leased(&s.digest)).map(|s| s.allocated_bytes).sum();
                return Err(CacheError::NoSpace(format!(
                    "the snapshot needs about {needed} bytes, but the cache holds {} of its {} bytes, {leased} of them in leased snapshots that cannot be evicted; release leases or raise --capacity",
                    st.used(),
                    self.config.capacity
                )));
            };
            let dir = self.dirs.snapshots.join(victim.hex());
            let doomed = self.dirs.work.join(format!("evicted-{}.{}", victim.hex(), fsutil::nonce()));
            std::fs::rename(&dir, &doomed).map_err(|e| CacheError::io("evicting", &dir, e))?;
            st.snapshots.remove(&victim);
            if let Some(spare) = st.spares.remove(&victim) {
                fsutil::remove_all(&spare.path);
            }
            tracing::info!(digest = %victim, "evicting the least recently used snapshot");
            evicted.push((victim, doomed, guard));
        }
        Ok(evicted)
    }

    pub(super) async fn finish_evictions(
        &self,
        evicted: Vec<(Sha256Digest, PathBuf, OwnedMutexGuard<()>)>,
    ) -> Result<()> {
        if evicted.is_empty() {
            return Ok(());
        }
        for (digest, doomed, guard) in evicted {
            tokio::task::block_in_place(|| self.index.remove_snapshot(&digest))?;
            drop(guard);
            fsutil::remove_all(&doomed);
            self.metrics.evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.update_gauges();
        self.holdings_changed.notify_one();
        Ok(())
    }

    /// Checks every file of a snapshot against its digest.
    pub(super) async fn verify(&self, record: &SnapshotRecord) -> Result<bool> {
        let dir = self.dirs.snapshots.join(record.digest.hex());
        let files: Vec<(PathBuf, Sha256Digest, u64)> =
            record.files.iter().map(|f| (dir.join(&f.title), f.digest, f.size)).collect();
        tokio::task::spawn_blocking(move || {
            for (path, digest, size) in files {
                match fsutil::sha256_file(&path) {
                    Ok((d, n)) if d == digest && n == size => {}
                    Ok(_) | Err(_) => return false,
                }
            }
            true
        })
        .await
        .map_err(|source| CacheError::Task { what: "verify", source })
    }

    /// Drops a damaged snapshot: out of the state and `snapshots/`, then out of the index,
    /// then its bytes. Its leases end (their private disk copies stay valid for whoever has
    /// them open).
    pub(super) async fn quarantine(&self, digest: &Sha256Digest) -> Result<()> {
        let doomed = {
            let mut st = self.state.lock().expect("state lock");
            if st.snapshots.remove(digest).is_none() {
                return Ok(());
            }
            if let Some(spare) = st.spares.remove(digest) {
                fsutil::remove_all(&spare.path);
            }
            let leases: Vec<String> = st
                .leases
                .iter()
                .filter(|(_, l)| l.record.digest == *digest)
                .map(|(id, _)| id.clone())
                .collect();
            for id in leases {
                st.leases.remove(&id);
                fsutil::remove_all(&self.dirs.leases.join(&id));
            }
            let dir = self.dirs.snapshots.join(digest.hex());
            let doomed = self.dirs.work.join(format!("corrupt-{}.{}", digest.hex(), fsutil::nonce()));
            std::fs::rename(&dir, &doomed).map_err(|e| CacheError::io("quarantining", &dir, e))?;
            doomed
        };
        tokio::task::block_in_place(|| self.index.remove_snapshot(digest))?;
        fsutil::remove_all(&doomed);
        self.metrics.corrupt.fetch_add(1, Ordering::Relaxed);
        self.update_gauges();
        self.holdings_changed.notify_one();
        Ok(())
    }

    /// Verifies every cached snapshot and drops the damaged ones.
    pub async fn scrub(&self) -> Result<ScrubReport> {
        let records: Vec<SnapshotRecord> =
            self.state.lock().expect("state lock").snapshots.values().cloned().collect();
        let mut report = ScrubReport { checked: 0, corrupt: Vec::new() };
        for record in records {
            let flight = self.flight(record.digest);
            // A snapshot being materialized or evicted right now is not checked.
            let Ok(_guard) = flight.try_lock() else { continue };
            if !self.state.lock().expect("state lock").snapshots.contains_key(&record.digest) {
                continue;
            }
            report.checked += 1;
            if !self.verify(&record).await? {
                tracing::warn!(digest = %record.digest, "scrub: a cached file does not match its digest; dropping the snapshot");
                self.quarantine(&record.digest).await?;
                report.corrupt.push(record.digest);
            }
        }
        Ok(report)
    }
}

/// What a scrub found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScrubReport {
    /// Snapshots checked.
    pub checked: usize,
    /// Snapshots found damaged and dropped.
    pub corrupt: Vec<Sha256Digest>,
}

/// Disk accounting, for consistency checks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskReport {
    /// Chunk locations the index holds.
    pub chunk_locations: u64,
    /// Bytes allocated under `snapshots/` and `leases/`.
    pub allocated_on_disk: u64,
    /// Bytes the index accounts for snapshots and leases' private copies.
    pub used_by_index: u64,
}
