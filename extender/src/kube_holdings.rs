//! Holdings from the cluster (`--holdings kube`): a kube reflector keeps every
//! `NodeSnapshotCache` in memory, and each change (coalesced for a moment) replaces the
//! scorer's holdings with the statuses in the store. Nothing here runs on the request path:
//! `/prioritize` reads only the scorer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use thaw_schema::crd::NodeSnapshotCache;
use thaw_schema::holdings::NodeHoldings;

use crate::AppState;

/// How long changes are gathered before the holdings are rebuilt, so a burst of status
/// writes from many nodes costs one rebuild.
pub const COALESCE: Duration = Duration::from_millis(100);

/// Holdings of every object in `store` whose status has been written, sorted by node.
pub fn holdings_of(store: &Store<NodeSnapshotCache>) -> Vec<NodeHoldings> {
    let mut nodes: Vec<NodeHoldings> = store.state().iter().filter_map(|nsc| nsc.holdings()).collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    nodes
}

/// Watches `NodeSnapshotCache` objects through `client` and feeds `state`'s scorer; runs
/// until the runtime stops. Watch errors back off and resume (the last holdings stay).
pub async fn run(state: Arc<AppState>, client: Client) {
    let api: Api<NodeSnapshotCache> = Api::all(client);
    let (store, writer) = reflector::store();
    let changed = Arc::new(tokio::sync::Notify::new());
    let applier = {
        let (state, store, changed) = (state.clone(), store.clone(), changed.clone());
        tokio::spawn(async move {
            let mut warming = None;
            loop {
                changed.notified().await;
                tokio::time::sleep(COALESCE).await;
                let nodes = holdings_of(&store);
                tracing::debug!(nodes = nodes.len(), "holdings from NodeSnapshotCache objects");
                state.metrics.directory_read(true);
                state.apply_holdings(nodes, &mut warming);
            }
        })
    };
    let events = watcher(api, watcher::Config::default()).default_backoff().reflect(writer);
    futures::pin_mut!(events);
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                if failing {
                    tracing::info!("watching NodeSnapshotCache objects again");
                    failing = false;
                }
                changed.notify_one();
            }
            Err(e) => {
                state.metrics.directory_read(false);
                if !failing {
                    tracing::warn!(error = %e, "cannot watch NodeSnapshotCache objects; scoring from the last holdings");
                    failing = true;
                }
            }
        }
        state.scorer.prune_herd(Instant::now());
    }
    applier.abort();
}
