//! What the peer service needs from the cache: where a chunk lies in a complete snapshot,
//! and upload slots per peer.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use thaw_schema::ChunkId;

use super::Cache;
use crate::error::Result;

impl Cache {
    /// A slot for one upload to the peer at `ip`, if it has fewer than its limit in progress.
    pub(crate) fn peer_upload_slot(&self, ip: IpAddr) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let per_peer = self.config.peer.max_uploads_per_peer.max(1);
        let mut map = self.uploads_per_peer.lock().expect("uploads lock");
        // Forget idle peers, so the map stays as small as the set of busy peers.
        map.retain(|_, s| s.available_permits() < per_peer);
        let slot = map.entry(ip).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(per_peer)));
        slot.clone().try_acquire_owned().ok()
    }

    /// For each id, a file of a complete snapshot holding it, with offset and length.
    pub(crate) fn chunk_files(&self, ids: &[ChunkId]) -> Result<Vec<Option<(PathBuf, u64, u32)>>> {
        let found = tokio::task::block_in_place(|| self.index.locate(ids))?;
        let st = self.state.lock().expect("state lock");
        Ok(ids
            .iter()
            .map(|id| {
                found.get(id)?.iter().find_map(|loc| {
                    let rec = st.snapshots.get(&loc.snapshot)?;
                    let file = rec.files.get(usize::from(loc.file))?;
                    let path = self.dirs.snapshots.join(loc.snapshot.hex()).join(&file.title);
                    Some((path, loc.offset, loc.len))
                })
            })
            .collect())
    }
}
