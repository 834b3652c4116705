//! `thaw-registry`: an OCI Distribution Spec v1.1 registry that stores every blob, however
//! it arrives, as deduplicated zstd chunks plus a recipe, and serves the `_thaw` extension
//! for chunk-level dedup on the wire.
//!
//! It owns the HTTP API (docs/API.md) and the storage layout (`storage::keys`). It must not
//! depend on other thaw services: they talk to it over HTTP with DTOs from `thaw-schema`.
#![warn(missing_docs)]

pub mod auth;
mod conn;
mod error;
mod handlers;
mod ingest;
mod limits;
pub mod routes;
mod storage;
mod uploads;

/// The listener's TLS (the workspace's one TLS crate), re-exported so that callers of
/// [`ServeOptions::with_tls`] need no dependency of their own.
pub use thaw_tls as tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use thaw_schema::chunker::ChunkerParams;

pub use error::{ApiError, ApiResult};
pub use handlers::{router, AppState};
pub use limits::{
    default_max_verifications, Limits, RateLimit, DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT,
    DEFAULT_INFLIGHT_WAIT, DEFAULT_MAX_CHUNK_REPEAT, DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT_PER_CLIENT,
    DEFAULT_MAX_VERIFICATIONS_PER_CLIENT, DEFAULT_SEND_TIMEOUT, DEFAULT_VERIFY_WAIT,
};
/// Fault injection under the object store, for tests and benchmarks only (feature `faults`).
#[cfg(feature = "faults")]
pub use storage::faults::{Fault, Faults, Faulty, Op, Rule, RuleId};
pub use storage::metrics::{process_storage_metrics, Counted, StorageCounts, StorageMetrics};
pub use storage::{
    ChunkWriter, ConditionalWrites, GcOptions, GcReport, ScrubReport, Store, StoreError, DEFAULT_GRACE,
    DEFAULT_PACK_TARGET, DEFAULT_REWRITE_BELOW,
};
pub use uploads::{
    UploadLimits, DEFAULT_MAX_UPLOAD_SESSIONS, DEFAULT_MAX_UPLOAD_SESSIONS_PER_CLIENT, DEFAULT_UPLOAD_MAX_AGE,
};

/// Default zstd level for chunks the registry compresses itself (see docs/DECISIONS.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How to run a registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// A directory path (filesystem storage) or `s3://BUCKET[/PREFIX]`.
    pub storage: String,
}

impl RegistryConfig {
    /// A config with the given address and storage.
    pub fn new(listen: SocketAddr, storage: impl Into<String>) -> Self {
        Self { listen, storage: storage.into() }
    }
}

/// What a registry runs with besides its address and storage: request limits, TLS, GC,
/// auth, upload caps, and (for tests, feature `faults`) faults to inject into its object
/// store. Kept apart from [`RegistryConfig`] so that config stays the two fields other
/// crates build literally.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Request limits.
    pub limits: Limits,
    /// When set, the object store is wrapped in [`Faulty`] driven by these rules (inside
    /// the request counter, so injected calls are still counted).
    #[cfg(feature = "faults")]
    pub faults: Option<Arc<Faults>>,
    /// Serve HTTPS with these files (reloaded when they change) instead of plain HTTP.
    pub tls: Option<tls::TlsFiles>,
    /// Run garbage collection this often inside the registry (off when `None`).
    pub gc_interval: Option<Duration>,
    /// How those runs collect.
    pub gc: GcOptions,
    /// Authentication and authorization; `None` serves everyone (the default).
    pub auth: Option<Arc<auth::Auth>>,
    /// Caps on upload sessions and how long an idle one lives.
    pub uploads: UploadLimits,
}

impl ServeOptions {
    /// The same options with `limits`.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
    /// The same options injecting `faults` into the object store.
    #[cfg(feature = "faults")]
    pub fn with_faults(mut self, faults: Arc<Faults>) -> Self {
        self.faults = Some(faults);
        self
    }
    /// The same options serving HTTPS from `files`.
    pub fn with_tls(mut self, files: tls::TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }
}

/// How long one S3 request may take, start to end (`AWS_TIMEOUT` overrides).
pub const S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to S3 may take (`AWS_CONNECT_TIMEOUT` overrides).
pub const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Retries of one failed S3 request (`THAW_S3_MAX_RETRIES` overrides).
pub const S3_MAX_RETRIES: usize = 3;
/// No retry starts later than this after the first attempt (`THAW_S3_RETRY_TIMEOUT`,
/// in seconds, overrides).
pub const S3_RETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the object store named by `storage` and picks the upload spool directory.
///
/// `s3://BUCKET[/PREFIX]` takes endpoint, region, credentials and addressing style from the
/// usual `AWS_*` variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`, and the
/// client options `AWS_TIMEOUT`, `AWS_CONNECT_TIMEOUT`); anything else is a directory.
///
/// Requests to S3 fail fast rather than hang: each may take [`S3_REQUEST_TIMEOUT`], and a
/// failed one is retried at most [`S3_MAX_RETRIES`] times within [`S3_RETRY_TIMEOUT`], so
/// an unreachable S3 server turns into a 503 `UNAVAILABLE` within seconds, not the minutes
/// `object_store`'s defaults allow (10 retries within 3 minutes).
///
/// Every store is wrapped in a request counter ([`process_storage_metrics`]).
///
/// Spool files are local to the process in both cases: under the storage directory, or for
/// S3 under `THAW_UPLOAD_DIR` (default: a per-port directory in the system temp dir, so
/// replicas on one host never share one; with port 0, a per-process-and-registry one).
fn open_objects(
    config: &RegistryConfig,
    options: &ServeOptions,
) -> anyhow::Result<(Arc<dyn ObjectStore>, PathBuf)> {
    let upload_dir_override = std::env::var_os("THAW_UPLOAD_DIR").map(PathBuf::from);
    let counted = |store: Arc<dyn ObjectStore>| -> Arc<dyn ObjectStore> {
        #[cfg(feature = "faults")]
        let store: Arc<dyn ObjectStore> = match &options.faults {
            Some(f) => Arc::new(storage::faults::Faulty::new(store, f.clone())),
            None => store,
        };
        #[cfg(not(feature = "faults"))]
        let _ = options;
        Arc::new(Counted::new(store, process_storage_metrics()))
    };
    if let Some(rest) = config.storage.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("storage URL {:?} names no bucket: use s3://BUCKET/PREFIX", config.storage);
        }
        let s3 = s3_builder()?
            .with_bucket_name(bucket)
            .build()
            .with_context(|| format!("configuring S3 storage {} from AWS_* variables", config.storage))?;
        let objects: Arc<dyn ObjectStore> = match prefix.trim_matches('/') {
            "" => Arc::new(s3),
            p => Arc::new(PrefixStore::new(s3, p)),
        };
        let id = match config.listen.port() {
            0 => {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                format!("pid-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
            }
            port => format!("port-{port}"),
        };
        let spool = upload_dir_override
            .unwrap_or_else(|| std::env::temp_dir().join("thaw-registry-uploads").join(id));
        return Ok((counted(objects), spool));
    }
    let root = PathBuf::from(&config.storage);
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating storage directory {}", root.display()))?;
    // fsync'd writes: a pack must be on disk before the index that points at it (D6).
    let objects = storage::durable::SyncedFs::new(&root)
        .with_context(|| format!("opening storage directory {}", root.display()))?;
    Ok((counted(Arc::new(objects)), upload_dir_override.unwrap_or_else(|| root.join("_uploads"))))
}

/// An S3 builder with the registry's timeouts and retries, then every `AWS_*` variable
/// applied as `AmazonS3Builder::from_env` does (so `AWS_TIMEOUT` and friends override).
fn s3_builder() -> anyhow::Result<AmazonS3Builder> {
    let env_number = |name: &str| -> anyhow::Result<Option<u64>> {
        match std::env::var(name) {
            Err(_) => Ok(None),
            Ok(v) => {
                v.trim().parse().map(Some).with_context(|| format!("{name}={v:?} is not a whole number"))
            }
        }
    };
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: env_number("THAW_S3_MAX_RETRIES")?.map_or(S3_MAX_RETRIES, |n| n as usize),
        retry_timeout: env_number("THAW_S3_RETRY_TIMEOUT")?.map_or(S3_RETRY_TIMEOUT, Duration::from_secs),
    };
    let client =
        ClientOptions::new().with_timeout(S3_REQUEST_TIMEOUT).with_connect_timeout(S3_CONNECT_TIMEOUT);
    let mut builder = AmazonS3Builder::new().with_client_options(client).with_retry(retry);
    for (key, value) in std::env::vars_os() {
        let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else { continue };
        if key.starts_with("AWS_") {
            if let Ok(config_key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                builder = builder.with_config(config_key, value);
            }
        }
    }
    Ok(builder)
}

/// Opens the storage named in `config` and builds the shared state, with default
/// [`ServeOptions`].
pub fn open_state(config: &RegistryConfig) -> anyhow::Result<Arc<AppState>> {
    open_state_with(config, &ServeOptions::default())
}

/// Opens the storage named in `config` and builds the shared state.
pub fn open_state_with(config: &RegistryConfig, options: &ServeOptions) -> anyhow::Result<Arc<AppState>> {
    let (objects, spool) = open_objects(config, options)?;
    let uploads = uploads::Uploads::open(&spool, options.uploads)
        .with_context(|| format!("preparing upload spool directory {}", spool.display()))?;
    let state = Arc::new(AppState {
        store: Arc::new(Store::new(objects)),
        uploads,
        chunker: ChunkerParams::REGISTRY_DEFAULT,
        zstd_level: DEFAULT_ZSTD_LEVEL,
        limiter: limits::Limiter::new(options.limits.clone()),
    });
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        start_gc_tasks(&runtime, &state, options);
        start_upload_expiry(&runtime, &state);
    }
    Ok(state)
}

/// Ends idle upload sessions on their own clock (GC is off by default, and a session is
/// something any client can open): checks a few times per `max_age`, at most every minute.
fn start_upload_expiry(runtime: &tokio::runtime::Handle, state: &Arc<AppState>) {
    let max_age = state.uploads.limits().max_age;
    let tick = (max_age / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let state = Arc::downgrade(state);
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(tick).await;
            let Some(state) = state.upgrade() else { return };
            let expired = state.uploads.expire(max_age);
            drop(state);
            if expired.is_empty() {
                continue;
            }
            let n = expired.len();
            let _ = tokio::task::spawn_blocking(move || {
                for path in expired {
                    let _ = std::fs::remove_file(path);
                }
            })
            .await;
            tracing::info!(sessions = n, "expired idle upload sessions");
        }
    });
}

/// Probes the store's conditional writes (logged), keeps this registry's serving lease
/// (which stores without conditional writes need to refuse GC across replicas) and, with
/// `gc_interval`, collects garbage periodically (docs/DECISIONS.md D26).
fn start_gc_tasks(runtime: &tokio::runtime::Handle, state: &Arc<AppState>, options: &ServeOptions) {
    let lease = hex::encode(rand::random::<[u8; 8]>());
    runtime.spawn(state.store.clone().keep_lease(lease.clone()));
    let store = state.store.clone();
    let online = options.gc_interval.is_some();
    runtime.spawn(async move {
        match store.probe_conditional_writes().await {
            Ok(w) if !w.create && online => tracing::warn!(
                "this storage ignores conditional writes (If-None-Match): online GC runs only while \
                 no other replica serves it; with several replicas, stop all but one or run \
                 `thaw-registry gc` with every replica stopped"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "conditional-write probe failed; GC will probe again"),
        }
    });
    let Some(interval) = options.gc_interval else { return };
    let (state, gc) = (Arc::downgrade(state), options.gc.clone());
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(state) = state.upgrade() else { return };
            let expire = |age| state.uploads.expire_now(age);
            if let Err(e) = state.store.collect_garbage(&gc, Some(&expire), Some(&lease)).await {
                tracing::error!(error = %e, "gc run failed or skipped");
            }
        }
    });
}

/// One standalone GC run over `storage` (`thaw-registry gc`). On stores that honour
/// conditional writes it takes the GC lock and fences serving replicas' commits; on others
/// it is refused while a registry serves the same storage.
pub async fn collect_garbage(storage: &str, options: &GcOptions) -> anyhow::Result<GcReport> {
    let config = RegistryConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), storage);
    let (objects, _spool) = open_objects(&config, &ServeOptions::default())?;
    let store = Arc::new(Store::new(objects));
    Ok(store.collect_garbage(options, None, None).await?)
}

/// `thaw-registry scrub`: verifies every stored chunk and, unless `dry_run`, drops the bad
/// ones from their pack indexes so the next push stores them again. `progress` is called
/// after each pack with (packs done, packs total, report so far).
pub async fn scrub(
    storage: &str,
    dry_run: bool,
    progress: &(dyn Fn(u64, u64, &ScrubReport) + Sync),
) -> anyhow::Result<ScrubReport> {
    let config = RegistryConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), storage);
    let (objects, _spool) = open_objects(&config, &ServeOptions::default())?;
    Ok(Store::new(objects).scrub(dry_run, progress).await?)
}

/// The router behind the auth middleware when `auth` is set (see [`auth`]), both behind the
/// limits layer: a request is counted against its client's and the process's in-flight caps
/// before any authentication work (bcrypt included) is done for it.
pub fn router_with_auth(state: Arc<AppState>, auth: Option<Arc<auth::Auth>>) -> axum::Router {
    let limits = axum::middleware::from_fn_with_state(state.clone(), limits::enforce);
    let app = match auth {
        None => router(state),
        Some(auth) => router(state).layer(axum::middleware::from_fn_with_state(auth, auth::authorize)),
    };
    app.layer(limits)
}

/// Serves `config` with default [`ServeOptions`] until `shutdown` completes.
pub async fn serve(
    config: RegistryConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(config, ServeOptions::default(), shutdown).await
}

/// Serves `config` with `options` until `shutdown` completes.
pub async fn serve_with(
    config: RegistryConfig,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = open_state_with(&config, &options)?;
    let tls = options.tls.clone().map(tls::ReloadingConfig::load).transpose().context("loading TLS files")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, storage = %config.storage, tls = tls.is_some(), "thaw-registry listening");
    serve_on(listener, state, options.auth.clone(), tls, shutdown).await
}

/// Serves plain HTTP, or TLS when `tls` is set, on `listener` until `shutdown`.
async fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    auth: Option<Arc<auth::Auth>>,
    tls: Option<tls::ReloadingConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = state.limiter.limits().clone();
    let app = router_with_auth(state, auth);
    match tls {
        None => conn::serve(listener, app, &limits, shutdown).await,
        Some(config) => conn::serve(tls::TlsListener::new(listener, config)?, app, &limits, shutdown).await,
    }
    Ok(())
}

/// A registry running on its own thread and runtime (for tests and embedding): the
/// caller's runtime may block or be single-threaded without stalling the registry.
pub struct RunningRegistry {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts a registry with default [`ServeOptions`] in the background and returns once it
/// accepts connections.
pub async fn spawn(config: RegistryConfig) -> anyhow::Result<RunningRegistry> {
    spawn_with(config, ServeOptions::default()).await
}

/// Starts a registry with `options` in the background and returns once it accepts
/// connections.
pub async fn spawn_with(config: RegistryConfig, options: ServeOptions) -> anyhow::Result<RunningRegistry> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<SocketAddr>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("thaw-registry".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.into()));
                return;
            }
        };
        runtime.block_on(async move {
            let started = async {
                let state = open_state_with(&config, &options)?;
                let tls = options.tls.clone().map(tls::ReloadingConfig::load).transpose()?;
                let listener = tokio::net::TcpListener::bind(config.listen).await?;
                Ok::<_, anyhow::Error>((state, tls, listener))
            };
            match started.await {
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
                Ok((state, tls, listener)) => {
                    let addr = listener.local_addr().expect("bound listener has an address");
                    let _ = ready_tx.send(Ok(addr));
                    let stop = async {
                        let _ = stop_rx.await;
                    };
                    if let Err(e) = serve_on(listener, state, options.auth.clone(), tls, stop).await {
                        tracing::error!(error = %e, "embedded registry stopped with an error");
                    }
                }
            }
        });
    })?;
    let addr = ready_rx.await.context("registry thread died before it was ready")??;
    Ok(RunningRegistry { addr, stop: Some(stop_tx), thread: Some(thread) })
}

impl RunningRegistry {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Stops it and waits until it has stopped.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for RunningRegistry {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
