//! kube-scheduler's wire format, replayed: `ExtenderArgs` exactly as kube-scheduler sends it
//! (a Knative Serving pod; `NodeNames` for `nodeCacheCapable: true`, a `NodeList` otherwise)
//! against an extender reading a real thaw-registry, replies checked field by field.

mod support;

use serde_json::{json, Value};
use support::{
    args_with_names, args_with_nodes, knative_pod, node_names, push, test_config, Extender, SnapshotData,
    ThawRegistry,
};
use thaw_schema::holdings::{HeldSnapshot, NodeHoldings};

/// A registry holding one snapshot, `holder` listed as holding it; answers the reference.
async fn registry_with_holder(holder: &str) -> (ThawRegistry, String) {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let data = SnapshotData::new(256, 64, 7);
    let reference = push(&host, "fn/hello:hello-00001", &data).await;
    let (digest, _) = support::recipes(&reference).await;
    let client = support::common::client_for(&thaw_client::Reference::parse(&reference).unwrap());
    client
        .put_node_holdings(&NodeHoldings {
            node: holder.into(),
            peer_endpoint: None,
            capacity_bytes: 1 << 30,
            used_bytes: 1 << 20,
            snapshots: vec![HeldSnapshot {
                reference: reference.clone(),
                digest,
                size_bytes: 1,
                cached_bytes: 1,
            }],
        })
        .await
        .unwrap();
    (registry, reference)
}

fn expected_priorities(names: &[String], holder: &str) -> Value {
    Value::Array(
        names.iter().map(|n| json!({"Host": n, "Score": if n == holder { 10 } else { 0 }})).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_prioritize_knative_pod_three_node_names() {
    let (registry, reference) = registry_with_holder("node-1").await;
    let ext = Extender::start(test_config(&registry.host())).await;
    ext.wait_warm(1, 1).await;
    let pod = knative_pod("fn", "hello", "hello-00001", &[("thaw.dev/snapshot", &reference)]);
    let names = node_names(3);
    let (status, answer) = ext.post("/prioritize", &args_with_names(&pod, &names)).await;
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!([{"Host": "node-0", "Score": 0}, {"Host": "node-1", "Score": 10}, {"Host": "node-2", "Score": 0}])
    );
    // The same pod without the annotation: the Knative labels map to the same reference
    // through the default template `{registry}/{namespace}/{service}:{revision}`.
    let labelled = knative_pod("fn", "hello", "hello-00001", &[]);
    let mut again = ext.prioritize(&args_with_names(&labelled, &names)).await;
    again.sort();
    assert_eq!(again.iter().map(|(_, s)| *s).max(), Some(10 - 1), "herd damping took a point: {again:?}");
    assert_eq!(again[1].0, "node-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_prioritize_thousand_node_names() {
    let (registry, reference) = registry_with_holder("node-500").await;
    let ext = Extender::start(test_config(&registry.host())).await;
    ext.wait_warm(1, 1).await;
    let pod = knative_pod("fn", "hello", "hello-00001", &[("thaw.dev/snapshot", &reference)]);
    let names = node_names(1000);
    let (status, answer) = ext.post("/prioritize", &args_with_names(&pod, &names)).await;
    assert_eq!(status, 200);
    assert_eq!(answer.as_array().unwrap().len(), 1000);
    assert_eq!(answer, expected_priorities(&names, "node-500"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_filter_node_names_passes_every_node() {
    let (registry, reference) = registry_with_holder("node-1").await;
    let ext = Extender::start(test_config(&registry.host())).await;
    let pod = knative_pod("fn", "hello", "hello-00001", &[("thaw.dev/snapshot", &reference)]);
    for n in [3, 1000] {
        let names = node_names(n);
        let (status, answer) = ext.post("/filter", &args_with_names(&pod, &names)).await;
        assert_eq!(status, 200);
        let o = answer.as_object().unwrap();
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["Error", "FailedAndUnresolvableNodes", "FailedNodes", "NodeNames", "Nodes"]);
        assert_eq!(o["Nodes"], Value::Null);
        assert_eq!(o["NodeNames"], json!(names), "cold nodes are never filtered out");
        assert_eq!(o["FailedNodes"], json!({}));
        assert_eq!(o["FailedAndUnresolvableNodes"], json!({}));
        assert_eq!(o["Error"], json!(""));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_nodes_as_node_list_with_node_names_null() {
    let (registry, reference) = registry_with_holder("node-2").await;
    let ext = Extender::start(test_config(&registry.host())).await;
    ext.wait_warm(1, 1).await;
    let pod = knative_pod("fn", "hello", "hello-00001", &[("thaw.dev/snapshot", &reference)]);
    let names = node_names(3);
    let body = args_with_nodes(&pod, &names);
    assert_eq!(body["NodeNames"], Value::Null);
    let (status, answer) = ext.post("/prioritize", &body).await;
    assert_eq!(status, 200);
    assert_eq!(answer, expected_priorities(&names, "node-2"));
    // Filter hands the same Node objects back, NodeNames null.
    let (status, answer) = ext.post("/filter", &body).await;
    assert_eq!(status, 200);
    assert_eq!(answer["Nodes"], body["Nodes"]);
    assert_eq!(answer["NodeNames"], Value::Null);
    assert_eq!(answer["FailedNodes"], json!({}));
    assert_eq!(answer["FailedAndUnresolvableNodes"], json!({}));
    assert_eq!(answer["Error"], json!(""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_pods_without_a_snapshot_score_neutral() {
    let (registry, _) = registry_with_holder("node-1").await;
    let ext = Extender::start(test_config(&registry.host())).await;
    ext.wait_warm(1, 1).await;
    let names = node_names(3);
    // An ordinary pod: no annotation, no Knative labels.
    let plain = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "nginx", "namespace": "default", "labels": {"app": "nginx"}},
        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27"}]}});
    assert_eq!(
        ext.post("/prioritize", &args_with_names(&plain, &names)).await,
        (200, expected_priorities(&names, ""))
    );
    // A pod with no metadata labels or annotations at all, and a malformed annotation.
    let bare = json!({"metadata": {"name": "x"}});
    assert_eq!(
        ext.post("/prioritize", &args_with_names(&bare, &names)).await,
        (200, expected_priorities(&names, ""))
    );
    let bad = knative_pod("fn", "hello", "hello-00001", &[("thaw.dev/snapshot", "Not A Reference!")]);
    assert_eq!(
        ext.post("/prioritize", &args_with_names(&bad, &names)).await,
        (200, expected_priorities(&names, ""))
    );
    // No candidates: an empty list, not null.
    let (status, answer) =
        ext.post("/prioritize", &json!({"Pod": plain, "Nodes": null, "NodeNames": null})).await;
    assert_eq!((status, answer), (200, json!([])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_lower_case_fields_accepted_and_garbage_refused() {
    // Go's decoder matches field names case-insensitively; so does the extender's.
    let (registry, reference) = registry_with_holder("node-0").await;
    let ext = Extender::start(test_config(&registry.host())).await;
    ext.wait_warm(1, 1).await;
    let pod = knative_pod("fn", "hello", "hello-00001", &[("thaw.dev/snapshot", &reference)]);
    let names = node_names(2);
    let (status, answer) = ext.post("/prioritize", &json!({"pod": pod, "nodenames": names})).await;
    assert_eq!((status, answer), (200, expected_priorities(&names, "node-0")));
    let (status, _) = ext.post("/prioritize", &json!("not an object")).await;
    assert_eq!(status, 400);
    // healthz and metrics.
    let http = reqwest::Client::new();
    let h = http.get(format!("http://{}/healthz", ext.addr)).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let m = http.get(format!("http://{}/metrics", ext.addr)).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("thaw_extender_request_seconds_count{verb=\"prioritize\"} 1\n"), "{m}");
    assert!(m.contains("thaw_extender_cache_entries{cache=\"profiles\"} 1\n"), "{m}");
    assert!(m.contains("thaw_extender_cache_entries{cache=\"nodes\"} 1\n"), "{m}");
}
