//! Shared by the extender tests: kube-scheduler's side of the wire (requests built exactly as
//! it sends them), an in-process extender on loopback, snapshots pushed to a real
//! thaw-registry, and real `thaw-node-cache` processes.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thaw_client::{PushOptions, Reference};
use thaw_extender::{app, AppState, Config};

#[path = "../../../push-pull/tests/common/mod.rs"]
pub mod common;

pub use common::{free_port, SnapshotData, ThawRegistry, PAGE};

/// A Knative Serving pod as the API server hands it to kube-scheduler: the labels and
/// annotations Knative sets, `user-container` and `queue-proxy`, and whatever `extra`
/// annotations are given (e.g. `thaw.dev/snapshot`).
pub fn knative_pod(namespace: &str, service: &str, revision: &str, extra: &[(&str, &str)]) -> Value {
    let mut annotations = json!({
        "autoscaling.knative.dev/min-scale": "0",
        "autoscaling.knative.dev/target": "10",
        "serving.knative.dev/creator": "system:admin",
        "kubectl.kubernetes.io/restartedAt": "2026-11-30T10:00:00Z"
    });
    for (k, v) in extra {
        annotations[*k] = json!(v);
    }
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": format!("{revision}-deployment-7d9f8b6c5d-x2k4p"),
            "generateName": format!("{revision}-deployment-7d9f8b6c5d-"),
            "namespace": namespace,
            "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            "resourceVersion": "48213",
            "creationTimestamp": "2026-12-01T19:00:00Z",
            "labels": {
                "app": revision,
                "pod-template-hash": "7d9f8b6c5d",
                "serving.knative.dev/configuration": service,
                "serving.knative.dev/configurationGeneration": "3",
                "serving.knative.dev/configurationUID": "7a0c4a55-0b4e-4a6f-9d1c-3f2b1e0d9c8b",
                "serving.knative.dev/revision": revision,
                "serving.knative.dev/revisionUID": "c1d2e3f4-a5b6-4c7d-8e9f-0a1b2c3d4e5f",
                "serving.knative.dev/service": service,
                "serving.knative.dev/serviceUID": "9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a"
            },
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{revision}-deployment-7d9f8b6c5d"),
                "uid": "5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e", "controller": true, "blockOwnerDeletion": true
            }],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-12-01T19:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
        },
        "spec": {
            "containers": [
                {
                    "name": "user-container",
                    "image": "index.docker.io/vhiveease/hello@sha256:4f6a1d0c8e3b2a1f9e8d7c6b5a4938271605f4e3d2c1b0a9f8e7d6c5b4a39281",
                    "ports": [{"name": "user-port", "containerPort": 50051, "protocol": "TCP"}],
                    "env": [{"name": "PORT", "value": "50051"}, {"name": "K_REVISION", "value": revision},
                            {"name": "K_CONFIGURATION", "value": service}, {"name": "K_SERVICE", "value": service}],
                    "resources": {},
                    "lifecycle": {"preStop": {"httpGet": {"path": "/wait-for-drain", "port": 8022, "scheme": "HTTP"}}},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "imagePullPolicy": "IfNotPresent"
                },
                {
                    "name": "queue-proxy",
                    "image": "gcr.io/knative-releases/knative.dev/serving/cmd/queue@sha256:1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809",
                    "ports": [{"name": "http-queueadm", "containerPort": 8022, "protocol": "TCP"},
                              {"name": "http-autometric", "containerPort": 9090, "protocol": "TCP"},
                              {"name": "http-usermetric", "containerPort": 9091, "protocol": "TCP"},
                              {"name": "queue-port", "containerPort": 8013, "protocol": "TCP"}],
                    "env": [{"name": "SERVING_NAMESPACE", "value": namespace}, {"name": "SERVING_SERVICE", "value": service},
                            {"name": "SERVING_REVISION", "value": revision}, {"name": "QUEUE_SERVING_PORT", "value": "8013"},
                            {"name": "USER_PORT", "value": "50051"}, {"name": "CONTAINER_CONCURRENCY", "value": "0"},
                            {"name": "SERVING_POD", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
                    "resources": {"requests": {"cpu": "25m"}},
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8013, "scheme": "HTTP",
                                                   "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]},
                                       "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
                    "securityContext": {"capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": true,
                                        "runAsNonRoot": true, "allowPrivilegeEscalation": false},
                    "imagePullPolicy": "IfNotPresent"
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 300,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "enableServiceLinks": false,
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"}
    })
}

/// `ExtenderArgs` as kube-scheduler sends it to a `nodeCacheCapable: true` extender.
pub fn args_with_names(pod: &Value, names: &[String]) -> Value {
    json!({"Pod": pod, "Nodes": null, "NodeNames": names})
}

/// A `v1.Node` as the API server returns it (abridged to what any node has).
pub fn node_object(name: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "uid": format!("uid-{name}"),
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"}
        },
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {
            "capacity": {"cpu": "2", "memory": "8141440Ki", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "8039040Ki", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.5"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.31.2", "containerRuntimeVersion": "containerd://1.7.22"}
        }
    })
}

/// `ExtenderArgs` as kube-scheduler sends it to an extender that is not `nodeCacheCapable`.
pub fn args_with_nodes(pod: &Value, names: &[String]) -> Value {
    let items: Vec<Value> = names.iter().map(|n| node_object(n)).collect();
    json!({"Pod": pod, "Nodes": {"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "48200"}, "items": items}, "NodeNames": null})
}

/// Node names `node-0` … `node-{n-1}`.
pub fn node_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node-{i}")).collect()
}

/// An extender served in-process on loopback.
pub struct Extender {
    pub addr: String,
    pub state: Arc<AppState>,
    http: reqwest::Client,
}

impl Extender {
    /// Starts an extender for `config`, its holdings poller running.
    pub async fn start(config: Config) -> Self {
        let state = AppState::new(&config).expect("extender state");
        state.spawn_background();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let router = app(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { addr, state, http: reqwest::Client::new() }
    }

    /// POSTs `body` to `verb`; answers status and JSON body.
    pub async fn post(&self, verb: &str, body: &Value) -> (u16, Value) {
        post(&self.http, &self.addr, verb, body).await
    }

    /// `/prioritize`, which must answer 200; the scores by host, in answer order.
    pub async fn prioritize(&self, body: &Value) -> Vec<(String, i64)> {
        prioritize(&self.http, &self.addr, body).await
    }

    /// Waits until the poller has read `nodes` nodes and `profiles` profiles are cached.
    pub async fn wait_warm(&self, nodes: usize, profiles: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.state.scorer.sizes();
            if s.nodes >= nodes && s.profiles >= profiles {
                return;
            }
            assert!(Instant::now() < deadline, "the extender never warmed: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub async fn post(http: &reqwest::Client, addr: &str, verb: &str, body: &Value) -> (u16, Value) {
    let r = http
        .post(format!("http://{addr}{verb}"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub async fn prioritize(http: &reqwest::Client, addr: &str, body: &Value) -> Vec<(String, i64)> {
    let (status, answer) = post(http, addr, "/prioritize", body).await;
    assert_eq!(status, 200, "{answer}");
    answer
        .as_array()
        .unwrap_or_else(|| panic!("not a HostPriorityList: {answer}"))
        .iter()
        .map(|e| {
            let o = e.as_object().unwrap();
            assert_eq!(o.len(), 2, "a HostPriority has exactly Host and Score: {e}");
            (o["Host"].as_str().unwrap().to_owned(), o["Score"].as_i64().unwrap())
        })
        .collect()
}

/// A plain-HTTP extender config for a registry at `host`, polling quickly.
pub fn test_config(host: &str) -> Config {
    let mut c = Config::new(host, true);
    c.poll_interval = Duration::from_millis(100);
    c.resolver.cold_wait = Duration::from_secs(5);
    c
}

/// Pushes `data` as `host/repo_tag`; answers the reference.
pub async fn push(host: &str, repo_tag: &str, data: &SnapshotData) -> String {
    let dir = tempfile::tempdir().unwrap();
    data.write(dir.path());
    let reference = Reference::parse(&format!("{host}/{repo_tag}")).unwrap();
    let registry = common::client_for(&reference);
    thaw_client::push_dir(&registry, &reference, dir.path(), &PushOptions::default()).await.expect("push");
    reference.to_string()
}

/// The manifest digest and recipes of a pushed snapshot.
pub async fn recipes(reference: &str) -> (thaw_schema::Sha256Digest, Vec<thaw_schema::Recipe>) {
    let reference = Reference::parse(reference).unwrap();
    let registry = common::client_for(&reference);
    let manifest =
        registry.get_manifest(reference.repository(), &reference.manifest_reference()).await.unwrap();
    let doc = thaw_client::manifest::ManifestDoc::parse(&manifest).unwrap();
    let mut out = Vec::new();
    for layer in thaw_client::manifest::file_layers(&doc, "test").unwrap() {
        let recipe = registry.recipe(reference.repository(), &layer.descriptor.digest).await.unwrap();
        out.push(recipe.expect("a thaw-registry has recipes"));
    }
    (manifest.digest, out)
}

/// The score a node holding `held` must get for `target`, computed independently of the
/// extender: distinct non-zero chunks of the whole snapshot, by bytes, rounded half up.
pub fn expected_score(held: &[&[thaw_schema::Recipe]], target: &[thaw_schema::Recipe]) -> i64 {
    use std::collections::{HashMap, HashSet};
    let have: HashSet<_> = held.iter().flat_map(|s| s.iter()).flat_map(|r| r.distinct_chunks()).collect();
    let mut want: HashMap<thaw_schema::ChunkId, u64> = HashMap::new();
    for r in target {
        for e in &r.entries {
            if let Some(id) = e.chunk_id() {
                want.insert(*id, u64::from(e.byte_len()));
            }
        }
    }
    let total: u64 = want.values().sum();
    let covered: u64 = want.iter().filter(|(id, _)| have.contains(*id)).map(|(_, l)| l).sum();
    ((covered as f64 / total as f64) * 10.0).round() as i64
}

/// Revision `seed` of `base`: `changed` memory pages rewritten, the info file changed.
pub fn revision(base: &SnapshotData, changed: usize, seed: u64) -> SnapshotData {
    let mut rng = common::Rng::new(seed);
    let mut memory = base.memory.clone();
    let pages = memory.len() / PAGE;
    for _ in 0..changed {
        let p = rng.below(pages as u64) as usize;
        rng.fill(&mut memory[p * PAGE..(p + 1) * PAGE]);
    }
    let mut info = base.info.clone();
    info.extend_from_slice(format!("{{\"rev\":{seed}}}\n").as_bytes());
    SnapshotData { memory, vmstate: base.vmstate.clone(), disk: base.disk.clone(), info }
}

/// The `thaw-node-cache` binary of this target directory. A test binary runs from
/// `target/<profile>/deps/`; the other package's binary is in `target/<profile>/`. Cargo does
/// not build another package's binaries for this package's tests, so when it is missing it
/// is built with `cargo build -p thaw-node-cache` (same profile), and a clear panic follows if
/// that fails.
pub fn node_cache_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("test binary in target/<profile>/deps");
    let bin = profile_dir.join("thaw-node-cache");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "thaw-node-cache", "--bin", "thaw-node-cache"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status();
        assert!(
            bin.exists(),
            "{} is missing and `cargo build -p thaw-node-cache` did not make it ({status:?}); build it, then rerun",
            bin.display()
        );
    }
    bin
}

/// A running `thaw-node-cache`; killed on drop.
pub struct NodeCache {
    child: Child,
    pub addr: String,
    pub node: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl NodeCache {
    /// Starts a node cache named `node` on a free port, publishing to the registry at `host`.
    pub async fn start(host: &str, node: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(node_cache_binary())
            .args(["--registry", &format!("http://{host}")])
            .arg("--cache-dir")
            .arg(dir.path())
            .args(["--capacity", "1G", "--listen", &addr, "--node-name", node])
            .env("THAW_LOG", std::env::var("THAW_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting thaw-node-cache");
        let mut n = Self { child, addr, node: node.to_owned(), http: reqwest::Client::new(), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = n.http.get(format!("http://{}/healthz", n.addr)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Some(status) = n.child.try_wait().unwrap() {
                panic!("thaw-node-cache exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "thaw-node-cache did not answer on {}", n.addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    }

    /// `ensure` through the node cache's local API, which must succeed; answers the digest.
    pub async fn ensure(&self, reference: &str) -> String {
        let r = self
            .http
            .post(format!("http://{}/v1/snapshots/ensure", self.addr))
            .json(&json!({ "reference": reference }))
            .send()
            .await
            .expect("ensure request");
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert!(status.is_success(), "ensure {reference} on {}: {status} {body}", self.node);
        body["digest"].as_str().unwrap().to_owned()
    }
}

impl Drop for NodeCache {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `thaw-extender` binary (this package's, so Cargo builds it for the tests).
pub struct ExtenderProcess {
    child: Child,
    pub addr: String,
}

impl ExtenderProcess {
    pub async fn start(args: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_thaw-extender"))
            .args(["--listen", &addr])
            .args(args)
            .env("THAW_LOG", std::env::var("THAW_TEST_EXTENDER_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting thaw-extender");
        let mut p = Self { child, addr };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("http://{}/healthz", p.addr)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("thaw-extender exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "thaw-extender did not answer on {}", p.addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }
}

impl Drop for ExtenderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
