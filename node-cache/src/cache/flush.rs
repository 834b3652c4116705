//! Volatile state (last-use times, ended leases, tag resolutions) kept in memory and
//! written to the index in batches: losing the last few after a crash is harmless.

use std::sync::Arc;
use std::time::Duration;

use super::Cache;
use crate::error::Result;
use crate::index::VolatileBatch;

impl Cache {
    /// Writes last-use times, ended leases and tag resolutions changed since the last call.
    pub fn flush(&self) -> Result<()> {
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
            for key in std::mem::take(&mut st.dirty_refs) {
                if let Some(r) = st.refs.get(&key) {
                    batch.refs.push((key, *r));
                }
            }
            batch
        };
        if batch.is_empty() {
            return Ok(());
        }
        self.index.write_volatile(&batch)
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
