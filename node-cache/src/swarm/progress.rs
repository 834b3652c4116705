//! This node's own state of each snapshot it materializes: the work files and their
//! segments, the frames held in memory, and where each segment is with this node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use thaw_schema::frame::EncodedChunk;
use thaw_schema::holdings::NodeDirectory;
use thaw_schema::{ChunkId, Recipe, RecipeEntry, Sha256Digest};
use tokio::sync::Notify;

use super::{MAX_HELD_BYTES, MAX_MEMBERS, SEGMENT_RAW_BYTES};

/// Snapshots being materialized on this node.
#[derive(Debug, Default)]
pub(crate) struct InProgress {
    map: Mutex<HashMap<Sha256Digest, Arc<Materializing>>>,
}

/// One file of a snapshot being materialized: its work path, its recipe's distinct data
/// chunks in first-occurrence order (each with its offset in the file and its length), and
/// their segments.
#[derive(Debug)]
pub(super) struct WorkFile {
    pub(super) path: PathBuf,
    pub(super) chunks: Vec<(ChunkId, u64, u32)>,
    /// Index in `chunks` of each chunk.
    pub(super) index: HashMap<ChunkId, usize>,
    /// Runs of `chunks`, each about [`SEGMENT_RAW_BYTES`].
    pub(super) segments: Vec<Range<usize>>,
    /// The segment of each chunk, by index in `chunks`.
    pub(super) segment_of: Vec<usize>,
}

/// Where this node is with one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SegmentState {
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
pub(super) struct Held {
    pub(super) frames: HashMap<ChunkId, Arc<EncodedChunk>>,
    /// The decoded bytes of this node's own registry segments, until the client takes them
    /// (so they are not decompressed twice).
    pub(super) ready: HashMap<ChunkId, Vec<u8>>,
    /// Bytes of `frames` and `ready`.
    pub(super) bytes: u64,
    /// Chunks of `frames` that came from peers and are not handed to the client yet (they
    /// count as delivered by peers when they are).
    pub(super) from_peers: HashSet<ChunkId>,
}

/// A snapshot being materialized on this node.
#[derive(Debug)]
pub(crate) struct Materializing {
    pub(crate) reference: String,
    pub(crate) size: u64,
    pub(super) files: HashMap<Sha256Digest, WorkFile>,
    /// The files in the order the client writes them, for prefetching.
    pub(super) order: Vec<Sha256Digest>,
    /// Where each chunk lies first, for serving it.
    pub(super) places: HashMap<ChunkId, (Sha256Digest, usize)>,
    /// Other members: node name → peer endpoint.
    pub(crate) members: Mutex<BTreeMap<String, String>>,
    pub(super) held: Mutex<Held>,
    pub(super) states: Mutex<HashMap<Sha256Digest, Vec<SegmentState>>>,
    /// Chunks this node copies from its own disk.
    pub(super) local: HashSet<ChunkId>,
    /// Chunks asked of members right now (locked after `held` when both are).
    pub(super) asking: Mutex<HashSet<ChunkId>>,
    /// Woken when frames arrive or a segment's state changes.
    pub(super) changed: Notify,
    /// When frames last arrived (from the registry or a peer): the [`STALL`] clock.
    pub(super) last_arrival: Mutex<Instant>,
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
    pub(super) fn written(file: &WorkFile) -> u64 {
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
    pub(super) fn hold(
        &self,
        frames: impl IntoIterator<Item = (ChunkId, Arc<EncodedChunk>)>,
        from_peers: bool,
    ) {
        self.hold_ready(frames.into_iter().map(|(id, f)| (id, f, None)), from_peers);
    }

    /// [`Self::hold`], with the decoded bytes of chunks the client has not taken yet.
    pub(super) fn hold_ready(
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
    pub(super) fn take_in_hand(
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
    pub(super) fn held_fits(&self) -> bool {
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

    pub(super) fn state(&self, blob: &Sha256Digest, segment: usize) -> SegmentState {
        self.states.lock().expect("states lock")[blob][segment]
    }

    /// Marks `segment` as being fetched by this node, if nobody here has started it.
    pub(super) fn claim(&self, blob: &Sha256Digest, segment: usize) -> bool {
        let mut states = self.states.lock().expect("states lock");
        let state = &mut states.get_mut(blob).expect("a file of the snapshot")[segment];
        let free = *state == SegmentState::Pending;
        if free {
            *state = SegmentState::Fetching;
        }
        free
    }

    pub(super) fn set_state(&self, blob: &Sha256Digest, segments: &[usize], to: SegmentState) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
