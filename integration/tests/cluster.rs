//! thaw on a real Kubernetes control plane (integration/src/control_plane.rs): etcd,
//! kube-apiserver and kube-scheduler built from their Go modules, deploy/ applied as an
//! operator applies it, four Ready nodes, the real `thaw-registry` binary on MinIO with pushed
//! snapshots, four real `thaw-node-cache` processes publishing their `NodeSnapshotCache` with
//! `--holdings kube` and serving each other chunks (P2P with a cluster token, as
//! deploy/node-cache.yaml runs them), each with its own node's pod-bound service-account
//! token, and the real `thaw-extender` with `--holdings kube` registered with kube-scheduler
//! by deploy/scheduler/. The tests create pods as Knative creates them and assert where
//! kube-scheduler binds them.
//!
//! One cluster serves every test of this file (starting one takes seconds); the tests take
//! turns (each places pods on the same four nodes) and each uses its own snapshots, so the
//! extender's herd damping of one test does not reach another.

#[path = "../../push-pull/tests/common/mod.rs"]
mod common;
#[path = "../../registry/tests/common/minio.rs"]
#[allow(dead_code, unreachable_pub)]
mod minio;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::{SnapshotData, PAGE};
use serde_json::{json, Value};
use thaw_client::{PushOptions, Reference};
use thaw_integration::control_plane::{free_port, workspace_binary, ControlPlane, Guarded};

const NODES: [&str; 4] = ["node-1", "node-2", "node-3", "node-4"];

/// Each node cache's capacity: node-4's is small enough that two of the eviction test's
/// snapshots (about 12 MiB each on disk) do not fit together.
fn capacity(node: &str) -> &'static str {
    if node == "node-4" {
        "20MiB"
    } else {
        "1GiB"
    }
}
/// The namespace the Knative pods run in.
const FN_NAMESPACE: &str = "fn";
/// How long a pod may wait to be bound. kube-scheduler binds in milliseconds; the margin is
/// for a loaded 2-core CI machine.
const BIND_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the tests share.
struct Cluster {
    plane: Mutex<ControlPlane>,
    rt: tokio::runtime::Runtime,
    /// In front of the thaw-registry process: its address is the registry's (the tests',
    /// the node caches' and the extender's), as a Service's would be.
    gate: FetchGate,
    _registry: Guarded,
    /// The registry's storage; stopped with the test process (its wrapper sees the pipe close).
    _minio: minio::Minio,
    node_caches: BTreeMap<&'static str, NodeCache>,
    extender: Mutex<Option<Guarded>>,
    extender_addr: String,
    extender_kubeconfig: PathBuf,
    /// Where the thaw processes' logs go (the harness directory, kept when a test fails).
    log_dir: PathBuf,
    /// Taken by each test for its whole run.
    turn: Mutex<()>,
}

struct NodeCache {
    addr: String,
    kubeconfig: PathBuf,
    process: Guarded,
    _dir: tempfile::TempDir,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(Cluster::start)
}

/// Takes this test's turn; a test that panicked before does not poison the next.
fn turn(c: &Cluster) -> MutexGuard<'_, ()> {
    c.turn.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `test` against the shared cluster, keeping the control plane's logs if it fails.
fn with_cluster(name: &str, test: impl FnOnce(&Cluster, &ControlPlane)) {
    let c = cluster();
    let _turn = turn(c);
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let plane = c.plane.lock().unwrap_or_else(|e| e.into_inner());
        test(c, &plane);
    }));
    if let Err(panic) = result {
        let mut plane = c.plane.lock().unwrap_or_else(|e| e.into_inner());
        for (node, cache) in &c.node_caches {
            eprintln!("--- thaw-node-cache {node}\n{}", cache.process.log_tail(20));
        }
        if let Some(ext) = c.extender.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            eprintln!("--- thaw-extender\n{}", ext.log_tail(30));
        }
        plane.keep_on_failure();
        std::panic::resume_unwind(panic);
    }
    eprintln!("{name}: {:.1}s", started.elapsed().as_secs_f64());
}

impl Cluster {
    fn start() -> Self {
        let started = Instant::now();
        let extender_addr = format!("127.0.0.1:{}", free_port());
        let plane = ControlPlane::start(&format!("http://{extender_addr}"));
        let deploy = thaw_integration::control_plane::repo_root().join("deploy");

        // deploy/ as an operator applies it: the namespace first, the CRD established before
        // anything of its kind, then everything (RBAC, the admission policy, workloads that
        // no controller runs here).
        plane.must(&["apply", "-f", &deploy.join("00-namespace.yaml").display().to_string()]);
        plane.must(&["apply", "-f", &deploy.join("crd.yaml").display().to_string()]);
        plane.must(&[
            "wait",
            "--for=condition=Established",
            "crd/nodesnapshotcaches.thaw.dev",
            "--timeout=60s",
        ]);
        plane.must(&["apply", "-f", &deploy.display().to_string()]);
        plane.must(&["create", "namespace", FN_NAMESPACE]);
        for node in NODES {
            plane.create_ready_node(node, &[]);
        }

        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        // thaw-registry on MinIO, run as deploy/registry.yaml runs it (--listen, --storage
        // s3://…, the AWS_* variables from its Secret).
        let minio = minio::Minio::start();
        let registry_addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(workspace_binary("thaw-registry", "thaw-registry"));
        cmd.args(["--listen", &registry_addr, "--storage", &minio.storage_url("cluster")])
            .env("THAW_LOG", "info");
        for (k, v) in minio.env() {
            cmd.env(k, v);
        }
        let registry = Guarded::spawn("thaw-registry", &cmd, &plane.dir().join("thaw-registry.log"));
        wait_http_ok(&format!("http://{registry_addr}/v2/"), "thaw-registry");
        let gate = FetchGate::start(&registry_addr);
        let host = gate.addr.clone();
        // The cluster token the node caches present to each other (deploy/'s thaw-peer-token).
        let peer_token = plane.dir().join("peer-token");
        std::fs::write(&peer_token, "cluster-test-peer-token-0123456789\n").unwrap();

        // Each node cache authenticates as deploy/'s thaw-node-cache service account with the
        // token kubelet would project into its pod on that node: bound to the pod, so it
        // names the node.
        let node_cache_bin = workspace_binary("thaw-node-cache", "thaw-node-cache");
        let mut node_caches = BTreeMap::new();
        for node in NODES {
            let pod = format!("thaw-node-cache-{node}");
            plane.apply(
                &json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod, "namespace": "thaw-system",
                                 "labels": {"app.kubernetes.io/name": "thaw-node-cache"}},
                    "spec": {"nodeName": node, "serviceAccountName": "thaw-node-cache",
                             "containers": [{"name": "node-cache", "image": "thaw/thaw-node-cache:0.1.0"}]}
                })
                .to_string(),
            );
            let token = plane.must(&[
                "create",
                "token",
                "thaw-node-cache",
                "-n",
                "thaw-system",
                "--bound-object-kind=Pod",
                &format!("--bound-object-name={pod}"),
                "--duration=2h",
            ]);
            let kubeconfig = plane.kubeconfig_for_token(node, token.trim());
            let dir = tempfile::tempdir().unwrap();
            let addr = format!("127.0.0.1:{}", free_port());
            let peer_addr = format!("127.0.0.1:{}", free_port());
            let mut cmd = Command::new(&node_cache_bin);
            cmd.args(["--registry", &format!("http://{host}")])
                .arg("--cache-dir")
                .arg(dir.path())
                .args([
                    "--capacity",
                    capacity(node),
                    "--listen",
                    &addr,
                    "--node-name",
                    node,
                    "--holdings",
                    "kube",
                    "--peer-listen",
                    &peer_addr,
                ])
                .arg("--peer-token-file")
                .arg(&peer_token)
                .env("KUBECONFIG", &kubeconfig)
                .env("THAW_LOG", "info");
            let process = Guarded::spawn(
                &format!("thaw-node-cache {node}"),
                &cmd,
                &plane.dir().join(format!("{node}.log")),
            );
            node_caches.insert(node, NodeCache { addr, kubeconfig, process, _dir: dir });
        }
        for (node, cache) in &node_caches {
            wait_http_ok(&format!("http://{}/healthz", cache.addr), &format!("thaw-node-cache {node}"));
        }

        let token = plane.must(&["create", "token", "thaw-extender", "-n", "thaw-system", "--duration=2h"]);
        let extender_kubeconfig = plane.kubeconfig_for_token("thaw-extender", token.trim());
        let log_dir = plane.dir().to_path_buf();
        let c = Self {
            plane: Mutex::new(plane),
            rt,
            gate,
            _registry: registry,
            _minio: minio,
            node_caches,
            extender: Mutex::new(None),
            extender_addr,
            extender_kubeconfig,
            log_dir,
            turn: Mutex::new(()),
        };
        c.start_extender();
        eprintln!("cluster fixture ready in {:.1}s", started.elapsed().as_secs_f64());
        c
    }

    /// Starts `thaw-extender --holdings kube` as deploy/extender.yaml runs it, on the address
    /// kube-scheduler was configured with.
    fn start_extender(&self) {
        let mut cmd = Command::new(workspace_binary("thaw-extender", "thaw-extender"));
        cmd.args(["--listen", &self.extender_addr])
            .args(["--registry", &format!("http://{}", self.host())])
            .args(["--holdings", "kube", "--cold-wait-ms", "50"])
            .env("KUBECONFIG", &self.extender_kubeconfig)
            .env("THAW_LOG", "info");
        let process = Guarded::spawn("thaw-extender", &cmd, &self.log_dir.join("thaw-extender.log"));
        *self.extender.lock().unwrap_or_else(|e| e.into_inner()) = Some(process);
        wait_http_ok(&format!("http://{}/healthz", self.extender_addr), "thaw-extender");
    }

    fn stop_extender(&self) {
        if let Some(mut p) = self.extender.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.stop();
        }
    }

    fn host(&self) -> String {
        self.gate.addr.clone()
    }

    /// Pushes `data` as `repo:tag` on the test registry; answers the full reference.
    fn push(&self, repo_tag: &str, data: &SnapshotData) -> String {
        let dir = tempfile::tempdir().unwrap();
        data.write(dir.path());
        let reference = Reference::parse(&format!("{}/{repo_tag}", self.host())).unwrap();
        let registry = common::client_for(&reference);
        self.rt
            .block_on(thaw_client::push_dir(&registry, &reference, dir.path(), &PushOptions::default()))
            .expect("push");
        reference.to_string()
    }

    /// Pushes the corpus snapshot `label` (`function/revision` of the quick corpus that
    /// integration/corpus/make-corpus.sh --quick makes, before the test stage of
    /// scripts/test.sh) as `repo:tag`; answers the full reference.
    fn push_corpus(&self, repo_tag: &str, label: &str) -> String {
        let corpus = thaw_integration::control_plane::repo_root().join("target/corpus-quick");
        let snapshots = thaw_integration::corpus::load(&corpus).unwrap_or_else(|e| {
            panic!("the cluster tests push real guest snapshots: run integration/corpus/make-corpus.sh --quick ({e})")
        });
        let snapshot = snapshots
            .iter()
            .find(|s| s.label() == label)
            .unwrap_or_else(|| panic!("no {label} in {}", corpus.display()));
        let reference = Reference::parse(&format!("{}/{repo_tag}", self.host())).unwrap();
        let registry = common::client_for(&reference);
        self.rt
            .block_on(thaw_client::push_dir(&registry, &reference, &snapshot.dir, &PushOptions::default()))
            .expect("push");
        reference.to_string()
    }

    /// `ensure` on `node`'s cache through its local API; answers the manifest digest.
    fn ensure(&self, node: &str, reference: &str) -> String {
        self.ensure_leased(node, reference).0
    }

    /// `ensure` on `node`'s cache; answers the manifest digest and the lease it took.
    fn ensure_leased(&self, node: &str, reference: &str) -> (String, String) {
        let body = self.node_api(node, "/v1/snapshots/ensure", &json!({ "reference": reference }));
        let field = |k: &str| body[k].as_str().unwrap_or_else(|| panic!("ensure answered {body}")).to_owned();
        (field("digest"), field("lease"))
    }

    fn node_api(&self, node: &str, path: &str, body: &Value) -> Value {
        let url = format!("http://{}{path}", self.node_caches[node].addr);
        let body = body.clone();
        self.rt.block_on(async move {
            let r = reqwest::Client::new().post(&url).json(&body).send().await.expect("node-cache request");
            let status = r.status();
            let text = r.text().await.unwrap();
            assert!(status.is_success(), "POST {url}: {status} {text}");
            serde_json::from_str(&text).unwrap_or(Value::Null)
        })
    }

    /// The extender's `thaw_extender_cache_entries{cache="..."}` gauge.
    /// One sample of the extender's `/metrics`, by its full name with labels.
    fn extender_metric(&self, name: &str) -> u64 {
        let url = format!("http://{}/metrics", self.extender_addr);
        let text = self.rt.block_on(async move {
            reqwest::get(&url).await.expect("metrics").text().await.expect("metrics text")
        });
        let key = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /metrics:\n{text}"))
    }
}

fn wait_http_ok(url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = http_status(url) {
            if status == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{what} did not answer 200 on {url}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_status(url: &str) -> std::io::Result<Option<u16>> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (hostport, path) =
        rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(hostport)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    Ok(std::str::from_utf8(&head[9..12]).ok().and_then(|c| c.parse().ok()))
}

/// A TCP relay in front of the registry that can hold back chunk fetches
/// (`POST /v2/<name>/_thaw/chunks/fetch`) while it is closed, so that a test can catch a node
/// cache in the middle of a materialization. Everything else passes at once, byte for byte:
/// requests are read one at a time (head, then the body by `Content-Length` or chunked
/// framing) only to see their paths; answers are copied as they come.
struct FetchGate {
    /// `127.0.0.1:PORT`, the address clients use as the registry's.
    addr: String,
    closed: Arc<AtomicBool>,
}

impl FetchGate {
    fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the gate");
        let addr = listener.local_addr().unwrap().to_string();
        let closed = Arc::new(AtomicBool::new(false));
        let (upstream, gate_closed) = (upstream.to_owned(), closed.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (upstream, closed) = (upstream.clone(), gate_closed.clone());
                std::thread::spawn(move || {
                    // A connection that fails ends; its client retries as it would with any proxy.
                    let _ = relay(client, &upstream, &closed);
                });
            }
        });
        Self { addr, closed }
    }

    /// Holds chunk fetches (those arriving while closed) until the answer is dropped, so a
    /// test that fails while the gate is closed does not stall the tests after it.
    fn close(&self) -> GateClosed<'_> {
        self.closed.store(true, Ordering::SeqCst);
        GateClosed(self)
    }
}

/// The gate stays closed while this lives.
struct GateClosed<'a>(&'a FetchGate);

impl Drop for GateClosed<'_> {
    fn drop(&mut self) {
        self.0.closed.store(false, Ordering::SeqCst);
    }
}

fn relay(client: TcpStream, upstream: &str, closed: &AtomicBool) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    let (mut answers, mut to_client) = (server.try_clone()?, client.try_clone()?);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut answers, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Write);
    });
    let mut requests = BufReader::new(client);
    let mut to_server = server;
    loop {
        let mut head = Vec::new();
        loop {
            let before = head.len();
            if requests.read_until(b'\n', &mut head)? == 0 {
                return to_server.shutdown(Shutdown::Write);
            }
            if &head[before..] == b"\r\n" {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let path = text.split_whitespace().nth(1).unwrap_or_default();
        let header = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim_start_matches(':').trim().to_owned()))
        };
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length: u64 = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        if path.ends_with("/_thaw/chunks/fetch") {
            while closed.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        to_server.write_all(&head)?;
        if chunked {
            // Each chunk: a size line, the data and its CRLF; the last (size 0) ends with the
            // trailers and an empty line.
            loop {
                let mut size_line = Vec::new();
                requests.read_until(b'\n', &mut size_line)?;
                to_server.write_all(&size_line)?;
                let size_text = String::from_utf8_lossy(&size_line);
                let size = u64::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|e| std::io::Error::other(format!("chunk size {size_text:?}: {e}")))?;
                if size == 0 {
                    loop {
                        let mut trailer = Vec::new();
                        requests.read_until(b'\n', &mut trailer)?;
                        to_server.write_all(&trailer)?;
                        if trailer == b"\r\n" || trailer.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                std::io::copy(&mut (&mut requests).take(size + 2), &mut to_server)?;
            }
        } else {
            std::io::copy(&mut (&mut requests).take(length), &mut to_server)?;
        }
    }
}

/// A snapshot sharing no chunk with any other seed's (common::SnapshotData draws pages from
/// a pool every snapshot shares): random memory pages with zero runs, a random vmstate, a
/// small disk. Coverage between two of these comes only from what a test makes them share.
fn unique_snapshot(pages: usize, seed: u64) -> SnapshotData {
    let mut rng = common::Rng::new(seed);
    let mut memory = vec![0u8; pages * PAGE];
    let mut page = 0;
    while page < pages {
        let run = 1 + rng.below(32) as usize;
        let zero = rng.below(4) == 0;
        for p in page..(page + run).min(pages) {
            if !zero {
                rng.fill(&mut memory[p * PAGE..(p + 1) * PAGE]);
            }
        }
        page += run;
    }
    let mut vmstate = vec![0u8; 16 * 1024];
    rng.fill(&mut vmstate);
    let mut disk = vec![0u8; 64 * PAGE];
    rng.fill(&mut disk[..8 * PAGE]);
    let info = format!("{{\"seed\":{seed}}}\n").into_bytes();
    SnapshotData { memory, vmstate, disk, info }
}

/// A revision of `base` whose first `changed_pages` memory pages are rewritten (a contiguous
/// range, so the chunks outside it are shared), with its own info file.
fn revision(base: &SnapshotData, changed_pages: usize, seed: u64) -> SnapshotData {
    let mut rng = common::Rng::new(seed);
    let mut memory = base.memory.clone();
    rng.fill(&mut memory[..changed_pages * PAGE]);
    let mut info = base.info.clone();
    info.extend_from_slice(format!("{{\"rev\":{seed}}}\n").as_bytes());
    SnapshotData { memory, vmstate: base.vmstate.clone(), disk: base.disk.clone(), info }
}

/// A pod as Knative Serving's ReplicaSet creates it for `revision` of `service`, carrying the
/// snapshot annotation.
fn knative_pod(name: &str, service: &str, revision: &str, snapshot: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": FN_NAMESPACE,
            "labels": {
                "app": revision,
                "serving.knative.dev/configuration": service,
                "serving.knative.dev/configurationGeneration": "1",
                "serving.knative.dev/revision": revision,
                "serving.knative.dev/service": service,
            },
            "annotations": {
                "thaw.dev/snapshot": snapshot,
                "autoscaling.knative.dev/min-scale": "0",
                "serving.knative.dev/creator": "system:admin",
            }
        },
        "spec": {
            "containers": [
                {"name": "user-container", "image": "index.docker.io/example/hello:latest",
                 "ports": [{"name": "user-port", "containerPort": 8080}],
                 "env": [{"name": "K_REVISION", "value": revision}]},
                {"name": "queue-proxy", "image": "gcr.io/knative-releases/knative.dev/serving/cmd/queue:latest",
                 "ports": [{"name": "http-queueadm", "containerPort": 8022}]}
            ],
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 30
        }
    })
}

/// Creates the pods in one request and answers each one's node once all are bound.
fn create_and_bind(plane: &ControlPlane, pods: &[Value]) -> Vec<String> {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": pods});
    plane
        .kubectl_as(plane.admin_kubeconfig(), &["create", "-f", "-"], Some(&list.to_string()))
        .unwrap_or_else(|e| panic!("{e}"));
    pods.iter()
        .map(|p| {
            let name = p["metadata"]["name"].as_str().unwrap();
            plane
                .wait_bound(FN_NAMESPACE, name, BIND_TIMEOUT)
                .unwrap_or_else(|| panic!("pod {name} not bound within {BIND_TIMEOUT:?}\n{}", plane.logs(20)))
        })
        .collect()
}

/// Waits until `node`'s NodeSnapshotCache lists every digest of `held` as a holding and
/// none of `gone`; answers the object.
fn wait_published(plane: &ControlPlane, node: &str, held: &[&str], gone: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = plane.kubectl(&["get", "nodesnapshotcache", node, "-o", "json"]) {
            let object: Value = serde_json::from_str(&text).unwrap();
            let listed: Vec<&str> = object["status"]["snapshots"]
                .as_array()
                .map(|s| s.iter().filter_map(|e| e["digest"].as_str()).collect())
                .unwrap_or_default();
            if held.iter().all(|d| listed.contains(d)) && !gone.iter().any(|d| listed.contains(d)) {
                return object;
            }
            assert!(
                Instant::now() < deadline,
                "{node}'s NodeSnapshotCache lists {listed:?}; want {held:?}, not {gone:?}"
            );
        } else {
            assert!(Instant::now() < deadline, "{node}'s NodeSnapshotCache never appeared");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `found` picks something out of `node`'s published holdings
/// (`status.snapshots` of its NodeSnapshotCache) and answers it.
fn wait_holding<T>(plane: &ControlPlane, node: &str, what: &str, found: impl Fn(&[Value]) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = plane
            .kubectl(&["get", "nodesnapshotcache", node, "-o", "json"])
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|o| o["status"]["snapshots"].as_array().cloned())
            .unwrap_or_default();
        if let Some(t) = found(&listed) {
            return t;
        }
        assert!(Instant::now() < deadline, "{node}'s NodeSnapshotCache never listed {what}: {listed:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lets the extender's watch catch up with published holdings and its profile cache learn
/// `snapshots` (asked with a pod of each and no node holding anything: no herd pick).
/// Waits until the extender has resolved and profiled each of `snapshots`: asks
/// `/prioritize` about a node that does not exist (so no herd pick is recorded) until an
/// answer is no longer neutral for "pending". Counting profiles instead would race with the
/// extender's own warming of what the nodes hold.
fn warm_extender(c: &Cluster, snapshots: &[&str]) {
    let url = format!("http://{}/prioritize", c.extender_addr);
    for (i, s) in snapshots.iter().enumerate() {
        let pod = knative_pod(&format!("warm-{i}"), "warm", "warm-00001", s);
        let args = json!({"Pod": pod, "NodeNames": ["no-such-node"]});
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pending_before = c.extender_metric("thaw_extender_neutral_total{reason=\"pending\"}");
            let failed_before = c.extender_metric("thaw_extender_neutral_total{reason=\"failed\"}");
            let (url, args) = (url.clone(), args.clone());
            c.rt.block_on(async move {
                reqwest::Client::new()
                    .post(&url)
                    .json(&args)
                    .send()
                    .await
                    .expect("prioritize")
                    .error_for_status()
                    .unwrap();
            });
            let pending =
                c.extender_metric("thaw_extender_neutral_total{reason=\"pending\"}") > pending_before;
            let failed = c.extender_metric("thaw_extender_neutral_total{reason=\"failed\"}") > failed_before;
            if !pending && !failed {
                break;
            }
            assert!(Instant::now() < deadline, "the extender never resolved and profiled {s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The holdings reach the extender by its watch; give it a moment after they were written.
    std::thread::sleep(Duration::from_millis(500));
}

fn counts(nodes: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in nodes {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn scheduler_binds_each_revision_to_the_node_with_the_highest_coverage() {
    with_cluster("highest_coverage", |c, plane| {
        // Real guest snapshots: two revisions of one function and another function.
        let r1 = c.push_corpus("fn/json:json-00001", "fn-json/v1");
        let r2 = c.push_corpus("fn/json:json-00002", "fn-json/v2");
        let r_other = c.push_corpus("fn/sqlite:sqlite-00001", "fn-sqlite/v1");
        let d1 = c.ensure("node-1", &r1);
        let d2 = c.ensure("node-2", &r2);
        let d_other = c.ensure("node-3", &r_other);
        let nsc1 = wait_published(plane, "node-1", &[&d1], &[]);
        wait_published(plane, "node-2", &[&d2], &[]);
        wait_published(plane, "node-3", &[&d_other], &[]);
        warm_extender(c, &[&r1, &r2, &r_other]);

        let bound = create_and_bind(
            plane,
            &[
                knative_pod("json-00002-a", "json", "json-00002", &r2),
                knative_pod("json-00001-a", "json", "json-00001", &r1),
                knative_pod("sqlite-00001-a", "sqlite", "sqlite-00001", &r_other),
            ],
        );
        assert_eq!(bound, ["node-2", "node-1", "node-3"], "each revision on the node holding it");

        // The NodeSnapshotCache is owned by its Node, for garbage collection with it.
        let node = plane.get_json(&["node", "node-1"]);
        let owners = nsc1["metadata"]["ownerReferences"].as_array().expect("ownerReferences");
        assert_eq!(owners.len(), 1, "{owners:?}");
        assert_eq!(owners[0]["kind"], "Node");
        assert_eq!(owners[0]["apiVersion"], "v1");
        assert_eq!(owners[0]["name"], "node-1");
        assert_eq!(owners[0]["uid"], node["metadata"]["uid"]);
    });
}

#[test]
fn a_node_cache_writes_its_own_node_snapshot_cache_and_no_other() {
    with_cluster("own_object_only", |c, plane| {
        for node in ["node-1", "node-2"] {
            let deadline = Instant::now() + Duration::from_secs(30);
            while plane.kubectl(&["get", "nodesnapshotcache", node]).is_err() {
                assert!(Instant::now() < deadline, "{node}'s NodeSnapshotCache never appeared");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let node2 = &c.node_caches["node-2"].kubeconfig;
        let as_node2 = |args: &[&str]| plane.kubectl_as(node2, args, None);
        let own_only = "may write only its own node's NodeSnapshotCache";

        // Another node's object: refused by the admission policy, whatever the write.
        let label = r#"{"metadata":{"labels":{"thaw.dev/forged":"true"}}}"#;
        let e = as_node2(&["patch", "nodesnapshotcache", "node-1", "--type=merge", "-p", label]).unwrap_err();
        assert!(e.stderr.contains(own_only), "{e}");
        let status = r#"{"status":{"capacityBytes":1,"usedBytes":0,"snapshots":[]}}"#;
        let e = as_node2(&[
            "patch",
            "nodesnapshotcache",
            "node-1",
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ])
        .unwrap_err();
        assert!(e.stderr.contains(own_only), "{e}");
        let forged = json!({"apiVersion": "thaw.dev/v1alpha1", "kind": "NodeSnapshotCache", "metadata": {"name": "node-9"}, "spec": {"nodeName": "node-9"}});
        let e = plane.kubectl_as(node2, &["create", "-f", "-"], Some(&forged.to_string())).unwrap_err();
        assert!(e.stderr.contains(own_only), "{e}");
        // Nor what RBAC never granted.
        let e = as_node2(&["delete", "nodesnapshotcache", "node-2"]).unwrap_err();
        assert!(e.stderr.contains("Forbidden") || e.stderr.contains("forbidden"), "{e}");
        let e = as_node2(&["get", "secrets", "-n", "thaw-system"]).unwrap_err();
        assert!(e.stderr.contains("forbidden"), "{e}");
        let node1 = plane.get_json(&["nodesnapshotcache", "node-1"]);
        assert!(node1["metadata"]["labels"]["thaw.dev/forged"].is_null(), "{node1}");
        assert_ne!(node1["status"]["capacityBytes"], 1, "{node1}");

        // Its own object: allowed.
        as_node2(&["patch", "nodesnapshotcache", "node-2", "--type=merge", "-p", label])
            .unwrap_or_else(|e| panic!("{e}"));
        let node2_object = plane.get_json(&["nodesnapshotcache", "node-2"]);
        assert_eq!(node2_object["metadata"]["labels"]["thaw.dev/forged"], "true");
        plane.must(&["label", "nodesnapshotcache", "node-2", "thaw.dev/forged-"]);

        // The same service account with a token bound to no pod names no node: it writes nothing.
        let token = plane.must(&["create", "token", "thaw-node-cache", "-n", "thaw-system", "--duration=1h"]);
        let unbound = plane.kubeconfig_for_token("unbound-node-cache", token.trim());
        let e = plane
            .kubectl_as(
                &unbound,
                &["patch", "nodesnapshotcache", "node-2", "--type=merge", "-p", label],
                None,
            )
            .unwrap_err();
        assert!(e.stderr.contains(own_only), "{e}");
    });
}

#[test]
fn a_burst_of_one_revision_spreads_over_the_nodes_holding_it() {
    with_cluster("herd_burst", |c, plane| {
        // node-3 holds revision 2; node-4 holds revision 1, which shares most of its chunks.
        // A tenth of the memory rewritten: node-4 scores about 9 of 10 for revision 2.
        let v1 = unique_snapshot(1024, 201);
        let v2 = revision(&v1, 102, 202);
        let r1 = c.push("fn/beta:beta-00001", &v1);
        let r2 = c.push("fn/beta:beta-00002", &v2);
        let d1 = c.ensure("node-4", &r1);
        let d2 = c.ensure("node-3", &r2);
        wait_published(plane, "node-3", &[&d2], &[]);
        wait_published(plane, "node-4", &[&d1], &[]);
        warm_extender(c, &[&r1, &r2]);

        let pods: Vec<Value> =
            (0..8).map(|i| knative_pod(&format!("beta-00002-{i}"), "beta", "beta-00002", &r2)).collect();
        let bound = create_and_bind(plane, &pods);
        let per_node = counts(&bound);
        eprintln!("burst of 8: {per_node:?}");
        // Without damping every pod would land on node-3 (the only full holder). The extender
        // lowers a node by a point per recent pick of it (at most 3, for 10 s): the first pod
        // goes to node-3, and from the third on node-4, a point behind, is the top pick at
        // least twice; nodes holding nothing of it take none.
        assert!(per_node.get("node-3").copied().unwrap_or(0) >= 1, "{per_node:?}");
        assert!(per_node.get("node-4").copied().unwrap_or(0) >= 2, "{per_node:?}");
        assert_eq!(per_node.keys().filter(|n| *n != "node-3" && *n != "node-4").count(), 0, "{per_node:?}");
    });
}

#[test]
fn with_the_extender_stopped_pods_are_still_scheduled() {
    with_cluster("extender_stopped", |c, plane| {
        c.stop_extender();
        let v = unique_snapshot(256, 301);
        let r = c.push("fn/delta:delta-00001", &v);
        let started = Instant::now();
        let bound = create_and_bind(plane, &[knative_pod("delta-00001-a", "delta", "delta-00001", &r)]);
        let took = started.elapsed();
        eprintln!("bound to {} in {took:?} with the extender down", bound[0]);
        // ignorable: true: a refused connection is skipped, not retried until a timeout.
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(NODES.contains(&bound[0].as_str()));
        c.start_extender();
    });
}

#[test]
fn after_an_eviction_the_next_pod_goes_elsewhere() {
    with_cluster("eviction", |c, plane| {
        // node-4 (20 MiB) holds revision 1; node-1 an older revision sharing 3/4 of it.
        let e1 = unique_snapshot(4096, 401);
        let e0 = revision(&e1, 1024, 400);
        let other = unique_snapshot(4096, 402);
        let r1 = c.push("fn/epsilon:epsilon-00002", &e1);
        let r0 = c.push("fn/epsilon:epsilon-00001", &e0);
        let r_other = c.push("fn/zeta:zeta-00001", &other);
        let (d1, lease) = c.ensure_leased("node-4", &r1);
        let d0 = c.ensure("node-1", &r0);
        let before = wait_published(plane, "node-4", &[&d1], &[]);
        wait_published(plane, "node-1", &[&d0], &[]);
        warm_extender(c, &[&r1]);
        let bound =
            create_and_bind(plane, &[knative_pod("epsilon-00002-a", "epsilon", "epsilon-00002", &r1)]);
        assert_eq!(bound, ["node-4"], "the pod goes to the node holding its revision");

        // The lease ends; another snapshot needs node-4's room, so revision 1 is evicted and
        // node-4's NodeSnapshotCache says so.
        c.node_api("node-4", "/v1/snapshots/release", &json!({ "lease": lease }));
        let d_other = c.ensure("node-4", &r_other);
        let after = wait_published(plane, "node-4", &[&d_other], &[&d1]);
        assert_ne!(before["metadata"]["resourceVersion"], after["metadata"]["resourceVersion"]);
        // The extender's watch carries the change within its 100 ms coalescing.
        std::thread::sleep(Duration::from_millis(1000));

        let bound =
            create_and_bind(plane, &[knative_pod("epsilon-00002-b", "epsilon", "epsilon-00002", &r1)]);
        assert_eq!(bound, ["node-1"], "after the eviction, the node holding most of it");
    });
}

#[test]
fn a_node_whose_holding_is_still_in_progress_is_not_preferred() {
    with_cluster("in_progress", |c, plane| {
        // node-1 holds revision 1; revision 2 rewrites half of the memory.
        let v1 = unique_snapshot(2048, 501);
        let v2 = revision(&v1, 1024, 502);
        let r1 = c.push("fn/eta:eta-00001", &v1);
        let r2 = c.push("fn/eta:eta-00002", &v2);
        let d1 = c.ensure("node-1", &r1);
        wait_published(plane, "node-1", &[&d1], &[]);
        warm_extender(c, &[&r1, &r2]);

        // node-3 starts materializing revision 2, but its chunk fetches from the registry are
        // held: it announces revision 2 as in progress (`cachedBytes: 0`) and stays there.
        let held = c.gate.close();
        let url = format!("http://{}/v1/snapshots/ensure", c.node_caches["node-3"].addr);
        let body = json!({ "reference": r2 });
        let ensuring = c.rt.spawn(async move {
            let r = reqwest::Client::new().post(&url).json(&body).send().await?;
            r.error_for_status()?.json::<Value>().await
        });
        let in_progress = |snaps: &[Value]| {
            snaps
                .iter()
                .find(|s| s["reference"] == r2.as_str() && s["cachedBytes"] == 0)
                .map(|s| s["digest"].clone())
        };
        let d2 = wait_holding(plane, "node-3", "revision 2 in progress", in_progress);
        // The extender's watch carries the change within its 100 ms coalescing.
        std::thread::sleep(Duration::from_millis(1000));
        let bound = create_and_bind(plane, &[knative_pod("eta-00002-a", "eta", "eta-00002", &r2)]);
        assert!(!ensuring.is_finished(), "node-3's ensure ended while its chunk fetches were held");
        assert_eq!(
            bound,
            ["node-1"],
            "an in-progress holding counts for nothing: the node holding revision 1 holds most of it"
        );

        // Once node-3 completes it (and says so), the next pod goes there: the same holding,
        // complete, outscores revision 1's partial coverage.
        drop(held);
        let ensured = c.rt.block_on(ensuring).expect("ensure task");
        if let Err(e) = ensured {
            // The held fetch may have outlived the client's patience; the node retries as an
            // orchestrator would.
            eprintln!("node-3's first ensure of revision 2 failed ({e}); ensuring again");
            c.ensure("node-3", &r2);
        }
        let complete = |snaps: &[Value]| {
            snaps.iter().any(|s| s["digest"] == d2 && s["cachedBytes"].as_u64() > Some(0)).then_some(())
        };
        wait_holding(plane, "node-3", "revision 2 complete", complete);
        std::thread::sleep(Duration::from_millis(1000));
        let bound = create_and_bind(plane, &[knative_pod("eta-00002-b", "eta", "eta-00002", &r2)]);
        assert_eq!(bound, ["node-3"], "once complete, the node holding the revision");
    });
}
