//! GC exclusion and fencing across replicas (docs/DECISIONS.md D26).
//!
//! - **Exclusion**: one GC run at a time, through a lock made of generations
//!   `gc/lock/<generation>`, each created with `PutMode::Create` (`If-None-Match: *` on
//!   S3, a hard link on the filesystem). The holder renews by creating the next generation;
//!   a contender takes over only after seeing the same newest generation unchanged for
//!   [`LOCK_TTL`] *on its own monotonic clock*, by creating the next generation itself, so
//!   exactly one of several contenders wins and no clock is compared with a store
//!   timestamp. The holder stops deleting once its last successful renewal is older than
//!   half the TTL, or the moment a renewal finds the next generation taken.
//! - **Fencing**: before deleting anything a run publishes a sweep record
//!   `gc/sweeps/<epoch>` (created with `PutMode::Create`) naming the packs, recipes and
//!   manifests it is about to delete, marks again, and deletes only what both marks found
//!   dead; `gc/sweeps/<epoch>.done` closes the record. Commits (`put_recipe`, `link_blob`,
//!   `link_manifest`) write first and then apply every new record to their index
//!   ([`Store::sync_sweeps`]: one LIST, plus one GET per new record): a commit that wrote
//!   before the record was published is seen by the second mark; one that checks after
//!   finds its content doomed and answers 503, and the client's retry stores it anew.
//! - **Stores that ignore conditional writes** (Garage 2.5): a probe at start-up finds it,
//!   and online GC then runs only while no other replica's serving lease is alive
//!   (observed to change within [`LEASE_FRESH`] on the observer's monotonic clock); the
//!   standalone `thaw-registry gc` refuses while any is.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{PutMode, PutOptions, PutPayload, UpdateVersion};
use thaw_schema::Sha256Digest;

use super::pack::PackId;
use super::{keys, Result, Store, StoreError};

/// A lock generation unchanged this long (as measured by the observer) is abandoned.
pub(crate) const LOCK_TTL: Duration = Duration::from_secs(30);
/// How often the holder renews: well before a contender could take over.
const LOCK_RENEW: Duration = Duration::from_secs(5);
/// How often serving registries renew their lease.
pub(crate) const LEASE_RENEW: Duration = Duration::from_secs(10);
/// A lease unchanged this long (observer's clock) belongs to a registry that stopped.
pub(crate) const LEASE_FRESH: Duration = Duration::from_secs(30);
/// Closed sweep records kept for replicas that have not looked for a while; one that
/// missed more rebuilds its whole chunk index.
const SWEEPS_KEPT: u64 = 64;

/// Which conditional writes the store honours (found by [`Store::probe_conditional_writes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ConditionalWrites {
    /// `PutMode::Create` fails on an existing object (S3 `If-None-Match: *`).
    pub create: bool,
    /// `PutMode::Update` fails when the ETag changed (S3 `If-Match`).
    pub update: bool,
}

/// The sweeps this process has applied (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Fence {
    /// Highest sweep epoch applied to the chunk index.
    applied: u64,
    /// Open sweeps, by epoch.
    open: BTreeMap<u64, OpenSweep>,
    /// A sweep was ever seen: links check that their content still exists.
    swept: bool,
}

/// What an open sweep may delete.
#[derive(Debug, Default)]
struct OpenSweep {
    packs: Vec<PackId>,
    recipes: HashSet<Sha256Digest>,
    manifests: HashSet<Sha256Digest>,
}

impl Fence {
    pub(crate) fn doomed_recipe(&self, digest: &Sha256Digest) -> bool {
        self.open.values().any(|s| s.recipes.contains(digest))
    }

    pub(crate) fn doomed_manifest(&self, digest: &Sha256Digest) -> bool {
        self.open.values().any(|s| s.manifests.contains(digest))
    }

    pub(crate) fn swept_any(&self) -> bool {
        self.swept
    }
}

/// What a sweep record says: what the run that wrote it may delete.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct SweepRecord {
    pub(crate) packs: Vec<String>,
    pub(crate) recipes: Vec<Sha256Digest>,
    pub(crate) manifests: Vec<Sha256Digest>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LockBody {
    owner: String,
    released: bool,
}

fn gc_error(why: String) -> StoreError {
    StoreError::Backend(object_store::Error::Generic { store: "gc", source: why.into() })
}

/// Parses `<20 digits>` or `<20 digits>.done`.
fn parse_epoch(name: &str) -> Option<(u64, bool)> {
    let (digits, done) = match name.strip_suffix(".done") {
        Some(d) => (d, true),
        None => (name, false),
    };
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, done))
}

impl Store {
    async fn create(&self, key: &Path, body: Vec<u8>) -> Result<bool> {
        let body_for_retry = Bytes::from(body.clone());
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.objects.put_opts(key, PutPayload::from(body), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            // Only stores the probe found without conditional writes get here, and GC then
            // refuses to run beside other replicas: a plain write is what they can do.
            Err(object_store::Error::NotImplemented) => self.put(key, body_for_retry).await.map(|()| true),
            Err(e) => Err(e.into()),
        }
    }

    /// Finds out which conditional writes the store honours, with a throw-away object
    /// under `gc/probe/`. Run once per process; GC across replicas needs `create`.
    pub async fn probe_conditional_writes(&self) -> Result<ConditionalWrites> {
        self.conditional
            .get_or_try_init(|| async {
                let key = keys::gc_probe(&hex::encode(rand::random::<[u8; 8]>()));
                let create_opts = || PutOptions { mode: PutMode::Create, ..Default::default() };
                let first =
                    self.objects.put_opts(&key, PutPayload::from_static(b"probe 1"), create_opts()).await;
                let create = match first {
                    Ok(_) => match self
                        .objects
                        .put_opts(&key, PutPayload::from_static(b"probe 2"), create_opts())
                        .await
                    {
                        Err(object_store::Error::AlreadyExists { .. }) => true,
                        Ok(_) => false,
                        Err(e) => return Err(e.into()),
                    },
                    Err(object_store::Error::NotImplemented) => {
                        self.put(&key, Bytes::from_static(b"probe 1")).await?;
                        false
                    }
                    Err(e) => return Err(e.into()),
                };
                let stale = UpdateVersion { e_tag: Some("\"0000000000000000\"".into()), version: None };
                let opts = PutOptions { mode: PutMode::Update(stale), ..Default::default() };
                let update =
                    match self.objects.put_opts(&key, PutPayload::from_static(b"probe 3"), opts).await {
                        Err(object_store::Error::Precondition { .. }) => true,
                        Ok(_) | Err(object_store::Error::NotImplemented) => false,
                        Err(e) => return Err(e.into()),
                    };
                let _ = self.objects.delete(&key).await;
                let found = ConditionalWrites { create, update };
                tracing::info!(create, update, "conditional writes probed");
                Ok(found)
            })
            .await
            .copied()
    }

    // ---- sweep records ----

    /// Lists the sweep records: epoch → closed.
    async fn list_sweeps(&self) -> Result<BTreeMap<u64, bool>> {
        let mut out = BTreeMap::new();
        for key in self.list_keys(&Path::from(keys::GC_SWEEPS)).await? {
            if let Some((epoch, done)) = key.filename().and_then(parse_epoch) {
                let closed = out.entry(epoch).or_insert(false);
                *closed |= done;
            }
        }
        Ok(out)
    }

    /// Applies every sweep record published since the last call to the chunk index (the
    /// packs they name are forgotten, so their chunks count as missing unless a copy is
    /// found) and returns the fence, held: commits check their content under it.
    pub(crate) async fn sync_sweeps(&self) -> Result<tokio::sync::MutexGuard<'_, Fence>> {
        let mut fence = self.fence.lock().await;
        let listed = self.list_sweeps().await?;
        let Some(&oldest) = listed.keys().next() else { return Ok(fence) };
        if fence.applied + 1 < oldest && fence.applied < *listed.keys().last().expect("non-empty") {
            // Records this process never applied were pruned: start the index afresh.
            self.reset_index().await;
        }
        // Packs of sweeps that ended: deleted, unless their run died first.
        let mut ended: Vec<PackId> = Vec::new();
        for (&epoch, &closed) in &listed {
            if epoch > fence.applied {
                let record = self.read_sweep(epoch).await?;
                let packs: Vec<PackId> = record.packs.iter().filter_map(|p| PackId::parse(p)).collect();
                self.index.write().expect("index lock").forget_packs(&packs);
                for digest in &record.recipes {
                    self.recipes.remove(digest);
                }
                fence.swept = true;
                if closed {
                    ended.extend(packs);
                } else {
                    let recipes = record.recipes.into_iter().collect();
                    let manifests = record.manifests.into_iter().collect();
                    fence.open.insert(epoch, OpenSweep { packs, recipes, manifests });
                }
                fence.applied = epoch;
            } else if closed {
                ended.extend(fence.open.remove(&epoch).map(|s| s.packs).unwrap_or_default());
            }
        }
        let pruned: Vec<u64> = fence.open.keys().filter(|e| listed.get(e) != Some(&false)).copied().collect();
        for epoch in pruned {
            ended.extend(fence.open.remove(&epoch).map(|s| s.packs).unwrap_or_default());
        }
        // A run that died before deleting (its record closed by the next lock holder) left
        // its packs stored, holding chunks its second mark found live: they may be read
        // again once no open sweep names them (before, every replica that had applied the
        // record kept them forgotten, and blobs using them failed to read).
        let still_doomed: HashSet<&PackId> = fence.open.values().flat_map(|s| s.packs.iter()).collect();
        ended.retain(|p| !still_doomed.contains(p));
        let mut index = self.index.write().expect("index lock");
        index.unforget_packs(&ended);
        if fence.open.is_empty() {
            index.drop_doomed();
        }
        drop(index);
        Ok(fence)
    }

    /// Forgets every chunk location (after missing sweep records), so the next question
    /// re-reads every pack index still listed.
    async fn reset_index(&self) {
        let mut refresh = self.refresh.lock().await;
        *refresh = super::chunks::RefreshState::default();
        *self.index.write().expect("index lock") = super::index::ChunkIndex::default();
        tracing::warn!("missed GC sweep records: chunk index rebuilt from the store");
    }

    async fn read_sweep(&self, epoch: u64) -> Result<SweepRecord> {
        let key = keys::gc_sweep(epoch, false);
        match self.get_opt(&key).await? {
            Some(body) => serde_json::from_slice(&body).map_err(|e| super::corrupt(&key, e)),
            // Pruned between the listing and now: nothing left to fence.
            None => Ok(SweepRecord::default()),
        }
    }

    /// Publishes the record of a sweep about to run; fails when another run took the epoch.
    pub(crate) async fn publish_sweep(&self, record: &SweepRecord) -> Result<u64> {
        let epoch = self.list_sweeps().await?.keys().last().copied().unwrap_or(0) + 1;
        let body = serde_json::to_vec(record).expect("sweep record serializes");
        if !self.create(&keys::gc_sweep(epoch, false), body).await? {
            return Err(gc_error(format!("sweep epoch {epoch} was taken by another GC run; this run stops")));
        }
        Ok(epoch)
    }

    /// Closes a sweep record, and prunes records closed long ago.
    pub(crate) async fn close_sweep(&self, epoch: u64) -> Result<()> {
        self.create(&keys::gc_sweep(epoch, true), b"done".to_vec()).await?;
        for (old, closed) in self.list_sweeps().await? {
            if closed && old + SWEEPS_KEPT < epoch {
                let _ = self.objects.delete(&keys::gc_sweep(old, false)).await;
                let _ = self.objects.delete(&keys::gc_sweep(old, true)).await;
            }
        }
        Ok(())
    }

    /// Closes the records of runs that died before closing them (called by the lock holder).
    pub(crate) async fn close_abandoned_sweeps(&self) -> Result<()> {
        for (epoch, closed) in self.list_sweeps().await? {
            if !closed {
                tracing::warn!(epoch, "closing the sweep record of a GC run that stopped midway");
                self.create(&keys::gc_sweep(epoch, true), b"abandoned".to_vec()).await?;
            }
        }
        Ok(())
    }

    // ---- serving leases ----

    /// Renews this process's serving lease until the task is dropped.
    pub(crate) async fn keep_lease(self: Arc<Self>, name: String) {
        let key = keys::gc_lease(&name);
        let mut n = 0u64;
        loop {
            // The body changes on every renewal, so observers see it change whatever the
            // store's timestamps say.
            n += 1;
            if let Err(e) =
                self.objects.put(&key, PutPayload::from(format!("serving {n}").into_bytes())).await
            {
                tracing::warn!(error = %e, "could not renew the serving lease");
            }
            tokio::time::sleep(LEASE_RENEW).await;
        }
    }

    /// The serving leases other than `own` that are alive: seen to change within
    /// [`LEASE_FRESH`] on this process's monotonic clock. Returns at the first change seen,
    /// or after watching the others unchanged for that long (those are deleted: their
    /// registries stopped).
    pub(crate) async fn live_leases(&self, own: Option<&str>) -> Result<Vec<String>> {
        let read = || async {
            let mut out = BTreeMap::new();
            for key in self.list_keys(&Path::from(keys::GC_LEASES)).await? {
                let Some(name) = key.filename().map(str::to_owned) else { continue };
                if Some(name.as_str()) == own {
                    continue;
                }
                if let Some(body) = self.get_opt(&key).await? {
                    out.insert(name, body);
                }
            }
            Ok::<_, StoreError>(out)
        };
        let first = read().await?;
        if first.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        while started.elapsed() < LEASE_FRESH {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = read().await?;
            let changed: Vec<String> = now
                .iter()
                .filter(|(name, body)| first.get(*name).is_some_and(|b| b != *body))
                .map(|(n, _)| n.clone())
                .collect();
            let added: Vec<String> = now.keys().filter(|n| !first.contains_key(*n)).cloned().collect();
            if !changed.is_empty() || !added.is_empty() {
                return Ok(changed.into_iter().chain(added).collect());
            }
        }
        for name in first.keys() {
            let _ = self.objects.delete(&keys::gc_lease(name)).await;
        }
        Ok(Vec::new())
    }
}

/// What the GC lock holder knows about its hold.
#[derive(Debug)]
struct Hold {
    generation: u64,
    renewed: Instant,
    lost: Option<String>,
}

/// The GC lock, held until [`GcLock::release`] (or the process dies: then a contender takes
/// it over after [`LOCK_TTL`]).
pub(crate) struct GcLock {
    store: Arc<Store>,
    owner: String,
    hold: Arc<Mutex<Hold>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Store {
    /// The newest lock generation and its body.
    async fn newest_lock(&self) -> Result<Option<(u64, Option<LockBody>)>> {
        let newest = self
            .list_keys(&Path::from(keys::GC_LOCK))
            .await?
            .iter()
            .filter_map(|k| k.filename().and_then(|n| n.parse::<u64>().ok()))
            .max();
        let Some(generation) = newest else { return Ok(None) };
        let body = self.get_opt(&keys::gc_lock(generation)).await?;
        Ok(Some((generation, body.and_then(|b| serde_json::from_slice(&b).ok()))))
    }
}

impl GcLock {
    /// Takes the GC lock: at once when it is free or released; after watching the newest
    /// generation unchanged for [`LOCK_TTL`] when its holder stopped renewing; fails when
    /// the holder is alive (it renewed while we watched).
    pub(crate) async fn acquire(store: Arc<Store>) -> Result<Self> {
        let owner = format!("{}-{}", std::process::id(), hex::encode(rand::random::<[u8; 6]>()));
        let mut watched: Option<(u64, Instant)> = None;
        loop {
            let newest = store.newest_lock().await?;
            let next = match &newest {
                None => Some(1),
                Some((generation, Some(body))) if body.released => Some(generation + 1),
                Some((generation, body)) => match watched {
                    Some((seen, since)) if seen == *generation && since.elapsed() >= LOCK_TTL => {
                        Some(generation + 1)
                    }
                    Some((seen, _)) if seen != *generation => {
                        let holder = body.as_ref().map_or("unknown", |b| b.owner.as_str());
                        return Err(gc_error(format!(
                            "another GC run ({holder}) holds the GC lock and is renewing it; this run is skipped"
                        )));
                    }
                    Some(_) => None,
                    None => {
                        watched = Some((*generation, Instant::now()));
                        None
                    }
                },
            };
            let Some(next) = next else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let body = serde_json::to_vec(&LockBody { owner: owner.clone(), released: false }).expect("json");
            if !store.create(&keys::gc_lock(next), body).await? {
                return Err(gc_error("another GC run took the GC lock first; this run is skipped".into()));
            }
            if let Some((old, _)) = newest {
                let _ = store.objects.delete(&keys::gc_lock(old)).await;
            }
            let hold = Arc::new(Mutex::new(Hold { generation: next, renewed: Instant::now(), lost: None }));
            let renewer = tokio::spawn(Self::renew(store.clone(), owner.clone(), hold.clone()));
            tracing::info!(generation = next, %owner, "GC lock taken");
            return Ok(Self { store, owner, hold, renewer });
        }
    }

    async fn renew(store: Arc<Store>, owner: String, hold: Arc<Mutex<Hold>>) {
        loop {
            tokio::time::sleep(LOCK_RENEW).await;
            let generation = hold.lock().expect("hold lock").generation;
            let body = serde_json::to_vec(&LockBody { owner: owner.clone(), released: false }).expect("json");
            match store.create(&keys::gc_lock(generation + 1), body).await {
                Ok(true) => {
                    {
                        let mut h = hold.lock().expect("hold lock");
                        h.generation = generation + 1;
                        h.renewed = Instant::now();
                    }
                    let _ = store.objects.delete(&keys::gc_lock(generation)).await;
                }
                Ok(false) => {
                    tracing::error!("the GC lock was taken over; this run stops");
                    hold.lock().expect("hold lock").lost = Some("another GC run took the lock over".into());
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the GC lock"),
            }
        }
    }

    /// Fails unless the lock is certainly still ours: not taken over, and renewed within
    /// half its TTL (a contender waits the whole TTL on its own clock before taking it).
    pub(crate) fn ensure_held(&self) -> Result<()> {
        let h = self.hold.lock().expect("hold lock");
        if let Some(why) = &h.lost {
            return Err(gc_error(format!("GC lock lost ({why}); stopped before deleting more")));
        }
        let age = h.renewed.elapsed();
        if age >= LOCK_TTL / 2 {
            return Err(gc_error(format!(
                "GC lock not renewed for {}s (store unreachable?); stopped before deleting more",
                age.as_secs()
            )));
        }
        Ok(())
    }

    /// Releases the lock (the next generation says so).
    pub(crate) async fn release(self) {
        self.renewer.abort();
        let generation = self.hold.lock().expect("hold lock").generation;
        let body = serde_json::to_vec(&LockBody { owner: self.owner.clone(), released: true }).expect("json");
        match self.store.create(&keys::gc_lock(generation + 1), body).await {
            Ok(true) => {
                let _ = self.store.objects.delete(&keys::gc_lock(generation)).await;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not release the GC lock; it expires in {}s", LOCK_TTL.as_secs())
            }
        }
    }
}
