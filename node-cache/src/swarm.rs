//! Swarming on simultaneous cold pulls (docs/DECISIONS.md D19, D21).
//!
//! A node materializing a snapshot registers it here ([`InProgress`]); its holdings then list
//! the snapshot with `cachedBytes: 0` (in progress), and its peer service answers bitmaps of
//! the chunks it has in hand and serves those chunks.
//!
//! The nodes materializing the same snapshot (the swarm: found in the holdings directory,
//! and from the bitmap requests they send) split the work by segment: each file's distinct
//! chunks, cut into runs of about [`SEGMENT_RAW_BYTES`]. Each segment has one owner among the
//! members that are materializing it, chosen by rendezvous hashing of its first chunk id over
//! their names, so every member agrees without talking. In the background of the client's
//! writes ([`SwarmSource::prefetch`]), in write order:
//!
//! - each node fetches the segments it owns from a member holding the complete snapshot if
//!   there is one, else from the registry, and keeps the frames as they came;
//! - its member workers ask the members whose bitmaps show them for the chunks it lacks
//!   (not the segment's owner when another member has them, then the member asked least,
//!   then spread by chunk id); while only the first holder has a chunk, only [`FANOUT`] members
//!   take it from there and the rest from them (a tree, so no uplink sends a segment to
//!   every member at once). What arrives is checked and held, and served on at once.
//!
//! The client's batches ([`ChunkSource`]) take what is held. Chunks held in memory are
//! served to peers without waiting for the in-order writer and without compressing again.
//! A chunk still missing when nothing has arrived at this node for [`STALL`], or whose
//! owner failed, comes from the registry.
//! Every peer chunk is checked against its id (twice: here and by the client).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt as _;
use thaw_client::blob::ChunkSource;
use thaw_client::Registry;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::holdings::NodeDirectory;
use thaw_schema::{ChunkId, Recipe, RecipeEntry, Sha256Digest};
use tokio::sync::Notify;

use crate::peer::fetch::{Peer, PeerSource};
use crate::peer::{PeerBook, PeerOptions};

/// How long chunks may stop arriving at this node (for any of its batches) before a batch
/// still waiting takes the rest of its chunks from the registry. Measured per
/// materialization, not per batch: the client asks for several batches ahead, and a later
/// one waits behind the earlier ones by design while the swarm works through the segments
/// in write order (a per-batch clock sent 1.27-1.61 copies from the registry: D23).
pub(crate) const STALL: Duration = Duration::from_secs(5);

/// How often a waiting batch looks at the members' bitmaps again (sooner when this node's
/// own frames arrive).
const POLL: Duration = Duration::from_millis(50);

/// How long a node that starts a materialization waits for its announcement (and the other
/// members') to reach the directory before the first batch: the publisher's debounce plus
/// one round trip. (150 ms, with announcements published at once, made 2 and 4 nodes take
/// 1.15 and 1.28 copies from the registry: D21.)
pub(crate) const GATHER: Duration = Duration::from_millis(400);

/// How often a materialization looks for new swarm members in the directory.
pub(crate) const SWARM_REFRESH: Duration = Duration::from_millis(500);

/// Most members of one swarm this node keeps (the directory may list more).
const MAX_MEMBERS: usize = 64;

/// Uncompressed bytes of one segment, the unit the members split among themselves. Small
/// enough that 8 members get several each of a 100 MiB file (an even split), large enough
/// that one registry request per segment costs little.
const SEGMENT_RAW_BYTES: u64 = 2 << 20;

/// Registry requests for this node's own segments in flight at once, ahead of its writer.
const PREFETCH_WORKERS: usize = 2;

/// Requests to members in flight at once, each for up to a segment's worth of chunks.
/// Each node takes 7/8 of an 8-member swarm's snapshot from members, as fast as the
/// registry sends the other 1/8 to its owners: its downlink has to stay full. With 3, the
/// downlinks ran about half full and the last node took 14.0-15.1 s at 50 Mbit/s; with 5,
/// 13.0-13.7 s; 8 was no faster and used more CPU (D23).
const MEMBER_WORKERS: usize = 5;

/// Members that take a segment from its first holder; the others take it from them.
const FANOUT: usize = 2;

/// Frames one materialization keeps in memory. Past this, the frames of chunks already
/// written are dropped (they are served from the work file), and prefetching waits for the
/// writer.
const MAX_HELD_BYTES: u64 = 256 << 20;

/// How old the last look at the members' bitmaps may be when prefetching decides whether a
/// segment is still needed from the registry.
const KNOWN_FRESH: Duration = Duration::from_millis(250);

/// Snapshots being materialized on this node.
#[derive(Debug, Default)]
pub(crate) struct InProgress {
    map: Mutex<HashMap<Sha256Digest, Arc<Materializing>>>,
}

/// One file of a snapshot being materialized: its work path, its recipe's distinct data
/// chunks in first-occurrence order (each with its offset in the file and its length), and
/// their segments.
#[derive(Debug)]
struct WorkFile {
    path: PathBuf,
    chunks: Vec<(ChunkId, u64, u32)>,
    /// Index in `chunks` of each chunk.
    index: HashMap<ChunkId, usize>,
    /// Runs of `chunks`, each about [`SEGMENT_RAW_BYTES`].
    segments: Vec<Range<usize>>,
    /// The segment of each chunk, by index in `chunks`.
    segment_of: Vec<usize>,
}

/// Where this node is with one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegmentState {
    /// Not fetched from the registry by this node (it may come from peers).
    Pending,
    /// A registry request for it is in flight.
    Fetching,
    /// Its frames came from the registry and are held (or written).
    Done,
    /// The registry request failed: the client fetches these chunks itself.
    Failed,
}

/// Frames in hand, as received (from the registry or a peer) and checked.
#[derive(Debug, Default)]
struct Held {
    frames: HashMap<ChunkId, Arc<EncodedChunk>>,
    /// The decoded bytes of this node's own registry segments, until the client takes them
    /// (so they are not decompressed twice).
    ready: HashMap<ChunkId, Vec<u8>>,
    /// Bytes of `frames` and `ready`.
    bytes: u64,
    /// Chunks of `frames` that came from peers and are not handed to the client yet (they
    /// count as delivered by peers when they are).
    from_peers: HashSet<ChunkId>,
}

/// A snapshot being materialized on this node.
#[derive(Debug)]
pub(crate) struct Materializing {
    pub(crate) reference: String,
    pub(crate) size: u64,
    files: HashMap<Sha256Digest, WorkFile>,
    /// The files in the order the client writes them, for prefetching.
    order: Vec<Sha256Digest>,
    /// Where each chunk lies first, for serving it.
    places: HashMap<ChunkId, (Sha256Digest, usize)>,
    /// Other members: node name → peer endpoint.
    pub(crate) members: Mutex<BTreeMap<String, String>>,
    held: Mutex<Held>,
    states: Mutex<HashMap<Sha256Digest, Vec<SegmentState>>>,
    /// Chunks this node copies from its own disk.
    local: HashSet<ChunkId>,
    /// Chunks asked of members right now (locked after `held` when both are).
    asking: Mutex<HashSet<ChunkId>>,
    /// Woken when frames arrive or a segment's state changes.
    changed: Notify,
    /// When frames last arrived (from the registry or a peer): the [`STALL`] clock.
    last_arrival: Mutex<Instant>,
}

impl Materializing {
    /// For each file (blob digest, recipe, work path), in the order they are written;
    /// `local` tells the chunks this node copies from its own disk (never fetched).
    pub(crate) fn new(
        reference: String,
        size: u64,
        files: Vec<(Sha256Digest, &Recipe, PathBuf)>,
        local: impl Fn(&ChunkId) -> bool,
    ) -> Self {
        let mut out = HashMap::new();
        let mut places = HashMap::new();
        let mut states = HashMap::new();
        let mut order = Vec::new();
        let mut local_ids = HashSet::new();
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
            // Every node cuts the same segments (so they agree on owners); this node fetches
            // only the chunks it lacks, and a segment it has all of is done from the start.
            let (segments, segment_of) = segments(&chunks);
            let index = chunks.iter().enumerate().map(|(i, (id, _, _))| (*id, i)).collect();
            let state = |run: &Range<usize>| {
                if chunks[run.clone()].iter().all(|(id, _, _)| local(id)) {
                    SegmentState::Done
                } else {
                    SegmentState::Pending
                }
            };
            states.insert(blob, segments.iter().map(state).collect());
            for (id, _, _) in &chunks {
                if local(id) {
                    local_ids.insert(*id);
                }
            }
            order.push(blob);
            out.insert(blob, WorkFile { path, chunks, index, segments, segment_of });
        }
        Self {
            reference,
            size,
            files: out,
            order,
            places,
            members: Mutex::default(),
            held: Mutex::default(),
            states: Mutex::new(states),
            local: local_ids,
            asking: Mutex::default(),
            changed: Notify::new(),
            last_arrival: Mutex::new(Instant::now()),
        }
    }

    /// How far `file`'s work file is written: chunks ending before it are on disk, checked.
    fn written(file: &WorkFile) -> u64 {
        std::fs::metadata(&file.path).map(|m| m.len()).unwrap_or(0)
    }

    /// The bitmap of `blob`'s distinct data chunks this node has in hand (bit `i` of byte
    /// `i / 8`, least significant first), and how many chunks it covers. A chunk counts once
    /// its frame is held, or once the work file reaches its end: files are written in
    /// recipe order, of chunks already checked against their ids.
    pub(crate) fn bitmap(&self, blob: &Sha256Digest) -> Option<(Vec<u8>, usize)> {
        let file = self.files.get(blob)?;
        let written = Self::written(file);
        let held = self.held.lock().expect("held lock");
        let mut bits = vec![0u8; file.chunks.len().div_ceil(8)];
        for (i, (id, offset, len)) in file.chunks.iter().enumerate() {
            if offset + u64::from(*len) <= written || held.frames.contains_key(id) {
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

    /// The frame of `id`, when this node holds it in memory (checked when it arrived).
    pub(crate) fn frame(&self, id: &ChunkId) -> Option<Arc<EncodedChunk>> {
        self.held.lock().expect("held lock").frames.get(id).cloned()
    }

    /// Keeps checked frames to serve, and wakes the batches waiting for chunks.
    /// `from_peers`: they came from peers (they count as such when the client takes them).
    fn hold(&self, frames: impl IntoIterator<Item = (ChunkId, Arc<EncodedChunk>)>, from_peers: bool) {
        self.hold_ready(frames.into_iter().map(|(id, f)| (id, f, None)), from_peers);
    }

    /// [`Self::hold`], with the decoded bytes of chunks the client has not taken yet.
    fn hold_ready(
        &self,
        frames: impl IntoIterator<Item = (ChunkId, Arc<EncodedChunk>, Option<Vec<u8>>)>,
        from_peers: bool,
    ) {
        {
            let mut held = self.held.lock().expect("held lock");
            let mut frames = frames.into_iter().peekable();
            if frames.peek().is_some() {
                *self.last_arrival.lock().expect("arrival lock") = Instant::now();
            }
            for (id, frame, data) in frames {
                if from_peers {
                    held.from_peers.insert(id);
                }
                let len = frame.payload.len() as u64;
                if held.frames.insert(id, frame).is_none() {
                    held.bytes += len;
                }
                if let Some(data) = data {
                    let len = data.len() as u64;
                    if held.ready.insert(id, data).is_none() {
                        held.bytes += len;
                    }
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// Takes, for each of `ids` this node has in hand, its decoded bytes, or else its frame
    /// (to decode); and the uncompressed bytes among them that peers delivered.
    #[allow(clippy::type_complexity)]
    fn take_in_hand(
        &self,
        ids: &[(ChunkId, u32)],
    ) -> (Vec<(ChunkId, Vec<u8>)>, Vec<(ChunkId, Arc<EncodedChunk>)>, u64) {
        let mut held = self.held.lock().expect("held lock");
        let (mut ready, mut frames, mut from_peers) = (Vec::new(), Vec::new(), 0);
        for (id, len) in ids {
            if let Some(data) = held.ready.remove(id) {
                held.bytes -= data.len() as u64;
                ready.push((*id, data));
            } else if let Some(f) = held.frames.get(id).cloned() {
                frames.push((*id, f));
            } else {
                continue;
            }
            if held.from_peers.remove(id) {
                from_peers += u64::from(*len);
            }
        }
        (ready, frames, from_peers)
    }

    /// Whether the held frames fit [`MAX_HELD_BYTES`], after dropping those of chunks
    /// already written (served from the work file from then on).
    fn held_fits(&self) -> bool {
        let mut held = self.held.lock().expect("held lock");
        if held.bytes <= MAX_HELD_BYTES {
            return true;
        }
        for file in self.files.values() {
            let written = Self::written(file);
            for (id, offset, len) in &file.chunks {
                if offset + u64::from(*len) <= written {
                    if let Some(frame) = held.frames.remove(id) {
                        held.bytes -= frame.payload.len() as u64;
                    }
                }
            }
        }
        held.bytes <= MAX_HELD_BYTES
    }

    fn state(&self, blob: &Sha256Digest, segment: usize) -> SegmentState {
        self.states.lock().expect("states lock")[blob][segment]
    }

    /// Marks `segment` as being fetched by this node, if nobody here has started it.
    fn claim(&self, blob: &Sha256Digest, segment: usize) -> bool {
        let mut states = self.states.lock().expect("states lock");
        let state = &mut states.get_mut(blob).expect("a file of the snapshot")[segment];
        let free = *state == SegmentState::Pending;
        if free {
            *state = SegmentState::Fetching;
        }
        free
    }

    fn set_state(&self, blob: &Sha256Digest, segments: &[usize], to: SegmentState) {
        {
            let mut states = self.states.lock().expect("states lock");
            let file = states.get_mut(blob).expect("a file of the snapshot");
            for s in segments {
                file[*s] = to;
            }
        }
        self.changed.notify_waiters();
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

/// Cuts `chunks` into runs of about [`SEGMENT_RAW_BYTES`]; answers the runs and the run of
/// each chunk.
fn segments(chunks: &[(ChunkId, u64, u32)]) -> (Vec<Range<usize>>, Vec<usize>) {
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut of = Vec::with_capacity(chunks.len());
    let mut raw = 0u64;
    for (i, (_, _, len)) in chunks.iter().enumerate() {
        if out.is_empty() || raw >= SEGMENT_RAW_BYTES {
            out.push(i..i);
            raw = 0;
        }
        let last = out.last_mut().expect("a segment");
        last.end = i + 1;
        raw += u64::from(*len);
        of.push(out.len() - 1);
    }
    (out, of)
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

    /// Where `id` lies in a work file of a snapshot in progress, and its frame when one of
    /// them holds it in memory.
    pub(crate) fn locate(&self, id: &ChunkId) -> Option<(PathBuf, u64, u32, Option<Arc<EncodedChunk>>)> {
        let map = self.map.lock().expect("in-progress lock");
        let frame = map.values().find_map(|m| m.frame(id));
        map.values().find_map(|m| m.locate(id)).map(|(path, offset, len)| (path, offset, len, frame))
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

/// The rendezvous score of `name` for the segment starting with `first`.
fn score(first: &ChunkId, name: &str) -> ChunkId {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(first.as_bytes());
    ChunkId::of(&key)
}

/// The owner of the segment starting with `first` among `me` and `others`: the highest
/// BLAKE3 of name and chunk id (rendezvous hashing, so every member agrees).
fn owner<'a>(first: &ChunkId, me: &'a str, others: impl Iterator<Item = &'a str>) -> &'a str {
    let mut best = (score(first, me), me);
    for name in others {
        let s = score(first, name);
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

/// The members' bitmaps of one blob, from one look.
struct Look {
    at: Instant,
    /// Healthy members (name, endpoint) and what each has (`None`: nothing known).
    members: Vec<(String, String, Option<Bits>)>,
}

impl Look {
    /// Whether a member that is materializing the snapshot too has chunk `i`.
    fn swarm_has(&self, i: usize) -> bool {
        self.members.iter().any(|(_, _, b)| matches!(b, Some(b @ Bits::Some(_)) if b.has(i)))
    }

    /// A member holding the complete snapshot: name and endpoint.
    fn complete_holder(&self) -> Option<(&str, &str)> {
        self.members
            .iter()
            .find_map(|(n, e, b)| matches!(b, Some(Bits::Complete)).then_some((n.as_str(), e.as_str())))
    }
}

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
    registry: Arc<Registry>,
    repository: String,
    /// The last look at the members' bitmaps, per blob.
    looks: Mutex<HashMap<Sha256Digest, Arc<Look>>>,
    /// Members found holding the complete snapshot: they own no segment (they fetch
    /// nothing); the owners fetch their segments from them instead of the registry.
    complete: Mutex<HashSet<String>>,
    /// This node's member asks in flight, by member endpoint.
    asking_from: Mutex<HashMap<String, usize>>,
    delivered: AtomicU64,
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
        let failed_as = |why: crate::peer::Failure, detail: String| {
            self.book.failed(endpoint, why, &detail, self.options.penalty);
            None
        };
        let failed = |detail: String| failed_as(crate::peer::Failure::Error, detail);
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return failed_as(crate::peer::Failure::Timeout, format!("bitmap: {e}"))
            }
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

    fn members(&self) -> BTreeMap<String, String> {
        self.materializing.members.lock().expect("members lock").clone()
    }

    /// Looks at every healthy member's bitmap of `blob` now.
    async fn look(&self, blob: &Sha256Digest) -> Arc<Look> {
        let healthy: Vec<(String, String)> =
            self.members().into_iter().filter(|(_, e)| !self.book.is_bad(e)).collect();
        let bits = futures::future::join_all(healthy.iter().map(|(_, e)| self.bitmap(e, blob))).await;
        let look = Arc::new(Look {
            at: Instant::now(),
            members: healthy.into_iter().zip(bits).map(|((n, e), b)| (n, e, b)).collect(),
        });
        let complete = look.members.iter().filter(|(_, _, b)| matches!(b, Some(Bits::Complete)));
        self.complete.lock().expect("complete lock").extend(complete.map(|(n, _, _)| n.clone()));
        self.looks.lock().expect("looks lock").insert(*blob, look.clone());
        look
    }

    /// The last look at `blob`'s bitmaps, if it is at most `max_age` old, else a new one.
    /// The batches in flight share looks, so the members get a few bitmap requests per
    /// [`POLL`], not one per batch.
    async fn recent_look(&self, blob: &Sha256Digest, max_age: Duration) -> Arc<Look> {
        let last = self.looks.lock().expect("looks lock").get(blob).cloned();
        match last {
            Some(l) if l.at.elapsed() <= max_age => l,
            _ => self.look(blob).await,
        }
    }

    /// The members that own segments: those materializing the snapshot too.
    fn owners(&self) -> BTreeMap<String, String> {
        let complete = self.complete.lock().expect("complete lock").clone();
        self.members().into_iter().filter(|(n, _)| !complete.contains(n)).collect()
    }

    /// Whether this node fetches segment `segment` of `file` (from a complete holder or the
    /// registry): it owns it among the owners, or its owner is marked bad.
    fn mine(&self, file: &WorkFile, segment: usize, members: &BTreeMap<String, String>) -> bool {
        let the_owner = self.segment_owner(file, segment, members);
        the_owner == self.me || self.book.is_bad(&members[the_owner])
    }

    /// The owner of `segment` of `file` among this node and `owners`.
    fn segment_owner<'a>(
        &'a self,
        file: &WorkFile,
        segment: usize,
        owners: &'a BTreeMap<String, String>,
    ) -> &'a str {
        let first = &file.chunks[file.segments[segment].start].0;
        owner(first, &self.me, owners.keys().map(String::as_str))
    }

    /// Asks the member `peer` for `want`, keeping the frames as sent; counts what arrives
    /// in the peer metrics. `None` when it failed (the peer is then marked bad).
    async fn ask_member(
        &self,
        peer: &Peer,
        want: &[(ChunkId, u32)],
    ) -> Option<Vec<(ChunkId, Vec<u8>, EncodedChunk)>> {
        let asked_at = Instant::now();
        let answer = crate::peer::fetch::ask_frames(&self.http, &self.options, peer, want).await;
        tracing::debug!(
            node = %self.me,
            from = %peer.node,
            asked = want.len(),
            got = answer.as_ref().map_or(0, |c| c.len()),
            ms = asked_at.elapsed().as_millis() as u64,
            "member ask"
        );
        match answer {
            Ok(chunks) => {
                let bytes: u64 = chunks.iter().map(|(_, d, _)| d.len() as u64).sum();
                self.book.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.book.fetched_chunks.fetch_add(chunks.len() as u64, Ordering::Relaxed);
                Some(chunks)
            }
            Err((why, detail)) => {
                let detail = format!("swarm member {}: {detail}", peer.node);
                self.book.failed(&peer.endpoint, why, &detail, self.options.penalty);
                None
            }
        }
    }

    /// Fetches `segments` of `blob` (already claimed) from the registry in one request, and
    /// holds their frames once each is checked against its id. On any failure the segments
    /// are marked failed: the client fetches those chunks itself, and reports what goes wrong.
    async fn fetch_segments(&self, blob: Sha256Digest, segments: Vec<usize>) {
        let m = &self.materializing;
        let file = &m.files[&blob];
        let ids: Vec<ChunkId> = {
            let held = m.held.lock().expect("held lock");
            segments
                .iter()
                .flat_map(|s| file.chunks[file.segments[*s].clone()].iter().map(|(id, _, _)| *id))
                .filter(|id| !held.frames.contains_key(id) && !m.local.contains(id))
                .collect()
        };
        if ids.is_empty() {
            m.set_state(&blob, &segments, SegmentState::Done);
            return;
        }
        // From a member holding the complete snapshot, when there is one: the registry sends
        // nothing then, and that member sends each segment once, to its owner.
        let look = self.recent_look(&blob, KNOWN_FRESH).await;
        let ids = match look.complete_holder() {
            Some((name, endpoint)) => {
                let peer = Peer { node: name.to_owned(), endpoint: endpoint.to_owned(), same_snapshot: true };
                let want: Vec<(ChunkId, u32)> =
                    ids.iter().map(|id| (*id, file.chunks[file.index[id]].2)).collect();
                match self.ask_member(&peer, &want).await {
                    Some(chunks) => {
                        let arrived: HashSet<ChunkId> = chunks.iter().map(|(id, _, _)| *id).collect();
                        m.hold_ready(
                            chunks.into_iter().map(|(id, data, frame)| (id, Arc::new(frame), Some(data))),
                            true,
                        );
                        ids.into_iter().filter(|id| !arrived.contains(id)).collect()
                    }
                    None => ids,
                }
            }
            None => ids,
        };
        if ids.is_empty() {
            m.set_state(&blob, &segments, SegmentState::Done);
            return;
        }
        let checked = match self.registry.fetch_chunks(&self.repository, &blob, &ids).await {
            Ok(frames) => tokio::task::spawn_blocking(move || {
                frames
                    .into_iter()
                    .map(|(id, frame)| match frame.decode(&id) {
                        Ok(data) => Ok((id, Arc::new(frame), Some(data))),
                        Err(e) => Err((id, e)),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .expect("check task")
            .map_err(|(id, e)| format!("chunk {id}: {e}")),
            Err(e) => Err(e.to_string()),
        };
        match checked {
            Ok(frames) => {
                m.hold_ready(frames, false);
                m.set_state(&blob, &segments, SegmentState::Done);
            }
            Err(e) => {
                tracing::debug!(error = %e, "swarm segments from the registry failed; the client fetches them");
                m.set_state(&blob, &segments, SegmentState::Failed);
            }
        }
    }

    /// Fetches, ahead of the client and in the order it writes: the segments this node owns
    /// (from a complete holder or the registry; segments some member already has are left
    /// to the swarm), and, from the members, the chunks it lacks. Runs until cancelled (when
    /// the materialization ends).
    pub(crate) async fn prefetch(&self) -> std::convert::Infallible {
        let worker = || async {
            loop {
                let changed = self.materializing.changed.notified();
                match self.next_own_segment().await {
                    Some((blob, segment)) => {
                        let t = Instant::now();
                        self.fetch_segments(blob, vec![segment]).await;
                        tracing::debug!(node = %self.me, segment, ms = t.elapsed().as_millis() as u64, "prefetched own segment");
                    }
                    None => {
                        let _ = tokio::time::timeout(POLL * 4, changed).await;
                    }
                }
            }
        };
        let member_worker = || async {
            loop {
                if !self.ask_members_once().await {
                    tokio::time::sleep(POLL).await;
                }
            }
        };
        let workers = (0..PREFETCH_WORKERS).map(|_| worker().boxed());
        let members = (0..MEMBER_WORKERS).map(|_| member_worker().boxed());
        futures::future::join_all(workers.chain(members)).await;
        unreachable!("prefetch workers never return")
    }

    /// Claims the first segment, in write order, that this node owns, has not fetched, and
    /// no member has; `None` when there is none now (or the held frames are at their limit).
    async fn next_own_segment(&self) -> Option<(Sha256Digest, usize)> {
        let m = &self.materializing;
        if !m.held_fits() {
            return None;
        }
        let members = self.owners();
        for blob in &m.order {
            let file = &m.files[blob];
            let pending: Vec<usize> = (0..file.segments.len())
                .filter(|s| m.state(blob, *s) == SegmentState::Pending && self.mine(file, *s, &members))
                .collect();
            if pending.is_empty() {
                continue;
            }
            let look = if self.materializing.members.lock().expect("members lock").is_empty() {
                None
            } else {
                Some(self.recent_look(blob, KNOWN_FRESH).await)
            };
            for s in pending {
                // A member that joined late may already have it: then it comes from there.
                let everywhere =
                    look.as_ref().is_some_and(|l| file.segments[s].clone().all(|i| l.swarm_has(i)));
                if !everywhere && m.claim(blob, s) {
                    return Some((*blob, s));
                }
            }
        }
        None
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

    /// One step of a member worker: asks one member for the earliest chunks, in write
    /// order, that this node lacks and that member has (up to a segment's worth), and holds
    /// what arrives, checked. Answers
    /// whether anything arrived.
    async fn ask_members_once(&self) -> bool {
        let m = &self.materializing;
        if !m.held_fits() || m.members.lock().expect("members lock").is_empty() {
            return false;
        }
        for blob in &m.order {
            let file = &m.files[blob];
            let lacking = |held: &Held, asking: &HashSet<ChunkId>, written: u64, i: usize| {
                let (id, offset, len) = &file.chunks[i];
                !held.frames.contains_key(id)
                    && !m.local.contains(id)
                    && !asking.contains(id)
                    && offset + u64::from(*len) > written
            };
            let any_lacking = {
                let written = Materializing::written(file);
                let held = m.held.lock().expect("held lock");
                let asking = m.asking.lock().expect("asking lock");
                (0..file.chunks.len()).any(|i| lacking(&held, &asking, written, i))
            };
            if !any_lacking {
                continue;
            }
            let look = self.recent_look(blob, POLL).await;
            let owners = self.owners();
            let written = Materializing::written(file);
            let mut pick: Option<(usize, Vec<(ChunkId, u32)>)> = None;
            {
                let held = m.held.lock().expect("held lock");
                let mut asking = m.asking.lock().expect("asking lock");
                let mut raw = 0u64;
                let mut may_ask_first: HashMap<usize, bool> = HashMap::new();
                let mut owner_of: HashMap<usize, String> = HashMap::new();
                let busy_with = self.asking_from.lock().expect("asking lock").clone();
                for (i, (id, _, len)) in file.chunks.iter().enumerate() {
                    if !lacking(&held, &asking, written, i) {
                        continue;
                    }
                    // Not from a complete holder: it sends each segment to its owner only.
                    let mut holders: Vec<usize> = (0..look.members.len())
                        .filter(|k| matches!(&look.members[*k].2, Some(b @ Bits::Some(_)) if b.has(i)))
                        .collect();
                    // Fan out as a tree: while only the segment's first holder (its owner)
                    // has a chunk, only the FANOUT next-ranked members take it from there;
                    // the rest take it from them, so no member's uplink carries a segment to
                    // every other member at once.
                    if holders.len() == 1 {
                        let segment = file.segment_of[i];
                        let may = *may_ask_first.entry(segment).or_insert_with(|| {
                            let first = &file.chunks[file.segments[segment].start].0;
                            let mine = score(first, &self.me);
                            let above =
                                look.members.iter().filter(|(n, _, _)| score(first, n) > mine).count();
                            // The owner is above everyone: ranks 1..=FANOUT may ask it.
                            above <= FANOUT
                        });
                        if !may {
                            holders.clear();
                        }
                    }
                    // Of the holders: not the segment's owner when another has it (its
                    // uplink is the one everyone starts from), then the one this node asks
                    // least right now, then spread by chunk id.
                    let segment = file.segment_of[i];
                    let the_owner = owner_of
                        .entry(segment)
                        .or_insert_with(|| self.segment_owner(file, segment, &owners).to_owned());
                    let spread = usize::from(id.as_bytes()[0]);
                    let Some(holder) = holders.iter().copied().min_by_key(|k| {
                        let (name, endpoint, _) = &look.members[*k];
                        let busy = busy_with.get(endpoint.as_str()).copied().unwrap_or(0);
                        (name == the_owner, busy, (spread + k) % holders.len())
                    }) else {
                        continue;
                    };
                    match &mut pick {
                        None => pick = Some((holder, vec![(*id, *len)])),
                        Some((h, want)) if *h == holder => {
                            if raw + u64::from(*len) > SEGMENT_RAW_BYTES {
                                break;
                            }
                            want.push((*id, *len));
                        }
                        Some(_) => continue,
                    }
                    raw += u64::from(*len);
                }
                if let Some((_, want)) = &pick {
                    asking.extend(want.iter().map(|(id, _)| *id));
                }
            }
            let Some((k, want)) = pick else { continue };
            let (name, endpoint, _) = &look.members[k];
            *self.asking_from.lock().expect("asking lock").entry(endpoint.clone()).or_default() += 1;
            let peer = Peer { node: name.clone(), endpoint: endpoint.clone(), same_snapshot: false };
            let mut got_any = false;
            if let Some(chunks) = self.ask_member(&peer, &want).await {
                got_any = !chunks.is_empty();
                m.hold(chunks.into_iter().map(|(id, _, frame)| (id, Arc::new(frame))), true);
            }
            let mut asking = m.asking.lock().expect("asking lock");
            for (id, _) in &want {
                asking.remove(id);
            }
            if let Some(n) = self.asking_from.lock().expect("asking lock").get_mut(endpoint) {
                *n -= 1;
            }
            // Nothing (a busy member answers 503, as nothing): wait before asking again.
            return got_any;
        }
        false
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
    /// waiting until the last of them (D23).
    fn batch_raw_bytes(&self) -> u64 {
        if self.materializing.members.lock().expect("members lock").is_empty() {
            thaw_client::tuning::FETCH_BATCH_RAW_BYTES
        } else {
            SEGMENT_RAW_BYTES
        }
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
        let m = Materializing::new("r".into(), 1, vec![(blob, &recipe, path.clone())], |_| false);
        assert_eq!(m.bitmap(&blob).unwrap(), (vec![0b00], 2), "no work file yet");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        assert_eq!(m.bitmap(&blob).unwrap(), (vec![0b01], 2));
        std::fs::write(&path, vec![1u8; 4096 * 3]).unwrap();
        assert_eq!(m.bitmap(&blob).unwrap(), (vec![0b11], 2));
        assert_eq!(m.locate(&b).unwrap().1, 8192);
        assert!(m.bitmap(&Sha256Digest::of(b"other")).is_none());
    }

    #[test]
    fn held_frames_count_in_the_bitmap_before_the_writer_reaches_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let data: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 4096]).collect();
        let ids: Vec<ChunkId> = data.iter().map(|d| ChunkId::of(d)).collect();
        let recipe = Recipe {
            digest: Sha256Digest::of(b"blob"),
            size: 4096 * 3,
            chunker: thaw_schema::chunker::ChunkerParams::fixed(4096),
            entries: ids.iter().map(|id| RecipeEntry::Data { len: 4096, id: *id }).collect(),
        };
        let blob = Sha256Digest::of(b"blob");
        let m = Materializing::new("r".into(), 1, vec![(blob, &recipe, path.clone())], |_| false);
        m.hold([(ids[2], Arc::new(EncodedChunk::compress(&data[2], 1)))], true);
        assert_eq!(m.bitmap(&blob).unwrap(), (vec![0b100], 3), "the third is held, not written");
        assert_eq!(m.frame(&ids[2]).unwrap().decode(&ids[2]).unwrap(), data[2]);
        assert!(m.frame(&ids[0]).is_none());
        std::fs::write(&path, &data[0]).unwrap();
        assert_eq!(m.bitmap(&blob).unwrap(), (vec![0b101], 3));
    }

    #[test]
    fn segments_cover_every_chunk_once_in_runs_of_about_two_mib() {
        let chunks: Vec<(ChunkId, u64, u32)> =
            (0..100u32).map(|i| (ChunkId::of(&i.to_le_bytes()), u64::from(i) * 65536, 65536)).collect();
        let (runs, of) = segments(&chunks);
        // 32 chunks of 64 KiB make 2 MiB: 100 chunks are 3 full runs and one of 4.
        assert_eq!(runs, vec![0..32, 32..64, 64..96, 96..100]);
        assert!(of.iter().enumerate().all(|(i, s)| runs[*s].contains(&i)));
        assert_eq!(segments(&[]).0, Vec::<Range<usize>>::new());
    }
}
