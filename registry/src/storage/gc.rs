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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, PutPayload};
use thaw_schema::{ChunkId, Sha256Digest};

use super::pack::{self, PackBuilder, PackId};
use super::{keys, Result, Store, StoreError};

/// Default grace period: content younger than this is never collected.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// Default threshold under which a pack is rewritten: the fraction of its bytes still live.
pub const DEFAULT_REWRITE_BELOW: f64 = 0.5;
/// How often a serving registry renews its lease, and how old a lease may be and still
/// count as a serving registry.
const LEASE_RENEW: Duration = Duration::from_secs(10);
const LEASE_FRESH: Duration = Duration::from_secs(30);
const LEASES: &str = "gc/serving";

/// What a GC run in this process is deleting, checked by commits (`Store::put_recipe`,
/// `link_blob`, `link_manifest`) under the shared side of `Store::gc_fence`.
#[derive(Debug, Default)]
pub(crate) struct Doomed {
    pub(crate) recipes: HashSet<Sha256Digest>,
    pub(crate) manifests: HashSet<Sha256Digest>,
    /// Runs that deleted something; once non-zero, links check their content exists.
    pub(crate) runs_deleted: u64,
}

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

/// Everything a run will delete, decided under the exclusive fence.
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

    /// Fails when a registry other than `own_lease` renewed its lease recently: GC in one
    /// process cannot fence the commits of another (docs/DECISIONS.md D17).
    pub async fn refuse_if_others_serve(&self, own_lease: Option<&str>) -> Result<()> {
        let now = SystemTime::now();
        for meta in self.list_meta(LEASES).await? {
            let name = meta.location.filename().unwrap_or_default().to_owned();
            let fresh = now.duration_since(meta.last_modified.into()).unwrap_or_default() < LEASE_FRESH;
            if fresh && Some(name.as_str()) != own_lease {
                return Err(StoreError::Backend(object_store::Error::Generic {
                    store: "gc",
                    source: format!(
                        "registry {name} is serving this storage (lease {}); run GC inside it \
                         (--gc-interval) or stop it first",
                        meta.location
                    )
                    .into(),
                }));
            }
        }
        Ok(())
    }

    /// Renews this process's serving lease until the task is dropped.
    pub(crate) async fn keep_lease(self: Arc<Self>, name: String) {
        let key = Path::from(format!("{LEASES}/{name}"));
        loop {
            if let Err(e) = self.objects.put(&key, PutPayload::from(Bytes::from_static(b"serving"))).await {
                tracing::warn!(error = %e, "could not renew the serving lease");
            }
            tokio::time::sleep(LEASE_RENEW).await;
        }
    }

    /// One GC run (see the module docs). `expire` expires this process's stale upload
    /// sessions and returns how many; standalone runs pass `None`.
    pub async fn collect_garbage(
        self: &Arc<Self>,
        options: &GcOptions,
        expire: Option<&(dyn Fn(Duration) -> u64 + Sync)>,
    ) -> Result<GcReport> {
        let cutoff = SystemTime::now() - options.grace;
        let mut report = GcReport { dry_run: options.dry_run, ..Default::default() };
        if options.dry_run {
            let plan = self.plan(cutoff, options).await?;
            fill(&mut report, &plan);
            return Ok(report);
        }
        report.upload_sessions = expire.map(|f| f(options.upload_max_age));
        // Mark and doom under the exclusive fence: every commit either finished before (and
        // the mark sees it) or runs after (and sees the doomed content gone).
        let plan = {
            let mut fence = self.gc_fence.write().await;
            let plan = self.plan(cutoff, options).await?;
            fence.recipes.extend(plan.recipes.iter().map(|(d, _)| *d));
            fence.manifests.extend(plan.manifests.iter().map(|(d, _)| *d));
            let mut index = self.index.write().expect("index lock");
            for id in &plan.doomed_chunks {
                index.remove(id);
            }
            drop(index);
            for (digest, _) in &plan.recipes {
                self.recipes.remove(digest);
            }
            plan
        };
        fill(&mut report, &plan);
        let outcome = self.execute(&plan).await;
        let mut fence = self.gc_fence.write().await;
        fence.runs_deleted += 1;
        fence.recipes.clear();
        fence.manifests.clear();
        drop(fence);
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

    /// The live sets: manifests and blob digests reachable from links, plus young objects.
    async fn plan(&self, cutoff: SystemTime, options: &GcOptions) -> Result<Plan> {
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
        let mut plan = Plan::default();
        for meta in stored_manifests {
            let Some(digest) = digest_of_key(&meta.location) else { continue };
            if !live_manifests.contains(&digest) {
                plan.manifests.push((digest, meta.size));
            }
        }
        let mut live_recipes: Vec<Sha256Digest> = Vec::new();
        for meta in self.list_meta("recipes/sha256").await? {
            let Some(digest) = digest_of_key(&meta.location) else { continue };
            if live_blobs.contains(&digest) || !older_than(&meta, cutoff) {
                live_recipes.push(digest);
            } else {
                plan.recipes.push((digest, meta.size));
            }
        }
        let mut live_chunks: HashSet<ChunkId> = HashSet::new();
        for digest in live_recipes {
            if let Some(recipe) = self.get_recipe(&digest).await? {
                live_chunks.extend(recipe.distinct_chunks());
            }
        }
        self.plan_packs(cutoff, options, &live_chunks, &mut plan).await?;
        Ok(plan)
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

    async fn execute(&self, plan: &Plan) -> Result<()> {
        for (old, kept) in &plan.rewrites {
            let body = self.objects.get(&keys::pack(old)).await?.bytes().await?;
            let mut builder = PackBuilder::new();
            for e in kept {
                let frame = body
                    .get(e.offset as usize..(e.offset + u64::from(e.len)) as usize)
                    .filter(|f| f.len() >= 5)
                    .ok_or_else(|| super::corrupt(&keys::pack(old), "index entry outside the pack"))?;
                let raw_len = u32::from_le_bytes(frame[1..5].try_into().expect("4 bytes"));
                builder.push(e.id, frame[0], raw_len, &frame[5..]);
            }
            let (new_body, entries) = builder.finish();
            let new = PackId::generate();
            self.objects.put(&keys::pack(&new), PutPayload::from(new_body)).await?;
            self.objects.put(&keys::pack_index(&new), PutPayload::from(pack::encode_index(&entries))).await?;
            self.index.write().expect("index lock").relocate(new, &entries);
            self.delete(&keys::pack_index(old)).await?;
            self.delete(&keys::pack(old)).await?;
        }
        for old in &plan.dead_packs {
            self.delete(&keys::pack_index(old)).await?;
            self.delete(&keys::pack(old)).await?;
        }
        for (key, _) in &plan.orphans {
            self.delete(key).await?;
        }
        for (digest, _) in &plan.recipes {
            self.delete(&keys::recipe(digest)).await?;
        }
        for (digest, _) in &plan.manifests {
            self.delete(&keys::manifest(digest)).await?;
        }
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
