//! The library's error type: semantic kinds a caller can match on, each naming what was
//! being done, with a hint for people in [`Error::hint`].

use std::path::PathBuf;

use thaw_schema::ErrorCode;

/// Result alias for the client library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, by kind. Every variant says which operation failed (`op`), so a message
/// read alone names the reference, blob or file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A reference string could not be parsed (a usage error).
    #[error("invalid reference {input:?}: {why}")]
    InvalidReference {
        /// The text given.
        input: String,
        /// What is wrong with it.
        why: String,
    },
    /// The command line or options are inconsistent (a usage error).
    #[error("{0}")]
    Usage(String),
    /// The registry answered with an error status.
    #[error("{op}: registry answered {status}{}: {message}", code.as_ref().map(|c| format!(" {c}")).unwrap_or_default())]
    Registry {
        /// What was being done, e.g. `GET manifest localhost:5000/fn:v1`.
        op: String,
        /// HTTP status.
        status: u16,
        /// The OCI error code from the body, when there was one.
        code: Option<RegistryCode>,
        /// The message from the body, or the status text.
        message: String,
    },
    /// Authentication was required and failed.
    #[error("{op}: authentication with {host} failed: {why}")]
    Auth {
        /// What was being done.
        op: String,
        /// Registry host.
        host: String,
        /// Why.
        why: String,
    },
    /// The registry could not be reached, or the connection broke.
    #[error("{op}: {source}")]
    Transport {
        /// What was being done.
        op: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// Bytes did not match their digest or chunk id, or a body was cut short.
    #[error("{what}: integrity check failed: {why}")]
    Integrity {
        /// The blob, chunk or file concerned.
        what: String,
        /// What did not match.
        why: String,
    },
    /// The registry's answer is malformed or not what the protocol allows.
    #[error("{op}: unexpected answer from the registry: {why}")]
    Protocol {
        /// What was being done.
        op: String,
        /// What was wrong.
        why: String,
    },
    /// A local file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`reading`, `writing`, …).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot directory or artifact is not usable (unknown files, unsafe names, …).
    #[error("{0}")]
    Snapshot(String),
    /// A local configuration file (Docker `config.json`) is unusable.
    #[error("{0}")]
    Config(String),
}

/// An OCI error code as a registry sent it in an error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryCode {
    /// One of the spec's codes (thaw-schema's one table).
    Spec(ErrorCode),
    /// A code outside the spec's table (registries may add their own), as sent.
    Other(String),
}

impl RegistryCode {
    /// The code in `text`: the spec's when it is one, else kept as sent.
    pub fn parse(text: &str) -> Self {
        ErrorCode::parse(text).map_or_else(|| Self::Other(text.to_owned()), Self::Spec)
    }
}

impl std::fmt::Display for RegistryCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Spec(code) => f.write_str(code.as_str()),
            Self::Other(text) => f.write_str(text),
        }
    }
}

impl Error {
    /// An I/O error on `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { op, path: path.into(), source }
    }

    /// A protocol error.
    pub(crate) fn protocol(op: impl Into<String>, why: impl Into<String>) -> Self {
        Self::Protocol { op: op.into(), why: why.into() }
    }

    /// An integrity error.
    pub(crate) fn integrity(what: impl Into<String>, why: impl Into<String>) -> Self {
        Self::Integrity { what: what.into(), why: why.into() }
    }

    /// True for usage errors (bad reference, inconsistent options): the CLI exits 2.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::InvalidReference { .. } | Self::Usage(_))
    }

    /// True when the registry said the thing does not exist (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Registry { status: 404, .. })
    }

    /// True when the registry refused the caller: 401 or 403, or credentials it rejected
    /// (no push right, say).
    pub fn is_denied(&self) -> bool {
        matches!(self, Self::Registry { status: 401 | 403, .. } | Self::Auth { .. })
    }

    /// What a person could try next, when there is a useful suggestion.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::InvalidReference { .. } => {
                Some("a reference looks like host[:port]/repository:tag or host[:port]/repository@sha256:<hex>")
            }
            Self::Registry { status: 404, .. } => {
                Some("check the repository and tag; `thaw tags REF` lists the tags of a repository")
            }
            Self::Registry { status: 401 | 403, .. } | Self::Auth { .. } => Some(
                "log in with `thaw login HOST`, or check the credentials in $DOCKER_CONFIG/config.json \
                 (~/.docker/config.json)",
            ),
            Self::Registry { status: 500..=599, .. } => {
                Some("the registry failed; retry later and check its logs")
            }
            Self::Transport { source, .. } if is_tls_mismatch(source) => Some(
                "the registry may speak plain HTTP: pass --plain-http (only for a registry you trust on this network)",
            ),
            Self::Transport { .. } => Some(
                "check the registry address and that it is running; for a registry without TLS pass --plain-http",
            ),
            Self::Integrity { .. } => Some(
                "the data received (or a seed file) was corrupt; nothing was written in place of the \
                 destination file. Retry; if it persists, the registry's storage is damaged",
            ),
            Self::Protocol { .. } => Some("the server may not be an OCI registry, or not the version expected"),
            Self::Io { .. } => Some("check that the path exists, is writable and that the disk has space"),
            Self::Config(_) => Some("fix or remove the file, or log in again with `thaw login HOST`"),
            _ => None,
        }
    }
}

fn is_tls_mismatch(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        let text = s.to_string().to_ascii_lowercase();
        if text.contains("invalidcontenttype") || text.contains("corrupt message") || text.contains("tls") {
            return true;
        }
        source = s.source();
    }
    false
}
