//! TLS for thaw's daemons and clients: a reloading rustls server listener (`ring` provider)
//! and the extra trust a reqwest client needs.
//!
//! The certificate and key files are re-read every [`RELOAD_POLL`] and on SIGHUP; when
//! their bytes change and the new pair loads, new handshakes use it. A pair that fails to
//! load (half-written, mismatched key, bad PEM) is logged and the old one kept. Connections
//! already established keep the configuration they were accepted with.
//!
//! One crate for every user: the registry, the node cache and the extender serve through
//! [`TlsListener`] (as an axum `Listener` with feature `axum`); the client and the node
//! cache's peer client add CAs and a client certificate to a reqwest client with
//! [`configure_client`] (feature `reqwest`). It depends on no thaw crate.
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// How often the certificate files are checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_secs(5);
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files a TLS listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// If set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
    /// How often to check the files for changes.
    pub poll: Duration,
}

impl TlsFiles {
    /// Serve `cert` and `key`, without client certificates, checking for changes every
    /// [`RELOAD_POLL`].
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self { cert: cert.into(), key: key.into(), client_ca: None, poll: RELOAD_POLL }
    }
}

/// Why a certificate, key or CA file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no usable PEM item of the kind expected.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("TLS configuration from {cert} and {key}: {source}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), why: format!("bad PEM certificate: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_owned(), why: "no CERTIFICATE in the file".into() });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The bytes of the files, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Snapshot {
    fn read(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            client_ca: files.client_ca.as_deref().map(read).transpose()?,
        })
    }

    fn build(&self, files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
        let certs = parse_certs(&files.cert, &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| TlsError::Pem {
            path: files.key.clone(),
            why: format!("no usable PRIVATE KEY: {e}"),
        })?;
        let config_error =
            |source| TlsError::Config { cert: files.cert.clone(), key: files.key.clone(), source };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let builder = match (&files.client_ca, &self.client_ca) {
            (Some(ca_path), Some(ca_pem)) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in parse_certs(ca_path, ca_pem)? {
                    roots.add(ca).map_err(config_error)?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| TlsError::Pem { path: ca_path.clone(), why: format!("client CA: {e}") })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(config_error)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The current server configuration, swapped when the files change.
#[derive(Debug, Clone)]
pub struct ReloadingConfig {
    files: TlsFiles,
    current: Arc<RwLock<(Snapshot, Arc<ServerConfig>)>>,
}

impl ReloadingConfig {
    /// Loads `files`; an error here is fatal to the caller (there is no old pair to keep).
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let snapshot = Snapshot::read(&files)?;
        let config = snapshot.build(&files)?;
        Ok(Self { files, current: Arc::new(RwLock::new((snapshot, config))) })
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// Re-reads the files. Returns `Ok(true)` if a new pair was installed, `Ok(false)` if
    /// nothing changed, and the error (old pair kept) if the new files do not load.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let snapshot = Snapshot::read(&self.files)?;
        if self.current.read().unwrap_or_else(|e| e.into_inner()).0 == snapshot {
            return Ok(false);
        }
        let config = snapshot.build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (snapshot, config);
        Ok(true)
    }

    /// Checks the files every `files.poll` and on SIGHUP until the returned task is aborted
    /// (or the runtime ends). Failed reloads are logged once per distinct failure.
    pub fn watch(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut hangup = hangup_signal();
            let mut ticker = tokio::time::interval(this.files.poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error = None::<String>;
            loop {
                let signalled = tokio::select! {
                    _ = ticker.tick() => false,
                    _ = next_hangup(&mut hangup) => true,
                };
                match this.reload() {
                    Ok(true) => {
                        last_error = None;
                        tracing::info!(cert = %this.files.cert.display(), "TLS certificate reloaded");
                    }
                    Ok(false) => {
                        if signalled {
                            tracing::info!(cert = %this.files.cert.display(), "SIGHUP: TLS files unchanged");
                        }
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if signalled || last_error.as_deref() != Some(&text) {
                            tracing::warn!(error = %text, "TLS reload failed; still serving the previous certificate");
                        }
                        last_error = Some(text);
                    }
                }
            }
        })
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
}

#[allow(clippy::unused_async)]
async fn next_hangup(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup {
        signal.recv().await;
        return;
    }
    let _ = hangup;
    std::future::pending::<()>().await;
}

/// A TCP listener that completes TLS handshakes off the accept path (a slow client cannot
/// hold up others) and yields only established TLS connections.
#[derive(Debug)]
pub struct TlsListener {
    local_addr: SocketAddr,
    established: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accept_task: tokio::task::JoinHandle<()>,
    watch_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.watch_task.abort();
    }
}

impl TlsListener {
    /// Serves TLS with `config` (and watches its files) on `listener`.
    pub fn new(listener: TcpListener, config: ReloadingConfig) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, established) = tokio::sync::mpsc::channel(64);
        let watch_task = config.watch();
        let accept_task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local_addr, established, accept_task, watch_task })
    }
}

impl TlsListener {
    /// The next established TLS connection and its peer address.
    pub async fn accept(&mut self) -> (TlsStream<TcpStream>, SocketAddr) {
        match self.established.recv().await {
            Some(connection) => connection,
            // The accept task only ends when aborted by drop; never yield a fake connection.
            None => std::future::pending().await,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        TlsListener::accept(self).await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

#[cfg(feature = "reqwest")]
/// Adds trust in the CAs in `ca_files` (PEM bundles) to `builder`, on top of the built-in
/// roots, and presents the client certificate `identity` (`(cert, key)` PEM files) if set.
pub fn configure_client(
    mut builder: reqwest::ClientBuilder,
    ca_files: &[PathBuf],
    identity: Option<(&Path, &Path)>,
) -> Result<reqwest::ClientBuilder, TlsError> {
    for path in ca_files {
        let pem = read(path)?;
        // Parse with rustls first: reqwest's own error does not name the file.
        parse_certs(path, &pem)?;
        let bundle = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| TlsError::Pem { path: path.clone(), why: format!("bad CA certificate: {e}") })?;
        for ca in bundle {
            builder = builder.add_root_certificate(ca);
        }
    }
    if let Some((cert, key)) = identity {
        let mut pem = read(cert)?;
        parse_certs(cert, &pem)?;
        let key_pem = read(key)?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            path: key.to_owned(),
            why: format!("no usable PRIVATE KEY: {e}"),
        })?;
        pem.push(b'\n');
        pem.extend_from_slice(&key_pem);
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| TlsError::Pem { path: cert.to_owned(), why: format!("client certificate: {e}") })?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}
