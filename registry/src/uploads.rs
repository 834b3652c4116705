//! Blob upload sessions. Bytes of a session are spooled to a local file while they arrive
//! (hashing as they go); at commit the file is chunked into storage and only then linked.
//!
//! Sessions live in this process: after a restart they are gone (clients see
//! `BLOB_UPLOAD_UNKNOWN` and start over), and spool files left by a crash are removed at
//! start-up. With several replicas, a session must stay on the replica that opened it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use thaw_schema::digest::Sha256Hasher;
use thaw_schema::{ErrorCode, Sha256Digest};
use tokio::io::AsyncWriteExt;

use crate::error::{ApiError, ApiResult};

/// One upload in progress.
pub(crate) struct Session {
    /// Spool file.
    pub(crate) path: PathBuf,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    /// Bytes received so far.
    pub(crate) size: u64,
    hasher: Sha256Hasher,
    /// When a request last touched the session (GC expires old ones).
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
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .await
                    .map_err(io)?;
                self.file.insert(tokio::io::BufWriter::with_capacity(1 << 20, f))
            }
        };
        self.touched = std::time::Instant::now();
        let mut written = 0u64;
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| {
                ApiError::new(ErrorCode::BlobUploadInvalid, format!("request body ended early or broke: {e}"))
            })?;
            file.write_all(&piece).await.map_err(io)?;
            self.hasher.update(&piece);
            self.size += piece.len() as u64;
            written += piece.len() as u64;
        }
        Ok(written)
    }

    /// Flushes the spool file and returns the digest of everything received.
    pub(crate) async fn finish(&mut self) -> ApiResult<Sha256Digest> {
        if let Some(f) = &mut self.file {
            f.flush().await.map_err(io)?;
            f.get_mut().sync_data().await.map_err(io)?;
        } else {
            // An empty blob: make sure the spool file exists for the ingest step.
            tokio::fs::File::create(&self.path).await.map_err(io)?;
        }
        self.file = None;
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
    /// Session id → (repository, session). The repository sits outside the session lock so
    /// that a lookup from the wrong repository is refused without waiting on a busy upload.
    sessions: Mutex<HashMap<String, (String, SharedSession)>>,
}

/// A session shared between the requests that touch it; its lock orders their appends.
pub(crate) type SharedSession = Arc<tokio::sync::Mutex<Session>>;

impl Uploads {
    /// Uses `dir` for spool files, removing whatever a previous process left there.
    pub(crate) fn open(dir: &Path) -> std::io::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned(), sessions: Mutex::new(HashMap::new()) })
    }

    /// Opens a session in `repo` and returns its id.
    pub(crate) fn create(&self, repo: &str) -> String {
        let id = hex::encode(rand::random::<[u8; 16]>());
        let session = Session {
            path: self.dir.join(&id),
            file: None,
            size: 0,
            hasher: Sha256Hasher::new(),
            touched: std::time::Instant::now(),
        };
        let entry = (repo.to_owned(), Arc::new(tokio::sync::Mutex::new(session)));
        self.sessions.lock().expect("lock").insert(id.clone(), entry);
        id
    }

    /// The session `id` of `repo`, or 404 `BLOB_UPLOAD_UNKNOWN`.
    pub(crate) fn get(&self, repo: &str, id: &str) -> ApiResult<SharedSession> {
        let sessions = self.sessions.lock().expect("lock");
        match sessions.get(id) {
            Some((owner, session)) if owner == repo => Ok(session.clone()),
            _ => Err(ApiError::new(
                ErrorCode::BlobUploadUnknown,
                format!("no upload session {id:?} in {repo}"),
            )),
        }
    }

    /// Ends sessions no request touched for `max_age` (busy ones are skipped), deleting
    /// their spool files; returns how many.
    pub(crate) fn expire(&self, max_age: std::time::Duration) -> u64 {
        let mut sessions = self.sessions.lock().expect("lock");
        let stale: Vec<String> = sessions
            .iter()
            .filter(|(_, (_, s))| s.try_lock().is_ok_and(|s| s.touched.elapsed() >= max_age))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &stale {
            if let Some((_, session)) = sessions.remove(id) {
                if let Ok(s) = session.try_lock() {
                    let _ = std::fs::remove_file(&s.path);
                }
            }
        }
        stale.len() as u64
    }

    /// Ends a session and deletes its spool file.
    pub(crate) async fn remove(&self, id: &str) {
        let session = self.sessions.lock().expect("lock").remove(id);
        if let Some((_, session)) = session {
            let path = session.lock().await.path.clone();
            let _ = tokio::fs::remove_file(path).await;
        }
    }
}
