//! `ensure` in lazy mode (`"memory": "uffd"`): the cache's side of it. The page server
//! itself is `crate::lazy`.
//!
//! A miss writes the snapshot's files but the memory file into `work/` as an eager restore
//! does (verified), takes a lease with private copies of them, starts the lease's page
//! server over a memory file that is filled in the background, and answers. The background
//! fill first looks for the snapshot's working set (`working_set.rs`) and fetches its chunks
//! first; without one, the page server records one for publishing. The background fill
//! holds the digest's flight lock, the reservation and the pins an eager restore would
//! hold; when the memory file is complete it is checked against its digest, the
//! directory is moved into `snapshots/` and recorded, and the leases taken meanwhile are
//! written to the index. A crash before that leaves only `work/`, emptied at start, and
//! leases the index never held: the cache restarts as if the restore had never begun.
//!
//! A hit takes an ordinary lease and serves the cached memory file through a page server
//! too, straight from the file (checked whole when it was recorded, as an eager hit hands it
//! out; the recipe gives the units and zero runs); if the recipe cannot be had, the answer
//! is an ordinary one, with `files.memory` and no socket.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thaw_client::blob::{self, BlobTarget, ChunkSource, LocalChunk};
use thaw_client::manifest::{file_layers, FileLayer, ManifestDoc};
use thaw_client::{FetchedManifest, FileCheck, LayerRecipe, Reference};
use thaw_schema::cache_api::{BytesBySource, EnsureResponse};
use thaw_schema::media::FileRole;
use thaw_schema::{ChunkId, RecipeEntry, Sha256Digest};
use tokio::sync::OwnedMutexGuard;

use super::working_set::{Subject, WorkingSetMode};
use super::{now_ms, ActiveEnsure, Cache, Lease};
use crate::error::{CacheError, Result};
use crate::fsutil::{self, allocated_bytes};
use crate::index::{ChunkLocation, FileRecord, LeaseRecord, SnapshotRecord};
use crate::lazy::fill::{LocalCopy, Remote};
use crate::lazy::{MemoryFill, Restoring, SOCKET_NAME};
use crate::peer::fetch::{candidates, PeerSource, DIRECTORY_TIMEOUT};

/// How long a hit waits for the memory file's recipe before answering with the file.
const RECIPE_WAIT: Duration = Duration::from_secs(2);

/// Pins and a reservation held by a lazy restore's background fill, undone on drop.
struct OwnedHold {
    cache: Arc<Cache>,
    pinned: Vec<Sha256Digest>,
    reserved: u64,
}

impl Drop for OwnedHold {
    fn drop(&mut self) {
        self.cache.state.lock().expect("state lock").unhold(&self.pinned, self.reserved);
    }
}

/// What the background fill needs to record the snapshot when the memory file is done.
struct Pending {
    reference: Reference,
    /// The snapshot manifest, for its working set.
    subject: Subject,
    digest: Sha256Digest,
    layers: Vec<(FileLayer, Option<LayerRecipe>)>,
    work: PathBuf,
    restoring: Arc<Restoring>,
    hold: OwnedHold,
    flight: OwnedMutexGuard<()>,
}

impl Cache {
    /// [`Cache::ensure`] with guest memory served by page fault: answers with
    /// `memory_socket` as soon as the snapshot's other files are ready.
    pub async fn ensure_lazy(self: &Arc<Self>, input: &str) -> Result<EnsureResponse> {
        let started = Instant::now();
        let result = self.ensure_lazy_inner(input, started).await;
        let seconds = started.elapsed().as_secs_f64();
        match &result {
            Ok(r) => self.metrics.record_ensure(r.hit, seconds, &r.bytes),
            Err(_) => self.metrics.record_ensure_error(seconds),
        }
        result
    }

    async fn ensure_lazy_inner(self: &Arc<Self>, input: &str, started: Instant) -> Result<EnsureResponse> {
        self.active_ensures.fetch_add(1, Ordering::SeqCst);
        let _active = ActiveEnsure(self);
        let reference = self.parse_reference(input)?;
        let (digest, manifest) = self.resolve(&reference).await?;
        let key = reference.to_string();
        let flight = self.flight(digest);
        // A lazy restore of it in progress is joined; a cached one is a hit; else this call
        // restores it, once the flight lock is free (an eager restore of it may hold it).
        let guard = loop {
            if let Some(r) = self.lazy.restoring(&digest) {
                return self.lazy_lease(&key, digest, &r, started, false).await;
            }
            if let Some(resp) = self.try_hit(&key, digest, started).await? {
                return Ok(self.serve_hit_lazily(&reference, digest, resp).await);
            }
            tokio::select! {
                guard = flight.clone().lock_owned() => break guard,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        };
        if let Some(resp) = self.try_hit(&key, digest, started).await? {
            drop(guard);
            return Ok(self.serve_hit_lazily(&reference, digest, resp).await);
        }
        self.start_lazy(&reference, digest, manifest, guard, started).await
    }

    /// Serves a hit's cached memory file through a page server on its lease.
    async fn serve_hit_lazily(
        &self,
        reference: &Reference,
        digest: Sha256Digest,
        mut resp: EnsureResponse,
    ) -> EnsureResponse {
        let memory = {
            let st = self.state.lock().expect("state lock");
            st.snapshots.get(&digest).and_then(|r| {
                r.files.iter().find(|f| f.role.as_deref() == Some(FileRole::Memory.key())).cloned()
            })
        };
        let Some(memory) = memory else { return resp };
        let recipe = match self.lazy.recipe(&memory.digest) {
            Some(r) => Ok(r),
            // A hit must not wait long on a registry that is down: then the file is handed out.
            None => tokio::time::timeout(
                RECIPE_WAIT,
                self.registry.recipe(reference.repository(), &memory.digest),
            )
            .await
            .map_err(|_| format!("no recipe from the registry within {RECIPE_WAIT:?}"))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .and_then(|r| r.ok_or_else(|| "the registry has no recipe for it".to_owned()))
            .map(Arc::new),
        };
        let served = recipe.and_then(|recipe| {
            self.lazy.keep_recipe(recipe.clone());
            let path = self.dirs.snapshots.join(digest.hex()).join(&memory.title);
            let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            let fill = Arc::new(MemoryFill::complete((*recipe).clone(), file, self.lazy.metrics.clone()));
            let dir = self.dirs.leases.join(&resp.lease);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let socket = dir.join(SOCKET_NAME);
            self.lazy.serve(&resp.lease, socket.clone(), fill).map_err(|e| e.to_string())?;
            Ok(socket)
        });
        match served {
            Ok(socket) => resp.memory_socket = Some(socket.display().to_string()),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot serve the cached memory file by page fault; answering with the file")
            }
        }
        resp
    }

    /// A miss: writes the files but memory, starts the background fill, answers.
    async fn start_lazy(
        self: &Arc<Self>,
        reference: &Reference,
        digest: Sha256Digest,
        manifest: Option<FetchedManifest>,
        flight: OwnedMutexGuard<()>,
        started: Instant,
    ) -> Result<EnsureResponse> {
        let manifest = match manifest {
            Some(m) if m.digest == digest => m,
            _ => self.registry.get_manifest(reference.repository(), &digest.to_string()).await?,
        };
        if ManifestDoc::is_index(&manifest.media_type) {
            return Err(CacheError::BadRequest(format!(
                "{reference} is an index; name one of its manifests by digest"
            )));
        }
        let doc = ManifestDoc::parse(&manifest)?;
        let what = reference.to_string();
        let thaw = self.registry.has_thaw().await?;
        let file_layers = file_layers(&doc, &what)?;
        let recipes = if thaw {
            self.registry
                .layer_recipes(reference.repository(), file_layers.iter().map(|l| &l.descriptor))
                .await?
        } else {
            vec![None; file_layers.len()]
        };
        let layers: Vec<(FileLayer, Option<LayerRecipe>)> = file_layers.into_iter().zip(recipes).collect();
        let memory_at =
            layers.iter().position(|(l, r)| l.descriptor.role() == Some(FileRole::Memory) && r.is_some());
        let Some(memory_at) = memory_at else {
            // Nothing to serve by fault (no memory file, or no recipe for it): restore
            // eagerly, then serve the cached file.
            self.materialize(reference, digest, Some(manifest)).await?;
            drop(flight);
            let resp = self.try_hit(&what, digest, started).await?.ok_or_else(|| {
                CacheError::Index(format!("{what} was materialized but is not in the index"))
            })?;
            return Ok(self.serve_hit_lazily(reference, digest, resp).await);
        };

        // Room and pins, as an eager restore takes them (materialize.rs).
        let mut ids: Vec<ChunkId> =
            layers.iter().filter_map(|(_, r)| r.as_ref()).flat_map(|r| r.recipe.distinct_chunks()).collect();
        ids.sort_unstable();
        ids.dedup();
        let estimate: u64 = layers
            .iter()
            .map(|(l, r)| match r {
                Some(r) => r
                    .recipe
                    .entries
                    .iter()
                    .filter(|e| e.chunk_id().is_some())
                    .map(|e| u64::from(e.byte_len()).div_ceil(4096) * 4096)
                    .sum(),
                None => l.descriptor.size,
            })
            .sum();
        let evicted = {
            let mut st = self.state.lock().expect("state lock");
            let evicted = self.make_room(&mut st, estimate, digest)?;
            st.reserved += estimate;
            evicted
        };
        let mut hold = OwnedHold { cache: self.clone(), pinned: Vec::new(), reserved: estimate };
        self.finish_evictions(evicted).await?;
        let found = tokio::task::block_in_place(|| self.index.locate(&ids))?;
        let (found, pinned) = self.pin_local_copies(&found);
        hold.pinned = pinned;
        let sources: HashMap<ChunkId, LocalChunk> = found
            .into_iter()
            .map(|(id, (loc, path))| {
                (id, LocalChunk { path: Arc::new(path), offset: loc.offset, len: loc.len })
            })
            .collect();

        let work = self.dirs.work.join(format!("{}.{}", digest.hex(), fsutil::nonce()));
        std::fs::create_dir_all(&work).map_err(|e| CacheError::io("creating", &work, e))?;
        let written = self.write_eager_files(reference, &layers, memory_at, &sources, &work).await;
        let bytes = match written {
            Ok(b) => b,
            Err(e) => {
                fsutil::remove_all(&work);
                return Err(e);
            }
        };
        let (memory_layer, memory_recipe) = &layers[memory_at];
        let memory_recipe = memory_recipe.as_ref().expect("found with a recipe").recipe.clone();
        let memory_path = work.join(&memory_layer.title);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&memory_path)
            .and_then(|f| f.set_len(memory_recipe.size).map(|()| f))
            .map_err(|e| CacheError::io("creating", &memory_path, e));
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                fsutil::remove_all(&work);
                return Err(e);
            }
        };
        let local = memory_recipe
            .distinct_chunks()
            .into_iter()
            .filter_map(|id| {
                let c = sources.get(&id)?;
                Some((id, LocalCopy { path: c.path.as_ref().clone(), offset: c.offset }))
            })
            .collect();
        let remote = Remote {
            peers: self.lazy_peers(reference, digest).await,
            registry: self.registry.clone(),
            repository: reference.repository().to_owned(),
        };
        let record = self.config.working_sets.mode == WorkingSetMode::Share;
        let fill = Arc::new(
            MemoryFill::filling(memory_recipe, file, local, remote, self.lazy.metrics.clone())
                .recording(record),
        );
        let files = layers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != memory_at)
            .map(|(_, (l, _))| {
                let role = l.descriptor.role().map_or_else(|| l.title.clone(), |r| r.key().to_owned());
                (role, l.title.clone())
            })
            .collect();
        let restoring = Arc::new(Restoring { fill, dir: tokio::sync::RwLock::new(work.clone()), files });
        let mut resp = self.lazy_lease(&what, digest, &restoring, started, true).await;
        if let Ok(r) = &mut resp {
            r.bytes = bytes;
        }
        if resp.is_err() {
            fsutil::remove_all(&work);
            return resp;
        }
        self.lazy.insert(digest, restoring.clone());
        let subject = Subject {
            reference: reference.clone(),
            manifest: thaw_schema::manifest::Reference {
                digest,
                size: manifest.body.len() as u64,
                media_type: manifest.media_type.clone(),
                recipe: None,
            },
        };
        let pending =
            Pending { reference: reference.clone(), subject, digest, layers, work, restoring, hold, flight };
        let cache = self.clone();
        tokio::spawn(async move { cache.complete_lazy(pending).await });
        resp
    }

    /// With P2P on, the peers to ask for the memory file's chunks before the registry: the
    /// nodes holding this snapshot, then those holding another of its repository. Unlike an
    /// eager restore, a lazy one does not wait to gather a swarm: a VM is waiting.
    async fn lazy_peers(&self, reference: &Reference, digest: Sha256Digest) -> Option<Arc<dyn ChunkSource>> {
        if !self.config.peer.enabled() {
            return None;
        }
        let directory = match tokio::time::timeout(DIRECTORY_TIMEOUT, self.registry.node_directory()).await {
            Ok(Ok(d)) => d,
            _ => {
                tracing::warn!("no node directory in time; a lazy restore fetches from the registry alone");
                return None;
            }
        };
        let peers = candidates(
            &directory,
            &self.config.node_name,
            self.config.peer_endpoint.as_deref(),
            reference.registry(),
            reference.repository(),
            &digest,
        );
        tracing::debug!(peers = ?peers.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(), "lazy restore: peers to ask");
        (!peers.is_empty()).then(|| {
            Arc::new(PeerSource::new(
                peers,
                self.peer_http.clone(),
                self.config.peer.clone(),
                self.peers.clone(),
            )) as Arc<dyn ChunkSource>
        })
    }

    /// Writes every file but the memory file into `work`, each verified.
    async fn write_eager_files(
        &self,
        reference: &Reference,
        layers: &[(FileLayer, Option<LayerRecipe>)],
        memory_at: usize,
        sources: &HashMap<ChunkId, LocalChunk>,
        work: &Path,
    ) -> Result<BytesBySource> {
        let mut bytes = BytesBySource::default();
        let mut writes = Vec::new();
        for (i, (layer, recipe)) in layers.iter().enumerate() {
            if i == memory_at {
                continue;
            }
            let mut local = HashMap::new();
            match recipe {
                Some(layer_recipe) => {
                    let mut seen = HashSet::new();
                    for entry in &layer_recipe.recipe.entries {
                        let RecipeEntry::Data { len, id } = entry else { continue };
                        if !seen.insert(*id) {
                            continue;
                        }
                        if let Some(c) = sources.get(id) {
                            bytes.local += u64::from(c.len);
                            local.insert(*id, c.clone());
                        } else {
                            bytes.registry += u64::from(*len);
                        }
                    }
                }
                None => bytes.registry += layer.descriptor.size,
            }
            // Every file at once: the VM waits for the slowest (the disk), not for the sum.
            writes.push(async move {
                let d = &layer.descriptor;
                let path = work.join(&layer.title);
                let target = BlobTarget {
                    repository: reference.repository(),
                    digest: d.digest,
                    size: d.size,
                    path: &path,
                };
                let what = format!("file {:?} of {reference}", layer.title);
                match recipe {
                    Some(r) => {
                        blob::write_from_recipe_with(&self.registry, target, r.clone(), local, None, &what)
                            .await
                    }
                    None => blob::download(&self.registry, target, &what).await,
                }
            });
        }
        futures::future::try_join_all(writes).await?;
        Ok(bytes)
    }

    /// Takes a lease on a lazy restore in progress: private copies of its files but
    /// memory, and a page server on the lease's socket. `first` marks the restore's own
    /// call (whose files sit in `work/` and cannot move yet).
    async fn lazy_lease(
        &self,
        key: &str,
        digest: Sha256Digest,
        restoring: &Restoring,
        started: Instant,
        first: bool,
    ) -> Result<EnsureResponse> {
        let lease_id = fsutil::nonce();
        let now = now_ms();
        let record = LeaseRecord {
            digest,
            reference: key.to_owned(),
            created_ms: now,
            expires_ms: now + self.config.lease_ttl.as_millis() as u64,
        };
        // Not in the index yet (the snapshot is not): written when the restore completes.
        self.state
            .lock()
            .expect("state lock")
            .leases
            .insert(lease_id.clone(), Lease { record: record.clone(), allocated: 0 });
        let dir = self.dirs.leases.join(&lease_id);
        let copied = async {
            std::fs::create_dir_all(&dir).map_err(|e| CacheError::io("creating", &dir, e))?;
            let source = restoring.dir.read().await;
            let mut files = BTreeMap::new();
            for (role, title) in &restoring.files {
                let (from, to) = (source.join(title), dir.join(title));
                let (f, t) = (from.clone(), to.clone());
                tokio::task::spawn_blocking(move || fsutil::private_copy(&f, &t))
                    .await
                    .map_err(|source| CacheError::Task { what: "copy", source })??;
                files.insert(role.clone(), to.display().to_string());
            }
            Ok::<_, CacheError>(files)
        }
        .await;
        let files = match copied {
            Ok(f) => f,
            Err(e) => {
                self.end_lease(&lease_id);
                return Err(e);
            }
        };
        let allocated = allocated_bytes(&dir);
        if let Some(l) = self.state.lock().expect("state lock").leases.get_mut(&lease_id) {
            l.allocated = allocated;
        }
        let socket = dir.join(SOCKET_NAME);
        if let Err(e) = self.lazy.serve(&lease_id, socket.clone(), restoring.fill.clone()) {
            self.end_lease(&lease_id);
            return Err(CacheError::io("listening on", &socket, e));
        }
        // The index takes leases only on recorded snapshots: one taken in progress is
        // written when the restore completes (`record_lazy`), or here if that already
        // happened while the copies were made.
        let recorded = !first && self.state.lock().expect("state lock").snapshots.contains_key(&digest);
        if recorded {
            let _ = self.persist_lease(&lease_id, &record).await;
            self.lease_log.confirm(&lease_id);
        }
        self.update_gauges();
        Ok(EnsureResponse {
            reference: key.to_owned(),
            digest,
            lease: lease_id,
            lease_expires_ms: record.expires_ms,
            files,
            bytes: BytesBySource::default(),
            millis: started.elapsed().as_millis() as u64,
            hit: false,
            memory_socket: Some(socket.display().to_string()),
        })
    }

    /// The background half: fills the memory file, checks it, records the snapshot.
    async fn complete_lazy(self: Arc<Self>, p: Pending) {
        let digest = p.digest;
        let fill = p.restoring.fill.clone();
        let wanted = {
            let cache = self.clone();
            move || cache.state.lock().expect("state lock").leased(&digest)
        };
        let first = self.working_set_for(&p.subject, &fill).await;
        let recorded = match fill.run_background(&first, wanted).await {
            Ok(()) => match self.record_lazy(&p).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(%digest, error = %e, "a lazily restored snapshot could not be recorded");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(%digest, error = %e, "lazy restore abandoned before its memory file was complete");
                false
            }
        };
        if !recorded {
            fsutil::remove_all(&p.work);
        }
        self.lazy.finished(&digest, recorded);
        let c = &fill.counters;
        tracing::info!(
            reference = %p.reference,
            %digest,
            recorded,
            local = c.local_bytes.load(Ordering::Relaxed),
            peers = c.peer_bytes.load(Ordering::Relaxed),
            registry = c.registry_bytes.load(Ordering::Relaxed),
            "lazy restore finished"
        );
        drop(p.hold);
        drop(p.flight);
        self.update_gauges();
        self.holdings_changed.notify_one();
        self.spares_wanted.notify_one();
    }

    /// Checks the memory file, moves the directory into `snapshots/`, records the snapshot
    /// and the leases taken on it meanwhile.
    async fn record_lazy(&self, p: &Pending) -> Result<()> {
        let (blob, size) = p.restoring.fill.blob();
        let (memory, memory_check) = p
            .layers
            .iter()
            .find(|(l, _)| l.descriptor.digest == blob)
            .map(|(l, r)| (l.title.clone(), r.as_ref().map_or(FileCheck::WholeFile, |r| r.check)))
            .ok_or_else(|| CacheError::Index("the memory layer went missing".into()))?;
        let path = p.work.join(&memory);
        if memory_check == FileCheck::Chain {
            // Every unit was checked against its chunk id as it was filled, and the recipe
            // is the one the manifest names: the file is proven without hashing it again.
            let len = std::fs::metadata(&path).map_err(|e| CacheError::io("reading", &path, e))?.len();
            if len != size {
                return Err(CacheError::Index(format!("the filled memory file is {len} bytes, not {size}")));
            }
        } else {
            let check = path.clone();
            let (got, len) = tokio::task::spawn_blocking(move || fsutil::sha256_file(&check))
                .await
                .map_err(|source| CacheError::Task { what: "hash", source })??;
            if got != blob || len != size {
                return Err(CacheError::Index(format!("the filled memory file hashes to {got}, not {blob}")));
            }
        }
        let mut files = Vec::new();
        let mut chunks: Vec<(ChunkId, ChunkLocation)> = Vec::new();
        let mut seen = HashSet::new();
        for (i, (layer, recipe)) in p.layers.iter().enumerate() {
            let file = u16::try_from(i).map_err(|_| CacheError::BadRequest("too many files".into()))?;
            if let Some(LayerRecipe { recipe, .. }) = recipe {
                let mut offset = 0u64;
                for e in &recipe.entries {
                    if let RecipeEntry::Data { len, id } = e {
                        if seen.insert(*id) {
                            chunks.push((*id, ChunkLocation { snapshot: p.digest, file, offset, len: *len }));
                        }
                    }
                    offset += u64::from(e.byte_len());
                }
            }
            let f = p.work.join(&layer.title);
            let meta = std::fs::metadata(&f).map_err(|e| CacheError::io("reading", &f, e))?;
            files.push(FileRecord {
                title: layer.title.clone(),
                role: layer.descriptor.role().map(|r| r.key().to_owned()),
                digest: layer.descriptor.digest,
                size: layer.descriptor.size,
                mtime_ns: fsutil::mtime_ns(&meta),
            });
        }
        fsutil::sync_dir(&p.work)?;
        let dest = self.dirs.snapshots.join(p.digest.hex());
        let mut dir = p.restoring.dir.write().await;
        std::fs::rename(&p.work, &dest).map_err(|e| CacheError::io("moving into place", &dest, e))?;
        fsutil::sync_dir(&self.dirs.snapshots)?;
        let record = SnapshotRecord {
            digest: p.digest,
            registry: p.reference.registry().to_owned(),
            repository: p.reference.repository().to_owned(),
            references: vec![p.reference.to_string()],
            files,
            allocated_bytes: allocated_bytes(&dest),
            last_used_ms: now_ms(),
        };
        let (index, rec) = (self.index.clone(), record.clone());
        let inserted = tokio::task::spawn_blocking(move || index.insert_snapshot(&rec, &chunks))
            .await
            .map_err(|source| CacheError::Task { what: "index", source })?;
        if let Err(e) = inserted {
            // Back where it was, so the caller's cleanup finds it.
            let _ = std::fs::rename(&dest, &p.work);
            return Err(e);
        }
        *dir = dest;
        drop(dir);
        let leases: Vec<(String, LeaseRecord)> = {
            let mut st = self.state.lock().expect("state lock");
            st.snapshots.insert(p.digest, record);
            st.leases
                .iter()
                .filter(|(_, l)| l.record.digest == p.digest)
                .map(|(id, l)| (id.clone(), l.record.clone()))
                .collect()
        };
        for (id, lease) in leases {
            if let Err(e) = self.persist_lease(&id, &lease).await {
                tracing::warn!(lease = %id, error = %e, "could not write a lazy restore's lease");
            }
            self.lease_log.confirm(&id);
        }
        tracing::info!(reference = %p.reference, digest = %p.digest, "lazily restored snapshot complete and recorded");
        Ok(())
    }
}
