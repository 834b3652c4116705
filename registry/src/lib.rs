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
use object_store::local::LocalFileSystem;
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
    /// A directory path (filesystem storage). `s3://` URLs are reserved for the S3 backend.
    pub storage: String,
}

impl RegistryConfig {
    /// A config with the given address and storage.
    pub fn new(listen: SocketAddr, storage: impl Into<String>) -> Self {
        Self { listen, storage: storage.into() }
    }
}

/// Opens the storage named in `config` and builds the shared state.
pub fn open_state(config: &RegistryConfig) -> anyhow::Result<Arc<AppState>> {
    if config.storage.starts_with("s3://") {
        bail!("S3 storage ({}) is not implemented yet; use a filesystem path", config.storage);
    }
    let root = PathBuf::from(&config.storage);
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating storage directory {}", root.display()))?;
    let objects = LocalFileSystem::new_with_prefix(&root)
        .with_context(|| format!("opening storage directory {}", root.display()))?;
    let uploads = uploads::Uploads::open(&root.join("_uploads"))
        .with_context(|| format!("preparing upload spool under {}", root.display()))?;
    Ok(Arc::new(AppState {
        store: Arc::new(Store::new(Arc::new(objects))),
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
