//! Leases: a snapshot in use is leased by `ensure` until released, renewed or expired;
//! every lease is in the lease log (`lease_log.rs`) before it is handed out.

use std::sync::Arc;
use std::time::Duration;

use super::{now_ms, Cache};
use crate::error::{CacheError, Result};
use crate::fsutil;
use crate::index::LeaseRecord;

impl Cache {
    /// Ends a lease: by id, or the oldest lease of a reference.
    pub fn release(&self, lease: Option<&str>, reference: Option<&str>) -> Result<String> {
        let id = {
            let st = self.state.lock().expect("state lock");
            match (lease, reference) {
                (Some(id), _) => {
                    if !st.leases.contains_key(id) {
                        return Err(CacheError::NotFound(format!("no lease {id:?}")));
                    }
                    id.to_owned()
                }
                (None, Some(r)) => {
                    let key = self.parse_reference(r)?.to_string();
                    st.leases
                        .iter()
                        .filter(|(_, l)| l.record.reference == key)
                        .min_by_key(|(_, l)| l.record.created_ms)
                        .map(|(id, _)| id.clone())
                        .ok_or_else(|| CacheError::NotFound(format!("{key} holds no lease")))?
                }
                (None, None) => {
                    return Err(CacheError::BadRequest("name a lease or a reference to release".into()))
                }
            }
        };
        self.end_lease(&id);
        Ok(id)
    }

    /// Extends a lease by the lease TTL from now, durably; answers the new expiry.
    pub async fn renew(&self, id: &str) -> Result<u64> {
        let gone = || CacheError::NotFound(format!("no lease {id:?} (released, or expired unrenewed)"));
        let mut record = {
            let st = self.state.lock().expect("state lock");
            st.leases.get(id).ok_or_else(gone)?.record.clone()
        };
        record.expires_ms = now_ms() + self.config.lease_ttl.as_millis() as u64;
        if !self.persist_lease(id, &record).await? {
            return Err(gone());
        }
        let mut st = self.state.lock().expect("state lock");
        let renewed = st.leases.get_mut(id).map(|l| {
            l.record.expires_ms = l.record.expires_ms.max(record.expires_ms);
            l.record.expires_ms
        });
        // After the state holds the new expiry: a flush in between copies the logged one.
        self.lease_log.confirm(id);
        match renewed {
            Some(expires_ms) => Ok(expires_ms),
            None => {
                // Released while the record was written: remove it again.
                st.dirty_leases.insert(id.to_owned());
                drop(st);
                self.dirty.notify_one();
                Err(gone())
            }
        }
    }

    /// Appends a lease to the lease log, off the async threads, before `ensure` or `renew`
    /// answers; the caller confirms it to the log once the state holds it. Answers false, writing nothing, when the snapshot is no longer cached (an
    /// eviction won the race): the caller then has no lease to hand out.
    pub(super) async fn persist_lease(&self, id: &str, lease: &LeaseRecord) -> Result<bool> {
        if !self.state.lock().expect("state lock").snapshots.contains_key(&lease.digest) {
            return Ok(false);
        }
        let (log, id, lease) = (self.lease_log.clone(), id.to_owned(), lease.clone());
        tokio::task::spawn_blocking(move || log.append(&id, &lease))
            .await
            .map_err(|source| CacheError::Task { what: "lease write", source })??;
        self.dirty.notify_one();
        Ok(true)
    }

    /// Ends the leases whose time is up; answers how many.
    pub fn release_expired(&self) -> usize {
        let now = now_ms();
        let expired: Vec<(String, String)> = {
            let st = self.state.lock().expect("state lock");
            st.leases
                .iter()
                .filter(|(_, l)| l.record.expires_ms <= now)
                .map(|(id, l)| (id.clone(), l.record.reference.clone()))
                .collect()
        };
        for (id, reference) in &expired {
            tracing::info!(lease = %id, %reference, "lease expired unrenewed; releasing it");
            self.end_lease(id);
        }
        if !expired.is_empty() {
            self.holdings_changed.notify_one();
        }
        expired.len()
    }

    /// Releases expired leases every `interval`. Runs forever.
    pub async fn run_lease_reaper(self: Arc<Self>, interval: Duration) {
        loop {
            let cache = self.clone();
            let _ = tokio::task::spawn_blocking(move || cache.release_expired()).await;
            tokio::time::sleep(interval).await;
        }
    }

    pub(super) fn end_lease(&self, id: &str) {
        self.lazy.lease_ended(id);
        {
            let mut st = self.state.lock().expect("state lock");
            st.leases.remove(id);
            st.dirty_leases.insert(id.to_owned());
        }
        fsutil::remove_all(&self.dirs.leases.join(id));
        self.dirty.notify_one();
        self.update_gauges();
    }
}
