//! What the cache tells others: its listing (local API), its holdings (the directory and
//! the swarm), a disk report for consistency checks, and its gauges.

use thaw_schema::cache_api::{CacheListing, CachedSnapshot};
use thaw_schema::holdings::{HeldSnapshot, NodeHoldings, MAX_SNAPSHOTS_PER_NODE};

use super::{Cache, DiskReport};
use crate::error::Result;
use crate::fsutil::allocated_bytes;

impl Cache {
    /// The cache's contents, most recently used first.
    pub fn listing(&self) -> CacheListing {
        let st = self.state.lock().expect("state lock");
        let mut snapshots: Vec<CachedSnapshot> = st
            .snapshots
            .values()
            .map(|s| CachedSnapshot {
                references: s.references.clone(),
                digest: s.digest,
                size_bytes: s.size_bytes(),
                allocated_bytes: s.allocated_bytes,
                last_used_ms: s.last_used_ms,
                leases: st.leases.values().filter(|l| l.record.digest == s.digest).count() as u32,
            })
            .collect();
        snapshots.sort_by(|a, b| b.last_used_ms.cmp(&a.last_used_ms).then(a.digest.cmp(&b.digest)));
        CacheListing { capacity_bytes: self.config.capacity, used_bytes: st.used(), snapshots }
    }

    /// What this node holds, for the holdings directory: largest snapshots first.
    pub fn holdings(&self) -> NodeHoldings {
        let st = self.state.lock().expect("state lock");
        let mut snapshots: Vec<HeldSnapshot> = st
            .snapshots
            .values()
            .map(|s| HeldSnapshot {
                reference: s.references.first().cloned().unwrap_or_default(),
                digest: s.digest,
                size_bytes: s.size_bytes(),
                cached_bytes: s.size_bytes(),
            })
            .collect();
        snapshots.sort_by(|a, b| b.size_bytes.cmp(&a.size_bytes).then(a.digest.cmp(&b.digest)));
        // Snapshots being materialized, first (so they survive the bound): `cachedBytes: 0`.
        let in_progress: Vec<HeldSnapshot> = self
            .swarm
            .list()
            .into_iter()
            .filter(|(d, _)| !st.snapshots.contains_key(d))
            .map(|(digest, m)| HeldSnapshot {
                reference: m.reference.clone(),
                digest,
                size_bytes: m.size,
                cached_bytes: 0,
            })
            .collect();
        snapshots.splice(0..0, in_progress);
        snapshots.truncate(MAX_SNAPSHOTS_PER_NODE);
        NodeHoldings {
            node: self.config.node_name.clone(),
            peer_endpoint: self.config.peer_endpoint.clone(),
            capacity_bytes: self.config.capacity,
            used_bytes: st.used(),
            snapshots,
        }
    }

    /// The chunk locations in the index, the bytes allocated under `snapshots/` and
    /// `leases/`, and what the index accounts for them: for consistency checks. Spares and
    /// work in progress are left out of both.
    pub fn disk_report(&self) -> Result<DiskReport> {
        Ok(DiskReport {
            chunk_locations: self.index.chunk_location_count()?,
            allocated_on_disk: allocated_bytes(&self.dirs.snapshots) + allocated_bytes(&self.dirs.leases),
            used_by_index: {
                let st = self.state.lock().expect("state lock");
                st.snapshots.values().map(|s| s.allocated_bytes).sum::<u64>()
                    + st.leases.values().map(|l| l.allocated).sum::<u64>()
            },
        })
    }

    pub(super) fn update_gauges(&self) {
        let st = self.state.lock().expect("state lock");
        self.metrics.set_gauges(
            st.used(),
            self.config.capacity,
            st.snapshots.len() as u64,
            st.leases.len() as u64,
        );
    }
}
