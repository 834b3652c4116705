//! JSON bodies of the node cache's local API (`thaw-node-cache`, docs/API.md), shared by the
//! daemon and the `thaw cache` subcommand.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Sha256Digest;

/// Body of `POST /v1/snapshots/ensure` and `POST /v1/snapshots/prefetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsureRequest {
    /// The snapshot: `host/repo:tag`, `host/repo@sha256:…`, or without a host for the
    /// cache's registry.
    pub reference: String,
    /// How guest memory is handed out: a file (the default), or a page-fault server
    /// (`"uffd"`, ensure only) that answers before the memory file is complete.
    #[serde(default, skip_serializing_if = "MemoryMode::is_file")]
    pub memory: MemoryMode,
}

/// How `ensure` hands out a snapshot's guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// As the memory file, complete and verified, in `files.memory`.
    #[default]
    File,
    /// As a Unix socket serving Firecracker's userfaultfd handshake (`memory_socket`),
    /// for `mem_backend: {"backend_type": "Uffd"}`: the answer comes as soon as the
    /// vmstate, info and disk files are ready, and pages are filled as the VM touches them.
    Uffd,
}

impl MemoryMode {
    /// Whether this is the default, [`MemoryMode::File`].
    pub fn is_file(&self) -> bool {
        *self == Self::File
    }
}

/// Answer of `POST /v1/snapshots/ensure`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnsureResponse {
    /// The reference as asked, resolved against the cache's registry.
    pub reference: String,
    /// Its manifest digest.
    pub digest: Sha256Digest,
    /// The lease this call took; `release` ends it, `renew` extends it.
    pub lease: String,
    /// When the lease expires unless renewed, Unix milliseconds: the cache then releases it
    /// itself, so a crashed orchestrator cannot pin capacity forever.
    pub lease_expires_ms: u64,
    /// Absolute paths by role (`memory`, `vmstate`, `disk`, `info`); files of no known role
    /// by their file name. `disk` is a private copy for this lease.
    pub files: BTreeMap<String, String>,
    /// Where the snapshot's bytes came from in this call (all zero on a hit).
    pub bytes: BytesBySource,
    /// Wall time of the call in milliseconds.
    pub millis: u64,
    /// True when the snapshot was already cached.
    pub hit: bool,
    /// With `"memory": "uffd"`: the Unix socket Firecracker's `mem_backend.backend_path`
    /// names. `files.memory` is then present only when the snapshot was already cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_socket: Option<String>,
}

/// Bytes of a materialization by where they came from (uncompressed chunk bytes; zero
/// chunks count nowhere).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BytesBySource {
    /// Copied from files already in the cache.
    pub local: u64,
    /// Fetched from other nodes.
    pub peers: u64,
    /// Fetched from the registry.
    pub registry: u64,
}

/// Body of `POST /v1/snapshots/release`: the lease, or else the reference's oldest lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The lease `ensure` returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// The snapshot whose oldest lease to end, when `lease` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// Body of `POST /v1/snapshots/renew`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The lease `ensure` returned.
    pub lease: String,
}

/// Answer of `POST /v1/snapshots/renew`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewResponse {
    /// The lease renewed.
    pub lease: String,
    /// Its new expiry, Unix milliseconds.
    pub lease_expires_ms: u64,
}

/// Body of `POST /v1/snapshots/publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// Where to push it: a repository on the cache's own registry (any other host is refused).
    pub reference: String,
    /// Absolute path of the snapshot directory on this node, under the cache's
    /// `--publish-root`.
    pub dir: String,
}

/// Answer of `POST /v1/snapshots/publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResponse {
    /// The reference pushed.
    pub reference: String,
    /// The manifest digest.
    pub digest: Sha256Digest,
    /// Compressed chunk bytes sent.
    pub bytes_sent: u64,
    /// Wall time in milliseconds.
    pub millis: u64,
}

/// Answer of `GET /v1/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheListing {
    /// Capacity in bytes of allocated disk.
    pub capacity_bytes: u64,
    /// Allocated bytes in use by cached snapshots, leases' private copies and work in progress.
    pub used_bytes: u64,
    /// The cached snapshots, most recently used first.
    pub snapshots: Vec<CachedSnapshot>,
}

/// One cached snapshot in the listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedSnapshot {
    /// The references it was ensured by.
    pub references: Vec<String>,
    /// Manifest digest.
    pub digest: Sha256Digest,
    /// Total size of its files.
    pub size_bytes: u64,
    /// Disk blocks allocated to it, in bytes.
    pub allocated_bytes: u64,
    /// Last use, Unix milliseconds.
    pub last_used_ms: u64,
    /// Leases held now.
    pub leases: u32,
}
