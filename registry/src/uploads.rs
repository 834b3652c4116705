//! Blob upload sessions. Bytes of a session are spooled to a local file while they arrive
//! (hashing as they go); at commit the file is chunked into storage and only then linked.
//!
//! Sessions live in this process: after a restart they are gone (clients see
//! `BLOB_UPLOAD_UNKNOWN` and start over), and spool files left by a crash are removed at
//! start-up. With several replicas, a session must stay on the replica that opened it.
//!
//! Sessions are a resource any client can ask for, so they are capped per client IP address
//! and in total ([`UploadLimits`]), expire on their own clock (`lib.rs` runs
//! [`Uploads::expire`] in a background task, GC or not), and an idle one holds no buffer
//! and no open file: only its path, its byte count and its running SHA-256 state.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use thaw_schema::digest::Sha256Hasher;
use thaw_schema::{ErrorCode, Sha256Digest};
use tokio::io::AsyncWriteExt;

use crate::error::{ApiError, ApiResult};

/// Write buffer of one append, dropped when the request ends (an idle session keeps none).
const APPEND_BUFFER: usize = 256 << 10;

/// How many upload sessions may be open at once (docs/API.md, "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// Sessions open at once in this process.
    pub max_sessions: usize,
    /// Sessions open at once from one client IP address.
    pub max_sessions_per_client: usize,
    /// A session no request touched for this long is ended, its spool file deleted.
    pub max_age: Duration,
}

/// Default of [`UploadLimits::max_sessions`].
pub const DEFAULT_MAX_UPLOAD_SESSIONS: usize = 1024;
/// Default of [`UploadLimits::max_sessions_per_client`]: clients push a few blobs at once
/// (thaw's own client 3, containerd and skopeo a handful), so 64 leaves room for many
/// clients behind one address.
pub const DEFAULT_MAX_UPLOAD_SESSIONS_PER_CLIENT: usize = 64;
/// Default of [`UploadLimits::max_age`].
pub const DEFAULT_UPLOAD_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_sessions: DEFAULT_MAX_UPLOAD_SESSIONS,
            max_sessions_per_client: DEFAULT_MAX_UPLOAD_SESSIONS_PER_CLIENT,
            max_age: DEFAULT_UPLOAD_MAX_AGE,
        }
    }
}

/// One upload in progress.
pub(crate) struct Session {
    /// Spool file.
    pub(crate) path: PathBuf,
    /// Bytes received so far.
    pub(crate) size: u64,
    hasher: Sha256Hasher,
    /// When a request last appended to the session (idle ones expire).
    touched: std::time::Instant,
}

impl Session {
    /// Appends a body stream. On a broken body the session is left unusable for further
    /// appends (its size no longer matches what the client believes) and an error returns.
    pub(crate) async fn append<S, E>(&mut self, mut body: S) -> ApiResult<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.touched = std::time::Instant::now();
        // The file and its buffer live for this request only: an idle session costs no
        // buffer and no file descriptor.
        let f = tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await.map_err(io)?;
        let mut file = tokio::io::BufWriter::with_capacity(APPEND_BUFFER, f);
        let mut written = 0u64;
        let mut result = Ok(());
        while let Some(piece) = body.next().await {
            let piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    result = Err(ApiError::new(
                        ErrorCode::BlobUploadInvalid,
                        format!("request body ended early or broke: {e}"),
                    ));
                    break;
                }
            };
            if let Err(e) = file.write_all(&piece).await {
                result = Err(io(e));
                break;
            }
            self.hasher.update(&piece);
            self.size += piece.len() as u64;
            written += piece.len() as u64;
        }
        self.touched = std::time::Instant::now();
        // Flush what was hashed even after a broken body, so file and hash stay in step.
        let flushed = file.flush().await.map_err(io);
        result?;
        flushed?;
        Ok(written)
    }

    /// Flushes the spool file and returns the digest of everything received.
    pub(crate) async fn finish(&mut self) -> ApiResult<Sha256Digest> {
        // An empty blob: make sure the spool file exists for the ingest step.
        let file =
            tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await.map_err(io)?;
        file.sync_data().await.map_err(io)?;
        Ok(self.hasher.clone().finish())
    }
}

fn io(e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, "upload spool I/O failed");
    ApiError::new(ErrorCode::Unknown, format!("upload spool I/O failed: {e}"))
}

/// All open sessions of this process.
pub(crate) struct Uploads {
    dir: PathBuf,
    limits: UploadLimits,
    /// Session id → its entry. The repository sits outside the session lock so that a
    /// lookup from the wrong repository is refused without waiting on a busy upload.
    sessions: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    repo: String,
    /// The client IP address that opened it (`None` for a router called without a peer).
    client: Option<IpAddr>,
    session: SharedSession,
}

/// A session shared between the requests that touch it; its lock orders their appends.
pub(crate) type SharedSession = Arc<tokio::sync::Mutex<Session>>;

impl Uploads {
    /// Uses `dir` for spool files, removing whatever a previous process left there.
    pub(crate) fn open(dir: &Path, limits: UploadLimits) -> std::io::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned(), limits, sessions: Mutex::new(HashMap::new()) })
    }

    /// The limits sessions are held to.
    pub(crate) fn limits(&self) -> UploadLimits {
        self.limits
    }

    /// Opens a session in `repo` for `client` and returns its id; 429 `TOOMANYREQUESTS`
    /// when the client or the whole process is at its cap of open sessions.
    pub(crate) fn create(&self, repo: &str, client: Option<IpAddr>) -> ApiResult<String> {
        let mut sessions = self.sessions.lock().expect("lock");
        let refuse = |why: String| {
            ApiError::new(ErrorCode::TooManyRequests, why).with_header("retry-after", "10".to_owned())
        };
        if sessions.len() >= self.limits.max_sessions {
            return Err(refuse(format!(
                "{} upload sessions are open, the most this registry keeps: finish or cancel one, or retry later",
                sessions.len()
            )));
        }
        if let Some(client) = client {
            let mine = sessions.values().filter(|e| e.client == Some(client)).count();
            if mine >= self.limits.max_sessions_per_client {
                return Err(refuse(format!(
                    "{mine} upload sessions are open from {client}, the most one client may have: finish or cancel one first"
                )));
            }
        }
        let id = hex::encode(rand::random::<[u8; 16]>());
        let session = Session {
            path: self.dir.join(&id),
            size: 0,
            hasher: Sha256Hasher::new(),
            touched: std::time::Instant::now(),
        };
        let entry =
            Entry { repo: repo.to_owned(), client, session: Arc::new(tokio::sync::Mutex::new(session)) };
        sessions.insert(id.clone(), entry);
        Ok(id)
    }

    /// The session `id` of `repo`, or 404 `BLOB_UPLOAD_UNKNOWN`.
    pub(crate) fn get(&self, repo: &str, id: &str) -> ApiResult<SharedSession> {
        let sessions = self.sessions.lock().expect("lock");
        match sessions.get(id) {
            Some(e) if e.repo == repo => Ok(e.session.clone()),
            _ => Err(ApiError::new(
                ErrorCode::BlobUploadUnknown,
                format!("no upload session {id:?} in {repo}"),
            )),
        }
    }

    /// Ends sessions no request touched for `max_age` (busy ones are skipped); returns
    /// their spool files, which the caller deletes (off the async threads).
    pub(crate) fn expire(&self, max_age: Duration) -> Vec<PathBuf> {
        let mut sessions = self.sessions.lock().expect("lock");
        let mut expired = Vec::new();
        sessions.retain(|_, e| match e.session.try_lock() {
            Ok(s) if s.touched.elapsed() >= max_age => {
                expired.push(s.path.clone());
                false
            }
            _ => true,
        });
        expired
    }

    /// Ends sessions no request touched for `max_age`, deleting their spool files; returns
    /// how many (the form GC's report takes).
    pub(crate) fn expire_now(&self, max_age: Duration) -> u64 {
        let expired = self.expire(max_age);
        for path in &expired {
            let _ = std::fs::remove_file(path);
        }
        expired.len() as u64
    }

    /// Ends a session and deletes its spool file.
    pub(crate) async fn remove(&self, id: &str) {
        let session = self.sessions.lock().expect("lock").remove(id);
        if let Some(e) = session {
            let path = e.session.lock().await.path.clone();
            let _ = tokio::fs::remove_file(path).await;
        }
    }
}
