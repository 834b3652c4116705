//! Garbage collection: mark what tags, manifests and blob links still reach, then delete
//! the rest once it is older than a grace period, rewriting packs that became mostly
//! garbage (docs/DECISIONS.md D17).
//!
//! Roots are every blob link and every manifest link of every repository: untagged
//! manifests stay pullable by digest, so they are kept (like distribution's GC without
//! `--delete-untagged`). From a manifest, its config, layers, `blobs` and child manifests
//! are reachable; from a blob, its recipe; from a recipe, its chunks. Recipes, manifests
//! and packs younger than the grace period are kept whatever the mark says: they may
//! belong to a push that has not linked them yet.
//!
//! Order of deletions, so that a crash at any point leaves a readable registry: a
//! rewritten pack's copy and its index are written before the old index and then the old
//! pack are deleted; a dead pack loses its index before its body (a body without an index
//! is an orphan, deleted by a later run once older than the grace period).
//!
//! Across replicas (docs/DECISIONS.md D26, `storage::fence`): one run at a time holds the GC
//! lock; a run publishes a sweep record before it deletes, marks a second time, and deletes
//! only what both marks found dead, so commits on any replica are fenced without waiting.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, PutPayload};
use thaw_schema::frame::EncodedChunk;
use thaw_schema::{ChunkId, Sha256Digest};

use super::fence::{GcLock, SweepRecord};
use super::pack::{self, PackBuilder, PackId};
use super::{keys, Result, Store, StoreError};

/// Default grace period: content younger than this is never collected.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// Default threshold under which a pack is rewritten: the fraction of its bytes still live.
pub const DEFAULT_REWRITE_BELOW: f64 = 0.5;
/// The retryable error (503 `UNAVAILABLE`) a commit gets when GC took its content.
pub(crate) fn collected(why: &str) -> StoreError {
    StoreError::Backend(object_store::Error::Generic { store: "gc", source: why.to_owned().into() })
}

/// How a GC run behaves.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Content younger than this is kept.
    pub grace: Duration,
    /// Report only; change nothing.
    pub dry_run: bool,
    /// Rewrite packs whose live bytes are below this fraction of their frames.
    pub rewrite_below: f64,
    /// Upload sessions untouched this long are expired (online runs only).
    pub upload_max_age: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            grace: DEFAULT_GRACE,
            dry_run: false,
            rewrite_below: DEFAULT_REWRITE_BELOW,
            upload_max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a run deleted (or, dry, would delete).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Manifest objects no link or index reaches.
    pub manifests: u64,
    /// Their bytes.
    pub manifest_bytes: u64,
    /// Recipes of blobs nothing reaches.
    pub recipes: u64,
    /// Their bytes.
    pub recipe_bytes: u64,
    /// Chunk frames dropped (from deleted and rewritten packs).
    pub chunks: u64,
    /// Their bytes (compressed frames).
    pub chunk_bytes: u64,
    /// Packs with no live chunk, deleted.
    pub packs_deleted: u64,
    /// Packs copied without their dead chunks, then deleted.
    pub packs_rewritten: u64,
    /// Pack bodies left without an index by an interrupted write or GC.
    pub orphan_packs: u64,
    /// Their bytes.
    pub orphan_bytes: u64,
    /// Upload sessions expired (`None` when run outside a serving registry).
    pub upload_sessions: Option<u64>,
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run { "would delete" } else { "deleted" };
        writeln!(f, "gc {verb}:")?;
        writeln!(f, "  manifests       {:>8}  {:>12} bytes", self.manifests, self.manifest_bytes)?;
        writeln!(f, "  recipes         {:>8}  {:>12} bytes", self.recipes, self.recipe_bytes)?;
        writeln!(f, "  chunks          {:>8}  {:>12} bytes", self.chunks, self.chunk_bytes)?;
        writeln!(f, "  orphan packs    {:>8}  {:>12} bytes", self.orphan_packs, self.orphan_bytes)?;
        writeln!(f, "  packs deleted   {:>8}", self.packs_deleted)?;
        writeln!(f, "  packs rewritten {:>8}", self.packs_rewritten)?;
        match self.upload_sessions {
            Some(n) => write!(f, "  upload sessions {n:>8}"),
            None => write!(f, "  upload sessions        - (held by serving registries only)"),
        }
    }
}

/// Everything a run may delete, from its first mark.
#[derive(Default)]
struct Plan {
    manifests: Vec<(Sha256Digest, u64)>,
    recipes: Vec<(Sha256Digest, u64)>,
    /// Packs with no live chunk.
    dead_packs: Vec<PackId>,
    /// Packs to rewrite, with their live entries.
    rewrites: Vec<(PackId, Vec<pack::IndexEntry>)>,
    orphans: Vec<(Path, u64)>,
    /// Dead chunk ids inside the packs above.
    doomed_chunks: HashSet<ChunkId>,
    chunk_frames: u64,
    chunk_bytes: u64,
}

/// What a mark found reachable.
#[derive(Default)]
struct Live {
    manifests: HashSet<Sha256Digest>,
    recipes: HashSet<Sha256Digest>,
    chunks: HashSet<ChunkId>,
}

fn digest_of_key(key: &Path) -> Option<Sha256Digest> {
    format!("sha256:{}", key.filename()?).parse().ok()
}

fn older_than(meta: &ObjectMeta, cutoff: SystemTime) -> bool {
    SystemTime::from(meta.last_modified) < cutoff
}

impl Store {
    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self.objects.list(Some(&Path::from(prefix))).try_collect().await?)
    }

    /// One GC run (see the module docs and `storage::fence`). `expire` expires this
    /// process's stale upload sessions and returns how many; standalone runs pass `None`.
    /// `own_lease` is this process's serving lease, when it serves.
    ///
    /// Nothing blocks commits: the run marks, publishes what it is about to delete as a sweep
    /// record, marks again (seeing every commit that wrote before the record appeared), and
    /// deletes only what both marks found dead, while it provably holds the GC lock.
    pub async fn collect_garbage(
        self: &Arc<Self>,
        options: &GcOptions,
        expire: Option<&(dyn Fn(Duration) -> u64 + Sync)>,
        own_lease: Option<&str>,
    ) -> Result<GcReport> {
        let now = match self.store_now().await {
            Ok(now) => now,
            // A dry run changes nothing and may run with read-only credentials.
            Err(e) if options.dry_run => {
                tracing::warn!(error = %e, "could not read the store's clock; the dry run uses this host's");
                SystemTime::now()
            }
            Err(e) => return Err(e),
        };
        let cutoff = now - options.grace;
        let mut report = GcReport { dry_run: options.dry_run, ..Default::default() };
        if options.dry_run {
            let plan = self.plan(cutoff, options).await?;
            fill(&mut report, &plan);
            return Ok(report);
        }
        let writes = self.probe_conditional_writes().await?;
        let lock = if writes.create {
            Some(GcLock::acquire(self.clone()).await?)
        } else {
            let live = self.live_leases(own_lease).await?;
            if let Some(other) = live.first() {
                return Err(StoreError::Backend(object_store::Error::Generic {
                    store: "gc",
                    source: format!(
                        "this storage ignores conditional writes (If-None-Match), so GC cannot be fenced \
                         against other replicas, and registry {other} is serving it: run one replica only \
                         with --gc-interval, or stop every replica and run `thaw-registry gc`"
                    )
                    .into(),
                }));
            }
            None
        };
        let outcome = self.run_sweep(options, cutoff, expire, lock.as_ref(), &mut report).await;
        if let Some(lock) = lock {
            lock.release().await;
        }
        outcome?;
        tracing::info!(
            manifests = report.manifests,
            recipes = report.recipes,
            chunks = report.chunks,
            chunk_bytes = report.chunk_bytes,
            packs_deleted = report.packs_deleted,
            packs_rewritten = report.packs_rewritten,
            orphan_packs = report.orphan_packs,
            upload_sessions = report.upload_sessions,
            "gc run finished"
        );
        Ok(report)
    }

    /// The store's clock, now: the modification time it gives an object written now, read
    /// back by listing, the way the marks read every other object's. The grace period is
    /// measured against timestamps the store set, so with its clock, not this host's: a
    /// replica whose clock runs ahead by more than the grace would otherwise collect
    /// content uploaded a moment ago (chunks whose commit is on its way), as the registry
    /// did before (registry/tests/s3_gc_replicas.rs). Where the store keeps whole seconds,
    /// both sides are truncated alike, which only keeps more.
    async fn store_now(&self) -> Result<SystemTime> {
        let key = keys::gc_probe(&format!("clock-{}", hex::encode(rand::random::<[u8; 8]>())));
        self.objects.put(&key, PutPayload::from_static(b"what time is it")).await?;
        let listed = self.list_meta(keys::GC_PROBES).await;
        let _ = self.objects.delete(&key).await;
        let written = listed?.into_iter().find(|m| m.location == key);
        let written = written.ok_or_else(|| super::corrupt(&key, "not listed after it was written"))?;
        Ok(SystemTime::from(written.last_modified))
    }

    async fn run_sweep(
        &self,
        options: &GcOptions,
        cutoff: SystemTime,
        expire: Option<&(dyn Fn(Duration) -> u64 + Sync)>,
        lock: Option<&GcLock>,
        report: &mut GcReport,
    ) -> Result<()> {
        let held = || lock.map_or(Ok(()), GcLock::ensure_held);
        if lock.is_some() {
            self.close_abandoned_sweeps().await?;
        }
        report.upload_sessions = expire.map(|f| f(options.upload_max_age));
        let plan = self.plan(cutoff, options).await?;
        fill(report, &plan);
        let swept: Vec<PackId> =
            plan.dead_packs.iter().cloned().chain(plan.rewrites.iter().map(|(p, _)| p.clone())).collect();
        if swept.is_empty() && plan.orphans.is_empty() && plan.recipes.is_empty() && plan.manifests.is_empty()
        {
            return Ok(());
        }
        // Copies first: nothing is deleted before its live chunks are stored elsewhere.
        let mut copies: Vec<(PackId, Vec<pack::IndexEntry>)> = Vec::new();
        for (old, kept) in &plan.rewrites {
            copies.extend(self.copy_frames(old, kept).await?);
        }
        held()?;
        let record = SweepRecord {
            packs: swept.iter().map(ToString::to_string).collect(),
            recipes: plan.recipes.iter().map(|(d, _)| *d).collect(),
            manifests: plan.manifests.iter().map(|(d, _)| *d).collect(),
        };
        let epoch = self.publish_sweep(&record).await?;
        drop(self.sync_sweeps().await?);
        for (new, entries) in &copies {
            self.index.write().expect("index lock").relocate(new.clone(), entries);
        }
        // Second mark: sees every commit that wrote before the record was published.
        let (live, _, _) = self.mark(cutoff).await?;
        let copied: HashSet<ChunkId> = copies.iter().flat_map(|(_, e)| e.iter().map(|e| e.id)).collect();
        for old in &swept {
            let Some(bytes) = self.get_opt(&keys::pack_index(old)).await? else { continue };
            let Ok(entries) = pack::decode_index(&bytes) else { continue };
            let rescued: Vec<_> = entries
                .into_iter()
                .filter(|e| live.chunks.contains(&e.id) && !copied.contains(&e.id))
                .collect();
            if !rescued.is_empty() {
                tracing::info!(pack = %old, chunks = rescued.len(), "chunks committed during the run: copied before the sweep");
                if let Some((new, entries)) = self.copy_frames(old, &rescued).await? {
                    self.index.write().expect("index lock").relocate(new, &entries);
                }
            }
        }
        for old in &swept {
            held()?;
            self.delete(&keys::pack_index(old)).await?;
            self.delete(&keys::pack(old)).await?;
        }
        for (key, _) in &plan.orphans {
            held()?;
            self.delete(key).await?;
        }
        let recipes: Vec<_> = plan.recipes.iter().filter(|(d, _)| !live.recipes.contains(d)).collect();
        let manifests: Vec<_> = plan.manifests.iter().filter(|(d, _)| !live.manifests.contains(d)).collect();
        report.recipes = recipes.len() as u64;
        report.recipe_bytes = recipes.iter().map(|(_, b)| b).sum();
        report.manifests = manifests.len() as u64;
        report.manifest_bytes = manifests.iter().map(|(_, b)| b).sum();
        for (n, (digest, _)) in recipes.iter().enumerate() {
            if n % 64 == 0 {
                held()?;
            }
            self.delete(&keys::recipe(digest)).await?;
        }
        for (n, (digest, _)) in manifests.iter().enumerate() {
            if n % 64 == 0 {
                held()?;
            }
            self.delete(&keys::manifest(digest)).await?;
        }
        self.close_sweep(epoch).await
    }

    /// Copies the frames of `entries` out of pack `old` into a new pack and index, each
    /// frame verified against its id first (a bad one is dropped and logged: copying it
    /// would only move the damage). `None` when no frame was good.
    async fn copy_frames(
        &self,
        old: &PackId,
        entries: &[pack::IndexEntry],
    ) -> Result<Option<(PackId, Vec<pack::IndexEntry>)>> {
        let body = match self.objects.get(&keys::pack(old)).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let entries = entries.to_vec();
        let pack_name = old.to_string();
        let build = move || {
            let mut builder = PackBuilder::new();
            for e in &entries {
                let frame = body.get(e.offset as usize..(e.offset + u64::from(e.len)) as usize);
                match frame.map(|f| (f, EncodedChunk::from_frame(f).and_then(|c| c.decode(&e.id)))) {
                    Some((f, Ok(_))) => {
                        let raw_len = u32::from_le_bytes(f[1..5].try_into().expect("4 bytes"));
                        builder.push(e.id, f[0], raw_len, &f[5..]);
                    }
                    _ => tracing::error!(pack = %pack_name, chunk = %e.id, "corrupt chunk not copied"),
                }
            }
            builder
        };
        let builder = tokio::task::spawn_blocking(build)
            .await
            .map_err(|e| super::corrupt(&keys::pack(old), format!("copy task: {e}")))?;
        if builder.is_empty() {
            return Ok(None);
        }
        let (new_body, entries) = builder.finish();
        let new = PackId::generate();
        self.objects.put(&keys::pack(&new), PutPayload::from(new_body)).await?;
        self.objects.put(&keys::pack_index(&new), PutPayload::from(pack::encode_index(&entries))).await?;
        Ok(Some((new, entries)))
    }

    /// What GC would delete now: the mark, then the packs.
    async fn plan(&self, cutoff: SystemTime, options: &GcOptions) -> Result<Plan> {
        let (live, manifests, recipes) = self.mark(cutoff).await?;
        let mut plan = Plan { manifests, recipes, ..Default::default() };
        self.plan_packs(cutoff, options, &live.chunks, &mut plan).await?;
        Ok(plan)
    }

    /// The live sets (reachable from links, or young), and the dead manifests and recipes
    /// with their sizes.
    #[allow(clippy::type_complexity)]
    async fn mark(
        &self,
        cutoff: SystemTime,
    ) -> Result<(Live, Vec<(Sha256Digest, u64)>, Vec<(Sha256Digest, u64)>)> {
        let mut live_manifests: HashSet<Sha256Digest> = HashSet::new();
        let mut live_blobs: HashSet<Sha256Digest> = HashSet::new();
        for meta in self.list_meta(keys::REPOSITORIES).await? {
            let key = meta.location.as_ref();
            if key.contains("/_layers/sha256/") {
                live_blobs.extend(digest_of_key(&meta.location));
            } else if key.contains("/_manifests/revisions/sha256/") {
                live_manifests.extend(digest_of_key(&meta.location));
            } else if key.contains("/_manifests/tags/") {
                if let Some(body) = self.get_opt(&meta.location).await? {
                    live_manifests.extend(
                        std::str::from_utf8(&body).ok().and_then(|t| t.trim().parse::<Sha256Digest>().ok()),
                    );
                }
            }
        }
        let stored_manifests = self.list_meta("manifests/sha256").await?;
        for meta in &stored_manifests {
            if !older_than(meta, cutoff) {
                live_manifests.extend(digest_of_key(&meta.location));
            }
        }
        // Walk manifests (index children are manifests too).
        let mut pending: Vec<Sha256Digest> = live_manifests.iter().copied().collect();
        let mut walked = HashSet::new();
        while let Some(digest) = pending.pop() {
            if !walked.insert(digest) {
                continue;
            }
            let Some(body) = self.get_opt(&keys::manifest(&digest)).await? else { continue };
            let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else { continue };
            let digests = |field: &str| -> Vec<Sha256Digest> {
                let one = json.get(field).filter(|v| v.is_object()).into_iter();
                let many = json.get(field).and_then(|v| v.as_array()).into_iter().flatten();
                one.chain(many).filter_map(|d| d.get("digest")?.as_str()?.parse().ok()).collect()
            };
            live_blobs.extend(digests("config"));
            live_blobs.extend(digests("layers"));
            live_blobs.extend(digests("blobs"));
            for child in digests("manifests").into_iter().chain(digests("subject")) {
                live_manifests.insert(child);
                pending.push(child);
            }
        }
        let mut dead_manifests = Vec::new();
        for meta in stored_manifests {
            let Some(digest) = digest_of_key(&meta.location) else { continue };
            if !live_manifests.contains(&digest) {
                dead_manifests.push((digest, meta.size));
            }
        }
        let mut live_recipes: HashSet<Sha256Digest> = HashSet::new();
        let mut dead_recipes = Vec::new();
        for meta in self.list_meta("recipes/sha256").await? {
            let Some(digest) = digest_of_key(&meta.location) else { continue };
            if live_blobs.contains(&digest) || !older_than(&meta, cutoff) {
                live_recipes.insert(digest);
            } else {
                dead_recipes.push((digest, meta.size));
            }
        }
        let mut live_chunks: HashSet<ChunkId> = HashSet::new();
        for digest in &live_recipes {
            if let Some(recipe) = self.get_recipe(digest).await? {
                live_chunks.extend(recipe.distinct_chunks());
            }
        }
        let live = Live { manifests: live_manifests, recipes: live_recipes, chunks: live_chunks };
        Ok((live, dead_manifests, dead_recipes))
    }

    async fn plan_packs(
        &self,
        cutoff: SystemTime,
        options: &GcOptions,
        live: &HashSet<ChunkId>,
        plan: &mut Plan,
    ) -> Result<()> {
        let indexed: HashSet<PackId> = self
            .list_meta(keys::PACK_INDEXES)
            .await?
            .iter()
            .filter_map(|m| m.location.filename().and_then(PackId::parse))
            .collect();
        let bodies: HashMap<PackId, ObjectMeta> = self
            .list_meta(keys::PACKS)
            .await?
            .into_iter()
            .filter_map(|m| Some((m.location.filename().and_then(PackId::parse)?, m)))
            .collect();
        for (id, meta) in &bodies {
            if !older_than(meta, cutoff) {
                continue;
            }
            if !indexed.contains(id) {
                plan.orphans.push((meta.location.clone(), meta.size));
                continue;
            }
            let Some(bytes) = self.get_opt(&keys::pack_index(id)).await? else { continue };
            let Ok(entries) = pack::decode_index(&bytes) else {
                tracing::warn!(pack = %id, "unreadable pack index: pack left alone");
                continue;
            };
            let total: u64 = entries.iter().map(|e| u64::from(e.len)).sum();
            let (kept, dropped): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| live.contains(&e.id));
            let kept_bytes: u64 = kept.iter().map(|e| u64::from(e.len)).sum();
            let rewrite = !kept.is_empty() && (kept_bytes as f64) < options.rewrite_below * total as f64;
            if !kept.is_empty() && !rewrite {
                continue;
            }
            plan.chunk_frames += dropped.len() as u64;
            plan.chunk_bytes += total - kept_bytes;
            plan.doomed_chunks.extend(dropped.iter().map(|e| e.id));
            if kept.is_empty() {
                plan.dead_packs.push(id.clone());
            } else {
                plan.rewrites.push((id.clone(), kept));
            }
        }
        // A chunk live in one pack may be dead in another copy: never doom a live id.
        plan.doomed_chunks.retain(|id| !live.contains(id));
        Ok(())
    }
}

fn fill(report: &mut GcReport, plan: &Plan) {
    report.manifests = plan.manifests.len() as u64;
    report.manifest_bytes = plan.manifests.iter().map(|(_, b)| b).sum();
    report.recipes = plan.recipes.len() as u64;
    report.recipe_bytes = plan.recipes.iter().map(|(_, b)| b).sum();
    report.chunks = plan.chunk_frames;
    report.chunk_bytes = plan.chunk_bytes;
    report.packs_deleted = plan.dead_packs.len() as u64;
    report.packs_rewritten = plan.rewrites.len() as u64;
    report.orphan_packs = plan.orphans.len() as u64;
    report.orphan_bytes = plan.orphans.iter().map(|(_, b)| b).sum();
}
