//! Publishing what this node holds after each change, through a [`HoldingsPublisher`]: the
//! registry's node directory here (the embedded default, for running without a cluster);
//! the node's `NodeSnapshotCache` status in `kube_publisher.rs` (`--holdings kube`).

use std::sync::Arc;
use std::time::Duration;

use thaw_client::Registry;
use thaw_schema::holdings::NodeHoldings;

use crate::cache::Cache;

/// Where holdings go.
pub trait HoldingsPublisher: Send + Sync + 'static {
    /// Publishes the node's current holdings, replacing what was published before.
    fn publish(
        &self,
        holdings: &NodeHoldings,
    ) -> impl std::future::Future<Output = Result<(), thaw_client::Error>> + Send;
}

/// The registry's node directory (`PUT /v2/_thaw/nodes/<node>`).
#[derive(Debug)]
pub struct RegistryDirectory {
    registry: Registry,
}

impl RegistryDirectory {
    /// Publishes through `registry`.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

impl HoldingsPublisher for RegistryDirectory {
    async fn publish(&self, holdings: &NodeHoldings) -> Result<(), thaw_client::Error> {
        self.registry.put_node_holdings(holdings).await
    }
}

/// Publishes on every change, at most once per `debounce`, and only when the record differs
/// from the last one published; retries failures with backoff up to a minute. Runs forever.
pub async fn run_publisher<P: HoldingsPublisher>(cache: Arc<Cache>, publisher: P, debounce: Duration) {
    let mut last: Option<NodeHoldings> = None;
    let mut backoff = Duration::from_millis(500);
    let mut first = true;
    loop {
        if !first {
            cache.holdings_changed.notified().await;
        }
        first = false;
        loop {
            tokio::time::sleep(debounce).await;
            let now = cache.holdings();
            if last.as_ref() == Some(&now) {
                break;
            }
            match publisher.publish(&now).await {
                Ok(()) => {
                    tracing::debug!(snapshots = now.snapshots.len(), "published holdings");
                    last = Some(now);
                    backoff = Duration::from_millis(500);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "could not publish holdings");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}
