//! Volatile state (last-use times, ended leases, tag resolutions) kept in memory and
//! written to the index in batches: losing the last few after a crash is harmless. Each
//! batch also copies the live leases into the index when the lease log holds any, and then
//! drops the part of the log it copied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::Cache;
use crate::error::Result;
use crate::index::{LeaseRecord, VolatileBatch};

impl Cache {
    /// Writes last-use times, ended leases and tag resolutions changed since the last call,
    /// and the leases logged since.
    pub fn flush(&self) -> Result<()> {
        // Set the log aside before reading the leases: every lease in it is then either
        // live in the state (written below) or ended (removed below, or already).
        let logged = self.lease_log.rotate()?;
        let batch = {
            let mut st = self.state.lock().expect("state lock");
            let mut batch = VolatileBatch::default();
            for d in std::mem::take(&mut st.dirty_snapshots) {
                if let Some(r) = st.snapshots.get(&d) {
                    batch.snapshots.push(r.clone());
                }
            }
            for id in std::mem::take(&mut st.dirty_leases) {
                // Live leases were written when taken or renewed; only ended ones remain.
                if !st.leases.contains_key(&id) {
                    batch.leases_removed.push(id);
                }
            }
            if let Some(in_flight) = &logged {
                let mut put: HashMap<String, LeaseRecord> = in_flight.iter().cloned().collect();
                for (id, l) in &st.leases {
                    let newer = put.get(id).is_none_or(|p| p.expires_ms <= l.record.expires_ms);
                    if newer {
                        put.insert(id.clone(), l.record.clone());
                    }
                }
                batch.leases_put = put.into_iter().collect();
            }
            for key in std::mem::take(&mut st.dirty_refs) {
                if let Some(r) = st.refs.get(&key) {
                    batch.refs.push((key, *r));
                }
            }
            batch
        };
        if !batch.is_empty() {
            self.index.write_volatile(&batch)?;
        }
        if logged.is_some() {
            self.lease_log.drop_old()?;
        }
        Ok(())
    }

    /// Writes volatile state at most every `interval`, whenever it changed. Runs forever.
    pub async fn run_flusher(self: Arc<Self>, interval: Duration) {
        loop {
            self.dirty.notified().await;
            tokio::time::sleep(interval).await;
            let cache = self.clone();
            match tokio::task::spawn_blocking(move || cache.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not write usage and leases to the index"),
                Err(e) => tracing::warn!(error = %e, "flush task failed"),
            }
        }
    }
}
