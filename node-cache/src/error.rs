//! The node cache's errors, each with the HTTP status its local API answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// What went wrong, by kind a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The request itself is wrong (a malformed reference, an unknown lease).
    #[error("{0}")]
    BadRequest(String),
    /// The request names something this cache will not touch for any caller: a directory
    /// outside `--publish-root`, or publishing while it is not configured.
    #[error("{0}")]
    Forbidden(String),
    /// The snapshot or lease does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The snapshot cannot fit, even after evicting every unleased snapshot.
    #[error("{0}")]
    NoSpace(String),
    /// The registry failed or answered something unusable.
    #[error("{0}")]
    Registry(#[source] thaw_client::Error),
    /// Local disk trouble.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The index database failed.
    #[error("cache index: {0}")]
    Database(#[source] redb::Error),
    /// A record in the index could not be read back.
    #[error("cache index: {what} {key}: unreadable record: {source}")]
    Record {
        /// The kind of record (`snapshot`, `lease`, `reference`).
        what: &'static str,
        /// Its key.
        key: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The index disagrees with what was just done (a bug, not bad input).
    #[error("cache index: {0}")]
    Index(String),
    /// Work handed to a blocking thread panicked or was cancelled.
    #[error("{what} task: {source}")]
    Task {
        /// The work (`lease write`, `verify`, …).
        what: &'static str,
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A peer request without the cluster token (peer API only).
    #[error("{0}")]
    Unauthorized(String),
    /// The peer service is at its upload limits; ask elsewhere (peer API only).
    #[error("{0}")]
    Busy(String),
}

/// Results of the cache.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

impl CacheError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { op, path: path.display().to_string(), source }
    }

    /// The status the local API answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            Self::Io { source, .. } if is_out_of_space(source) => StatusCode::INSUFFICIENT_STORAGE,
            Self::Registry(e) if e.is_not_found() => StatusCode::NOT_FOUND,
            Self::Registry(e) if e.is_usage() => StatusCode::BAD_REQUEST,
            Self::Registry(_) => StatusCode::BAD_GATEWAY,
            Self::Io { .. }
            | Self::Database(_)
            | Self::Record { .. }
            | Self::Index(_)
            | Self::Task { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable code for scripts.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "BAD_REQUEST",
            Self::Forbidden(_) => "FORBIDDEN",
            Self::NotFound(_) => "NOT_FOUND",
            Self::NoSpace(_) => "NO_SPACE",
            Self::Io { source, .. } if is_out_of_space(source) => "NO_SPACE",
            Self::Registry(e) if e.is_not_found() => "NOT_FOUND",
            Self::Registry(_) => "REGISTRY",
            Self::Io { .. } => "IO",
            Self::Database(_) | Self::Record { .. } | Self::Index(_) => "INDEX",
            Self::Task { .. } => "INTERNAL",
            Self::Unauthorized(_) => "UNAUTHORIZED",
            Self::Busy(_) => "BUSY",
        }
    }
}

impl From<thaw_client::Error> for CacheError {
    fn from(e: thaw_client::Error) -> Self {
        match e {
            // The client failed on the cache's own disk, not on the registry: say so, and a
            // full disk answers 507 like any other lack of space.
            thaw_client::Error::Io { op, path, source } => {
                Self::Io { op, path: path.display().to_string(), source }
            }
            other => Self::Registry(other),
        }
    }
}

/// True when an I/O error means the filesystem (or the quota) is full.
fn is_out_of_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
            || code == rustix::io::Errno::DQUOT.raw_os_error())
}

/// The JSON error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

impl IntoResponse for CacheError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && !matches!(self, Self::Busy(_)) {
            tracing::warn!(error = %self, "request failed");
        }
        let mut message = self.to_string();
        if let Self::Registry(e) = &self {
            if let Some(hint) = e.hint() {
                message = format!("{message} ({hint})");
            }
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code(), message } };
        (status, axum::Json(body)).into_response()
    }
}
