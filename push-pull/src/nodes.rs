//! The registry's node holdings directory (`/v2/_thaw/nodes`, docs/API.md): node caches
//! publish what they hold there; the extender and peers read it.

use bytes::Bytes;
use reqwest::Method;
use thaw_schema::holdings::{validate_node_name, NodeDirectory, NodeHoldings};

use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::transport::{Body, Request, Scope};

/// Largest directory answer accepted.
const MAX_DIRECTORY_LEN: usize = 64 * 1024 * 1024;

impl Registry {
    /// Publishes one node's holdings, replacing its previous record.
    pub async fn put_node_holdings(&self, holdings: &NodeHoldings) -> Result<()> {
        validate_node_name(&holdings.node).map_err(|e| Error::Usage(e.to_string()))?;
        let op = format!("publishing the holdings of node {} to {}", holdings.node, self.host());
        let body = serde_json::to_vec(holdings).expect("serializes");
        let req = Request::new(
            Method::PUT,
            self.transport.url(&format!("/v2/_thaw/nodes/{}", holdings.node)),
            Scope::Nodes { write: true },
        )
        .header("content-type", "application/json")
        .body(Body::Bytes(Bytes::from(body)))
        .idempotent(true);
        self.transport.fetch_all(&op, &req, &[200, 201, 204], 64 * 1024).await?;
        Ok(())
    }

    /// Every node's latest holdings.
    pub async fn node_directory(&self) -> Result<NodeDirectory> {
        let op = format!("reading the node directory of {}", self.host());
        let req =
            Request::new(Method::GET, self.transport.url("/v2/_thaw/nodes"), Scope::Nodes { write: false });
        let (_, body) = self.transport.fetch_all(&op, &req, &[200], MAX_DIRECTORY_LEN).await?;
        serde_json::from_slice(&body).map_err(|e| Error::protocol(&op, format!("malformed directory: {e}")))
    }
}
