//! The node directory: each node cache's latest holdings record, one object per node
//! (`keys::node`), so every replica serving the bucket answers the same directory.

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use thaw_schema::holdings::NodeHoldings;

use super::{corrupt, keys, Result, Store};

/// Records read at once when listing the directory.
const LIST_CONCURRENCY: usize = 8;

impl Store {
    /// Stores `holdings` as its node's record, replacing the previous one (last writer wins;
    /// the write is one atomic PUT). The caller has validated the node name.
    pub async fn put_node(&self, holdings: &NodeHoldings) -> Result<()> {
        let body = serde_json::to_vec(holdings).expect("holdings serialize");
        self.put(&keys::node(&holdings.node), body).await
    }

    /// A node's record, or `None`. Checked to parse and to name the node it is stored under.
    pub async fn get_node(&self, node: &str) -> Result<Option<NodeHoldings>> {
        let key = keys::node(node);
        match self.get_opt(&key).await? {
            None => Ok(None),
            Some(bytes) => parse_record(&key, node, &bytes).map(Some),
        }
    }

    /// Deletes a node's record; false when there was none.
    pub async fn delete_node(&self, node: &str) -> Result<bool> {
        self.delete(&keys::node(node)).await
    }

    /// Every node's record, sorted by node name. A record deleted between the listing and
    /// its read is left out.
    pub async fn list_nodes(&self) -> Result<Vec<NodeHoldings>> {
        let mut names: Vec<String> = self
            .list_keys(&Path::from(keys::NODES))
            .await?
            .into_iter()
            .filter_map(|k| k.filename().map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        let reads = names.into_iter().map(|name| async move { self.get_node(&name).await });
        let records: Vec<Option<NodeHoldings>> =
            futures::stream::iter(reads).buffered(LIST_CONCURRENCY).try_collect().await?;
        Ok(records.into_iter().flatten().collect())
    }
}

fn parse_record(key: &Path, node: &str, bytes: &[u8]) -> Result<NodeHoldings> {
    let holdings: NodeHoldings = serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))?;
    if holdings.node != node {
        return Err(corrupt(key, format!("the record is for node {:?}", holdings.node)));
    }
    Ok(holdings)
}
