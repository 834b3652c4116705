//! `thaw-client`: thaw's registry client and the library behind the `thaw` CLI.
//!
//! It owns the client side of the wire: talking OCI Distribution to any registry (with
//! anonymous, basic and bearer-token authentication, Docker `config.json` credentials,
//! retries with backoff) and the `_thaw` extension where a registry offers it; pushing a
//! snapshot directory (chunk, hash and compress on all cores, send only the chunks the
//! registry lacks, commit each file by recipe, push the manifest); pulling one (reuse chunks
//! from seed files and a chunk cache, fetch the rest, write zero chunks as holes, verify
//! every chunk and file before renaming into place); inspecting and copying artifacts.
//!
//! It must not re-implement formats: digests, chunker, frames, batches, recipes, manifests
//! and media types come from `thaw-schema`. It holds no long-lived state: the node cache
//! builds its own store on top of it. Bytes from the network, seeds or the cache are
//! always checked before they are used or written under a final name.
#![warn(missing_docs)]

pub mod auth;
pub mod blob;
mod copy;
pub mod error;
pub mod ingest;
mod inspect;
mod local;
pub mod manifest;
mod materialize;
mod nodes;
mod pull;
mod push;
pub mod reference;
mod registry;
mod scan;
mod sink;
pub mod snapshot;
pub mod stats;
mod thaw_api;
mod transport;
pub mod tuning;
mod upload;

pub use auth::Credentials;
pub use copy::{copy, CopyReport};
pub use error::{Error, Result};
pub use inspect::{inspect, InspectReport, InspectedFile, RecipeSummary};
pub use local::ChunkCache;
pub use pull::{pull, PullOptions, PullReport, PulledFile};
pub use push::{push, push_dir, PushOptions, PushReport, PushedFile};
pub use reference::{parse_registry_url, Reference};
pub use registry::{ClientOptions, FetchedManifest, Referrer, Registry};
pub use stats::{Stats, StatsSnapshot};
pub use thaw_api::{FileCheck, LayerRecipe};
pub use transport::RetryPolicy;
pub use upload::{UploadOptions, UploadedBlob};
