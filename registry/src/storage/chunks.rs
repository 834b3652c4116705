//! Chunks: written into packs by a [`ChunkWriter`], located through the in-memory index,
//! read back a window at a time with a few ranged GETs.
//!
//! Request budget (docs/DECISIONS.md D6): storing new chunks costs two PUTs per pack (the
//! pack, then its index), one pack per `DEFAULT_PACK_TARGET` bytes; asking which chunks
//! exist costs nothing when the index knows them all, and otherwise one LIST plus one GET
//! per pack index not read before; reading costs, per `WINDOW_RAW_BYTES` of chunks, one GET
//! per pack the window touches (more when its frames lie far apart in that pack).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::PutPayload;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::{ChunkId, MAX_CHUNK_LEN};

use super::index::Location;
use super::pack::{self, PackBuilder, PackId};
use super::{corrupt, keys, Result, Store, StoreError};

/// A writer closes its pack once it holds this many bytes: 16 MiB keeps a pack's PUT
/// short on a slow link and its buffer cheap, while cutting requests ~250-fold against
/// one object per 64 KiB chunk (the measurement is in docs/DECISIONS.md D6).
pub const DEFAULT_PACK_TARGET: usize = 16 << 20;
/// Packs of one writer being uploaded at once (each holds up to a pack of memory).
const FLUSHES_IN_FLIGHT: usize = 2;
/// Frames of one pack at most this far apart are read with one GET (the bytes between are
/// read and dropped).
const MAX_GAP: u64 = 256 << 10;
/// At most this many bytes of a window's reads may be gap bytes; past it, the window is
/// read frame by frame.
const MAX_GAP_OVERHEAD: u64 = 16 << 20;
/// Largest single ranged GET.
const MAX_READ: u64 = 8 << 20;
/// A reader plans its GETs over windows of this many distinct uncompressed chunk bytes (or
/// `WINDOW_CHUNKS` entries), and holds about `WINDOWS_AHEAD` windows in memory: a reader's
/// buffers stay under `WINDOWS_AHEAD × (WINDOW_RAW_BYTES + MAX_CHUNK_LEN)` of decoded
/// bytes, plus as much again of frames, however compressible the chunks (docs/API.md,
/// "Limits").
pub(crate) const WINDOW_RAW_BYTES: u64 = 16 << 20;
const WINDOW_CHUNKS: usize = 4096;
pub(crate) const WINDOWS_AHEAD: usize = 2;
/// Ranged GETs of one window in flight at once.
const READ_AHEAD: usize = 4;
/// Pack indexes read at once while refreshing the chunk index.
const INDEX_READS: usize = 16;
/// An incremental refresh re-lists the indexes of packs created up to this long before the
/// newest one it has seen: packs are named by their writer's clock when the writer starts
/// them, so an index can appear after ones with later names (slow uploads, clock skew
/// between replicas). One missed by this margin costs a duplicate upload of its chunks, and
/// a reader that needs one of them one full listing (`locate_all`).
const LIST_MARGIN: Duration = Duration::from_secs(15 * 60);

/// How far index refreshes got.
#[derive(Debug, Default)]
pub(crate) struct RefreshState {
    /// When the last refresh that completed had started.
    last_started: Option<Instant>,
    /// When the last refresh that listed every pack index had started.
    last_full: Option<Instant>,
    /// Creation time of the newest pack seen, in unix milliseconds.
    newest_millis: Option<u64>,
}

/// One entry of a fetched window: the stored frame, or the verified content.
#[derive(Clone)]
enum WindowRead {
    Frame(EncodedChunk),
    Data(Bytes),
}

/// Cuts a lazy sequence of wanted chunks into windows of at most `WINDOW_CHUNKS` entries
/// and `WINDOW_RAW_BYTES` of distinct declared lengths (a chunk of unknown length counts as
/// the largest there may be). A single chunk larger than the budget gets a window alone.
struct Windows {
    wanted: std::iter::Peekable<Box<dyn Iterator<Item = (ChunkId, Option<u32>)> + Send>>,
}

impl Iterator for Windows {
    type Item = Vec<(ChunkId, Option<u32>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut window = Vec::new();
        let mut seen = HashSet::new();
        let mut raw = 0u64;
        while let Some(&(id, len)) = self.wanted.peek() {
            let cost = if seen.contains(&id) { 0 } else { u64::from(len.unwrap_or(MAX_CHUNK_LEN)) };
            if !window.is_empty() && (window.len() >= WINDOW_CHUNKS || raw + cost > WINDOW_RAW_BYTES) {
                break;
            }
            seen.insert(id);
            raw += cost;
            window.push((id, len));
            self.wanted.next();
        }
        (!window.is_empty()).then_some(window)
    }
}

impl Store {
    // ---- the index ----

    /// True when the in-memory index knows the chunk (no I/O; may say false for a stored
    /// chunk, never true for a missing one).
    pub fn is_known_chunk(&self, id: &ChunkId) -> bool {
        self.index.read().expect("index lock").contains(id)
    }

    fn locate(&self, id: &ChunkId) -> Option<(PackId, Location)> {
        let index = self.index.read().expect("index lock");
        index.get(id).map(|loc| (index.pack(loc.pack).clone(), loc))
    }

    /// Brings the chunk index up to date with every pack index visible in the bucket at
    /// `asked_at` or later. Concurrent callers share one refresh: a caller whose question
    /// is older than a refresh that completed meanwhile returns at once.
    pub async fn refresh_index(&self, asked_at: Instant) -> Result<()> {
        self.refresh_index_from(asked_at, false).await
    }

    /// [`Store::refresh_index`], listing every pack index when `full`, not only those named
    /// after the newest seen less `LIST_MARGIN`: a reader that still misses a chunk a
    /// committed recipe names asks for this, since the pack may be named by a writer whose
    /// clock is behind by more than the margin (it costs one LIST per 1,000 packs, and only
    /// reads that would otherwise fail pay it).
    async fn refresh_index_from(&self, asked_at: Instant, full: bool) -> Result<()> {
        let mut state = self.refresh.lock().await;
        let done = if full { state.last_full } else { state.last_started };
        if done.is_some_and(|t| t >= asked_at) {
            return Ok(());
        }
        let started = Instant::now();
        let dir = Path::from(keys::PACK_INDEXES);
        let newest_seen = if full { None } else { state.newest_millis };
        let listing = match newest_seen {
            None => self.objects.list(Some(&dir)),
            Some(newest) => {
                let floor = newest.saturating_sub(LIST_MARGIN.as_millis() as u64);
                let offset = Path::from(format!("{}/{}", keys::PACK_INDEXES, PackId::floor_of(floor)));
                self.objects.list_with_offset(Some(&dir), &offset)
            }
        };
        let listed: Vec<PackId> = listing
            .try_filter_map(|meta| async move { Ok(meta.location.filename().and_then(PackId::parse)) })
            .try_collect()
            .await?;
        let newest = listed.iter().map(PackId::millis).max();
        let unseen: Vec<PackId> = {
            let index = self.index.read().expect("index lock");
            listed.into_iter().filter(|p| !index.has_seen(p)).collect()
        };
        let loaded: Vec<(PackId, Option<Vec<pack::IndexEntry>>)> = futures::stream::iter(unseen)
            .map(|id| async move {
                let key = keys::pack_index(&id);
                let bytes = match self.objects.get(&key).await {
                    Ok(r) => r.bytes().await?,
                    // Listed, then gone: only GC deletes indexes, and then the pack is gone too.
                    Err(object_store::Error::NotFound { .. }) => return Ok((id, None)),
                    Err(e) => return Err(StoreError::from(e)),
                };
                match pack::decode_index(&bytes) {
                    Ok(entries) => Ok((id, Some(entries))),
                    Err(why) => {
                        tracing::error!(key = %key, why, "unreadable pack index: its chunks are treated as absent");
                        Ok((id, None))
                    }
                }
            })
            .buffer_unordered(INDEX_READS)
            .try_collect()
            .await?;
        let mut index = self.index.write().expect("index lock");
        for (id, entries) in loaded {
            match entries {
                Some(entries) => index.insert(id, &entries),
                None => index.skip(id),
            }
        }
        tracing::debug!(chunks = index.len(), "chunk index refreshed");
        drop(index);
        // With nothing stored yet this stays `None`: the next refresh lists everything,
        // which is still one request.
        state.newest_millis = state.newest_millis.max(newest);
        state.last_started = Some(started);
        if newest_seen.is_none() {
            state.last_full = Some(started);
        }
        Ok(())
    }

    /// For each id, whether the chunk is stored. Ids the index does not know cost one index
    /// refresh (one LIST, plus one GET per pack index not read before) for the whole call.
    pub async fn which_present(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let asked_at = Instant::now();
        let mut present: Vec<bool> = ids.iter().map(|id| self.is_known_chunk(id)).collect();
        if present.iter().all(|p| *p) {
            return Ok(present);
        }
        self.refresh_index(asked_at).await?;
        for (p, id) in present.iter_mut().zip(ids) {
            *p = *p || self.is_known_chunk(id);
        }
        Ok(present)
    }

    /// True when the chunk is stored.
    pub async fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.which_present(std::slice::from_ref(id)).await?[0])
    }

    /// Locations of `ids`, refreshing the index once if some are unknown. An id stored
    /// nowhere is an error: callers read chunks that a committed recipe references.
    async fn locate_all(&self, ids: &[ChunkId]) -> Result<Vec<(PackId, Location)>> {
        let asked_at = Instant::now();
        if ids.iter().any(|id| !self.is_known_chunk(id)) {
            self.refresh_index(asked_at).await?;
        }
        if ids.iter().any(|id| !self.is_known_chunk(id)) {
            self.refresh_index_from(asked_at, true).await?;
        }
        ids.iter()
            .map(|id| {
                self.locate(id).ok_or_else(|| StoreError::Corrupt {
                    key: format!("chunk {id}"),
                    why: "referenced chunk is not stored".into(),
                })
            })
            .collect()
    }

    // ---- writing ----

    /// A writer that packs new chunks (see [`ChunkWriter`]).
    pub fn chunk_writer(self: &Arc<Self>) -> ChunkWriter {
        ChunkWriter {
            store: self.clone(),
            current: PackBuilder::new(),
            taken: HashSet::new(),
            flushes: FuturesUnordered::new(),
            stored: 0,
        }
    }

    /// Stores verified chunks (those not already stored), in as few packs as fit; returns
    /// how many were new.
    pub async fn store_chunks(self: &Arc<Self>, chunks: &[(ChunkId, EncodedChunk)]) -> Result<usize> {
        let mut writer = self.chunk_writer();
        for (id, chunk) in chunks {
            writer.add(*id, chunk).await?;
        }
        writer.finish().await
    }

    /// Uploads one pack, then its index, then makes its chunks known. Packs have fresh
    /// names, so a retried PUT rewrites the same bytes: safe without conditional writes.
    async fn write_pack(&self, pack: PackBuilder) -> Result<()> {
        let (body, entries) = pack.finish();
        let id = PackId::generate();
        self.objects.put(&keys::pack(&id), PutPayload::from(body)).await?;
        self.objects.put(&keys::pack_index(&id), PutPayload::from(pack::encode_index(&entries))).await?;
        self.index.write().expect("index lock").insert(id, &entries);
        Ok(())
    }

    // ---- reading ----

    /// The stored frames of `ids`, in order, unverified (callers decode with the id, which
    /// verifies). Neighbouring frames are fetched together.
    pub fn chunk_frames(
        self: &Arc<Self>,
        ids: Vec<ChunkId>,
    ) -> BoxStream<'static, Result<(ChunkId, EncodedChunk)>> {
        self.chunk_frames_sized(ids.into_iter().map(|id| (id, None)))
    }

    /// Like [`Store::chunk_frames`], each id with the uncompressed length its recipe
    /// declares: a stored frame of another length is refused before it is used.
    pub(crate) fn chunk_frames_sized(
        self: &Arc<Self>,
        wanted: impl Iterator<Item = (ChunkId, Option<u32>)> + Send + 'static,
    ) -> BoxStream<'static, Result<(ChunkId, EncodedChunk)>> {
        self.planned_reads(Box::new(wanted), false)
            .map_ok(|window| {
                futures::stream::iter(window.into_iter().map(|(id, read)| match read {
                    WindowRead::Frame(frame) => Ok((id, frame)),
                    WindowRead::Data(_) => unreachable!("frames were asked for"),
                }))
            })
            .try_flatten()
            .boxed()
    }

    /// The content of `ids`, in order, each decoded and verified against its id.
    pub fn read_chunks(self: &Arc<Self>, ids: Vec<ChunkId>) -> BoxStream<'static, Result<Bytes>> {
        self.read_chunks_sized(ids.into_iter().map(|id| (id, None)))
    }

    /// Like [`Store::read_chunks`], each id with the uncompressed length its recipe
    /// declares (checked against the frame header before anything is decompressed). The
    /// ids are taken lazily, a window at a time, so a reader of a huge recipe holds only
    /// the windows in flight; a chunk named several times in one window is decoded once.
    pub(crate) fn read_chunks_sized(
        self: &Arc<Self>,
        wanted: impl Iterator<Item = (ChunkId, Option<u32>)> + Send + 'static,
    ) -> BoxStream<'static, Result<Bytes>> {
        self.planned_reads(Box::new(wanted), true)
            .map_ok(|window| {
                futures::stream::iter(window.into_iter().map(|(_, read)| match read {
                    WindowRead::Data(data) => Ok(data),
                    WindowRead::Frame(_) => unreachable!("content was asked for"),
                }))
            })
            .try_flatten()
            .boxed()
    }

    /// Reads `wanted` window by window (`WINDOW_RAW_BYTES` of distinct uncompressed chunk
    /// bytes or `WINDOW_CHUNKS` entries each, `WINDOWS_AHEAD` windows ahead): each window
    /// is located, fetched with the few ranged GETs [`pack::plan_window`] plans, and yields
    /// its entries in request order (with `decode`, their verified content, decoded off the
    /// async threads). Budgets count uncompressed bytes: a frame's payload is never larger
    /// than its chunk, so they bound the compressed bytes too.
    fn planned_reads(
        self: &Arc<Self>,
        wanted: Box<dyn Iterator<Item = (ChunkId, Option<u32>)> + Send>,
        decode: bool,
    ) -> BoxStream<'static, Result<Vec<(ChunkId, WindowRead)>>> {
        let store = self.clone();
        futures::stream::iter(Windows { wanted: wanted.peekable() })
            .map(move |window| {
                let store = store.clone();
                async move { store.fetch_window(window, decode).await }
            })
            .buffered(WINDOWS_AHEAD)
            .boxed()
    }

    /// Fetches a window; when a pack was deleted under it (GC rewrote it since the reader
    /// located its chunks), locates the chunks again and fetches once more.
    async fn fetch_window(
        &self,
        wanted: Vec<(ChunkId, Option<u32>)>,
        decode: bool,
    ) -> Result<Vec<(ChunkId, WindowRead)>> {
        let result = match self.fetch_window_once(&wanted, decode).await {
            // A pack gone under us: GC on another replica swept it, or rewrote it with the
            // live chunks copied elsewhere. A replica that only reads never applied that
            // sweep record; applying it forgets the old pack, and the read finds the copy.
            Err(StoreError::Backend(object_store::Error::NotFound { .. })) => {
                drop(self.sync_sweeps().await?);
                self.fetch_window_once(&wanted, decode).await
            }
            other => other,
        };
        // Stored frames that are short or fail verification: drop them from the index so
        // the next push stores them again (storage::heal).
        if let Err(StoreError::Corrupt { .. } | StoreError::Backend(object_store::Error::Generic { .. })) =
            &result
        {
            let ids: Vec<ChunkId> = wanted.iter().map(|(id, _)| *id).collect();
            if let Ok(located) = self.locate_all(&ids).await {
                self.heal_packs(located.into_iter().map(|(pack, _)| pack).collect::<HashSet<PackId>>()).await;
            }
        }
        result
    }

    async fn fetch_window_once(
        &self,
        wanted: &[(ChunkId, Option<u32>)],
        decode: bool,
    ) -> Result<Vec<(ChunkId, WindowRead)>> {
        // Each distinct chunk of the window is read and decoded once.
        let mut slot_of: HashMap<ChunkId, usize> = HashMap::new();
        let mut distinct: Vec<(ChunkId, Option<u32>)> = Vec::new();
        let slots: Vec<usize> = wanted
            .iter()
            .map(|&(id, len)| {
                *slot_of.entry(id).or_insert_with(|| {
                    distinct.push((id, len));
                    distinct.len() - 1
                })
            })
            .collect();
        let ids: Vec<ChunkId> = distinct.iter().map(|(id, _)| *id).collect();
        let located = self.locate_all(&ids).await?;
        let frames: Vec<(PackId, Range<u64>)> =
            located.iter().map(|(p, loc)| (p.clone(), loc.range())).collect();
        let mut plan = pack::plan_window(&frames, MAX_GAP, MAX_READ);
        // Gaps read and dropped must not multiply a window's bytes: frames chosen far apart
        // (a few bytes each, 256 KiB of other chunks between) are read exactly instead.
        let frame_bytes: u64 = frames.iter().map(|(_, r)| r.end - r.start).sum();
        let read_bytes: u64 = plan.reads.iter().map(|(_, r)| r.end - r.start).sum();
        if read_bytes > frame_bytes + MAX_GAP_OVERHEAD {
            plan = pack::plan_window(&frames, 0, MAX_READ);
        }
        let bodies: Vec<Bytes> = futures::stream::iter(plan.reads)
            .map(|(pack, range)| async move {
                let key = keys::pack(&pack);
                let bytes = self.objects.get_range(&key, range.clone()).await?;
                if bytes.len() as u64 != range.end - range.start {
                    return Err(corrupt(&key, format!("range {range:?} returned {} bytes", bytes.len())));
                }
                Ok(bytes)
            })
            .buffered(READ_AHEAD)
            .try_collect()
            .await?;
        let parse = move || -> Result<Vec<WindowRead>> {
            distinct
                .into_iter()
                .zip(located)
                .zip(plan.picks)
                .map(|(((id, declared), (pack, _)), (n, r))| {
                    let key = || keys::pack(&pack);
                    let frame = EncodedChunk::from_frame(&bodies[n][r]).map_err(|e| corrupt(&key(), e))?;
                    // Refuse a length the recipe does not declare before decompressing.
                    if let Some(declared) = declared {
                        if frame.raw_len != declared {
                            return Err(StoreError::ChunkLength { id, stored: frame.raw_len, declared });
                        }
                    }
                    if decode {
                        Ok(WindowRead::Data(Bytes::from(frame.decode(&id).map_err(|e| corrupt(&key(), e))?)))
                    } else {
                        Ok(WindowRead::Frame(frame))
                    }
                })
                .collect()
        };
        let reads = if decode {
            tokio::task::spawn_blocking(parse).await.map_err(|e| StoreError::Corrupt {
                key: keys::PACKS.to_owned(),
                why: format!("decoding task failed: {e}"),
            })??
        } else {
            parse()?
        };
        Ok(wanted.iter().zip(slots).map(|((id, _), slot)| (*id, reads[slot].clone())).collect())
    }

    /// A chunk's stored frame, unverified: `None` when it is not stored.
    pub async fn get_chunk(self: &Arc<Self>, id: &ChunkId) -> Result<Option<EncodedChunk>> {
        if !self.has_chunk(id).await? {
            return Ok(None);
        }
        let mut frames = self.chunk_frames(vec![*id]);
        Ok(frames.try_next().await?.map(|(_, frame)| frame))
    }

    /// Reads a chunk and verifies its content against its id.
    pub async fn read_chunk(self: &Arc<Self>, id: &ChunkId) -> Result<Bytes> {
        let mut chunks = self.read_chunks(vec![*id]);
        chunks.try_next().await?.ok_or_else(|| StoreError::Corrupt {
            key: format!("chunk {id}"),
            why: "referenced chunk is missing".into(),
        })
    }
}

/// Collects new chunks into packs and uploads each pack as it fills, a couple at a time
/// (backpressure for the caller: `add` waits while `FLUSHES_IN_FLIGHT` packs upload).
/// Chunks the index knows, and chunks added before, are skipped. Nothing is stored until
/// a pack is full or [`ChunkWriter::finish`] runs; a writer dropped before `finish` may
/// leave the packs it had started uploading (unreferenced, harmless).
pub struct ChunkWriter {
    store: Arc<Store>,
    current: PackBuilder,
    taken: HashSet<ChunkId>,
    flushes: FuturesUnordered<tokio::task::JoinHandle<Result<()>>>,
    stored: usize,
}

impl ChunkWriter {
    /// Adds a verified chunk; returns false when it is already stored or added.
    pub async fn add(&mut self, id: ChunkId, chunk: &EncodedChunk) -> Result<bool> {
        if self.store.is_known_chunk(&id) || !self.taken.insert(id) {
            return Ok(false);
        }
        self.current.push(id, chunk.codec as u8, chunk.raw_len, &chunk.payload);
        self.stored += 1;
        if self.current.len() >= self.store.pack_target {
            self.flush().await?;
        }
        Ok(true)
    }

    async fn flush(&mut self) -> Result<()> {
        let pack = std::mem::replace(&mut self.current, PackBuilder::new());
        while self.flushes.len() >= FLUSHES_IN_FLIGHT {
            self.next_flush().await?;
        }
        let store = self.store.clone();
        self.flushes.push(tokio::spawn(async move { store.write_pack(pack).await }));
        Ok(())
    }

    async fn next_flush(&mut self) -> Result<()> {
        match self.flushes.next().await {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(StoreError::Backend(object_store::Error::Generic {
                store: "pack writer",
                source: Box::new(e),
            })),
        }
    }

    /// Uploads what is left and waits for every pack; returns how many chunks were new.
    pub async fn finish(mut self) -> Result<usize> {
        if !self.current.is_empty() {
            self.flush().await?;
        }
        while !self.flushes.is_empty() {
            self.next_flush().await?;
        }
        Ok(self.stored)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use object_store::memory::InMemory;
    use object_store::{
        GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
        PutOptions, PutResult,
    };

    use super::*;
    use crate::storage::metrics::{Counted, StorageMetrics};

    /// Lets `puts_left` PUTs through, then fails every PUT (the S3 server went away).
    #[derive(Debug)]
    struct FailingPuts {
        inner: InMemory,
        puts_left: AtomicUsize,
    }

    impl std::fmt::Display for FailingPuts {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("FailingPuts")
        }
    }

    #[async_trait]
    impl ObjectStore for FailingPuts {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            let left = self.puts_left.load(Ordering::SeqCst);
            if left == 0 {
                return Err(object_store::Error::Generic { store: "test", source: "S3 is gone".into() });
            }
            self.puts_left.store(left - 1, Ordering::SeqCst);
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }
        async fn delete(&self, location: &Path) -> object_store::Result<()> {
            self.inner.delete(location).await
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }
        async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    fn chunks(n: usize) -> Vec<(ChunkId, EncodedChunk)> {
        (0..n)
            .map(|i| {
                let data: Vec<u8> = (0..30_000u32).map(|j| (j as usize * 7 + i * 13) as u8).collect();
                (ChunkId::of(&data), EncodedChunk::compress(&data, 1))
            })
            .collect()
    }

    #[test]
    fn windows_are_bounded_in_distinct_uncompressed_bytes() {
        let id = |i: u8| ChunkId::of(&[i]);
        let windows = |wanted: Vec<(ChunkId, Option<u32>)>| -> Vec<usize> {
            let wanted: Box<dyn Iterator<Item = (ChunkId, Option<u32>)> + Send> =
                Box::new(wanted.into_iter());
            Windows { wanted: wanted.peekable() }.map(|w| w.len()).collect()
        };
        // One 4 MiB chunk named 10,000 times costs 4 MiB per window: windows end at the
        // entry cap, not earlier, and no window holds it twice.
        assert_eq!(windows(vec![(id(0), Some(MAX_CHUNK_LEN)); 10_000]), vec![4096, 4096, 1808]);
        // Eight distinct 4 MiB chunks: four per 16 MiB window.
        assert_eq!(windows((0..8).map(|i| (id(i), Some(MAX_CHUNK_LEN))).collect()), vec![4, 4]);
        // Unknown lengths count as the largest chunk.
        assert_eq!(windows((0..5).map(|i| (id(i), None)).collect()), vec![4, 1]);
    }

    #[tokio::test]
    async fn a_failed_pack_or_index_write_never_makes_chunks_known() {
        // 0: the pack PUT fails; 1: the pack lands, its index PUT fails.
        for puts_left in [0, 1] {
            let objects =
                Arc::new(FailingPuts { inner: InMemory::new(), puts_left: AtomicUsize::new(puts_left) });
            let store = Arc::new(Store::new(objects.clone()));
            let set = chunks(5);
            assert!(
                store.store_chunks(&set).await.is_err(),
                "the write must fail ({puts_left} PUTs allowed)"
            );
            let ids: Vec<ChunkId> = set.iter().map(|(id, _)| *id).collect();
            assert!(ids.iter().all(|id| !store.is_known_chunk(id)));
            let cold = Store::new(objects);
            assert_eq!(cold.which_present(&ids).await.unwrap(), vec![false; 5], "{puts_left} PUTs allowed");
        }
    }

    #[tokio::test]
    async fn storing_and_reading_many_chunks_takes_few_requests() {
        let metrics = StorageMetrics::new();
        let store = Arc::new(Store::new(Arc::new(Counted::new(Arc::new(InMemory::new()), metrics.clone()))));
        let set = chunks(100);
        let ids: Vec<ChunkId> = set.iter().map(|(id, _)| *id).collect();

        let before = metrics.snapshot();
        assert_eq!(store.which_present(&ids).await.unwrap(), vec![false; 100]);
        assert_eq!(store.store_chunks(&set).await.unwrap(), 100);
        let write = metrics.snapshot().since(&before);
        assert_eq!((write.lists, write.puts, write.requests()), (1, 2, 3), "one LIST, one pack, one index");

        let before = metrics.snapshot();
        assert_eq!(store.which_present(&ids).await.unwrap(), vec![true; 100]);
        let mut backwards = ids.clone();
        backwards.reverse();
        backwards.extend_from_slice(&ids[..10]);
        // With their declared lengths (as every recipe reader passes them) the 110 chunks
        // fit one window; without, each would be budgeted as the largest chunk.
        let sized = backwards.into_iter().map(|id| (id, Some(30_000)));
        let read: Vec<Bytes> = store.read_chunks_sized(sized).try_collect().await.unwrap();
        assert_eq!(read.len(), 110);
        let reading = metrics.snapshot().since(&before);
        assert_eq!((reading.gets, reading.requests()), (1, 1), "110 chunks of one pack: one ranged GET");
    }
}
