//! The `NodeSnapshotCache` custom resource (`thaw.dev/v1alpha1`, short name `nsc`): one
//! cluster-scoped object per node, named after the node and owned by its Node object, whose
//! status is the node's holdings ([`NodeHoldings`]) as the node cache last published them.
//!
//! The node cache creates the object and writes its status by server-side apply; the
//! extender watches the objects and scores from them. `deploy/crd.yaml` is generated from
//! these types (see [`crd_yaml_header`] and the `crd_yaml_is_generated_from_the_rust_type`
//! test) and must never be edited by hand.
//!
//! Kubernetes integers are signed 64-bit (`format: int64`); the schema has no unsigned
//! formats, so byte counts are `i64` here and [`NodeHoldings`]' `u64`s are clamped to
//! `i64::MAX` on the way in (and negative values read as 0 on the way out). The snapshot
//! list is bounded by `maxItems` = [`MAX_SNAPSHOTS_PER_NODE`]; a node holding more lists its
//! largest holdings first and drops the rest, while `snapshotCount` still counts them all.

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::holdings::{HeldSnapshot, NodeHoldings, MAX_SNAPSHOTS_PER_NODE};
use crate::Sha256Digest;

/// API group of thaw's custom resources.
pub const GROUP: &str = "thaw.dev";
/// API version of [`NodeSnapshotCache`].
pub const VERSION: &str = "v1alpha1";
/// Field manager the node cache applies status with.
pub const FIELD_MANAGER: &str = "thaw-node-cache";

/// What the node cache declares when it creates its node's object: only which node it is.
/// Everything that changes lives in the status.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "thaw.dev",
    version = "v1alpha1",
    kind = "NodeSnapshotCache",
    shortname = "nsc",
    doc = "One node's snapshot cache: its holdings as the node cache last published them (status).",
    status = "NodeSnapshotCacheStatus",
    crates(
        kube_core = "::kube_core",
        k8s_openapi = "::k8s_openapi",
        schemars = "::schemars",
        serde = "::serde",
        serde_json = "::serde_json"
    ),
    printcolumn = r#"{"name":"Node","type":"string","description":"The node whose cache this is","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Snapshots","type":"integer","description":"Snapshots held","jsonPath":".status.snapshotCount"}"#,
    printcolumn = r#"{"name":"Used","type":"integer","description":"Allocated bytes in use","jsonPath":".status.usedBytes"}"#,
    printcolumn = r#"{"name":"Capacity","type":"integer","description":"Cache capacity in bytes","jsonPath":".status.capacityBytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeSnapshotCacheSpec {
    /// The node's name (equal to the object's name).
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
}

/// A node's holdings as the status of its `NodeSnapshotCache`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSnapshotCacheStatus {
    /// Where other nodes fetch chunks from this one (`host:port`), when P2P is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_endpoint: Option<String>,
    /// Cache capacity in bytes of allocated disk.
    #[schemars(range(min = 0))]
    pub capacity_bytes: i64,
    /// Allocated bytes in use.
    #[schemars(range(min = 0))]
    pub used_bytes: i64,
    /// Snapshots held, including any left out of `snapshots` by the bound.
    #[schemars(range(min = 0))]
    pub snapshot_count: i64,
    /// The snapshots held, most cached bytes first, at most `MAX_SNAPSHOTS_PER_NODE`.
    #[schemars(length(max = MAX_SNAPSHOTS_PER_NODE))]
    pub snapshots: Vec<CachedSnapshot>,
}

/// One snapshot in a node's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachedSnapshot {
    /// The reference it was ensured by (`host/repo:tag` or `host/repo@sha256:…`).
    pub reference: String,
    /// Its manifest digest (`sha256:` and 64 lowercase hex digits).
    #[schemars(with = "String", regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub digest: Sha256Digest,
    /// Total size of its files in bytes.
    #[schemars(range(min = 0))]
    pub size_bytes: i64,
    /// Bytes of it present on the node.
    #[schemars(range(min = 0))]
    pub cached_bytes: i64,
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unclamp(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl NodeSnapshotCacheStatus {
    /// The status for `holdings`: byte counts clamped to `i64::MAX`, snapshots ordered by
    /// cached bytes (then size, then reference, so the order is stable and an unchanged
    /// holding gives an identical status), at most [`MAX_SNAPSHOTS_PER_NODE`] of them.
    pub fn from_holdings(holdings: &NodeHoldings) -> Self {
        let mut held: Vec<&HeldSnapshot> = holdings.snapshots.iter().collect();
        held.sort_by(|a, b| {
            b.cached_bytes
                .cmp(&a.cached_bytes)
                .then(b.size_bytes.cmp(&a.size_bytes))
                .then(a.reference.cmp(&b.reference))
                .then(a.digest.cmp(&b.digest))
        });
        let snapshot_count = clamp(held.len() as u64);
        held.truncate(MAX_SNAPSHOTS_PER_NODE);
        Self {
            peer_endpoint: holdings.peer_endpoint.clone(),
            capacity_bytes: clamp(holdings.capacity_bytes),
            used_bytes: clamp(holdings.used_bytes),
            snapshot_count,
            snapshots: held
                .into_iter()
                .map(|s| CachedSnapshot {
                    reference: s.reference.clone(),
                    digest: s.digest,
                    size_bytes: clamp(s.size_bytes),
                    cached_bytes: clamp(s.cached_bytes),
                })
                .collect(),
        }
    }

    /// The holdings of `node` this status describes (negative counts read as 0).
    pub fn to_holdings(&self, node: &str) -> NodeHoldings {
        NodeHoldings {
            node: node.to_owned(),
            peer_endpoint: self.peer_endpoint.clone(),
            capacity_bytes: unclamp(self.capacity_bytes),
            used_bytes: unclamp(self.used_bytes),
            snapshots: self
                .snapshots
                .iter()
                .map(|s| HeldSnapshot {
                    reference: s.reference.clone(),
                    digest: s.digest,
                    size_bytes: unclamp(s.size_bytes),
                    cached_bytes: unclamp(s.cached_bytes),
                })
                .collect(),
        }
    }
}

impl NodeSnapshotCache {
    /// The object for `node` as the node cache creates it: named after the node, no status.
    /// (The owner reference to the Node needs the Node's uid; the creator adds it.)
    pub fn for_node(node: &str) -> Self {
        let mut nsc = Self::new(node, NodeSnapshotCacheSpec { node_name: node.to_owned() });
        nsc.metadata.labels =
            Some([("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned())].into());
        nsc
    }

    /// The node's holdings, once its status has been written. The node is the object's
    /// name (the spec repeats it; the name is what RBAC and ownership key on).
    pub fn holdings(&self) -> Option<NodeHoldings> {
        let node = self.metadata.name.as_deref()?;
        Some(self.status.as_ref()?.to_holdings(node))
    }
}

/// The comment heading `deploy/crd.yaml`.
pub fn crd_yaml_header() -> &'static str {
    "# Generated from thaw-schema's NodeSnapshotCache (schema/src/crd.rs). Do not edit.\n\
     # Regenerate: THAW_REGENERATE_CRD=1 cargo test -p thaw-schema --lib crd\n"
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use kube_core::CustomResourceExt;

    use super::*;

    fn digest(n: u8) -> Sha256Digest {
        format!("sha256:{}", hex::encode([n; 32])).parse().unwrap()
    }

    fn held(reference: &str, n: u8, size: u64, cached: u64) -> HeldSnapshot {
        HeldSnapshot {
            reference: reference.into(),
            digest: digest(n),
            size_bytes: size,
            cached_bytes: cached,
        }
    }

    fn crd_yaml() -> String {
        let crd = NodeSnapshotCache::crd();
        format!("{}---\n{}", crd_yaml_header(), serde_yaml::to_string(&crd).unwrap())
    }

    /// `deploy/crd.yaml` is what these types generate. Regenerate with
    /// `THAW_REGENERATE_CRD=1 cargo test -p thaw-schema --lib crd`.
    #[test]
    fn crd_yaml_is_generated_from_the_rust_type() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crd.yaml");
        let generated = crd_yaml();
        if std::env::var_os("THAW_REGENERATE_CRD").is_some() {
            std::fs::write(&path, &generated).unwrap();
            return;
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "deploy/crd.yaml differs from what schema/src/crd.rs generates; regenerate it with \
             `THAW_REGENERATE_CRD=1 cargo test -p thaw-schema --lib crd` and commit the result"
        );
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_short_name_and_columns() {
        let crd = serde_json::to_value(NodeSnapshotCache::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "nodesnapshotcaches.thaw.dev");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        assert_eq!(crd["spec"]["names"]["shortNames"], serde_json::json!(["nsc"]));
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], VERSION);
        assert_eq!(v["subresources"]["status"], serde_json::json!({}));
        let columns: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Node", "Snapshots", "Used", "Capacity", "Age"]);
        let status = &v["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert_eq!(status["properties"]["snapshots"]["maxItems"], MAX_SNAPSHOTS_PER_NODE as u64);
    }

    /// Kubernetes knows `int32`/`int64`; kube-scheduler-era API servers reject or mangle
    /// `uint64`, so no unsigned format may appear anywhere in the schema.
    #[test]
    fn crd_schema_has_no_unsigned_formats() {
        let crd = serde_json::to_string(&NodeSnapshotCache::crd()).unwrap();
        assert!(!crd.contains("\"uint"), "unsigned format in {crd}");
        assert!(!crd.contains("\"format\":\"uint"));
    }

    #[test]
    fn status_orders_largest_first_bounds_and_clamps() {
        let mut snapshots: Vec<HeldSnapshot> = (0..MAX_SNAPSHOTS_PER_NODE as u64 + 5)
            .map(|i| held(&format!("r/x:{i}"), (i % 250) as u8, i, i))
            .collect();
        snapshots.push(held("r/huge:1", 1, u64::MAX, u64::MAX));
        let h = NodeHoldings {
            node: "n1".into(),
            peer_endpoint: Some("10.0.0.1:7000".into()),
            capacity_bytes: u64::MAX,
            used_bytes: 7,
            snapshots,
        };
        let s = NodeSnapshotCacheStatus::from_holdings(&h);
        assert_eq!(s.snapshots.len(), MAX_SNAPSHOTS_PER_NODE);
        assert_eq!(s.snapshot_count, MAX_SNAPSHOTS_PER_NODE as i64 + 6);
        assert_eq!(s.capacity_bytes, i64::MAX);
        assert_eq!(s.snapshots[0].reference, "r/huge:1");
        assert_eq!(s.snapshots[0].cached_bytes, i64::MAX);
        assert_eq!(s.snapshots[1].cached_bytes, MAX_SNAPSHOTS_PER_NODE as i64 + 4);
        // The smallest six (0..=5) are the ones dropped.
        assert_eq!(s.snapshots.last().unwrap().cached_bytes, 6);
        assert!(s.snapshots.windows(2).all(|w| w[0].cached_bytes >= w[1].cached_bytes));
    }

    #[test]
    fn status_round_trips_to_holdings() {
        let h = NodeHoldings {
            node: "n1".into(),
            peer_endpoint: None,
            capacity_bytes: 100,
            used_bytes: 50,
            snapshots: vec![held("r/a:1", 1, 10, 5), held("r/b:1", 2, 40, 40)],
        };
        let s = NodeSnapshotCacheStatus::from_holdings(&h);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"capacityBytes": 100, "usedBytes": 50, "snapshotCount": 2, "snapshots": [
                {"reference": "r/b:1", "digest": digest(2).to_string(), "sizeBytes": 40, "cachedBytes": 40},
                {"reference": "r/a:1", "digest": digest(1).to_string(), "sizeBytes": 10, "cachedBytes": 5},
            ]})
        );
        let mut nsc = NodeSnapshotCache::for_node("n1");
        assert!(nsc.holdings().is_none(), "no status yet");
        nsc.status = Some(s);
        let back = nsc.holdings().unwrap();
        assert_eq!(back.node, "n1");
        assert_eq!(back.snapshots[0], h.snapshots[1]);
        assert_eq!(back.snapshots[1], h.snapshots[0]);
        let negative = NodeSnapshotCacheStatus { used_bytes: -3, ..Default::default() };
        assert_eq!(negative.to_holdings("n").used_bytes, 0);
    }
}
