//! Materializing a snapshot: recipes from the registry, room made by eviction, chunks
//! copied from cached snapshots (pinned meanwhile) or fetched, every file verified in
//! `work/`, then moved into `snapshots/` and recorded. Chunks not held locally are asked
//! of peers (when P2P is on) before the registry; meanwhile the snapshot is announced as in
//! progress and swarmed with the other nodes materializing it (`swarm.rs`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thaw_client::blob::{self, BlobTarget, ChunkSource, LocalChunk};
use thaw_client::manifest::{file_layers, FileLayer, ManifestDoc};
use thaw_client::{FetchedManifest, LayerRecipe, Reference};
use thaw_schema::cache_api::BytesBySource;
use thaw_schema::{ChunkId, Recipe, RecipeEntry, Sha256Digest};

use super::{now_ms, Cache};
use crate::error::{CacheError, Result};
use crate::fsutil::{self, allocated_bytes};
use crate::index::{ChunkLocation, FileRecord, SnapshotRecord};
use crate::peer::fetch::{candidates, PeerSource, DIRECTORY_TIMEOUT};
use crate::swarm::{Materializing, RegistryFetch, SwarmSource, GATHER, SWARM_REFRESH};

/// What one file of a snapshot being materialized needs.
struct Planned {
    layer: FileLayer,
    layer_recipe: Option<LayerRecipe>,
}

impl Planned {
    fn recipe(&self) -> Option<&Recipe> {
        self.layer_recipe.as_ref().map(|r| &r.recipe)
    }
}

/// Pins and a reservation held by a materialization, undone on drop.
struct Hold<'a> {
    cache: &'a Cache,
    pinned: Vec<Sha256Digest>,
    reserved: u64,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.cache.state.lock().expect("state lock").unhold(&self.pinned, self.reserved);
    }
}

impl Cache {
    /// For each chunk the index `found` on disk, the first copy in a cached snapshot that is
    /// still recorded, with its file's path; pins each snapshot used (undone by
    /// [`State::unhold`]) and answers them too.
    pub(super) fn pin_local_copies(
        &self,
        found: &HashMap<ChunkId, Vec<ChunkLocation>>,
    ) -> (HashMap<ChunkId, (ChunkLocation, PathBuf)>, Vec<Sha256Digest>) {
        let mut st = self.state.lock().expect("state lock");
        let mut sources = HashMap::new();
        let mut pinned = HashSet::new();
        for (id, locs) in found {
            let usable = locs.iter().find_map(|loc| {
                let rec = st.snapshots.get(&loc.snapshot)?;
                let file = rec.files.get(usize::from(loc.file))?;
                Some((*loc, self.dirs.snapshots.join(loc.snapshot.hex()).join(&file.title)))
            });
            if let Some((loc, path)) = usable {
                pinned.insert(loc.snapshot);
                sources.insert(*id, (loc, path));
            }
        }
        for d in &pinned {
            *st.pins.entry(*d).or_default() += 1;
        }
        (sources, pinned.into_iter().collect())
    }

    /// Fetches the snapshot into `work/`, verifies it, moves it into `snapshots/` and
    /// records it. The caller holds the digest's flight lock.
    pub(super) async fn materialize(
        &self,
        reference: &Reference,
        digest: Sha256Digest,
        manifest: Option<FetchedManifest>,
    ) -> Result<BytesBySource> {
        let manifest = match manifest {
            Some(m) if m.digest == digest => m,
            _ => self.registry.get_manifest(reference.repository(), &digest.to_string()).await?,
        };
        if ManifestDoc::is_index(&manifest.media_type) {
            return Err(CacheError::BadRequest(format!(
                "{reference} is an index ({}); name one of its manifests by digest",
                manifest.media_type
            )));
        }
        let doc = ManifestDoc::parse(&manifest)?;
        let layers = file_layers(&doc, &reference.to_string())?;
        if layers.is_empty() {
            return Err(CacheError::BadRequest(format!("{reference} has no files")));
        }
        let thaw = self.registry.has_thaw().await?;
        let recipes = if thaw {
            self.registry.layer_recipes(reference.repository(), layers.iter().map(|l| &l.descriptor)).await?
        } else {
            vec![None; layers.len()]
        };
        let planned: Vec<Planned> = layers
            .into_iter()
            .zip(recipes)
            .map(|(layer, layer_recipe)| Planned { layer, layer_recipe })
            .collect();
        match self.materialize_planned(reference, digest, &planned, true).await {
            Err(CacheError::Registry(thaw_client::Error::Integrity { what, why })) => {
                // A local chunk did not match its id: find the damaged cached snapshots,
                // drop them, and fetch again from the registry.
                tracing::warn!(%what, %why, "a local chunk failed its check; scrubbing the sources");
                let report = self.scrub().await?;
                tracing::warn!(corrupt = report.corrupt.len(), "scrubbed before retrying");
                self.materialize_planned(reference, digest, &planned, report.corrupt.is_empty()).await
            }
            other => other,
        }
    }

    async fn materialize_planned(
        &self,
        reference: &Reference,
        digest: Sha256Digest,
        planned: &[Planned],
        use_local: bool,
    ) -> Result<BytesBySource> {
        let what = reference.to_string();
        // Chunks other cached snapshots hold, in snapshots pinned for the duration.
        let mut ids: Vec<ChunkId> =
            planned.iter().filter_map(Planned::recipe).flat_map(Recipe::distinct_chunks).collect();
        ids.sort_unstable();
        ids.dedup();
        let estimate: u64 = planned
            .iter()
            .map(|p| match p.recipe() {
                Some(r) => r
                    .entries
                    .iter()
                    .filter(|e| e.chunk_id().is_some())
                    .map(|e| u64::from(e.byte_len()).div_ceil(4096) * 4096)
                    .sum(),
                None => p.layer.descriptor.size,
            })
            .sum();
        // Room first, by least-recent use alone; then the chunks to copy, from what remains.
        let evicted = {
            let mut st = self.state.lock().expect("state lock");
            let evicted = self.make_room(&mut st, estimate, digest)?;
            st.reserved += estimate;
            evicted
        };
        // Dropped on every way out: unpins the sources and returns the reservation.
        let mut hold = Hold { cache: self, pinned: Vec::new(), reserved: estimate };
        self.finish_evictions(evicted).await?;
        let found = if use_local { self.index.locate(&ids)? } else { HashMap::new() };
        let (sources, pinned) = self.pin_local_copies(&found);
        hold.pinned = pinned;

        let work = self.dirs.work.join(format!("{}.{}", digest.hex(), fsutil::nonce()));
        std::fs::create_dir_all(&work).map_err(|e| CacheError::io("creating", &work, e))?;
        // Announced as in progress (holdings, bitmaps) until it is recorded below.
        let registered = self.config.peer.enabled().then(|| {
            let files: Vec<(Sha256Digest, &Recipe, PathBuf)> = planned
                .iter()
                .filter_map(|p| {
                    let r = p.recipe()?;
                    Some((p.layer.descriptor.digest, r, work.join(&p.layer.title)))
                })
                .collect();
            let size = planned.iter().map(|p| p.layer.descriptor.size).sum();
            let m = Materializing::new(what.clone(), size, files, |id| sources.contains_key(id));
            let registered = self.swarm.register(digest, m);
            self.holdings_changed.notify_one();
            registered
        });
        let peers = match &registered {
            Some(r) => self.peer_source(reference, digest, r.materializing.clone()).await,
            None => None,
        };
        let writing = self.write_files(reference, digest, planned, &sources, peers.as_ref(), &work);
        let result = match &registered {
            Some(r) => {
                let prefetch = async {
                    match &peers {
                        Some(p) => p.prefetch().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    result = writing => result,
                    never = self.refresh_swarm(digest, &r.materializing) => match never {},
                    never = prefetch => match never {},
                }
            }
            None => writing.await,
        };
        let (files, chunks, bytes) = match result {
            Ok(v) => v,
            Err(e) => {
                fsutil::remove_all(&work);
                if registered.is_some() {
                    // No longer in progress: withdraw the announcement.
                    drop(registered);
                    self.holdings_changed.notify_one();
                }
                return Err(e);
            }
        };
        fsutil::sync_dir(&work)?;
        let dest = self.dirs.snapshots.join(digest.hex());
        std::fs::rename(&work, &dest).map_err(|e| CacheError::io("moving into place", &dest, e))?;
        fsutil::sync_dir(&self.dirs.snapshots)?;
        let record = SnapshotRecord {
            digest,
            registry: reference.registry().to_owned(),
            repository: reference.repository().to_owned(),
            references: vec![what.clone()],
            files,
            allocated_bytes: allocated_bytes(&dest),
            last_used_ms: now_ms(),
        };
        let index_record = record.clone();
        let insert = {
            let index = &self.index;
            tokio::task::block_in_place(|| index.insert_snapshot(&index_record, &chunks))
        };
        if let Err(e) = insert {
            fsutil::remove_all(&dest);
            return Err(e);
        }
        {
            let mut st = self.state.lock().expect("state lock");
            st.snapshots.insert(digest, record);
        }
        // Recorded: its chunks are now served from `snapshots/`.
        drop(registered);
        drop(hold);
        tracing::info!(
            reference = %what,
            %digest,
            local = bytes.local,
            peers = bytes.peers,
            registry = bytes.registry,
            "materialized"
        );
        self.update_gauges();
        self.holdings_changed.notify_one();
        Ok(bytes)
    }

    /// Writes every file of the snapshot into `work`, each verified by the client.
    async fn write_files(
        &self,
        reference: &Reference,
        digest: Sha256Digest,
        planned: &[Planned],
        sources: &HashMap<ChunkId, (ChunkLocation, PathBuf)>,
        peers: Option<&Arc<SwarmSource>>,
        work: &Path,
    ) -> Result<(Vec<FileRecord>, Vec<(ChunkId, ChunkLocation)>, BytesBySource)> {
        let mut chunks: Vec<(ChunkId, ChunkLocation)> = Vec::new();
        let mut seen: HashSet<ChunkId> = HashSet::new();
        let mut bytes = BytesBySource::default();
        // Where each file's chunks come from, worked out first; then every file is written
        // at once (the memory file's decoding and writing no longer waits for the disk's).
        let mut locals: Vec<HashMap<ChunkId, LocalChunk>> = Vec::new();
        for (i, p) in planned.iter().enumerate() {
            let mut local = HashMap::new();
            match p.recipe() {
                Some(recipe) => {
                    let file = u16::try_from(i)
                        .map_err(|_| CacheError::BadRequest(format!("{reference} has too many files")))?;
                    let mut fetched = HashSet::new();
                    let mut offset = 0u64;
                    for entry in &recipe.entries {
                        if let RecipeEntry::Data { len, id } = entry {
                            if let Some((loc, src)) = sources.get(id) {
                                let chunk = LocalChunk {
                                    path: Arc::new(src.clone()),
                                    offset: loc.offset,
                                    len: loc.len,
                                };
                                local.insert(*id, chunk);
                                bytes.local += u64::from(*len);
                            } else if fetched.insert(*id) {
                                bytes.registry += u64::from(*len);
                            } else {
                                bytes.local += u64::from(*len);
                            }
                            if seen.insert(*id) {
                                chunks
                                    .push((*id, ChunkLocation { snapshot: digest, file, offset, len: *len }));
                            }
                        }
                        offset += u64::from(entry.byte_len());
                    }
                }
                None => bytes.registry += p.layer.descriptor.size,
            }
            locals.push(local);
        }
        if let Some(p) = peers {
            p.take_delivered();
        }
        let writes = planned.iter().zip(locals).map(|(p, local)| async move {
            let d = &p.layer.descriptor;
            let path = work.join(&p.layer.title);
            let target = BlobTarget {
                repository: reference.repository(),
                digest: d.digest,
                size: d.size,
                path: &path,
            };
            let what = format!("file {:?} of {reference}", p.layer.title);
            match &p.layer_recipe {
                Some(layer_recipe) => {
                    let source = peers.map(|p| p.clone() as Arc<dyn ChunkSource>);
                    blob::write_from_recipe_with(
                        &self.registry,
                        target,
                        layer_recipe.clone(),
                        local,
                        source,
                        &what,
                    )
                    .await?
                }
                None => blob::download(&self.registry, target, &what).await?,
            }
            let meta = std::fs::metadata(&path).map_err(|e| CacheError::io("reading", &path, e))?;
            Ok::<_, CacheError>(FileRecord {
                title: p.layer.title.clone(),
                role: d.role().map(|r| r.key().to_owned()),
                digest: d.digest,
                size: d.size,
                mtime_ns: fsutil::mtime_ns(&meta),
            })
        });
        let files = futures::future::try_join_all(writes).await?;
        // What the peers delivered did not come from the registry.
        let from_peers = peers.map_or(0, |p| p.take_delivered());
        bytes.peers += from_peers;
        bytes.registry = bytes.registry.saturating_sub(from_peers);
        Ok((files, chunks, bytes))
    }

    /// The peers to ask for this snapshot's chunks, when P2P is on: nodes holding this
    /// snapshot, then nodes holding another snapshot of its repository (they share most
    /// chunks across revisions), then the swarm of nodes materializing it too. When no node
    /// holds it, waits [`GATHER`] for the other members' announcements first. Without a
    /// directory answer in time, the snapshot comes from the registry alone.
    async fn peer_source(
        &self,
        reference: &Reference,
        digest: Sha256Digest,
        materializing: Arc<Materializing>,
    ) -> Option<Arc<SwarmSource>> {
        let options = &self.config.peer;
        let mut directory = self.directory().await?;
        let holders_of = |d: &thaw_schema::holdings::NodeDirectory| {
            candidates(
                d,
                &self.config.node_name,
                self.config.peer_endpoint.as_deref(),
                reference.registry(),
                reference.repository(),
                &digest,
            )
        };
        let mut peers = holders_of(&directory);
        if !peers.iter().any(|p| p.same_snapshot) {
            tokio::time::sleep(GATHER).await;
            directory = self.directory().await?;
            peers = holders_of(&directory);
        }
        materializing.add_from_directory(&directory, &self.config.node_name, &digest);
        tracing::debug!(
            peers = ?peers.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(),
            swarm = ?materializing.members.lock().expect("members lock").keys().collect::<Vec<_>>(),
            "peers to ask"
        );
        let holders = (!peers.is_empty()).then(|| {
            Arc::new(PeerSource::new(peers, self.peer_http.clone(), options.clone(), self.peers.clone()))
        });
        Some(Arc::new(SwarmSource::new(
            holders,
            self.config.node_name.clone(),
            self.config.peer_endpoint.clone(),
            digest,
            materializing,
            self.peer_http.clone(),
            options.clone(),
            self.peers.clone(),
            RegistryFetch { registry: self.registry.clone(), repository: reference.repository().to_owned() },
        )))
    }

    /// The registry's node directory, or `None` (logged) when it does not answer in time.
    async fn directory(&self) -> Option<thaw_schema::holdings::NodeDirectory> {
        match tokio::time::timeout(DIRECTORY_TIMEOUT, self.registry.node_directory()).await {
            Ok(Ok(d)) => Some(d),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "no node directory; fetching from the registry alone");
                None
            }
            Err(_) => {
                tracing::warn!("the node directory did not answer in time; fetching from the registry alone");
                None
            }
        }
    }

    /// Adds the nodes that start materializing `digest` later to its swarm, from the
    /// directory, until cancelled.
    async fn refresh_swarm(
        &self,
        digest: Sha256Digest,
        materializing: &Materializing,
    ) -> std::convert::Infallible {
        loop {
            tokio::time::sleep(SWARM_REFRESH).await;
            if let Ok(Ok(d)) = tokio::time::timeout(DIRECTORY_TIMEOUT, self.registry.node_directory()).await {
                materializing.add_from_directory(&d, &self.config.node_name, &digest);
            }
        }
    }
}
