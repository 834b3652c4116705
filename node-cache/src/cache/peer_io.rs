//! What the peer service needs from the cache: where a chunk lies (in a complete snapshot,
//! or in the work file of one being materialized), and upload slots per peer.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thaw_schema::frame::EncodedChunk;
use thaw_schema::{ChunkId, Sha256Digest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Cache;
use crate::error::Result;

/// One upload to a peer in progress: a slot of its own and one of the total.
pub(crate) struct UploadSlot {
    _mine: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl Cache {
    /// Whether an `ensure` is in progress on this node (peer uploads then go one at a time).
    pub(crate) fn restoring(&self) -> bool {
        self.active_ensures.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// A slot for one upload to the peer at `ip`, waiting up to `wait` for one of its
    /// `max_uploads_per_peer` slots, then for one of the `max_uploads` in total.
    pub(crate) async fn peer_upload_slot(&self, ip: IpAddr, wait: Duration) -> Option<UploadSlot> {
        let per_peer = self.config.peer.max_uploads_per_peer.max(1);
        let mine = {
            let mut map = self.uploads_per_peer.lock().expect("uploads lock");
            if map.len() > 256 {
                // Forget idle peers, so the map stays about as small as the set of busy ones.
                map.retain(|_, s| s.available_permits() < per_peer);
            }
            map.entry(ip).or_insert_with(|| Arc::new(Semaphore::new(per_peer))).clone()
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mine = tokio::time::timeout_at(deadline, mine.acquire_owned()).await.ok()?.ok()?;
        let total =
            tokio::time::timeout_at(deadline, self.uploads.clone().acquire_owned()).await.ok()?.ok()?;
        Some(UploadSlot { _mine: mine, _total: total })
    }

    /// For each id, where to read it: a file of a complete snapshot holding it, else a work
    /// file of a snapshot being materialized (whose bytes the reader must check: they may not
    /// be written yet).
    pub(crate) fn chunk_files(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkPlace>>> {
        let found = tokio::task::block_in_place(|| self.index.locate(ids))?;
        let st = self.state.lock().expect("state lock");
        Ok(ids
            .iter()
            .map(|id| {
                let complete = found.get(id).and_then(|locs| {
                    locs.iter().find_map(|loc| {
                        let rec = st.snapshots.get(&loc.snapshot)?;
                        let file = rec.files.get(usize::from(loc.file))?;
                        let path = self.dirs.snapshots.join(loc.snapshot.hex()).join(&file.title);
                        Some(ChunkPlace {
                            path,
                            offset: loc.offset,
                            len: loc.len,
                            in_progress: false,
                            frame: None,
                        })
                    })
                });
                complete.or_else(|| {
                    let (path, offset, len, frame) = self.swarm.locate(id)?;
                    Some(ChunkPlace { path, offset, len, in_progress: true, frame })
                })
            })
            .collect())
    }

    /// Whether this node holds the complete snapshot `snapshot`, with `blob` among its files.
    pub(crate) fn holds_blob(&self, snapshot: &Sha256Digest, blob: &Sha256Digest) -> bool {
        let st = self.state.lock().expect("state lock");
        st.snapshots.get(snapshot).is_some_and(|r| r.files.iter().any(|f| f.digest == *blob))
    }
}

/// Where a chunk lies on this node.
pub(crate) struct ChunkPlace {
    pub(crate) path: PathBuf,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    /// In the work file of a snapshot being materialized, perhaps not written yet.
    pub(crate) in_progress: bool,
    /// Its frame, held in memory by a materialization (checked when it arrived): served
    /// as is, without reading the file.
    pub(crate) frame: Option<Arc<EncodedChunk>>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{CacheConfig, PeerOptions};

    #[tokio::test]
    async fn each_peer_gets_at_most_its_upload_slots() {
        let dir = tempfile::tempdir().unwrap();
        let config = CacheConfig {
            registry: "127.0.0.1:9".into(),
            client: thaw_client::ClientOptions { plain_http: true, ..Default::default() },
            cache_dir: dir.path().to_owned(),
            capacity: 1 << 20,
            node_name: "n".into(),
            tag_ttl: Duration::from_secs(1),
            peer_endpoint: None,
            peer: PeerOptions { max_uploads_per_peer: 2, max_uploads: 3, ..PeerOptions::default() },
            lease_ttl: Duration::from_secs(600),
            publish_root: None,
            working_sets: Default::default(),
        };
        let cache = Cache::open(config).unwrap();
        let (one, two, three): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let now = Duration::ZERO;
        let a = cache.peer_upload_slot(one, now).await.expect("first slot");
        let _b = cache.peer_upload_slot(one, now).await.expect("second slot");
        assert!(cache.peer_upload_slot(one, now).await.is_none(), "a third upload to one peer");
        let _c = cache.peer_upload_slot(two, now).await.expect("another peer has its own slots");
        assert!(cache.peer_upload_slot(three, now).await.is_none(), "a fourth upload in total");
        // A waiting request gets the slot a finished upload frees.
        let waiting = cache.peer_upload_slot(one, Duration::from_secs(5));
        let freed = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a);
        };
        let (got, ()) = tokio::join!(waiting, freed);
        assert!(got.is_some(), "a freed slot went unused");
        assert_eq!(cache.uploads.available_permits(), 0);
    }
}
