//! Working sets, the cache's side: finding a snapshot's working set in the registry for a
//! lazy restore's background fill, and publishing the one a first restore recorded. The
//! recording is `crate::lazy::working_set`, the blob and manifest `thaw_schema::working_set`;
//! the format, and why a working set from the registry is safe to follow, docs/FORMAT.md.
//!
//! A working set is a hint: it orders the background fill and nothing else. Whatever the
//! registry sends is bounded before it is read (at most [`MAX_CANDIDATES`] referrers, a blob
//! no larger than the recipe allows), checked against the recipe the restore already uses,
//! and dropped on any problem, the fill then going in file order.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use thaw_client::{Reference, Referrer};
use thaw_schema::manifest::{self, summarize};
use thaw_schema::working_set::{working_set_manifest, WorkingSet, EMPTY_CONFIG};
use thaw_schema::{media, Recipe, Sha256Digest};

use super::Cache;
use crate::lazy::MemoryFill;

/// How long a lazy restore's background fill waits for the working-set lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Working-set referrers looked at per snapshot: one that fails its checks is skipped for
/// the next, but a repository full of them costs no more than this many.
const MAX_CANDIDATES: usize = 4;
/// Largest working-set manifest read (the ones thaw writes are under 1 KiB).
const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// A recording is published at the latest this long after its first fault, however busy
/// the VM still is.
const MAX_RECORDING: Duration = Duration::from_secs(60);
/// How often the publisher looks at a recording.
const POLL: Duration = Duration::from_millis(100);

/// What a node does with working sets (`--working-sets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkingSetMode {
    /// Fetch a snapshot's working set first; record and publish one when it has none.
    #[default]
    Share,
    /// Fetch a snapshot's working set first; never record or publish one.
    Use,
    /// Ignore working sets: background fills go in file order.
    Off,
}

/// Working-set settings of a node cache.
#[derive(Debug, Clone)]
pub struct WorkingSetOptions {
    /// What the node does with working sets.
    pub mode: WorkingSetMode,
    /// A recording is published once no VM has touched a new chunk for this long.
    pub quiet: Duration,
}

impl Default for WorkingSetOptions {
    fn default() -> Self {
        Self { mode: WorkingSetMode::Share, quiet: Duration::from_secs(3) }
    }
}

/// What the registry holds for a snapshot.
enum Lookup {
    /// A usable working set: the recipe entries to fetch first.
    Usable(Vec<usize>),
    /// None usable among those looked at; `room` when they were fewer than a reader looks
    /// at, so that one more would be seen.
    Unusable { room: bool },
}

/// The snapshot a working set is attached to.
#[derive(Debug, Clone)]
pub(super) struct Subject {
    pub(super) reference: Reference,
    /// The snapshot manifest's descriptor: the working set's `subject`.
    pub(super) manifest: manifest::Reference,
}

impl Cache {
    /// The recipe entries a lazy restore's background fill fetches first: the snapshot's
    /// working set when the registry has a usable one, else none. When it has none and
    /// `fill` records, starts the task that publishes the recording.
    pub(super) async fn working_set_for(
        self: &Arc<Self>,
        subject: &Subject,
        fill: &Arc<MemoryFill>,
    ) -> Vec<usize> {
        if self.config.working_sets.mode == WorkingSetMode::Off {
            return Vec::new();
        }
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, self.find_working_set(subject, fill.recipe()))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {LOOKUP_TIMEOUT:?}")));
        match found {
            Ok(Lookup::Usable(order)) => {
                self.lazy.working_sets.used.fetch_add(1, Ordering::Relaxed);
                tracing::info!(reference = %subject.reference, entries = order.len(), "lazy restore: fetching the working set first");
                if let Some(r) = fill.recorder() {
                    r.freeze();
                }
                return order;
            }
            Ok(Lookup::Unusable { .. }) => {}
            Err(e) => {
                tracing::warn!(reference = %subject.reference, error = %e, "lazy restore: no working set (lookup failed); filling in file order")
            }
        }
        if fill.recorder().is_some() {
            let (cache, subject, fill) = (self.clone(), subject.clone(), fill.clone());
            tokio::spawn(async move { cache.publish_when_quiet(subject, fill).await });
        }
        Vec::new()
    }

    /// The usable working set of the snapshot, checked against its memory `recipe`: the
    /// first referrer of thaw's working-set type that passes every check. Candidates that
    /// fail are logged, counted and skipped; only a failing referrers listing is an error.
    async fn find_working_set(&self, subject: &Subject, recipe: &Recipe) -> Result<Lookup, String> {
        let repository = subject.reference.repository();
        let referrers = self
            .registry
            .referrers(repository, &subject.manifest.digest, Some(media::WORKING_SET_ARTIFACT))
            .await
            .map_err(|e| e.to_string())?;
        for r in referrers.iter().take(MAX_CANDIDATES) {
            match self.read_working_set(subject, r, recipe).await {
                Ok(order) => return Ok(Lookup::Usable(order)),
                Err(e) => {
                    self.lazy.working_sets.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(reference = %subject.reference, working_set = %r.digest, error = %e, "ignoring a working set");
                }
            }
        }
        Ok(Lookup::Unusable { room: referrers.len() < MAX_CANDIDATES })
    }

    /// Reads one working-set referrer and checks it: its manifest, its one layer (no larger
    /// than the recipe allows, refused before download), and every index against `recipe`.
    async fn read_working_set(
        &self,
        subject: &Subject,
        r: &Referrer,
        recipe: &Recipe,
    ) -> Result<Vec<usize>, String> {
        if r.size > MAX_MANIFEST_BYTES {
            return Err(format!("its manifest is {} bytes (at most {MAX_MANIFEST_BYTES})", r.size));
        }
        let repository = subject.reference.repository();
        let m =
            self.registry.get_manifest(repository, &r.digest.to_string()).await.map_err(|e| e.to_string())?;
        let s = summarize(&m.body, Some(&m.media_type)).map_err(|e| e.to_string())?;
        if s.artifact_type.as_deref() != Some(media::WORKING_SET_ARTIFACT) {
            return Err(format!("its artifactType is {:?}", s.artifact_type));
        }
        if s.subject.as_ref().map(|d| d.digest) != Some(subject.manifest.digest) {
            return Err("its subject is another manifest".into());
        }
        let layers: Vec<_> = s.blobs.iter().filter(|b| b.media_type == media::WORKING_SET_LAYER).collect();
        let [layer] = layers.as_slice() else {
            return Err(format!("it has {} working-set layers, not one", layers.len()));
        };
        let cap = WorkingSet::max_len(recipe.entries.len());
        if layer.size > cap {
            return Err(format!(
                "its list is {} bytes, more than a recipe of {} entries allows ({cap})",
                layer.size,
                recipe.entries.len()
            ));
        }
        let bytes = self
            .registry
            .get_blob_bytes(repository, &layer.digest, cap as usize)
            .await
            .map_err(|e| e.to_string())?;
        let set = WorkingSet::decode(&bytes).map_err(|e| e.to_string())?;
        set.order_in(recipe).map_err(|e| e.to_string())
    }

    /// Waits until the VMs of a first restore have touched no new chunk for the quiet
    /// period (or no lease holds the snapshot any more, or [`MAX_RECORDING`] passed since
    /// the first fault), then publishes what `fill` recorded.
    async fn publish_when_quiet(self: Arc<Self>, subject: Subject, fill: Arc<MemoryFill>) {
        let Some(recorder) = fill.recorder() else { return };
        let quiet = self.config.working_sets.quiet;
        loop {
            tokio::time::sleep(POLL).await;
            let leased = self.state.lock().expect("state lock").leased(&subject.manifest.digest);
            match recorder.quiet_and_age() {
                // No VM touched anything, and none will.
                None if !leased => {
                    recorder.freeze();
                    return;
                }
                Some((idle, age)) if idle >= quiet || age >= MAX_RECORDING || !leased => break,
                _ => {}
            }
        }
        let order = recorder.freeze();
        self.publish_working_set(&subject, fill.recipe(), order).await;
    }

    /// Pushes a working set as a referrer of the snapshot manifest, unless this process
    /// tried already or the registry has a usable one by now. A refusal (no push right) is
    /// logged once per process and counted; a restore never depends on this.
    async fn publish_working_set(&self, subject: &Subject, recipe: &Recipe, order: Vec<u32>) {
        if order.is_empty()
            || !self.lazy.working_sets_tried.lock().expect("tried lock").insert(subject.manifest.digest)
        {
            return;
        }
        let entries = order.len();
        let set = WorkingSet { memory: recipe.digest, entry_count: recipe.entries.len() as u32, order };
        let metrics = &self.lazy.working_sets;
        match self.push_working_set(subject, recipe, &set).await {
            Ok(Some(digest)) => {
                metrics.published.fetch_add(1, Ordering::Relaxed);
                tracing::info!(reference = %subject.reference, working_set = %digest, entries, "published the snapshot's working set");
            }
            Ok(None) => tracing::debug!(
                reference = %subject.reference,
                "the snapshot has a working set already (or {MAX_CANDIDATES} unusable ones); not publishing one"
            ),
            Err(e) if e.is_denied() => {
                metrics.refused.fetch_add(1, Ordering::Relaxed);
                if !metrics.refusal_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(reference = %subject.reference, error = %e, "the registry refused a working set: this node's credentials cannot push (restores are unaffected; further refusals are only counted in thaw_lazy_working_sets_publish_refused_total)");
                }
            }
            Err(e) => {
                metrics.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reference = %subject.reference, error = %e, "could not publish the snapshot's working set");
            }
        }
    }

    /// The uploads: the empty config, the list, then the manifest. `None` when a usable
    /// working set appeared since the restore looked (another node was first), or the
    /// snapshot has as many working sets as a reader looks at: a node adds one only while
    /// every existing one is unusable and the next reader would still see the new one.
    async fn push_working_set(
        &self,
        subject: &Subject,
        recipe: &Recipe,
        set: &WorkingSet,
    ) -> thaw_client::Result<Option<Sha256Digest>> {
        match self.find_working_set(subject, recipe).await {
            Ok(Lookup::Usable(_) | Lookup::Unusable { room: false }) => return Ok(None),
            Ok(Lookup::Unusable { room: true }) => {}
            Err(e) => return Err(thaw_client::Error::Snapshot(format!("looking for a working set: {e}"))),
        }
        let repository = subject.reference.repository();
        let list = Bytes::from(set.encode());
        let list_digest = Sha256Digest::of(&list);
        let size = list.len() as u64;
        let config = Bytes::from_static(EMPTY_CONFIG);
        self.registry.upload_blob_bytes(repository, &Sha256Digest::of(&config), config).await?;
        self.registry.upload_blob_bytes(repository, &list_digest, list).await?;
        let body = working_set_manifest(&subject.manifest, list_digest, size)
            .map_err(|e| thaw_client::Error::Snapshot(e.to_string()))?;
        let digest = Sha256Digest::of(&body);
        self.registry
            .put_manifest(repository, &digest.to_string(), Bytes::from(body), media::OCI_MANIFEST)
            .await?;
        Ok(Some(digest))
    }
}
