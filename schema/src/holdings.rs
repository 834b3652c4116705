//! What a node cache holds, as it publishes it: the body of the registry's node directory
//! (`PUT/GET /v2/_thaw/nodes/<node>`, docs/API.md) and, on Kubernetes, the status of the
//! node's `NodeSnapshotCache`. The extender scores nodes from it; peers find chunks with it.

use serde::{Deserialize, Serialize};

use crate::Sha256Digest;

/// Most snapshots one holdings record lists; a node holding more lists its largest.
pub const MAX_SNAPSHOTS_PER_NODE: usize = 1024;

/// Longest node name accepted (a Kubernetes node name is a DNS subdomain: 253).
pub const MAX_NODE_NAME_LEN: usize = 253;

/// One node's holdings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeHoldings {
    /// The node's name (the Kubernetes node name).
    pub node: String,
    /// Where other nodes fetch chunks from this one (`host:port`), once P2P exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_endpoint: Option<String>,
    /// Cache capacity in bytes of allocated disk.
    pub capacity_bytes: u64,
    /// Allocated bytes in use.
    pub used_bytes: u64,
    /// The snapshots held, largest first.
    pub snapshots: Vec<HeldSnapshot>,
}

/// One cached snapshot in a holdings record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeldSnapshot {
    /// The reference it was ensured by (`host/repo:tag` or `host/repo@sha256:…`).
    pub reference: String,
    /// Its manifest digest.
    pub digest: Sha256Digest,
    /// Total size of its files in bytes.
    pub size_bytes: u64,
    /// Bytes of it present on the node (equal to `size_bytes` once complete). `0` while a
    /// node cache is materializing it: an in-progress announcement, for swarming peers
    /// (docs/DECISIONS.md D19).
    pub cached_bytes: u64,
}

impl HeldSnapshot {
    /// True for an in-progress announcement: the node is still materializing it, so it
    /// holds none of it that anyone may count on yet.
    pub fn is_in_progress(&self) -> bool {
        self.cached_bytes == 0 && self.size_bytes > 0
    }
}

/// Answer of `GET /v2/_thaw/nodes`: every node's latest record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeDirectory {
    /// One record per node, sorted by node name.
    pub nodes: Vec<NodeHoldings>,
}

/// Why a node name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node name {name:?}: {why}")]
pub struct NodeNameError {
    /// The name given.
    pub name: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Checks a node name: a DNS subdomain as Kubernetes names nodes (lowercase letters, digits,
/// `-` and `.`, starting and ending alphanumeric, at most 253 characters). It becomes a
/// storage key, so nothing else may pass.
pub fn validate_node_name(name: &str) -> Result<(), NodeNameError> {
    let fail = |why| Err(NodeNameError { name: name.to_owned(), why });
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return fail("it is longer than 253 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
        return fail("only lowercase letters, digits, '-' and '.' are allowed");
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(name.as_bytes()[0]) || !alnum(name.as_bytes()[name.len() - 1]) {
        return fail("it must start and end with a letter or digit");
    }
    if name.split('.').any(str::is_empty) {
        return fail("it has an empty label");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_kubernetes_rules() {
        for ok in ["node-1", "worker.example.com", "a", "10.0.0.1"] {
            validate_node_name(ok).unwrap();
        }
        for bad in ["", "Node", "-a", "a-", "a..b", "../x", "a/b", "a b", &"x".repeat(254)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn holdings_use_camel_case_json() {
        let h = NodeHoldings {
            node: "n1".into(),
            peer_endpoint: None,
            capacity_bytes: 10,
            used_bytes: 5,
            snapshots: vec![],
        };
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, r#"{"node":"n1","capacityBytes":10,"usedBytes":5,"snapshots":[]}"#);
        assert!(serde_json::from_str::<NodeHoldings>(
            r#"{"node":"n1","capacityBytes":1,"usedBytes":1,"snapshots":[],"x":1}"#
        )
        .is_err());
    }
}
