//! Swarming on simultaneous cold pulls (docs/DECISIONS.md D19).
//!
//! A node materializing a snapshot registers it here ([`InProgress`]); its holdings then list
//! the snapshot with `cachedBytes: 0` (in progress), and its peer service answers bitmaps of
//! the chunks already written to the work files and serves those chunks (read back and
//! checked against their ids, so a half-written chunk is never sent).
//!
//! The nodes materializing the same snapshot (the swarm: found in the holdings directory,
//! and from the bitmap requests they send) split the work by fetch batch: each batch has one
//! owner, chosen by rendezvous hashing of the batch's first chunk id over the sorted member
//! names. The owner takes the batch from the registry; the others wait for the owner's (or
//! any member's) bitmap to show its chunks, and fetch them from whichever members hold them.
//! A batch whose chunks stop arriving for [`STALL`], or whose owner failed, comes from the
//! registry. Every peer chunk is checked against its id (twice: here and by the client).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use thaw_client::blob::ChunkSource;
use thaw_schema::holdings::NodeDirectory;
use thaw_schema::{ChunkId, Recipe, RecipeEntry, Sha256Digest};

use crate::peer::fetch::{Peer, PeerSource};
use crate::peer::{PeerBook, PeerOptions};

/// How long the chunks of a batch this node waits for may stop arriving before the batch
/// comes from the registry.
pub(crate) const STALL: Duration = Duration::from_secs(5);

/// How often a waiting batch looks at the members' bitmaps again.
const POLL: Duration = Duration::from_millis(100);

/// How long a node that starts a materialization waits for its announcement (and the other
/// members') to reach the directory before the first batch: the publisher's debounce plus
/// one round trip.
pub(crate) const GATHER: Duration = Duration::from_millis(400);

/// How often a materialization looks for new swarm members in the directory.
pub(crate) const SWARM_REFRESH: Duration = Duration::from_millis(500);

/// Most members of one swarm this node keeps (the directory may list more).
const MAX_MEMBERS: usize = 64;

/// Snapshots being materialized on this node.
#[derive(Debug, Default)]
pub(crate) struct InProgress {
    map: Mutex<HashMap<Sha256Digest, Arc<Materializing>>>,
}

/// One file of a snapshot being materialized: its work path and its recipe's distinct data
/// chunks in first-occurrence order, each with its offset in the file and its length.
#[derive(Debug)]
struct WorkFile {
    path: PathBuf,
    chunks: Vec<(ChunkId, u64, u32)>,
}

/// A snapshot being materialized on this node.
#[derive(Debug)]
pub(crate) struct Materializing {
    pub(crate) reference: String,
    pub(crate) size: u64,
    files: HashMap<Sha256Digest, WorkFile>,
    /// Where each chunk lies first, for serving it.
    places: HashMap<ChunkId, (Sha256Digest, usize)>,
    /// Other members: node name → peer endpoint.
    pub(crate) members: Mutex<BTreeMap<String, String>>,
}

impl Materializing {
    /// For each file (blob digest, recipe, work path).
    pub(crate) fn new(reference: String, size: u64, files: Vec<(Sha256Digest, &Recipe, PathBuf)>) -> Self {
        let mut out = HashMap::new();
        let mut places = HashMap::new();
        for (blob, recipe, path) in files {
            let mut firsts: HashMap<ChunkId, (u64, u32)> = HashMap::new();
            let mut offset = 0u64;
            for e in &recipe.entries {
                if let RecipeEntry::Data { len, id } = e {
                    firsts.entry(*id).or_insert((offset, *len));
                }
                offset += u64::from(e.byte_len());
            }
            let chunks: Vec<(ChunkId, u64, u32)> = recipe
                .distinct_chunks()
                .into_iter()
                .map(|id| {
                    let (o, l) = firsts[&id];
                    (id, o, l)
                })
                .collect();
            for (i, (id, _, _)) in chunks.iter().enumerate() {
                places.entry(*id).or_insert((blob, i));
            }
            out.insert(blob, WorkFile { path, chunks });
        }
        Self { reference, size, files: out, places, members: Mutex::default() }
    }

    /// The bitmap of `blob`'s distinct data chunks written so far (bit `i` of byte `i / 8`,
    /// least significant first), and how many chunks it covers. A chunk counts once the
    /// work file reaches its end: files are written in recipe order, of chunks already
    /// checked against their ids.
    pub(crate) fn bitmap(&self, blob: &Sha256Digest) -> Option<(Vec<u8>, usize)> {
        let file = self.files.get(blob)?;
        let written = std::fs::metadata(&file.path).map(|m| m.len()).unwrap_or(0);
        let mut bits = vec![0u8; file.chunks.len().div_ceil(8)];
        for (i, (_, offset, len)) in file.chunks.iter().enumerate() {
            if offset + u64::from(*len) <= written {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        Some((bits, file.chunks.len()))
    }

    /// Where `id` would lie in a work file: path, offset, length. The caller checks the
    /// bytes against the id (they may not be written yet).
    pub(crate) fn locate(&self, id: &ChunkId) -> Option<(PathBuf, u64, u32)> {
        let (blob, i) = self.places.get(id)?;
        let file = &self.files[blob];
        let (_, offset, len) = file.chunks[*i];
        Some((file.path.clone(), offset, len))
    }

    /// Records a member learned from the directory or from its bitmap request.
    pub(crate) fn add_member(&self, node: &str, endpoint: &str) {
        let mut m = self.members.lock().expect("members lock");
        if m.len() < MAX_MEMBERS || m.contains_key(node) {
            m.insert(node.to_owned(), endpoint.to_owned());
        }
    }

    /// Adds the nodes of `directory` materializing or holding `digest` (not `me`).
    pub(crate) fn add_from_directory(&self, directory: &NodeDirectory, me: &str, digest: &Sha256Digest) {
        for node in &directory.nodes {
            let Some(endpoint) = &node.peer_endpoint else { continue };
            if node.node != me && node.snapshots.iter().any(|s| s.digest == *digest) {
                self.add_member(&node.node, endpoint);
            }
        }
    }
}

impl InProgress {
    /// Registers a materialization; it is forgotten when the guard drops.
    pub(crate) fn register(self: &Arc<Self>, digest: Sha256Digest, m: Materializing) -> Registered {
        let m = Arc::new(m);
        self.map.lock().expect("in-progress lock").insert(digest, m.clone());
        Registered { owner: self.clone(), digest, materializing: m }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.lock().expect("in-progress lock").is_empty()
    }

    pub(crate) fn get(&self, digest: &Sha256Digest) -> Option<Arc<Materializing>> {
        self.map.lock().expect("in-progress lock").get(digest).cloned()
    }

    /// Every snapshot in progress, for the holdings.
    pub(crate) fn list(&self) -> Vec<(Sha256Digest, Arc<Materializing>)> {
        self.map.lock().expect("in-progress lock").iter().map(|(d, m)| (*d, m.clone())).collect()
    }

    /// Where `id` lies in a work file of a snapshot in progress.
    pub(crate) fn locate(&self, id: &ChunkId) -> Option<(PathBuf, u64, u32)> {
        self.map.lock().expect("in-progress lock").values().find_map(|m| m.locate(id))
    }
}

/// A registered materialization; unregisters on drop.
pub(crate) struct Registered {
    owner: Arc<InProgress>,
    digest: Sha256Digest,
    pub(crate) materializing: Arc<Materializing>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.owner.map.lock().expect("in-progress lock").remove(&self.digest);
    }
}

/// The owner of the batch starting with `first` among `me` and `others`: the highest
/// BLAKE3 of name and chunk id (rendezvous hashing, so every member agrees).
fn owner<'a>(first: &ChunkId, me: &'a str, others: impl Iterator<Item = &'a str>) -> &'a str {
    let score = |name: &str| {
        let mut key = name.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(first.as_bytes());
        ChunkId::of(&key)
    };
    let mut best = (score(me), me);
    for name in others {
        let s = score(name);
        if s > best.0 {
            best = (s, name);
        }
    }
    best.1
}

/// A member's bitmap of one blob, as last fetched.
#[derive(Clone)]
enum Bits {
    Complete,
    Some(Vec<u8>),
}

impl Bits {
    fn has(&self, i: usize) -> bool {
        match self {
            Self::Complete => true,
            Self::Some(b) => b.get(i / 8).is_some_and(|byte| byte & (1 << (i % 8)) != 0),
        }
    }
}

/// The chunk source of a materialization with P2P on: holders of the complete snapshot
/// (or of its repository) first, then the swarm.
pub(crate) struct SwarmSource {
    pub(crate) holders: Option<Arc<PeerSource>>,
    pub(crate) me: String,
    pub(crate) my_endpoint: Option<String>,
    pub(crate) snapshot: Sha256Digest,
    pub(crate) materializing: Arc<Materializing>,
    pub(crate) http: reqwest::Client,
    pub(crate) options: PeerOptions,
    pub(crate) book: Arc<PeerBook>,
    delivered: AtomicU64,
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
            delivered: AtomicU64::new(0),
        }
    }

    /// Uncompressed bytes delivered by peers (holders and swarm) since the last call.
    pub(crate) fn take_delivered(&self) -> u64 {
        let holders = self.holders.as_ref().map_or(0, |h| h.take_delivered());
        holders + self.delivered.swap(0, Ordering::Relaxed)
    }

    /// A member's bitmap of `blob`; `None` when it failed (it is then marked bad) or does not
    /// know the snapshot.
    async fn bitmap(&self, endpoint: &str, blob: &Sha256Digest) -> Option<Bits> {
        let scheme = if self.options.tls_ca.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{endpoint}{}", crate::peer::bitmap_path(&self.snapshot, blob));
        let mut req =
            self.http.get(&url).timeout(self.options.timeout).header(crate::peer::NODE_HEADER, &self.me);
        if let Some(e) = &self.my_endpoint {
            req = req.header(crate::peer::ENDPOINT_HEADER, e);
        }
        if let Some(t) = &self.options.token {
            req = req.bearer_auth(t.as_str());
        }
        let failed = |detail: String| {
            self.book.failed(endpoint, crate::peer::Failure::Error, &detail, self.options.penalty);
            None
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return failed(format!("bitmap: {e}")),
        };
        match resp.status().as_u16() {
            200 => {}
            // Not (or no longer) materializing it, and not holding it: nothing to get there.
            404 => return None,
            s => return failed(format!("bitmap answered HTTP {s}")),
        }
        if resp.headers().contains_key(crate::peer::COMPLETE_HEADER) {
            return Some(Bits::Complete);
        }
        match resp.bytes().await {
            Ok(b) => Some(Bits::Some(b.to_vec())),
            Err(e) => failed(format!("bitmap body: {e}")),
        }
    }

    async fn fetch_batch(&self, blob: Sha256Digest, ids: &[(ChunkId, u32)]) -> Vec<(ChunkId, Vec<u8>)> {
        let mut got = match &self.holders {
            Some(h) => h.fetch_batch(ids).await,
            None => Vec::new(),
        };
        let have: HashSet<ChunkId> = got.iter().map(|(id, _)| *id).collect();
        let mut rest: Vec<(ChunkId, u32)> =
            ids.iter().copied().filter(|(id, _)| !have.contains(id)).collect();
        let Some((first, _)) = ids.first() else { return got };
        let Some(file) = self.materializing.files.get(&blob) else { return got };
        let index: HashMap<ChunkId, usize> =
            file.chunks.iter().enumerate().map(|(i, (id, _, _))| (*id, i)).collect();
        let mut last_progress = Instant::now();
        while !rest.is_empty() {
            let members: BTreeMap<String, String> =
                self.materializing.members.lock().expect("members lock").clone();
            let the_owner = owner(first, &self.me, members.keys().map(String::as_str)).to_owned();
            if the_owner == self.me {
                break; // this node's batch: from the registry
            }
            let owner_endpoint = &members[&the_owner];
            if self.book.is_bad(owner_endpoint) || last_progress.elapsed() > STALL {
                tracing::debug!(owner = %the_owner, "swarm batch from the registry instead");
                break;
            }
            // Who has what, among the healthy members.
            let healthy: Vec<(&String, &String)> =
                members.iter().filter(|(_, e)| !self.book.is_bad(e)).collect();
            let bitmaps = futures::future::join_all(healthy.iter().map(|(_, e)| self.bitmap(e, &blob))).await;
            let mut asks: HashMap<usize, Vec<(ChunkId, u32)>> = HashMap::new();
            for (id, len) in &rest {
                let Some(&i) = index.get(id) else { continue };
                let holders: Vec<usize> =
                    (0..healthy.len()).filter(|m| bitmaps[*m].as_ref().is_some_and(|b| b.has(i))).collect();
                if holders.is_empty() {
                    continue;
                }
                // Spread over the holders, by chunk.
                let pick = holders[usize::from(id.as_bytes()[0]) % holders.len()];
                asks.entry(pick).or_default().push((*id, *len));
            }
            if !asks.is_empty() {
                let answers = futures::future::join_all(asks.iter().map(|(m, want)| {
                    let (name, endpoint) = healthy[*m];
                    let peer = Peer { node: name.clone(), endpoint: endpoint.clone(), same_snapshot: false };
                    async move { (peer.clone(), self.ask(&peer, want).await) }
                }))
                .await;
                for (peer, answer) in answers {
                    match answer {
                        Ok(chunks) if !chunks.is_empty() => {
                            let bytes: u64 = chunks.iter().map(|(_, d)| d.len() as u64).sum();
                            self.delivered.fetch_add(bytes, Ordering::Relaxed);
                            self.book.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
                            self.book.fetched_chunks.fetch_add(chunks.len() as u64, Ordering::Relaxed);
                            let arrived: HashSet<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
                            rest.retain(|(id, _)| !arrived.contains(id));
                            got.extend(chunks);
                            last_progress = Instant::now();
                        }
                        Ok(_) => {}
                        Err((why, detail)) => {
                            let detail = format!("swarm member {}: {detail}", peer.node);
                            self.book.failed(&peer.endpoint, why, &detail, self.options.penalty);
                        }
                    }
                }
            }
            if !rest.is_empty() {
                tokio::time::sleep(POLL).await;
            }
        }
        got
    }

    async fn ask(
        &self,
        peer: &Peer,
        ids: &[(ChunkId, u32)],
    ) -> Result<Vec<(ChunkId, Vec<u8>)>, (crate::peer::Failure, String)> {
        crate::peer::fetch::ask(&self.http, &self.options, peer, ids).await
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_agrees_on_the_owner_and_owners_spread() {
        let names = ["node-a", "node-b", "node-c", "node-d"];
        let mut owned: HashMap<&str, usize> = HashMap::new();
        for n in 0..400u32 {
            let first = ChunkId::of(&n.to_le_bytes());
            let seen: Vec<&str> =
                names.iter().map(|me| owner(&first, me, names.iter().copied().filter(|o| o != me))).collect();
            assert!(seen.windows(2).all(|w| w[0] == w[1]), "members disagree: {seen:?}");
            *owned.entry(seen[0]).or_default() += 1;
        }
        assert_eq!(owned.len(), 4, "{owned:?}");
        assert!(owned.values().all(|n| *n > 50), "owners spread unevenly: {owned:?}");
    }

    #[test]
    fn the_bitmap_shows_chunks_the_work_file_reaches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let recipe = Recipe {
            digest: Sha256Digest::of(b"blob"),
            size: 4096 * 4,
            chunker: thaw_schema::chunker::ChunkerParams::fixed(4096),
            entries: vec![
                RecipeEntry::Data { len: 4096, id: a },
                RecipeEntry::Zero { len: 4096 },
                RecipeEntry::Data { len: 4096, id: b },
                RecipeEntry::Data { len: 4096, id: a },
            ],
        };
        let blob = Sha256Digest::of(b"blob");
        let m = Materializing::new("r".into(), 1, vec![(blob, &recipe, path.clone())]);
        assert_eq!(m.bitmap(&blob).unwrap(), (vec![0b00], 2), "no work file yet");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        assert_eq!(m.bitmap(&blob).unwrap(), (vec![0b01], 2));
        std::fs::write(&path, vec![1u8; 4096 * 3]).unwrap();
        assert_eq!(m.bitmap(&blob).unwrap(), (vec![0b11], 2));
        assert_eq!(m.locate(&b).unwrap().1, 8192);
        assert!(m.bitmap(&Sha256Digest::of(b"other")).is_none());
    }
}
