//! JSON bodies of the `_thaw` extension (docs/API.md).

use serde::{Deserialize, Serialize};

use crate::{ChunkId, Sha256Digest};

/// Most chunk ids one missing-chunks or fetch query may name.
pub const MAX_IDS_PER_QUERY: usize = 100_000;

/// Largest body of `PUT /v2/_thaw/nodes/<node>` (a `holdings::NodeHoldings` record):
/// 1,024 snapshots of ~300 bytes each fit with room to spare.
pub const MAX_NODE_RECORD_LEN: usize = 1024 * 1024;

/// Body of `POST /v2/<name>/_thaw/chunks/missing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingChunksRequest {
    /// The ids to look up.
    pub chunks: Vec<ChunkId>,
}

/// Answer of `POST /v2/<name>/_thaw/chunks/missing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingChunksResponse {
    /// The ids the registry does not store, in request order.
    pub missing: Vec<ChunkId>,
}

/// Answer of `POST /v2/<name>/_thaw/chunks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkUploadResponse {
    /// Chunks newly written.
    pub stored: usize,
    /// Chunks that were already stored.
    pub present: usize,
}

/// Body of `POST /v2/<name>/_thaw/chunks/fetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchChunksRequest {
    /// A blob readable in the repository; every requested chunk must belong to it.
    pub blob: Sha256Digest,
    /// The chunks wanted, answered in this order.
    pub chunks: Vec<ChunkId>,
}

/// Answer of `GET /v2/_oci/ext/discover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoverResponse {
    /// Extensions the registry serves.
    pub extensions: Vec<ExtensionInfo>,
}

/// One extension in the discover answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionInfo {
    /// Extension name, `_thaw` for thaw's.
    pub name: String,
    /// Where it is documented.
    pub url: String,
    /// What it does.
    pub description: String,
    /// Endpoint paths relative to `/v2/<name>/`.
    pub endpoints: Vec<String>,
}

/// Name of thaw's extension.
pub const THAW_EXTENSION: &str = "_thaw";
