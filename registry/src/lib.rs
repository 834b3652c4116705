//! `thaw-registry`: an OCI Distribution Spec v1.1 registry that stores every blob, however
//! it arrives, as deduplicated zstd chunks plus a recipe, and serves the `_thaw` extension
//! for chunk-level dedup on the wire.
//!
//! It owns the HTTP API (docs/API.md) and the storage layout (`storage::keys`). It must not
//! depend on other thaw services: they talk to it over HTTP with DTOs from `thaw-schema`.
#![warn(missing_docs)]

mod error;
mod handlers;
mod ingest;
pub mod routes;
mod storage;
mod uploads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use thaw_schema::chunker::ChunkerParams;

pub use error::{ApiError, ApiResult};
pub use handlers::{router, AppState};
pub use storage::{Store, StoreError};

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

/// Opens the object store named by `storage` and picks the upload spool directory.
///
/// `s3://BUCKET[/PREFIX]` takes endpoint, region, credentials and addressing style from the
/// usual `AWS_*` variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`); anything
/// else is a directory. Spool files are local to the process in both cases: under the
/// storage directory, or for S3 under `THAW_UPLOAD_DIR` (default: a per-port directory in
/// the system temp dir, so replicas on one host never share one).
fn open_objects(config: &RegistryConfig) -> anyhow::Result<(Arc<dyn ObjectStore>, PathBuf)> {
    let upload_dir_override = std::env::var_os("THAW_UPLOAD_DIR").map(PathBuf::from);
    if let Some(rest) = config.storage.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("storage URL {:?} names no bucket: use s3://BUCKET/PREFIX", config.storage);
        }
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .with_context(|| format!("configuring S3 storage {} from AWS_* variables", config.storage))?;
        let objects: Arc<dyn ObjectStore> = match prefix.trim_matches('/') {
            "" => Arc::new(s3),
            p => Arc::new(PrefixStore::new(s3, p)),
        };
        let id = match config.listen.port() {
            0 => format!("pid-{}", std::process::id()),
            port => format!("port-{port}"),
        };
        let spool = upload_dir_override
            .unwrap_or_else(|| std::env::temp_dir().join("thaw-registry-uploads").join(id));
        return Ok((objects, spool));
    }
    let root = PathBuf::from(&config.storage);
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating storage directory {}", root.display()))?;
    let objects = LocalFileSystem::new_with_prefix(&root)
        .with_context(|| format!("opening storage directory {}", root.display()))?;
    Ok((Arc::new(objects), upload_dir_override.unwrap_or_else(|| root.join("_uploads"))))
}

/// Opens the storage named in `config` and builds the shared state.
pub fn open_state(config: &RegistryConfig) -> anyhow::Result<Arc<AppState>> {
    let (objects, spool) = open_objects(config)?;
    let uploads = uploads::Uploads::open(&spool)
        .with_context(|| format!("preparing upload spool directory {}", spool.display()))?;
    Ok(Arc::new(AppState {
        store: Arc::new(Store::new(objects)),
        uploads,
        chunker: ChunkerParams::REGISTRY_DEFAULT,
        zstd_level: DEFAULT_ZSTD_LEVEL,
    }))
}

/// Serves `config` until `shutdown` completes.
pub async fn serve(
    config: RegistryConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = open_state(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, storage = %config.storage, "thaw-registry listening");
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// A registry running on its own thread and runtime (for tests and embedding): the
/// caller's runtime may block or be single-threaded without stalling the registry.
pub struct RunningRegistry {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts a registry in the background and returns once it accepts connections.
pub async fn spawn(config: RegistryConfig) -> anyhow::Result<RunningRegistry> {
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
                let state = open_state(&config)?;
                let listener = tokio::net::TcpListener::bind(config.listen).await?;
                Ok::<_, anyhow::Error>((state, listener))
            };
            match started.await {
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
                Ok((state, listener)) => {
                    let addr = listener.local_addr().expect("bound listener has an address");
                    let _ = ready_tx.send(Ok(addr));
                    let stop = async {
                        let _ = stop_rx.await;
                    };
                    if let Err(e) = axum::serve(listener, router(state)).with_graceful_shutdown(stop).await {
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
