//! The cache itself: ensure, release, prefetch, eviction, recovery and scrubbing.
//!
//! Rooms: this file opens the cache (recovery) and answers `ensure` (hit or miss);
//! `materialize` restores a miss, `evict` makes room and scrubs, `leases` and `spares` keep
//! what a hit hands out, `flush` writes volatile state, `report` answers listings and
//! holdings, `publish` pushes a local snapshot, `peer_io` reads chunks for the peer service,
//! `lazy` restores by page fault and `working_set` finds and publishes working sets for it.
//!
//! On disk, under the cache directory:
//!
//! ```text
//! index.redb                 the index (see `index.rs`)
//! leases.log[.old]           leases not yet copied into the index (see `lease_log.rs`)
//! snapshots/<hex>/<title>    complete, verified snapshots; a directory here that the index
//!                            does not list is an orphan and is removed at start
//! work/                      materializations in progress and directories being deleted;
//!                            emptied at start
//! leases/<lease>/<title>     the private disk copy handed out with each lease
//! spares/<hex>-<nonce>-<title>  a disk copy made ahead of time, so a hit renames instead of copying
//! ```
//!
//! Order of writes: a snapshot's files are written and verified in `work/`, synced, renamed
//! into `snapshots/`, and only then recorded in the index. An eviction first takes the
//! directory out of `snapshots/` (a rename into `work/`), then removes the record, then the
//! bytes. A crash at any point leaves either a record with its files, or files without a
//! record (removed at start), never a record without its files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thaw_client::{ClientOptions, FetchedManifest, Reference, Registry, Stats};
use thaw_schema::cache_api::{BytesBySource, EnsureResponse};
use thaw_schema::media::FileRole;
use thaw_schema::Sha256Digest;
use tokio::sync::Notify;

use crate::error::{CacheError, Result};
use crate::fsutil::{self, allocated_bytes};
use crate::index::{Index, LeaseRecord, RefRecord, SnapshotRecord, VolatileBatch};
use crate::lease_log::LeaseLog;
use crate::metrics::Metrics;
use crate::peer::{PeerBook, PeerOptions};

mod evict;
mod flush;
mod lazy;
mod leases;
mod materialize;
mod peer_io;
mod publish;
mod report;
mod spares;
mod working_set;
pub(crate) use peer_io::ChunkPlace;

pub use evict::{DiskReport, ScrubReport};
pub use working_set::{WorkingSetMode, WorkingSetOptions};

/// How the cache is set up.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// The registry (`host[:port]`) snapshots come from; references without a host use it.
    pub registry: String,
    /// Client settings (plain HTTP, credentials, retries).
    pub client: ClientOptions,
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// Capacity in bytes of allocated disk.
    pub capacity: u64,
    /// This node's name, as published in its holdings.
    pub node_name: String,
    /// How long a tag's resolution is trusted before `ensure` asks the registry again.
    pub tag_ttl: Duration,
    /// Where peers reach this node, published in its holdings.
    pub peer_endpoint: Option<String>,
    /// P2P: the cluster token, timeouts and upload limits.
    pub peer: PeerOptions,
    /// How long a lease lasts unless renewed; then the cache releases it itself.
    pub lease_ttl: Duration,
    /// The only directory tree `publish` reads snapshots from (canonical); `None` turns
    /// publishing off.
    pub publish_root: Option<PathBuf>,
    /// Lazy restores: using, recording and publishing working sets.
    pub working_sets: WorkingSetOptions,
}

/// One lease: a snapshot in use, and its private disk copy.
#[derive(Debug, Clone)]
struct Lease {
    record: LeaseRecord,
    /// Bytes allocated to the private disk copy.
    allocated: u64,
}

/// A disk copy made ahead of time.
#[derive(Debug, Clone)]
struct Spare {
    path: PathBuf,
    allocated: u64,
}

/// In-memory state: the index's records plus what only lives while the process runs.
#[derive(Debug, Default)]
struct State {
    snapshots: HashMap<Sha256Digest, SnapshotRecord>,
    leases: HashMap<String, Lease>,
    refs: HashMap<String, RefRecord>,
    /// Snapshots a materialization is copying chunks from: not evicted meanwhile.
    pins: HashMap<Sha256Digest, u32>,
    /// Estimated bytes of materializations in progress.
    reserved: u64,
    spares: HashMap<Sha256Digest, Spare>,
    spares_in_progress: HashSet<Sha256Digest>,
    dirty_snapshots: HashSet<Sha256Digest>,
    dirty_leases: HashSet<String>,
    dirty_refs: HashSet<String>,
}

impl State {
    fn used(&self) -> u64 {
        self.snapshots.values().map(|s| s.allocated_bytes).sum::<u64>()
            + self.leases.values().map(|l| l.allocated).sum::<u64>()
            + self.spares.values().map(|s| s.allocated).sum::<u64>()
            + self.reserved
    }

    fn leased(&self, digest: &Sha256Digest) -> bool {
        self.leases.values().any(|l| l.record.digest == *digest)
    }

    /// Undoes what a materialization (eager or lazy) held: one pin of each of `pinned`,
    /// and `reserved` bytes of room.
    fn unhold(&mut self, pinned: &[Sha256Digest], reserved: u64) {
        for d in pinned {
            if let Some(n) = self.pins.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    self.pins.remove(d);
                }
            }
        }
        self.reserved -= reserved;
    }
}

/// Directories under the cache directory.
#[derive(Debug)]
struct Dirs {
    snapshots: PathBuf,
    work: PathBuf,
    leases: PathBuf,
    spares: PathBuf,
}

/// The node cache. Shared behind `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Cache {
    config: CacheConfig,
    dirs: Dirs,
    index: Arc<Index>,
    /// Leases taken or renewed since the flusher last copied them into the index.
    lease_log: Arc<LeaseLog>,
    registry: Arc<Registry>,
    state: Mutex<State>,
    /// One lock per snapshot digest: held while it is materialized or evicted, so
    /// concurrent `ensure`s of one snapshot do the work once.
    flights: Mutex<HashMap<Sha256Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// `ensure`s in progress; prefetches wait for none.
    active_ensures: AtomicUsize,
    ensures_idle: Notify,
    prefetch_slot: tokio::sync::Semaphore,
    /// Woken when holdings change.
    pub(crate) holdings_changed: Notify,
    /// Woken when volatile state needs writing.
    dirty: Notify,
    /// Woken when a spare disk copy was used up or a snapshot arrived.
    spares_wanted: Notify,
    pub(crate) metrics: Metrics,
    /// Peers to avoid, and the P2P counters.
    pub(crate) peers: Arc<PeerBook>,
    /// Snapshots being materialized, for the swarm (`swarm/`).
    pub(crate) swarm: Arc<crate::swarm::InProgress>,
    /// Peer uploads in progress, in total.
    pub(crate) uploads: Arc<tokio::sync::Semaphore>,
    /// Peer uploads in progress, per peer address.
    pub(crate) uploads_per_peer: Mutex<HashMap<IpAddr, Arc<tokio::sync::Semaphore>>>,
    /// The HTTP client for peers.
    pub(crate) peer_http: reqwest::Client,
    /// Lazy restores in progress and their page servers (`lazy.rs`).
    pub(crate) lazy: crate::lazy::LazyRestores,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Counts the `ensure`s in progress.
struct ActiveEnsure<'a>(&'a Cache);

impl Drop for ActiveEnsure<'_> {
    fn drop(&mut self) {
        if self.0.active_ensures.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.ensures_idle.notify_waiters();
        }
    }
}

impl Cache {
    /// Opens the cache directory, recovering from whatever a crash left: work in progress and
    /// orphaned directories are removed, index entries whose files are missing are dropped.
    pub fn open(mut config: CacheConfig) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&config.cache_dir)
            .map_err(|e| CacheError::io("creating", &config.cache_dir, e))?;
        if let Some(publish_root) = &config.publish_root {
            config.publish_root = Some(publish::check_publish_root(publish_root, &config.cache_dir)?);
        }
        if config.lease_ttl.is_zero() {
            return Err(CacheError::BadRequest("the lease TTL must be at least a second".into()));
        }
        let root = &config.cache_dir;
        let dirs = Dirs {
            snapshots: root.join("snapshots"),
            work: root.join("work"),
            leases: root.join("leases"),
            spares: root.join("spares"),
        };
        for d in [&dirs.snapshots, &dirs.work, &dirs.leases, &dirs.spares] {
            std::fs::create_dir_all(d).map_err(|e| CacheError::io("creating", d, e))?;
        }
        for d in [&dirs.work, &dirs.spares] {
            for entry in std::fs::read_dir(d).map_err(|e| CacheError::io("reading", d, e))?.flatten() {
                fsutil::remove_all(&entry.path());
            }
        }
        let index = Index::open(&root.join("index.redb"))?;
        let loaded = index.load()?;
        // The index's leases, then the log's (a later line for a lease wins).
        let (lease_log, logged) = LeaseLog::open(root)?;
        let mut leases: HashMap<String, LeaseRecord> = HashMap::new();
        for (id, record) in loaded.leases.into_iter().chain(logged) {
            leases.insert(id, record);
        }
        let mut state = State::default();
        for mut record in loaded.snapshots {
            let dir = dirs.snapshots.join(record.digest.hex());
            let complete = record.files.iter().all(|f| {
                std::fs::metadata(dir.join(&f.title)).is_ok_and(|m| m.is_file() && m.len() == f.size)
            });
            if complete {
                record.allocated_bytes = allocated_bytes(&dir);
                state.snapshots.insert(record.digest, record);
            } else {
                tracing::warn!(digest = %record.digest, "files of an indexed snapshot are missing; dropping it");
                index.remove_snapshot(&record.digest)?;
            }
        }
        let entries =
            std::fs::read_dir(&dirs.snapshots).map_err(|e| CacheError::io("reading", &dirs.snapshots, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let known = format!("sha256:{name}")
                .parse::<Sha256Digest>()
                .is_ok_and(|d| state.snapshots.contains_key(&d));
            if !known {
                tracing::info!(dir = %entry.path().display(), "removing an orphaned snapshot directory");
                fsutil::remove_all(&entry.path());
            }
        }
        for (id, mut record) in leases {
            if record.expires_ms == 0 {
                // Written before leases had a TTL: one full TTL from now.
                record.expires_ms = now_ms() + config.lease_ttl.as_millis() as u64;
            }
            if state.snapshots.contains_key(&record.digest) {
                let allocated = allocated_bytes(&dirs.leases.join(&id));
                state.leases.insert(id, Lease { record, allocated });
            }
        }
        let entries =
            std::fs::read_dir(&dirs.leases).map_err(|e| CacheError::io("reading", &dirs.leases, e))?;
        for entry in entries.flatten() {
            if !state.leases.contains_key(entry.file_name().to_string_lossy().as_ref()) {
                fsutil::remove_all(&entry.path());
            }
        }
        state.refs = loaded.refs.into_iter().collect();
        // The logged leases go into the index, and the log starts empty.
        let batch = VolatileBatch {
            leases_put: state.leases.iter().map(|(id, l)| (id.clone(), l.record.clone())).collect(),
            ..Default::default()
        };
        index.write_volatile(&batch)?;
        lease_log.reset()?;
        let registry = Arc::new(Registry::new(&config.registry, &config.client, Arc::new(Stats::new()))?);
        let cache = Arc::new(Self {
            dirs,
            index: Arc::new(index),
            lease_log: Arc::new(lease_log),
            registry,
            state: Mutex::new(state),
            flights: Mutex::default(),
            active_ensures: AtomicUsize::new(0),
            ensures_idle: Notify::new(),
            prefetch_slot: tokio::sync::Semaphore::new(1),
            holdings_changed: Notify::new(),
            dirty: Notify::new(),
            spares_wanted: Notify::new(),
            metrics: Metrics::default(),
            peers: Arc::default(),
            swarm: Arc::default(),
            uploads: Arc::new(tokio::sync::Semaphore::new(config.peer.max_uploads.max(1))),
            uploads_per_peer: Mutex::default(),
            lazy: crate::lazy::LazyRestores::default(),
            peer_http: thaw_tls::configure_client(
                reqwest::Client::builder().pool_max_idle_per_host(4),
                config.peer.tls_ca.as_slice(),
                config.peer.tls_identity.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path())),
            )
            .map_err(|e| CacheError::BadRequest(format!("peer TLS: {e}")))?
            .build()
            .map_err(|e| CacheError::BadRequest(format!("peer HTTP client: {e}")))?,
            config,
        });
        cache.update_gauges();
        Ok(cache)
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn flight(&self, digest: Sha256Digest) -> Arc<tokio::sync::Mutex<()>> {
        self.flights.lock().expect("flights lock").entry(digest).or_default().clone()
    }

    fn parse_reference(&self, input: &str) -> Result<Reference> {
        let reference = Reference::parse_with_default(input, Some(&self.config.registry))
            .map_err(|e| CacheError::BadRequest(e.to_string()))?;
        if reference.registry() != self.config.registry {
            return Err(CacheError::BadRequest(format!(
                "{reference} is on registry {}, but this cache pulls from {}",
                reference.registry(),
                self.config.registry
            )));
        }
        Ok(reference)
    }

    /// Makes the snapshot present, takes a lease on it and answers with its files.
    pub async fn ensure(&self, input: &str) -> Result<EnsureResponse> {
        let started = Instant::now();
        let result = self.ensure_inner(input, started).await;
        let seconds = started.elapsed().as_secs_f64();
        match &result {
            Ok(r) => self.metrics.record_ensure(r.hit, seconds, &r.bytes),
            Err(_) => self.metrics.record_ensure_error(seconds),
        }
        result
    }

    async fn ensure_inner(&self, input: &str, started: Instant) -> Result<EnsureResponse> {
        self.active_ensures.fetch_add(1, Ordering::SeqCst);
        let _active = ActiveEnsure(self);
        let reference = self.parse_reference(input)?;
        let (digest, manifest) = self.resolve(&reference).await?;
        let key = reference.to_string();
        if let Some(resp) = self.try_hit(&key, digest, started).await? {
            return Ok(resp);
        }
        let flight = self.flight(digest);
        let _guard = flight.lock().await;
        if let Some(resp) = self.try_hit(&key, digest, started).await? {
            return Ok(resp);
        }
        let bytes = self.materialize(&reference, digest, manifest).await?;
        let mut resp = self
            .try_hit(&key, digest, started)
            .await?
            .ok_or_else(|| CacheError::Index(format!("{key} was materialized but is not in the index")))?;
        resp.hit = false;
        resp.bytes = bytes;
        Ok(resp)
    }

    /// Materializes the snapshot in the background, after any `ensure` in progress, and
    /// takes no lease.
    pub async fn prefetch(self: &Arc<Self>, input: &str) -> Result<String> {
        let reference = self.parse_reference(input)?;
        let cache = self.clone();
        let key = reference.to_string();
        tokio::spawn(async move {
            let _slot = cache.prefetch_slot.acquire().await.expect("semaphore open");
            loop {
                let idle = cache.ensures_idle.notified();
                if cache.active_ensures.load(Ordering::SeqCst) == 0 {
                    break;
                }
                idle.await;
            }
            let result = async {
                let (digest, manifest) = cache.resolve(&reference).await?;
                if cache.state.lock().expect("state lock").snapshots.contains_key(&digest) {
                    return Ok(());
                }
                let flight = cache.flight(digest);
                let _guard = flight.lock().await;
                if !cache.state.lock().expect("state lock").snapshots.contains_key(&digest) {
                    cache.materialize(&reference, digest, manifest).await?;
                }
                Ok::<_, CacheError>(())
            }
            .await;
            match result {
                Ok(()) => tracing::info!(reference = %reference, "prefetched"),
                Err(e) => tracing::warn!(reference = %reference, error = %e, "prefetch failed"),
            }
        });
        Ok(key)
    }

    /// The digest a reference names: its own, a fresh tag resolution, or the registry's answer
    /// (with the manifest, which a miss needs anyway). If the registry cannot be reached, a
    /// stale resolution is used rather than failing a restore the cache could serve.
    async fn resolve(&self, reference: &Reference) -> Result<(Sha256Digest, Option<FetchedManifest>)> {
        if let Some(d) = reference.digest() {
            return Ok((d, None));
        }
        let key = reference.to_string();
        let known = self.state.lock().expect("state lock").refs.get(&key).copied();
        if let Some(r) = known {
            if now_ms().saturating_sub(r.resolved_ms) < self.config.tag_ttl.as_millis() as u64 {
                return Ok((r.digest, None));
            }
        }
        match self.registry.get_manifest(reference.repository(), &reference.manifest_reference()).await {
            Ok(m) => {
                let mut st = self.state.lock().expect("state lock");
                st.refs.insert(key.clone(), RefRecord { digest: m.digest, resolved_ms: now_ms() });
                st.dirty_refs.insert(key);
                drop(st);
                self.dirty.notify_one();
                Ok((m.digest, Some(m)))
            }
            Err(e) => match known {
                Some(r) if !e.is_not_found() => {
                    tracing::warn!(reference = %key, error = %e, "registry unreachable; using the last resolution of the tag");
                    Ok((r.digest, None))
                }
                _ => Err(e.into()),
            },
        }
    }

    /// If the snapshot is cached and intact, takes a lease and answers. The filesystem work
    /// of a hit (the files' sizes and times, the lease's log line, the spare disk copy
    /// moved into the lease) is one trip to the blocking pool; only a hit without a spare
    /// copies the disk image, in a second one.
    async fn try_hit(
        &self,
        key: &str,
        digest: Sha256Digest,
        started: Instant,
    ) -> Result<Option<EnsureResponse>> {
        let (record, spare) = {
            let mut st = self.state.lock().expect("state lock");
            let Some(record) = st.snapshots.get(&digest).cloned() else {
                return Ok(None);
            };
            (record, st.spares.remove(&digest))
        };
        let t0 = Instant::now();
        let dir = self.dirs.snapshots.join(digest.hex());
        let lease_id = fsutil::nonce();
        let disk = record.files.iter().find(|f| f.role.as_deref() == Some(FileRole::Disk.key())).cloned();
        let now = now_ms();
        let lease = LeaseRecord {
            digest,
            reference: key.to_owned(),
            created_ms: now,
            expires_ms: now + self.config.lease_ttl.as_millis() as u64,
        };
        let mut check_files = true;
        let mut spare = spare;
        let prepared = loop {
            let job = HitJob {
                lease_log: self.lease_log.clone(),
                dir: dir.clone(),
                record: record.clone(),
                check_files,
                lease_id: lease_id.clone(),
                lease: lease.clone(),
                lease_dir: self.dirs.leases.join(&lease_id),
                disk_title: disk.as_ref().map(|d| d.title.clone()),
                spare: spare.take(),
            };
            let prepared = tokio::task::spawn_blocking(move || job.run())
                .await
                .map_err(|source| CacheError::Task { what: "hit", source })?;
            match prepared {
                Ok(HitPrep::Touched(unused)) => {
                    // A written file changes its mtime: such a snapshot is checked before use.
                    self.return_spare(digest, unused);
                    if !self.verify(&record).await? {
                        tracing::warn!(%digest, "a cached file was modified; re-fetching the snapshot");
                        self.quarantine(&digest).await?;
                        return Ok(None);
                    }
                    check_files = false;
                }
                Ok(leased @ HitPrep::Leased { .. }) => break leased,
                Err(e) => {
                    // The job gave the spare back only on success paths: it may be spent.
                    return Err(e);
                }
            }
        };
        let HitPrep::Leased { disk_copy, disk_source_allocated } = prepared else {
            unreachable!("the loop breaks only on a lease")
        };
        let t_persist = t0.elapsed();
        let had_spare = disk_copy.is_some();
        let lease_expires_ms = {
            let mut st = self.state.lock().expect("state lock");
            let Some(rec) = st.snapshots.get_mut(&digest) else {
                // Evicted meanwhile: the logged lease is dropped with its snapshot (the flush
                // and a start write no lease of a snapshot the index does not hold).
                st.dirty_leases.insert(lease_id.clone());
                drop(st);
                self.lease_log.confirm(&lease_id);
                self.dirty.notify_one();
                let lease_dir = self.dirs.leases.join(&lease_id);
                tokio::task::spawn_blocking(move || fsutil::remove_all(&lease_dir));
                return Ok(None);
            };
            rec.last_used_ms = now;
            if !rec.references.iter().any(|r| r == key) {
                rec.references.push(key.to_owned());
            }
            let expires_ms = lease.expires_ms;
            let allocated = disk_copy.as_ref().map_or(0, |(_, a)| *a);
            st.leases.insert(lease_id.clone(), Lease { record: lease, allocated });
            st.dirty_snapshots.insert(digest);
            expires_ms
        };
        self.lease_log.confirm(&lease_id);
        self.dirty.notify_one();
        let mut files = BTreeMap::new();
        for f in &record.files {
            let name = f.role.clone().unwrap_or_else(|| f.title.clone());
            files.insert(name, dir.join(&f.title).display().to_string());
        }
        if let Some(disk) = disk {
            let path = match disk_copy {
                Some((path, _)) => path,
                None => {
                    // No spare: the copy counts against capacity like everything else, so
                    // room is made first.
                    let evicted = {
                        let mut st = self.state.lock().expect("state lock");
                        self.make_room(&mut st, disk_source_allocated, digest)
                    };
                    let room = match evicted {
                        Ok(evicted) => self.finish_evictions(evicted).await,
                        Err(e) => Err(e),
                    };
                    let copied = match room {
                        Ok(()) => self.copy_into_lease(&lease_id, &dir.join(&disk.title), &disk.title).await,
                        Err(e) => Err(e),
                    };
                    match copied {
                        Ok(path) => path,
                        Err(e) => {
                            self.end_lease(&lease_id);
                            return Err(e);
                        }
                    }
                }
            };
            files.insert(FileRole::Disk.key().to_owned(), path.display().to_string());
        }
        let t_copy = t0.elapsed();
        self.update_gauges();
        self.holdings_changed.notify_one();
        self.spares_wanted.notify_one();
        tracing::debug!(
            %digest,
            lease = %lease_id,
            prepare_us = t_persist.as_micros() as u64,
            total_us = t_copy.as_micros() as u64,
            spare = had_spare,
            "hit"
        );
        Ok(Some(EnsureResponse {
            reference: key.to_owned(),
            digest,
            lease: lease_id,
            lease_expires_ms,
            files,
            bytes: BytesBySource::default(),
            millis: started.elapsed().as_millis() as u64,
            hit: true,
            memory_socket: None,
        }))
    }
}

/// What a hit does off the async threads, in order: checks that the snapshot's files have
/// the size and modification time they were committed with (unless `check_files` is off,
/// after a verification), appends the lease to the lease log, and moves the spare disk copy (if any)
/// into the lease's directory.
struct HitJob {
    lease_log: Arc<LeaseLog>,
    dir: PathBuf,
    record: SnapshotRecord,
    check_files: bool,
    lease_id: String,
    lease: LeaseRecord,
    lease_dir: PathBuf,
    disk_title: Option<String>,
    spare: Option<Spare>,
}

/// How a [`HitJob`] ended.
enum HitPrep {
    /// A file's size or time changed: nothing written; the spare is handed back.
    Touched(Option<Spare>),
    /// The lease is in the log. `disk_copy`: the spare, now the lease's disk copy, and its
    /// allocated bytes; `None` when there was no spare (or it could not be moved), and then
    /// `disk_source_allocated` is what a copy will take.
    Leased { disk_copy: Option<(PathBuf, u64)>, disk_source_allocated: u64 },
}

impl HitJob {
    fn run(self) -> Result<HitPrep> {
        if self.check_files {
            let touched = self.record.files.iter().any(|f| {
                std::fs::metadata(self.dir.join(&f.title))
                    .map_or(true, |m| m.len() != f.size || fsutil::mtime_ns(&m) != f.mtime_ns)
            });
            if touched {
                return Ok(HitPrep::Touched(self.spare));
            }
        }
        // In the lease log before it is handed out: a kill after the answer must not lose it.
        if let Err(e) = self.lease_log.append(&self.lease_id, &self.lease) {
            if let Some(s) = &self.spare {
                fsutil::remove_all(&s.path);
            }
            return Err(e);
        }
        let Some(title) = self.disk_title else {
            if let Some(s) = &self.spare {
                fsutil::remove_all(&s.path);
            }
            return Ok(HitPrep::Leased { disk_copy: None, disk_source_allocated: 0 });
        };
        if let Some(spare) = self.spare {
            let dest = self.lease_dir.join(&title);
            let moved =
                std::fs::create_dir_all(&self.lease_dir).and_then(|()| std::fs::rename(&spare.path, &dest));
            match moved {
                Ok(()) => {
                    return Ok(HitPrep::Leased {
                        disk_copy: Some((dest, spare.allocated)),
                        disk_source_allocated: 0,
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not take the spare disk copy; copying");
                    fsutil::remove_all(&spare.path);
                }
            }
        }
        Ok(HitPrep::Leased {
            disk_copy: None,
            disk_source_allocated: allocated_bytes(&self.dir.join(&title)),
        })
    }
}
