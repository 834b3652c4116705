//! Where a lazily restored memory file's chunks come from, and the file they go into.
//!
//! Each distinct chunk is `Missing`, `InFlight` (one batch fetching it; everyone who needs
//! it waits for that batch) or `Written` (verified, and in the file). Chunks come from a
//! cached snapshot holding them (read, then checked against their id) or from the registry
//! (`_thaw/chunks/fetch`, decoded and checked against their id); a chunk that fails its
//! check is never handed out, only fetched again. A `Written` chunk read back for a fault is
//! checked again: while a file is being filled, no byte reaches guest memory without its
//! BLAKE3 id matching. A *complete* file (a cached snapshot, verified when it was recorded:
//! by the chunk chain or against its sha256, D30) is served as an eager restore serves it, straight from the
//! file: [`MemoryFill::read_complete`], on the fault loop, with no task, chunk lookup or
//! hash in between.
//!
//! Faults fetch exactly the chunks of the unit they need, at once, up to
//! [`FAULT_FETCHES`] requests in flight; the background fill fetches a working set's chunks
//! first, in its order, then walks the file in order, with at most [`BACKGROUND_FETCHES`]
//! batches in flight, so a fault never queues behind more than that on the link. A fill
//! made for a first restore also records which chunks the VMs touch first
//! ([`MemoryFill::record_unit`]).

use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt as _, Shared};
use futures::StreamExt as _;
use thaw_client::blob::ChunkSource;
use thaw_client::Registry;
use thaw_schema::{ChunkId, Recipe, RecipeEntry, Sha256Digest};
use tokio::sync::Semaphore;

use super::layout::Layout;
use super::working_set::Recorder;
use super::LazyMetrics;

/// Fetches for faults in flight at once.
pub(crate) const FAULT_FETCHES: usize = 8;
/// Background batches in flight at once.
pub(crate) const BACKGROUND_FETCHES: usize = 2;
/// Uncompressed bytes in one background batch.
const BACKGROUND_BATCH_BYTES: u64 = 4 * 1024 * 1024;
/// How long one fetch may take before it counts as failed and is tried again: a stalled
/// registry must not leave a VM waiting on the client's own (much longer) read timeout.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A chunk wanted, with its length.
type Wanted = (ChunkId, u32);
/// Verified chunk bytes by id.
type Chunks = HashMap<ChunkId, Arc<Vec<u8>>>;
type Batch = Shared<BoxFuture<'static, Result<Arc<Chunks>, Arc<String>>>>;

enum Slot {
    Missing,
    InFlight(Batch),
    Written,
}

/// A chunk held in a file of a cached snapshot (pinned while this fill runs).
#[derive(Debug, Clone)]
pub(crate) struct LocalCopy {
    pub(crate) path: PathBuf,
    pub(crate) offset: u64,
}

/// Where missing chunks are fetched from: peers holding the snapshot (when P2P is on),
/// then the registry.
pub(crate) struct Remote {
    pub(crate) peers: Option<Arc<dyn ChunkSource>>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) repository: String,
}

/// Bytes by where they came from.
#[derive(Debug, Default)]
pub(crate) struct FillCounters {
    pub(crate) local_bytes: AtomicU64,
    pub(crate) peer_bytes: AtomicU64,
    pub(crate) registry_bytes: AtomicU64,
}

/// One memory file, being filled or complete.
pub(crate) struct MemoryFill {
    recipe: Recipe,
    file: std::fs::File,
    /// Offsets in the file of every occurrence of each distinct chunk, and its length.
    placements: HashMap<ChunkId, (u32, Vec<u64>)>,
    slots: Mutex<HashMap<ChunkId, Slot>>,
    local: HashMap<ChunkId, LocalCopy>,
    remote: Option<Remote>,
    fault_fetches: Arc<Semaphore>,
    layouts: Mutex<HashMap<u64, Arc<Layout>>>,
    pub(crate) counters: FillCounters,
    metrics: Arc<LazyMetrics>,
    /// The first-touch order of the recipe's entries, when this restore records it.
    recorder: Option<Recorder>,
}

impl std::fmt::Debug for MemoryFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryFill").field("blob", &self.recipe.digest).finish_non_exhaustive()
    }
}

impl MemoryFill {
    fn new(
        recipe: Recipe,
        file: std::fs::File,
        local: HashMap<ChunkId, LocalCopy>,
        remote: Option<Remote>,
        metrics: Arc<LazyMetrics>,
    ) -> Self {
        let mut placements: HashMap<ChunkId, (u32, Vec<u64>)> = HashMap::new();
        let mut offset = 0u64;
        for e in &recipe.entries {
            if let RecipeEntry::Data { len, id } = e {
                placements.entry(*id).or_insert_with(|| (*len, Vec::new())).1.push(offset);
            }
            offset += u64::from(e.byte_len());
        }
        let complete = remote.is_none();
        let slots =
            placements.keys().map(|id| (*id, if complete { Slot::Written } else { Slot::Missing })).collect();
        Self {
            recipe,
            file,
            placements,
            slots: Mutex::new(slots),
            local,
            remote,
            fault_fetches: Arc::new(Semaphore::new(FAULT_FETCHES)),
            layouts: Mutex::default(),
            counters: FillCounters::default(),
            metrics,
            recorder: None,
        }
    }

    /// The same fill, recording which chunks the VMs touch first when `on`.
    pub(crate) fn recording(mut self, on: bool) -> Self {
        self.recorder = on.then(|| Recorder::new(self.recipe.entries.len()));
        self
    }

    /// The first-touch recorder, when this fill records.
    pub(crate) fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    /// Records that a VM touched unit `u` of `layout` for the first time. Called by the
    /// page server's event loop: no lock, no allocation (`working_set.rs`).
    pub(crate) fn record_unit(&self, layout: &Layout, u: usize) {
        if let Some(r) = &self.recorder {
            r.record(layout.data_entries_of(u));
        }
    }

    /// The memory file's recipe.
    pub(crate) fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    /// A complete, verified memory file (a cached snapshot): every chunk is read from it.
    pub(crate) fn complete(recipe: Recipe, file: std::fs::File, metrics: Arc<LazyMetrics>) -> Self {
        Self::new(recipe, file, HashMap::new(), None, metrics)
    }

    /// A memory file to fill: `file` has the recipe's size and holds nothing yet.
    pub(crate) fn filling(
        recipe: Recipe,
        file: std::fs::File,
        local: HashMap<ChunkId, LocalCopy>,
        remote: Remote,
        metrics: Arc<LazyMetrics>,
    ) -> Self {
        Self::new(recipe, file, local, Some(remote), metrics)
    }

    /// The memory file's digest and size.
    pub(crate) fn blob(&self) -> (Sha256Digest, u64) {
        (self.recipe.digest, self.recipe.size)
    }

    /// The file's units for `page`-byte pages.
    pub(crate) fn layout(&self, page: u64) -> Arc<Layout> {
        let mut layouts = self.layouts.lock().expect("layouts lock");
        layouts.entry(page).or_insert_with(|| Arc::new(Layout::new(&self.recipe, page))).clone()
    }

    /// Whether every chunk is in the file, verified: a cached snapshot's memory file.
    pub(crate) fn is_complete(&self) -> bool {
        self.remote.is_none()
    }

    /// For a complete file ([`Self::is_complete`]), reads `buf.len()` bytes at `offset`
    /// (zeros past the end of the file: the last unit reaches to a page boundary). `None`
    /// while the file is being filled. The file was verified when it was recorded and
    /// an eager restore hands the very same file to the VMM, so it is not checked again
    /// here: a fault on a cached snapshot costs a `pread` and a copy.
    pub(crate) fn read_complete(&self, offset: u64, buf: &mut [u8]) -> Option<std::io::Result<()>> {
        if !self.is_complete() {
            return None;
        }
        let in_file = (self.recipe.size.saturating_sub(offset)).min(buf.len() as u64) as usize;
        buf[in_file..].fill(0);
        Some(self.file.read_exact_at(&mut buf[..in_file], offset))
    }

    /// The bytes of unit `u` of `layout`, every chunk in it checked against its id; `None`
    /// when the unit is all zeros. Fetches what is missing, ahead of the background fill.
    pub(crate) async fn unit_bytes(
        self: &Arc<Self>,
        layout: &Layout,
        u: usize,
    ) -> Result<Option<Vec<u8>>, String> {
        let chunks = layout.chunks_of(u);
        if chunks.is_empty() {
            return Ok(None);
        }
        let bytes = self.get(&chunks, true).await?;
        let range = layout.unit_range(u);
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        for (start, entry) in layout.entries_of(u) {
            if let RecipeEntry::Data { len, id } = entry {
                let data = bytes.get(&id).ok_or_else(|| format!("chunk {id} went missing"))?;
                let from = start.max(range.start);
                let to = (start + u64::from(len)).min(range.end);
                buf[(from - range.start) as usize..(to - range.start) as usize]
                    .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
            }
        }
        Ok(Some(buf))
    }

    /// Makes `ids` present and, when `for_fault`, answers their verified bytes.
    async fn get(self: &Arc<Self>, ids: &[(ChunkId, u32)], for_fault: bool) -> Result<Chunks, String> {
        let mut waits = Vec::new();
        let mut written = Vec::new();
        {
            let mut slots = self.slots.lock().expect("slots lock");
            let mut missing = Vec::new();
            for (id, len) in ids {
                match slots.get(id) {
                    Some(Slot::Written) => written.push(*id),
                    Some(Slot::InFlight(batch)) => waits.push(batch.clone()),
                    Some(Slot::Missing) => missing.push((*id, *len)),
                    None => return Err(format!("chunk {id} is not in the recipe")),
                }
            }
            if !missing.is_empty() {
                let batch = self.launch(missing.clone(), for_fault);
                for (id, _) in &missing {
                    slots.insert(*id, Slot::InFlight(batch.clone()));
                }
                waits.push(batch);
            }
        }
        let mut out = Chunks::new();
        for batch in waits {
            let got = batch.await.map_err(|e| e.to_string())?;
            if for_fault {
                for (id, _) in ids {
                    if let Some(b) = got.get(id) {
                        out.insert(*id, b.clone());
                    }
                }
            }
        }
        if for_fault && !written.is_empty() {
            let fill = self.clone();
            let read = tokio::task::spawn_blocking(move || fill.read_written(&written))
                .await
                .map_err(|e| format!("read task: {e}"))??;
            out.extend(read);
        }
        Ok(out)
    }

    /// Reads `Written` chunks back from the file, each checked against its id. A chunk that
    /// fails is marked missing (fetched again) and the call fails.
    fn read_written(&self, ids: &[ChunkId]) -> Result<Chunks, String> {
        let mut out = Chunks::new();
        for id in ids {
            let (len, offsets) = &self.placements[id];
            let mut buf = vec![0u8; *len as usize];
            let ok = self.file.read_exact_at(&mut buf, offsets[0]).is_ok() && ChunkId::of(&buf) == *id;
            if !ok {
                tracing::error!(chunk = %id, "a chunk of the memory file being served does not match its id; fetching it again");
                self.slots.lock().expect("slots lock").insert(*id, Slot::Missing);
                return Err(format!("chunk {id} in the memory file is damaged"));
            }
            out.insert(*id, Arc::new(buf));
        }
        Ok(out)
    }

    /// Starts one batch: fetched, verified, written into the file, marked `Written`; on
    /// failure marked `Missing` again. Runs as its own task, so it completes even if every
    /// waiter gives up.
    fn launch(self: &Arc<Self>, ids: Vec<(ChunkId, u32)>, for_fault: bool) -> Batch {
        let fill = self.clone();
        let task = tokio::spawn(async move {
            let _slot = if for_fault { fill.fault_fetches.clone().acquire_owned().await.ok() } else { None };
            let fetched = match tokio::time::timeout(FETCH_TIMEOUT, fill.fetch(&ids)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
            };
            let chunks = match fetched {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    fill.metrics.fetch_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(chunks = ids.len(), error = %e, "fetching chunks of a memory file being served failed");
                    let mut slots = fill.slots.lock().expect("slots lock");
                    for (id, _) in &ids {
                        slots.insert(*id, Slot::Missing);
                    }
                    return Err(Arc::new(e));
                }
            };
            let (writer, written) = (fill.clone(), chunks.clone());
            let stored = tokio::task::spawn_blocking(move || writer.write(&written)).await;
            let stored = matches!(stored, Ok(Ok(())));
            let mut slots = fill.slots.lock().expect("slots lock");
            for (id, _) in &ids {
                // Bytes that could not be written are still good to serve; the background
                // fill writes them later.
                slots.insert(*id, if stored { Slot::Written } else { Slot::Missing });
            }
            Ok(chunks)
        });
        async move { task.await.unwrap_or_else(|e| Err(Arc::new(format!("fetch task: {e}")))) }
            .boxed()
            .shared()
    }

    /// Gets `ids`: from cached snapshots where held (checked), else from the registry
    /// (checked by decoding against the id).
    async fn fetch(self: &Arc<Self>, ids: &[(ChunkId, u32)]) -> Result<Chunks, String> {
        let (local, remote): (Vec<Wanted>, Vec<Wanted>) =
            ids.iter().copied().partition(|(id, _)| self.local.contains_key(id));
        let mut out = Chunks::new();
        let mut from_registry: Vec<ChunkId> = remote.iter().map(|(id, _)| *id).collect();
        if !local.is_empty() {
            let fill = self.clone();
            let read = tokio::task::spawn_blocking(move || {
                local
                    .into_iter()
                    .map(|(id, len)| {
                        let place = &fill.local[&id];
                        let mut buf = vec![0u8; len as usize];
                        let ok = std::fs::File::open(&place.path)
                            .and_then(|f| f.read_exact_at(&mut buf, place.offset))
                            .is_ok()
                            && ChunkId::of(&buf) == id;
                        (id, ok.then_some(buf))
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| format!("read task: {e}"))?;
            for (id, bytes) in read {
                match bytes {
                    Some(b) => {
                        self.counters.local_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                        self.metrics.local_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                        out.insert(id, Arc::new(b));
                    }
                    None => {
                        tracing::warn!(chunk = %id, "a cached copy of a chunk failed its check; fetching it");
                        from_registry.push(id);
                    }
                }
            }
        }
        if from_registry.is_empty() {
            return Ok(out);
        }
        let remote = self.remote.as_ref().ok_or("a complete memory file lacks a chunk")?;
        if let Some(peers) = &remote.peers {
            let asked: Vec<Wanted> = remote_ids(ids, &from_registry);
            // The peer source checks every chunk; checked again here, at this boundary.
            for (id, bytes) in peers.fetch(self.recipe.digest, &asked).await {
                let wanted_len = asked.iter().find(|(a, _)| *a == id).map(|(_, l)| *l as usize);
                if wanted_len == Some(bytes.len()) && !out.contains_key(&id) && ChunkId::of(&bytes) == id {
                    self.counters.peer_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    self.metrics.peer_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    out.insert(id, Arc::new(bytes));
                }
            }
            from_registry.retain(|id| !out.contains_key(id));
        }
        if !from_registry.is_empty() {
            let frames = remote
                .registry
                .fetch_chunks(&remote.repository, &self.recipe.digest, &from_registry)
                .await
                .map_err(|e| e.to_string())?;
            let decoded = tokio::task::spawn_blocking(move || {
                frames
                    .into_iter()
                    .map(|(id, frame)| {
                        frame.decode(&id).map(|b| (id, b)).map_err(|e| format!("chunk {id}: {e}"))
                    })
                    .collect::<Result<Vec<_>, String>>()
            })
            .await
            .map_err(|e| format!("decode task: {e}"))??;
            for (id, bytes) in decoded {
                self.counters.registry_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.metrics.registry_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                out.insert(id, Arc::new(bytes));
            }
        }
        Ok(out)
    }

    /// Writes verified chunks at every offset they occupy.
    fn write(&self, chunks: &Chunks) -> std::io::Result<()> {
        for (id, bytes) in chunks {
            for offset in &self.placements[id].1 {
                self.file.write_all_at(bytes, *offset)?;
            }
        }
        Ok(())
    }

    /// Fills every chunk the faults have not: first those of the recipe entries in `first`
    /// (a working set, checked against the recipe), in that order, all of them before any
    /// other is asked for; then the rest in file order. Retries failed batches with backoff
    /// while `wanted()` (someone still holds a lease on the snapshot); then syncs the file.
    /// Fails when nobody wants the snapshot any more and a batch failed.
    pub(crate) async fn run_background(
        self: &Arc<Self>,
        first: &[usize],
        wanted: impl Fn() -> bool,
    ) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        let mut pick = |entries: &mut dyn Iterator<Item = &RecipeEntry>| -> Vec<Wanted> {
            entries
                .filter_map(|e| match e {
                    RecipeEntry::Data { len, id } if seen.insert(*id) => Some((*id, *len)),
                    _ => None,
                })
                .collect()
        };
        let working_set = pick(&mut first.iter().filter_map(|&i| self.recipe.entries.get(i)));
        let rest = pick(&mut self.recipe.entries.iter());
        for phase in [working_set, rest] {
            let results: Vec<Result<(), String>> = futures::stream::iter(batches(phase))
                .map(|batch| self.fill_batch(batch, &wanted))
                .buffer_unordered(BACKGROUND_FETCHES)
                .collect()
                .await;
            results.into_iter().collect::<Result<(), String>>()?;
        }
        let fill = self.clone();
        tokio::task::spawn_blocking(move || fill.file.sync_all())
            .await
            .map_err(|e| format!("sync task: {e}"))?
            .map_err(|e| format!("syncing the memory file: {e}"))
    }

    async fn fill_batch(
        self: &Arc<Self>,
        batch: Vec<(ChunkId, u32)>,
        wanted: &impl Fn() -> bool,
    ) -> Result<(), String> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = self.get(&batch, false).await;
            let all_written = {
                let slots = self.slots.lock().expect("slots lock");
                batch.iter().all(|(id, _)| matches!(slots.get(id), Some(Slot::Written)))
            };
            match result {
                Ok(_) if all_written => return Ok(()),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "background fill: a batch failed; retrying"),
            }
            if !wanted() {
                return Err("no lease holds the snapshot any more".into());
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// `chunks` cut, in order, into background batches of at most [`BACKGROUND_BATCH_BYTES`].
fn batches(chunks: Vec<Wanted>) -> Vec<Vec<Wanted>> {
    let mut batches: Vec<Vec<Wanted>> = Vec::new();
    let mut bytes = 0u64;
    for c in chunks {
        if batches.is_empty() || bytes + u64::from(c.1) > BACKGROUND_BATCH_BYTES {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += u64::from(c.1);
        batches.last_mut().expect("pushed").push(c);
    }
    batches
}

/// The entries of `ids` named in `wanted`, with their lengths.
fn remote_ids(ids: &[Wanted], wanted: &[ChunkId]) -> Vec<Wanted> {
    ids.iter().filter(|(id, _)| wanted.contains(id)).copied().collect()
}
