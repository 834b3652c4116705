//! `--holdings kube` against a mock API server (`tower-test`), not a cluster: the reflector is
//! fed a LIST answer and then a WATCH stream, in the exact JSON the API server sends, and
//! `/prioritize` must score from what they say. Recipes come from a real thaw-registry.

mod support;

use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use support::{
    args_with_names, expected_score, knative_pod, push, recipes, revision, test_config, SnapshotData,
    ThawRegistry,
};
use thaw_extender::herd::HerdConfig;
use thaw_extender::{app, AppState};
use thaw_schema::Sha256Digest;

/// A `NodeSnapshotCache` as the API server serializes it (status as the node cache applies it).
fn nsc(node: &str, rv: &str, held: Option<&[(&str, Sha256Digest)]>) -> Value {
    let mut o = json!({
        "apiVersion": "thaw.dev/v1alpha1",
        "kind": "NodeSnapshotCache",
        "metadata": {
            "name": node,
            "uid": format!("6f1c2a6e-0000-4000-8000-{:012}", node.len()),
            "resourceVersion": rv,
            "generation": 1,
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {"app.kubernetes.io/managed-by": "thaw-node-cache"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": "0b5d8a3e-1111-4222-8333-444455556666"}]
        },
        "spec": {"nodeName": node}
    });
    if let Some(held) = held {
        o["status"] = json!({
            "peerEndpoint": "10.0.0.1:7701",
            "capacityBytes": 107374182400i64,
            "usedBytes": 1048576,
            "snapshotCount": held.len(),
            "snapshots": held.iter().map(|(r, d)| json!({
                "reference": r, "digest": d.to_string(), "sizeBytes": 1048576, "cachedBytes": 1048576
            })).collect::<Vec<_>>()
        });
    }
    o
}

fn respond(json: &Value) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(json).unwrap()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_apiserver_list_then_watch_feeds_prioritize() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let v1 = SnapshotData::new(2048, 256, 21);
    let v2 = revision(&v1, 40, 22);
    let r1 = push(&host, "fn/hello:hello-00001", &v1).await;
    let r2 = push(&host, "fn/hello:hello-00002", &v2).await;
    let ((d1, rec1), (d2, rec2)) = (recipes(&r1).await, recipes(&r2).await);

    let (service, mut apiserver) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let mut config = test_config(&host);
    config.herd = HerdConfig::OFF;
    let state = AppState::new(&config).unwrap();
    state.spawn_kube(client);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = app(state.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    // LIST: node-a holds revision 1, node-c has no status yet, node-d holds revision 2.
    let (req, send) = apiserver.next_request().await.expect("the reflector lists");
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/apis/thaw.dev/v1alpha1/nodesnapshotcaches");
    assert!(!req.uri().query().unwrap_or("").contains("watch"), "{}", req.uri());
    send.send_response(respond(&json!({
        "apiVersion": "thaw.dev/v1alpha1",
        "kind": "NodeSnapshotCacheList",
        "metadata": {"resourceVersion": "100"},
        "items": [
            nsc("node-a", "90", Some(&[(&r1, d1)])),
            nsc("node-c", "91", None),
            nsc("node-d", "92", Some(&[(&r2, d2)])),
        ]
    })));

    // WATCH from the list's resourceVersion: node-b appears holding revision 2, node-c's
    // status arrives (revision 1), node-d goes away, then a bookmark.
    let (req, send) = apiserver.next_request().await.expect("the reflector watches");
    let query = req.uri().query().unwrap_or("").to_owned();
    assert_eq!(req.uri().path(), "/apis/thaw.dev/v1alpha1/nodesnapshotcaches");
    assert!(query.contains("watch=true") && query.contains("resourceVersion=100"), "{query}");
    let events = [
        json!({"type": "ADDED", "object": nsc("node-b", "101", Some(&[(&r2, d2)]))}),
        json!({"type": "MODIFIED", "object": nsc("node-c", "102", Some(&[(&r1, d1)]))}),
        json!({"type": "DELETED", "object": nsc("node-d", "103", Some(&[(&r2, d2)]))}),
        json!({"type": "BOOKMARK", "object": {"apiVersion": "thaw.dev/v1alpha1", "kind": "NodeSnapshotCache",
            "metadata": {"resourceVersion": "104", "creationTimestamp": null}}}),
    ];
    let mut body = Vec::new();
    for e in &events {
        serde_json::to_writer(&mut body, e).unwrap();
        body.push(b'\n');
    }
    send.send_response(
        Response::builder().header("content-type", "application/json").body(Body::from(body)).unwrap(),
    );

    // The stream ended: the reflector watches again from the bookmark, and that request is
    // left unanswered (the mock server keeps it open), so the holdings stay as streamed.
    let rewatch = tokio::spawn(async move {
        let (req, _send) = apiserver.next_request().await.expect("re-watch");
        let q = req.uri().query().unwrap_or("").to_owned();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        q
    });

    let pod = knative_pod("fn", "hello", "hello-00002", &[]);
    let names: Vec<String> = ["node-a", "node-b", "node-c", "node-d"].map(String::from).into();
    let partial = expected_score(&[&rec1], &rec2);
    assert!(partial > 0 && partial < 10, "{partial}");
    let want = vec![
        ("node-a".to_owned(), partial),
        ("node-b".to_owned(), 10),
        ("node-c".to_owned(), partial),
        ("node-d".to_owned(), 0),
    ];
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = support::prioritize(&http, &addr, &args_with_names(&pod, &names)).await;
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "never scored from the LIST and WATCH: {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sizes = state.scorer.sizes();
    assert_eq!(sizes.nodes, 3, "node-a, node-b, node-c (node-d deleted): {sizes:?}");
    assert!(!rewatch.is_finished());
    rewatch.abort();
}
