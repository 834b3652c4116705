//! The chunk source a materialization with P2P on hands the client's materializer: each
//! batch takes what this node holds, waits for the swarm while chunks keep arriving, and
//! leaves the rest to the registry.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::BoxFuture;
use thaw_client::blob::ChunkSource;
use thaw_client::Registry;
use thaw_schema::{ChunkId, Sha256Digest};

use super::members::Look;
use super::progress::{Materializing, SegmentState};
use super::{POLL, SEGMENT_RAW_BYTES, STALL};
use crate::peer::fetch::PeerSource;
use crate::peer::{PeerBook, PeerOptions};

/// The chunk source of a materialization with P2P on: holders of the complete snapshot
/// (or of its repository) first, then the swarm, then this node's own registry fetches of
/// the segments it owns.
pub(crate) struct SwarmSource {
    pub(crate) holders: Option<Arc<PeerSource>>,
    pub(crate) me: String,
    pub(crate) my_endpoint: Option<String>,
    pub(crate) snapshot: Sha256Digest,
    pub(crate) materializing: Arc<Materializing>,
    pub(crate) http: reqwest::Client,
    pub(crate) options: PeerOptions,
    pub(crate) book: Arc<PeerBook>,
    pub(super) registry: Arc<Registry>,
    pub(super) repository: String,
    /// The last look at the members' bitmaps, per blob.
    pub(super) looks: Mutex<HashMap<Sha256Digest, Arc<Look>>>,
    /// Members found holding the complete snapshot: they own no segment (they fetch
    /// nothing); the owners fetch their segments from them instead of the registry.
    pub(super) complete: Mutex<HashSet<String>>,
    /// This node's member asks in flight, by member endpoint.
    pub(super) asking_from: Mutex<HashMap<String, usize>>,
    pub(super) delivered: AtomicU64,
}

/// Where a [`SwarmSource`] takes chunks from the registry: the client and repository.
pub(crate) struct RegistryFetch {
    pub(crate) registry: Arc<Registry>,
    pub(crate) repository: String,
}

impl SwarmSource {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        holders: Option<Arc<PeerSource>>,
        me: String,
        my_endpoint: Option<String>,
        snapshot: Sha256Digest,
        materializing: Arc<Materializing>,
        http: reqwest::Client,
        options: PeerOptions,
        book: Arc<PeerBook>,
        registry: RegistryFetch,
    ) -> Self {
        Self {
            holders,
            me,
            my_endpoint,
            snapshot,
            materializing,
            http,
            options,
            book,
            registry: registry.registry,
            repository: registry.repository,
            looks: Mutex::default(),
            complete: Mutex::default(),
            asking_from: Mutex::default(),
            delivered: AtomicU64::new(0),
        }
    }

    /// Uncompressed bytes delivered by peers (holders and swarm) since the last call.
    pub(crate) fn take_delivered(&self) -> u64 {
        let holders = self.holders.as_ref().map_or(0, |h| h.take_delivered());
        holders + self.delivered.swap(0, Ordering::Relaxed)
    }

    async fn fetch_batch(&self, blob: Sha256Digest, ids: &[(ChunkId, u32)]) -> Vec<(ChunkId, Vec<u8>)> {
        // Holders of the snapshot or its repository, batch by batch, when there is no swarm;
        // with a swarm (holders of the snapshot are members too) its workers fetch instead.
        let alone = self.materializing.members.lock().expect("members lock").is_empty();
        let mut got = match &self.holders {
            Some(h) if alone => h.fetch_batch(ids).await,
            _ => Vec::new(),
        };
        let have: HashSet<ChunkId> = got.iter().map(|(id, _)| *id).collect();
        let mut rest: Vec<(ChunkId, u32)> =
            ids.iter().copied().filter(|(id, _)| !have.contains(id)).collect();
        let m = &self.materializing;
        let Some(file) = m.files.get(&blob) else { return got };
        let asked_at = Instant::now();
        let mut last_progress = Instant::now();
        let mut rounds = 0u32;
        while !rest.is_empty() {
            rounds += 1;
            let changed = m.changed.notified();
            // 1. What this node holds in memory: its own registry segments, and what its
            // workers got from the members.
            let (mut decoded, frames, from_peers) = m.take_in_hand(&rest);
            self.delivered.fetch_add(from_peers, Ordering::Relaxed);
            if !frames.is_empty() {
                let more = tokio::task::spawn_blocking(move || {
                    frames
                        .into_iter()
                        .filter_map(|(id, f)| f.decode(&id).ok().map(|d| (id, d)))
                        .collect::<Vec<_>>()
                })
                .await
                .expect("decode task");
                decoded.extend(more);
            }
            if !decoded.is_empty() {
                let arrived: HashSet<ChunkId> = decoded.iter().map(|(id, _)| *id).collect();
                rest.retain(|(id, _)| !arrived.contains(id));
                got.extend(decoded);
                last_progress = Instant::now();
                if rest.is_empty() {
                    break;
                }
            }
            // 2. This node's own segments come from its prefetch, which takes them in write
            // order: a batch that fetched its own here would compete with the prefetch for
            // the registry's uplink and let later segments overtake the ones the writers
            // wait for. Only when the prefetch is held back by the memory limit does the
            // batch fetch them itself. Those that failed are left to the client.
            let members = self.owners();
            let prefetch_held_back = !m.held_fits();
            let mut claimed = Vec::new();
            let mut failed = HashSet::new();
            for (id, _) in &rest {
                let Some(&i) = file.index.get(id) else {
                    failed.insert(*id);
                    continue;
                };
                let segment = file.segment_of[i];
                match m.state(&blob, segment) {
                    // Held since the look above: taken in the next round.
                    SegmentState::Done if m.frame(id).is_some() => {}
                    // Done but not in hand: its frame was dropped after another file wrote
                    // it (past the memory limit). Either way the client fetches it itself.
                    SegmentState::Failed | SegmentState::Done => {
                        failed.insert(*id);
                    }
                    SegmentState::Fetching => {}
                    SegmentState::Pending if self.mine(file, segment, &members) => {
                        if prefetch_held_back && m.claim(&blob, segment) {
                            claimed.push(segment);
                        }
                    }
                    // Another member's: this node's workers bring it from whoever has it.
                    SegmentState::Pending => {}
                }
            }
            if !failed.is_empty() {
                rest.retain(|(id, _)| !failed.contains(id));
            }
            if !claimed.is_empty() {
                self.fetch_segments(blob, claimed).await;
                continue;
            }
            let quiet = last_progress.max(*m.last_arrival.lock().expect("arrival lock")).elapsed();
            if rest.is_empty() || quiet > STALL {
                if !rest.is_empty() {
                    tracing::debug!(chunks = rest.len(), "swarm chunks stalled; from the registry instead");
                }
                break;
            }
            let _ = tokio::time::timeout(POLL, changed).await;
        }
        tracing::debug!(
            chunks = ids.len(),
            waited_ms = asked_at.elapsed().as_millis() as u64,
            rounds,
            node = %self.me,
            first = %ids.first().map(|(id, _)| id.to_string()).unwrap_or_default(),
            "swarm batch"
        );
        got
    }
}

impl ChunkSource for SwarmSource {
    fn fetch<'a>(
        &'a self,
        blob: Sha256Digest,
        ids: &'a [(ChunkId, u32)],
    ) -> BoxFuture<'a, Vec<(ChunkId, Vec<u8>)>> {
        Box::pin(self.fetch_batch(blob, ids))
    }

    /// A segment per batch while there is a swarm: its chunks arrive segment by segment
    /// from different members, so a registry-sized batch (8 segments) would keep the writer
    /// waiting until the last of them (D19).
    fn batch_raw_bytes(&self) -> u64 {
        if self.materializing.members.lock().expect("members lock").is_empty() {
            thaw_client::tuning::FETCH_BATCH_RAW_BYTES
        } else {
            SEGMENT_RAW_BYTES
        }
    }
}
