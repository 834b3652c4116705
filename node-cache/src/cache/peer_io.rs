//! What the peer service needs from the cache: where a chunk lies in a complete snapshot,
//! and upload slots per peer.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use thaw_schema::ChunkId;

use super::Cache;
use crate::error::Result;

impl Cache {
    /// Whether an `ensure` is in progress on this node (peer uploads then go one at a time).
    pub(crate) fn restoring(&self) -> bool {
        self.active_ensures.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{CacheConfig, PeerOptions};

    #[test]
    fn each_peer_gets_at_most_its_upload_slots() {
        let dir = tempfile::tempdir().unwrap();
        let config = CacheConfig {
            registry: "127.0.0.1:9".into(),
            client: thaw_client::ClientOptions { plain_http: true, ..Default::default() },
            cache_dir: dir.path().to_owned(),
            capacity: 1 << 20,
            node_name: "n".into(),
            tag_ttl: Duration::from_secs(1),
            peer_endpoint: None,
            peer: PeerOptions { max_uploads_per_peer: 2, ..PeerOptions::default() },
        };
        let cache = Cache::open(config).unwrap();
        let (one, two): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a = cache.peer_upload_slot(one).expect("first slot");
        let _b = cache.peer_upload_slot(one).expect("second slot");
        assert!(cache.peer_upload_slot(one).is_none(), "a third upload to one peer");
        let _c = cache.peer_upload_slot(two).expect("another peer has its own slots");
        drop(a);
        assert!(cache.peer_upload_slot(one).is_some(), "a finished upload frees its slot");
        assert_eq!(cache.uploads.available_permits(), PeerOptions::default().max_uploads);
    }
}
