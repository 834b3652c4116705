//! Holdings as the node's `NodeSnapshotCache` (`--holdings kube`): on first publish the object
//! is created, named after the node and owned by its Node (so it is garbage-collected with
//! the Node), then each publish writes only the status, by server-side apply with the field
//! manager `thaw-node-cache` (forced: this node cache owns its status). A status equal to the
//! last one written is not sent again, and the status carries no timestamps, so an idle node
//! causes no writes. [`crate::holdings::run_publisher`] debounces and retries.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Serialize;
use thaw_schema::crd::{NodeSnapshotCache, NodeSnapshotCacheStatus, FIELD_MANAGER};
use thaw_schema::holdings::NodeHoldings;
use tokio::sync::Mutex;

use crate::holdings::HoldingsPublisher;

/// Publishes one node's holdings as its `NodeSnapshotCache`.
pub struct KubePublisher {
    node: String,
    nodes: Api<Node>,
    caches: Api<NodeSnapshotCache>,
    state: Mutex<Written>,
}

#[derive(Default)]
struct Written {
    /// The object is known to exist.
    created: bool,
    /// The status last applied successfully.
    status: Option<NodeSnapshotCacheStatus>,
}

/// The body of the status apply: only what this field manager owns.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusApply<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: ApplyMeta<'a>,
    status: &'a NodeSnapshotCacheStatus,
}

#[derive(Debug, Serialize)]
struct ApplyMeta<'a> {
    name: &'a str,
}

impl std::fmt::Debug for KubePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePublisher").field("node", &self.node).finish_non_exhaustive()
    }
}

fn failed(op: String, e: kube::Error) -> thaw_client::Error {
    thaw_client::Error::Snapshot(format!("Kubernetes API: {op}: {e}"))
}

impl KubePublisher {
    /// Publishes `node`'s holdings through `client` (in a pod: `kube::Client::try_default()`,
    /// the service account of deploy/node-cache.yaml).
    pub fn new(client: Client, node: &str) -> Self {
        Self {
            node: node.to_owned(),
            nodes: Api::all(client.clone()),
            caches: Api::all(client),
            state: Mutex::new(Written::default()),
        }
    }

    /// Creates the object, owned by the Node; one that exists already is fine.
    async fn create(&self) -> Result<(), thaw_client::Error> {
        let node =
            self.nodes.get(&self.node).await.map_err(|e| failed(format!("GET node {}", self.node), e))?;
        let uid = node.metadata.uid.ok_or_else(|| {
            thaw_client::Error::Snapshot(format!("Kubernetes API: node {} has no uid", self.node))
        })?;
        let mut object = NodeSnapshotCache::for_node(&self.node);
        object.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: self.node.clone(),
            uid,
            ..OwnerReference::default()
        }]);
        let params = PostParams { dry_run: false, field_manager: Some(FIELD_MANAGER.into()) };
        match self.caches.create(&params, &object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(failed(format!("create NodeSnapshotCache {}", self.node), e)),
        }
    }
}

impl HoldingsPublisher for KubePublisher {
    async fn publish(&self, holdings: &NodeHoldings) -> Result<(), thaw_client::Error> {
        let mut written = self.state.lock().await;
        let status = NodeSnapshotCacheStatus::from_holdings(holdings);
        if written.created && written.status.as_ref() == Some(&status) {
            return Ok(());
        }
        if !written.created {
            self.create().await?;
            written.created = true;
        }
        let body = StatusApply {
            api_version: "thaw.dev/v1alpha1",
            kind: "NodeSnapshotCache",
            metadata: ApplyMeta { name: &self.node },
            status: &status,
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match self.caches.patch_status(&self.node, &params, &Patch::Apply(&body)).await {
            Ok(_) => {
                written.status = Some(status);
                Ok(())
            }
            Err(e) => {
                // Gone (its Node was deleted and recreated, or someone deleted it): create it
                // again on the retry.
                if matches!(&e, kube::Error::Api(a) if a.code == 404) {
                    written.created = false;
                }
                written.status = None;
                Err(failed(format!("apply NodeSnapshotCache {}/status", self.node), e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against a mock API server (`tower-test`), not a cluster: the requests are checked
    //! method, URI, content type and body byte for byte.

    use std::time::Duration;

    use http::{Method, Request, Response};
    use kube::client::Body;
    use thaw_schema::holdings::HeldSnapshot;

    use super::*;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    const NODE_UID: &str = "0b5d8a3e-1111-4222-8333-444455556666";

    fn holdings(extra: u64) -> NodeHoldings {
        let digest = |n: u8| format!("sha256:{}", hex::encode([n; 32])).parse().unwrap();
        NodeHoldings {
            node: "node-a".into(),
            peer_endpoint: Some("10.0.0.1:7701".into()),
            capacity_bytes: 1000,
            used_bytes: 300 + extra,
            snapshots: vec![
                HeldSnapshot {
                    reference: "reg/fn/a:1".into(),
                    digest: digest(1),
                    size_bytes: 100,
                    cached_bytes: 100,
                },
                HeldSnapshot {
                    reference: "reg/fn/b:1".into(),
                    digest: digest(2),
                    size_bytes: 200,
                    cached_bytes: 200,
                },
            ],
        }
    }

    /// Takes the next request; answers it with `status` and `answer`; returns what was asked.
    async fn exchange(api: &mut Handle, status: u16, answer: &str) -> (Method, String, String, String) {
        let (req, send) = api.next_request().await.expect("a request");
        let method = req.method().clone();
        let uri = req.uri().to_string();
        let content_type =
            req.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let body = String::from_utf8(req.into_body().collect_bytes().await.unwrap().to_vec()).unwrap();
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(answer.as_bytes().to_vec()))
                .unwrap(),
        );
        (method, uri, content_type, body)
    }

    const CREATED: &str = r#"{"apiVersion":"thaw.dev/v1alpha1","kind":"NodeSnapshotCache","metadata":{"labels":{"app.kubernetes.io/managed-by":"thaw-node-cache"},"name":"node-a","ownerReferences":[{"apiVersion":"v1","kind":"Node","name":"node-a","uid":"0b5d8a3e-1111-4222-8333-444455556666"}]},"spec":{"nodeName":"node-a"}}"#;

    fn status_body(used: u64) -> String {
        format!(
            concat!(
                r#"{{"apiVersion":"thaw.dev/v1alpha1","kind":"NodeSnapshotCache","metadata":{{"name":"node-a"}},"#,
                r#""status":{{"peerEndpoint":"10.0.0.1:7701","capacityBytes":1000,"usedBytes":{},"snapshotCount":2,"#,
                r#""snapshots":[{{"reference":"reg/fn/b:1","digest":"sha256:{}","sizeBytes":200,"cachedBytes":200}},"#,
                r#"{{"reference":"reg/fn/a:1","digest":"sha256:{}","sizeBytes":100,"cachedBytes":100}}]}}}}"#
            ),
            used,
            hex::encode([2u8; 32]),
            hex::encode([1u8; 32])
        )
    }

    #[tokio::test]
    async fn mock_apiserver_publisher_creates_then_applies_status_once_per_change() {
        let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let publisher = std::sync::Arc::new(KubePublisher::new(Client::new(service, "default"), "node-a"));
        let p = publisher.clone();
        let first = tokio::spawn(async move { p.publish(&holdings(0)).await });

        let node = format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"node-a","uid":"{NODE_UID}"}}}}"#
        );
        let (method, uri, _, body) = exchange(&mut api, 200, &node).await;
        assert_eq!((method, uri.as_str(), body.as_str()), (Method::GET, "/api/v1/nodes/node-a", ""));

        let (method, uri, content_type, body) = exchange(&mut api, 201, CREATED).await;
        assert_eq!(method, Method::POST);
        assert_eq!(uri, "/apis/thaw.dev/v1alpha1/nodesnapshotcaches?&fieldManager=thaw-node-cache");
        assert_eq!(content_type, "application/json");
        assert_eq!(body, CREATED);

        let (method, uri, content_type, body) = exchange(&mut api, 200, CREATED).await;
        assert_eq!(method, Method::PATCH);
        assert_eq!(
            uri,
            "/apis/thaw.dev/v1alpha1/nodesnapshotcaches/node-a/status?&force=true&fieldManager=thaw-node-cache"
        );
        assert_eq!(content_type, "application/apply-patch+yaml");
        assert_eq!(body, status_body(300));
        first.await.unwrap().unwrap();

        // The same holdings again: nothing is sent (nobody would answer it).
        tokio::time::timeout(Duration::from_secs(2), publisher.publish(&holdings(0)))
            .await
            .expect("an unchanged status is not written")
            .unwrap();

        // A change: only the status apply, the object exists.
        let p = publisher.clone();
        let changed = tokio::spawn(async move { p.publish(&holdings(5)).await });
        let (method, _, _, body) = exchange(&mut api, 200, CREATED).await;
        assert_eq!(method, Method::PATCH);
        assert_eq!(body, status_body(305));
        changed.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn mock_apiserver_publisher_recreates_a_deleted_object() {
        let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let publisher = std::sync::Arc::new(KubePublisher::new(Client::new(service, "default"), "node-a"));
        let node = format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"node-a","uid":"{NODE_UID}"}}}}"#
        );
        let exists = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"nodesnapshotcaches.thaw.dev \"node-a\" already exists","reason":"AlreadyExists","details":{"name":"node-a","group":"thaw.dev","kind":"nodesnapshotcaches"},"code":409}"#;
        let gone = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"nodesnapshotcaches.thaw.dev \"node-a\" not found","reason":"NotFound","details":{"name":"node-a","group":"thaw.dev","kind":"nodesnapshotcaches"},"code":404}"#;

        // It exists already (409 is fine), but the status apply finds it gone.
        let p = publisher.clone();
        let first = tokio::spawn(async move { p.publish(&holdings(0)).await });
        assert_eq!(exchange(&mut api, 200, &node).await.0, Method::GET);
        assert_eq!(exchange(&mut api, 409, exists).await.0, Method::POST);
        assert_eq!(exchange(&mut api, 404, gone).await.0, Method::PATCH);
        assert!(first.await.unwrap().is_err());

        // The retry creates it again, then applies.
        let p = publisher.clone();
        let retry = tokio::spawn(async move { p.publish(&holdings(0)).await });
        assert_eq!(exchange(&mut api, 200, &node).await.0, Method::GET);
        assert_eq!(exchange(&mut api, 201, CREATED).await.0, Method::POST);
        let (method, _, _, body) = exchange(&mut api, 200, CREATED).await;
        assert_eq!((method, body), (Method::PATCH, status_body(300)));
        retry.await.unwrap().unwrap();
    }
}
