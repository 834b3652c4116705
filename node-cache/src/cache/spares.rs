//! Private disk copies: each lease gets its own copy of the disk image (the guest writes
//! to it), taken from a spare made ahead of time when there is one, so a hit renames
//! instead of copying.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thaw_schema::media::FileRole;
use thaw_schema::Sha256Digest;

use super::{Cache, Spare};
use crate::error::{CacheError, Result};
use crate::fsutil;

impl Cache {
    /// Copies the disk image into the lease's directory now (there was no spare), off the
    /// async threads; records the copy's allocated bytes on the lease.
    pub(super) async fn copy_into_lease(&self, lease: &str, source: &Path, title: &str) -> Result<PathBuf> {
        let dir = self.dirs.leases.join(lease);
        let dest = dir.join(title);
        let (from, to) = (source.to_owned(), dest.clone());
        let allocated = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| CacheError::io("creating", &dir, e))?;
            let (allocated, kind) = fsutil::private_copy(&from, &to)?;
            tracing::debug!(?kind, allocated, to = %to.display(), "private disk copy");
            Ok::<_, CacheError>(allocated)
        })
        .await
        .map_err(|source| CacheError::Task { what: "copy", source })??;
        if let Some(l) = self.state.lock().expect("state lock").leases.get_mut(lease) {
            l.allocated = allocated;
        }
        Ok(dest)
    }

    /// Puts back a spare a hit took but did not use; removes it (in the background) if its
    /// snapshot is gone or another spare took its place.
    pub(super) fn return_spare(&self, digest: Sha256Digest, spare: Option<Spare>) {
        let Some(spare) = spare else { return };
        let mut st = self.state.lock().expect("state lock");
        if st.snapshots.contains_key(&digest) && !st.spares.contains_key(&digest) {
            st.spares.insert(digest, spare);
        } else {
            drop(st);
            tokio::task::spawn_blocking(move || fsutil::remove_all(&spare.path));
        }
    }

    /// Makes a spare disk copy of a cached snapshot, if it has a disk and none is ready.
    pub(crate) async fn prepare_spare(&self, digest: Sha256Digest) {
        let source = {
            let mut st = self.state.lock().expect("state lock");
            let Some(rec) = st.snapshots.get(&digest) else { return };
            let Some(disk) = rec.files.iter().find(|f| f.role.as_deref() == Some(FileRole::Disk.key()))
            else {
                return;
            };
            let title = disk.title.clone();
            if st.spares.contains_key(&digest) || !st.spares_in_progress.insert(digest) {
                return;
            }
            title
        };
        let from = self.dirs.snapshots.join(digest.hex()).join(&source);
        let to = self.dirs.spares.join(format!("{}-{}-{source}", digest.hex(), fsutil::nonce()));
        let copied = copy_blocking(&from, &to).await;
        let mut st = self.state.lock().expect("state lock");
        st.spares_in_progress.remove(&digest);
        match copied {
            Ok(allocated) if st.snapshots.contains_key(&digest) => {
                st.spares.insert(digest, Spare { path: to, allocated });
            }
            Ok(_) => fsutil::remove_all(&to),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "could not make a spare disk copy");
                fsutil::remove_all(&to);
            }
        }
    }

    /// Keeps a spare disk copy ready for every cached snapshot that has a disk. Runs forever.
    pub async fn run_spare_maker(self: Arc<Self>) {
        loop {
            let wanted: Vec<Sha256Digest> = {
                let st = self.state.lock().expect("state lock");
                st.snapshots
                    .values()
                    .filter(|s| s.files.iter().any(|f| f.role.as_deref() == Some(FileRole::Disk.key())))
                    .filter(|s| !st.spares.contains_key(&s.digest) && !st.pins.contains_key(&s.digest))
                    .map(|s| s.digest)
                    .collect()
            };
            for d in wanted {
                // Copies wait for restores in progress, which need the disk more.
                loop {
                    let idle = self.ensures_idle.notified();
                    if self.active_ensures.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), idle).await;
                }
                // Spares use spare capacity only (the whole snapshot's size: an upper bound).
                let fits = {
                    let st = self.state.lock().expect("state lock");
                    let bound = st.snapshots.get(&d).map_or(0, |s| s.allocated_bytes);
                    st.used() + bound <= self.config.capacity
                };
                if fits {
                    self.prepare_spare(d).await;
                }
            }
            let wanted = self.spares_wanted.notified();
            let _ = tokio::time::timeout(Duration::from_secs(1), wanted).await;
        }
    }
}

async fn copy_blocking(from: &Path, to: &Path) -> Result<u64> {
    let (from, to) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || {
        let (allocated, kind) = fsutil::private_copy(&from, &to)?;
        tracing::debug!(?kind, allocated, to = %to.display(), "private disk copy");
        Ok(allocated)
    })
    .await
    .map_err(|source| CacheError::Task { what: "copy", source })?
}
