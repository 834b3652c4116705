//! `thaw-schema`: the pure core every thaw component shares.
//!
//! It owns the names and formats that cross process boundaries: typed digests, the chunker,
//! the chunk frame and chunk batch codecs, the recipe codec, the working-set codec, media
//! types, the artifact manifest builders (snapshots, working sets), the `_thaw` wire DTOs,
//! repository-name rules and the OCI error-code table. Byte layouts are specified in
//! `docs/FORMAT.md`.
//!
//! It must stay pure: no async runtime, no HTTP, no filesystem, no Kubernetes client. CI
//! checks this with `cargo tree -p thaw-schema -e normal`.
#![warn(missing_docs)]

pub mod batch;
pub mod cache_api;
pub mod chunker;
pub mod crd;
pub mod digest;
pub mod dto;
pub mod error;
pub mod frame;
pub mod holdings;
pub mod manifest;
pub mod media;
pub mod names;
pub mod recipe;
pub mod working_set;

pub use chunker::{ChunkerKind, ChunkerParams};
pub use digest::{ChunkId, DigestError, Sha256Digest};
pub use error::{ErrorCode, ErrorInfo, ErrorResponse};
pub use recipe::{Recipe, RecipeEntry, RecipeError};

/// Largest uncompressed chunk any thaw format accepts (4 MiB).
pub const MAX_CHUNK_LEN: u32 = 4 * 1024 * 1024;
