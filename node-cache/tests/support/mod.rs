//! Shared by the node-cache tests: a registry holding snapshots, and `thaw-node-cache`
//! processes (the real binary) talking to it over loopback.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use thaw_client::{PushOptions, Reference};

#[path = "../../../push-pull/tests/common/mod.rs"]
pub mod common;

pub use common::{free_port, SnapshotData, ThawRegistry, PAGE};

/// A snapshot pushed to the test registry, and its bytes for comparisons.
pub struct Pushed {
    pub reference: String,
    pub data: SnapshotData,
    pub dir: tempfile::TempDir,
}

/// Pushes `data` as `host/repo:tag`.
pub async fn push(host: &str, repo_tag: &str, data: SnapshotData) -> Pushed {
    let dir = tempfile::tempdir().unwrap();
    data.write(dir.path());
    let reference = Reference::parse(&format!("{host}/{repo_tag}")).unwrap();
    let registry = common::client_for(&reference);
    thaw_client::push_dir(&registry, &reference, dir.path(), &PushOptions::default()).await.expect("push");
    Pushed { reference: reference.to_string(), data, dir }
}

/// Revision 2 of a snapshot: `changed` memory pages rewritten, one disk block changed.
pub fn revision(base: &SnapshotData, changed: usize, seed: u64) -> SnapshotData {
    let mut rng = common::Rng::new(seed);
    let mut memory = base.memory.clone();
    let pages = memory.len() / PAGE;
    for _ in 0..changed {
        let p = rng.below(pages as u64) as usize;
        rng.fill(&mut memory[p * PAGE..(p + 1) * PAGE]);
    }
    let mut disk = base.disk.clone();
    disk[PAGE * 3..PAGE * 3 + 16].copy_from_slice(b"revision two....");
    let mut info = base.info.clone();
    info.extend_from_slice(format!("{{\"rev\":{seed}}}\n").as_bytes());
    SnapshotData { memory, vmstate: base.vmstate.clone(), disk, info }
}

/// How a test process is started: a command prefix put before the program (for example
/// `ip netns exec NS`, to run it in a network namespace) and the IP address its listeners
/// bind. The default is no prefix and loopback, as every test but the P2P benchmark uses.
#[derive(Clone, Debug)]
pub struct Launch {
    pub prefix: Vec<String>,
    pub ip: String,
}

impl Default for Launch {
    fn default() -> Self {
        Self { prefix: Vec::new(), ip: "127.0.0.1".into() }
    }
}

impl Launch {
    /// Runs the process in network namespace `ns`, listening on `ip` (an address of `ns`).
    pub fn netns(ns: &str, ip: &str) -> Self {
        Self { prefix: ["ip", "netns", "exec", ns].map(String::from).to_vec(), ip: ip.to_owned() }
    }

    /// `program` behind the prefix. Ports are picked by [`free_port`] on loopback of this
    /// namespace: a namespace of its own has every port free anyway.
    fn command(&self, program: &Path) -> Command {
        match self.prefix.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
        }
    }

    fn free_addr(&self) -> String {
        format!("{}:{}", self.ip, free_port())
    }
}

/// The `thaw-registry` binary of this target directory, as a separate process on a free
/// loopback port with its storage in a temporary directory; killed on drop. A test binary
/// runs from `target/<profile>/deps/`, the registry's binary is in `target/<profile>/`:
/// `cargo test --workspace` builds it (thaw-registry has tests of its own); for
/// `cargo test -p thaw-node-cache` alone, `cargo build -p thaw-registry` first.
pub struct RegistryProcess {
    child: Child,
    addr: String,
    _storage: tempfile::TempDir,
}

impl RegistryProcess {
    pub async fn start() -> Self {
        Self::start_in(&Launch::default()).await
    }

    /// Starts the registry as `launch` says (another namespace, another address).
    pub async fn start_in(launch: &Launch) -> Self {
        Self::start_with(launch, &[]).await
    }

    /// Starts the registry with more arguments (`--auth-config FILE`: an anonymous
    /// `GET /v2/` is then answered 401, which counts as up).
    pub async fn start_with(launch: &Launch, extra: &[&str]) -> Self {
        let exe = std::env::current_exe().expect("current_exe");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary in target/<profile>/deps")
            .join("thaw-registry");
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build -p thaw-registry` (cargo test --workspace builds it)",
            bin.display()
        );
        let storage = tempfile::tempdir().unwrap();
        let addr = launch.free_addr();
        let child = launch
            .command(&bin)
            .args(["--listen", &addr, "--storage"])
            .arg(storage.path())
            .args(extra)
            .env("THAW_LOG", "warn")
            .env("THAW_UPLOAD_DIR", storage.path().join("uploads"))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting thaw-registry");
        let me = Self { child, addr, _storage: storage };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let up = |s: reqwest::StatusCode| s.is_success() || s == reqwest::StatusCode::UNAUTHORIZED;
        while !http.get(format!("http://{}/v2/", me.addr)).send().await.is_ok_and(|r| up(r.status())) {
            assert!(Instant::now() < deadline, "thaw-registry did not answer on {}", me.addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        me
    }

    pub fn host(&self) -> String {
        self.addr.clone()
    }

    /// The registry's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `thaw-node-cache`; killed on drop.
pub struct NodeCache {
    child: Option<Child>,
    pub addr: String,
    pub dir: PathBuf,
    registry: String,
    capacity: u64,
    node: String,
    /// More command-line arguments (P2P flags).
    extra: Vec<String>,
    /// More environment variables.
    env: Vec<(String, String)>,
    /// Where the peer service listens, when `extra` asks for one (`--peer-listen auto`).
    pub peer_addr: Option<String>,
    /// How the process is started (loopback unless [`NodeCache::start_in`] says otherwise).
    launch: Launch,
    http: reqwest::Client,
}

impl NodeCache {
    /// Starts a node cache on a free port with its cache in `dir`.
    pub async fn start(registry: &str, dir: &Path, capacity: u64, node: &str) -> Self {
        Self::start_with(registry, dir, capacity, node, &[]).await
    }

    /// Starts a node cache with more arguments; `--peer-listen auto` picks a free port.
    pub async fn start_with(registry: &str, dir: &Path, capacity: u64, node: &str, extra: &[&str]) -> Self {
        Self::start_in(&Launch::default(), registry, dir, capacity, node, extra).await
    }

    /// Starts a node cache with more environment variables (set through the environment
    /// so that a binary without the matching options still starts).
    pub async fn start_env(
        registry: &str,
        dir: &Path,
        capacity: u64,
        node: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let mut n = Self::unstarted(&Launch::default(), registry, dir, capacity, node, &[]);
        n.env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        n.spawn().await;
        n
    }

    /// [`NodeCache::start_with`], started as `launch` says: both listeners (and
    /// `--peer-listen auto`) bind `launch.ip`.
    pub async fn start_in(
        launch: &Launch,
        registry: &str,
        dir: &Path,
        capacity: u64,
        node: &str,
        extra: &[&str],
    ) -> Self {
        let mut n = Self::unstarted(launch, registry, dir, capacity, node, extra);
        n.spawn().await;
        n
    }

    fn unstarted(
        launch: &Launch,
        registry: &str,
        dir: &Path,
        capacity: u64,
        node: &str,
        extra: &[&str],
    ) -> Self {
        Self {
            env: Vec::new(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            peer_addr: None,
            child: None,
            addr: String::new(),
            dir: dir.to_owned(),
            registry: registry.to_owned(),
            capacity,
            node: node.to_owned(),
            launch: launch.clone(),
            http: reqwest::Client::new(),
        }
    }

    /// Starts the process, on new ports up to three times: a port found free here may be
    /// taken in another network namespace, or by a process of an earlier round still exiting.
    async fn spawn(&mut self) {
        for attempt in 1..=3 {
            if self.spawn_once().await {
                return;
            }
            eprintln!(
                "thaw-node-cache {} exited at start (attempt {attempt}); trying other ports",
                self.node
            );
        }
        panic!("thaw-node-cache {} exited at start three times", self.node);
    }

    /// One start; `false` when the process exited before answering.
    async fn spawn_once(&mut self) -> bool {
        self.addr = self.launch.free_addr();
        let mut extra = self.extra.clone();
        if let Some(i) = extra.iter().position(|a| a == "--peer-listen") {
            if extra.get(i + 1).map(String::as_str) == Some("auto") {
                let addr = self.launch.free_addr();
                extra[i + 1] = addr.clone();
                self.peer_addr = Some(addr);
            }
        }
        let child = self
            .launch
            .command(Path::new(env!("CARGO_BIN_EXE_thaw-node-cache")))
            .args(["--registry", &format!("http://{}", self.registry)])
            .arg("--cache-dir")
            .arg(&self.dir)
            .args([
                "--capacity",
                &self.capacity.to_string(),
                "--listen",
                &self.addr,
                "--node-name",
                &self.node,
            ])
            .args(&extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("THAW_LOG", std::env::var("THAW_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting thaw-node-cache");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(self.url("/healthz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("thaw-node-cache exited at start: {status}");
                self.child = None;
                return false;
            }
            assert!(Instant::now() < deadline, "thaw-node-cache did not answer on {}", self.addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The running process's id (`ip netns exec` execs the program: the same process).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills and starts again on the same cache directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs JSON; answers status and body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(self.url(path)).json(&body).send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> Value {
        let r = self.http.get(self.url(path)).send().await.expect("request");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// `ensure`, which must succeed.
    pub async fn ensure(&self, reference: &str) -> Value {
        let (status, body) =
            self.post("/v1/snapshots/ensure", serde_json::json!({ "reference": reference })).await;
        assert_eq!(status, 200, "ensure {reference}: {body}");
        body
    }

    pub async fn release(&self, lease: &str) {
        let (status, body) = self.post("/v1/snapshots/release", serde_json::json!({ "lease": lease })).await;
        assert_eq!(status, 200, "release {lease}: {body}");
    }

    /// Manifest digests of the cached snapshots.
    pub async fn cached(&self) -> Vec<String> {
        let listing = self.get("/v1/snapshots").await;
        listing["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["digest"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for NodeCache {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts that an ensure answer's files hold exactly the snapshot's bytes.
pub fn assert_files(answer: &Value, data: &SnapshotData) {
    let files = answer["files"].as_object().expect("files");
    let expected: HashMap<&str, &[u8]> = [
        ("memory", data.memory.as_slice()),
        ("vmstate", data.vmstate.as_slice()),
        ("disk", data.disk.as_slice()),
        ("info", data.info.as_slice()),
    ]
    .into_iter()
    .collect();
    assert_eq!(files.len(), 4, "{answer}");
    for (role, bytes) in expected {
        let path = files[role].as_str().unwrap();
        assert!(Path::new(path).is_absolute(), "{path}");
        let got = std::fs::read(path).unwrap();
        assert!(got == bytes, "{role} ({path}) differs from what was pushed");
    }
}

pub fn bytes_from(answer: &Value, source: &str) -> u64 {
    answer["bytes"][source].as_u64().unwrap()
}

/// The recipes of a snapshot's files, in manifest order.
pub async fn recipes(reference: &str) -> Vec<thaw_schema::Recipe> {
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
    out
}

/// Bytes of the distinct chunks of `new` (per file) that no file of `old` holds: what a
/// node holding `old` must fetch for `new`.
pub fn new_chunk_bytes(old: &[thaw_schema::Recipe], new: &[thaw_schema::Recipe]) -> u64 {
    use std::collections::HashSet;
    let held: HashSet<_> = old.iter().flat_map(|r| r.distinct_chunks()).collect();
    let mut total = 0;
    for r in new {
        let mut seen = HashSet::new();
        for e in &r.entries {
            if let Some(id) = e.chunk_id() {
                if !held.contains(id) && seen.insert(*id) {
                    total += u64::from(e.byte_len());
                }
            }
        }
    }
    total
}

/// A TCP proxy on a free loopback port to `upstream`, adding to `passed` every byte it
/// passes back from upstream, and pausing `pace` after each piece of at most 64 KiB (zero:
/// full speed). Benchmarks count a server's egress with it; tests slow a transfer down
/// enough to kill the upstream in the middle. Answers the proxy's `host:port`.
pub async fn proxy(
    upstream: String,
    passed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pace: Duration,
) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let (upstream, passed) = (upstream.clone(), passed.clone());
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let (mut down_r, mut down_w) = down.into_split();
                let (mut up_r, mut up_w) = up.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match up_r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if down_w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            passed.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                            if !pace.is_zero() {
                                tokio::time::sleep(pace).await;
                            }
                        }
                    }
                }
                requests.abort();
            });
        }
    });
    addr
}

/// An in-process registry whose object store injects the faults of `faults`
/// (`thaw_registry::Faults`); storage in a temporary directory.
pub struct FaultyRegistry {
    pub running: thaw_registry::RunningRegistry,
    pub faults: std::sync::Arc<thaw_registry::Faults>,
    _storage: tempfile::TempDir,
}

impl FaultyRegistry {
    pub async fn start(seed: u64) -> Self {
        let storage = tempfile::tempdir().unwrap();
        let faults = thaw_registry::Faults::new(seed);
        let config = thaw_registry::RegistryConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            storage.path().to_str().unwrap(),
        );
        let options = thaw_registry::ServeOptions::default().with_faults(faults.clone());
        let running = thaw_registry::spawn_with(config, options).await.expect("starting thaw-registry");
        Self { running, faults, _storage: storage }
    }

    pub fn host(&self) -> String {
        self.running.addr().to_string()
    }
}
