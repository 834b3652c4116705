//! kube-scheduler's extender protocol (`k8s.io/kube-scheduler/extender/v1`) as it is on the
//! wire. The Go types carry no JSON tags, so the field names are the Go names (PascalCase);
//! Go's decoder matches them case-insensitively, so replies use the exact Go spelling and
//! requests are also accepted in lower case. Only the parts of the Pod the extender reads are
//! parsed; every other field is ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `ExtenderArgs`: the body of both `/filter` and `/prioritize`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExtenderArgs {
    /// The pod being scheduled.
    #[serde(rename = "Pod", alias = "pod", default)]
    pub pod: Option<Pod>,
    /// Candidate nodes, sent when the extender is not `nodeCacheCapable`. Kept as sent so
    /// `/filter` can hand the same objects back.
    #[serde(rename = "Nodes", alias = "nodes", default)]
    pub nodes: Option<serde_json::Value>,
    /// Candidate node names, sent when the extender is `nodeCacheCapable`.
    #[serde(rename = "NodeNames", alias = "nodenames", alias = "nodeNames", default)]
    pub node_names: Option<Vec<String>>,
}

impl ExtenderArgs {
    /// The candidate node names, in request order: `NodeNames` when given, else the
    /// `metadata.name` of each item of `Nodes`.
    pub fn candidates(&self) -> Vec<String> {
        if let Some(names) = &self.node_names {
            return names.clone();
        }
        let Some(items) = self.nodes.as_ref().and_then(|n| n.get("items")).and_then(|i| i.as_array()) else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|node| node.get("metadata")?.get("name")?.as_str().map(str::to_owned))
            .collect()
    }
}

/// The parts of a `v1.Pod` the extender reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Pod {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// The parts of a `v1.ObjectMeta` the extender reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ObjectMeta {
    /// `metadata.name` (empty for a pod from `generateName` not yet named).
    #[serde(default)]
    pub name: Option<String>,
    /// `metadata.namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// `metadata.labels`.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// `metadata.annotations`.
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Pod {
    /// A label's value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(String::as_str)
    }

    /// An annotation's value.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotations.as_ref()?.get(key).map(String::as_str)
    }

    /// `namespace/name`, for logs.
    pub fn display_name(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or("default"),
            self.metadata.name.as_deref().unwrap_or("")
        )
    }
}

/// `HostPriority`: one entry of the `/prioritize` answer (`HostPriorityList`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPriority {
    /// The node name.
    #[serde(rename = "Host")]
    pub host: String,
    /// 0 ([`MIN_EXTENDER_PRIORITY`]) to 10 ([`MAX_EXTENDER_PRIORITY`]).
    #[serde(rename = "Score")]
    pub score: i64,
}

/// `extenderv1.MinExtenderPriority`.
pub const MIN_EXTENDER_PRIORITY: i64 = 0;
/// `extenderv1.MaxExtenderPriority`.
pub const MAX_EXTENDER_PRIORITY: i64 = 10;

/// `ExtenderFilterResult`: the `/filter` answer. Every field is always written, as Go's
/// encoder writes them (`null` for an absent list, `{}` for an empty map).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtenderFilterResult {
    /// The nodes that pass, when the request carried `Nodes`.
    #[serde(rename = "Nodes")]
    pub nodes: Option<serde_json::Value>,
    /// The node names that pass, when the request carried `NodeNames`.
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<String>>,
    /// Nodes filtered out, with the reason (preemption may help).
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    /// Nodes filtered out where preemption would not help.
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    /// An error that fails the whole call; empty on success.
    #[serde(rename = "Error")]
    pub error: String,
}

impl ExtenderFilterResult {
    /// The answer that filters nothing out: the request's nodes back, in the form it sent
    /// them (`NodeNames` when present, else `Nodes`; an empty name list when neither).
    pub fn keep_all(args: ExtenderArgs) -> Self {
        let (nodes, node_names) = match (args.node_names, args.nodes) {
            (Some(names), _) => (None, Some(names)),
            (None, Some(nodes)) => (Some(nodes), None),
            (None, None) => (None, Some(Vec::new())),
        };
        Self {
            nodes,
            node_names,
            failed_nodes: Default::default(),
            failed_and_unresolvable_nodes: Default::default(),
            error: String::new(),
        }
    }
}
