//! `thaw-node-cache`: the snapshot cache on every worker node.
//!
//! It owns the node's copy of snapshots: `ensure` answers with the paths of a snapshot's
//! files (materializing it first if needed, copying the chunks it shares with any cached
//! snapshot from local disk and fetching only the rest), leases keep snapshots in use from
//! eviction, capacity is bounded in allocated bytes with least-recently-used eviction, and
//! what the node holds is published to the registry's node directory. The cached files are
//! the chunk store: a redb index maps each chunk id to a file and offset holding it. Node
//! caches serve each other the chunks of their complete snapshots ([`peer`]), authenticated
//! by a cluster token, and fetch from peers before the registry, verifying every chunk.
//!
//! It must not re-implement the registry protocol (that is `thaw-client`) nor formats (that
//! is `thaw-schema`), and it never reports a snapshot present before every file is verified.
#![warn(missing_docs)]

pub mod api;
pub mod cache;
pub mod error;
mod fsutil;
pub mod holdings;
mod index;
pub mod kube_publisher;
mod lazy;
mod lease_log;
mod metrics;
pub mod peer;
mod swarm;

pub use cache::{Cache, CacheConfig, DiskReport, ScrubReport, WorkingSetMode, WorkingSetOptions};
pub use error::{CacheError, Result};
pub use peer::{PeerOptions, PeerToken};
