//! A real S3 server for tests: MinIO on loopback, with its own temporary directory, free
//! ports, one bucket and the root credentials that can read and write it.
//!
//! [`Minio`] is a single server on one drive (MinIO's "single-node single-drive" shape).
//! [`MinioCluster`] is distributed MinIO: several server processes on loopback, each with
//! its own drives, erasure coded across all of them, for the tests that stop one of them.
//!
//! Each server is started through a small `sh` wrapper that holds the read end of a pipe
//! from this process: when the test process ends, however it ends, the pipe closes and the
//! wrapper kills MinIO and removes its directory. So a MinIO shared by a whole test binary
//! (a `static`, whose destructor never runs) does not outlive the tests.
//!
//! MinIO honours `If-None-Match: *` and `If-Match` on PUT (conditional writes).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3Builder, AwsAuthorizer, AwsCredential};
use object_store::ObjectStore;

/// The bucket every harness MinIO creates.
pub(crate) const BUCKET: &str = "thaw-test";
/// The region clients sign for (MinIO's default).
pub(crate) const REGION: &str = "us-east-1";
/// The version the tests are written against (and the install script builds): a pseudo-version
/// of `github.com/minio/minio`, built with `go install` (the module proxy serves no tags).
pub(crate) const MINIO_VERSION: &str = "v0.0.0-20260212201848-7aac2a2c5b7c";

const ACCESS_KEY_ID: &str = "thawtestroot";
const SECRET_ACCESS_KEY: &str = "thawtestsecret-0000000000000001";

/// Runs the command after its first two arguments (log file, directory) until a line
/// arrives on stdin or stdin closes; then kills it, and removes the directory unless that
/// line was `keep` (a `stop()` that a `start_again()` will follow).
const WRAPPER: &str = r#"
log=$1; dir=$2; shift 2
"$@" >>"$log" 2>&1 &
m=$!
read -r cmd
kill -9 "$m" 2>/dev/null
wait "$m" 2>/dev/null
if [ "$cmd" != keep ]; then rm -rf "$dir"; fi
"#;

/// The `minio` binary: `$THAW_MINIO`, else the one scripts/install-test-deps.sh builds into
/// `~/.cache/thaw-tools/minio-<version>/`, else `minio` on `PATH`.
pub(crate) fn minio_binary() -> PathBuf {
    find_minio_binary().unwrap_or_else(|| {
        panic!(
            "the S3 tests need MinIO {MINIO_VERSION} and no `minio` binary was found \
             (THAW_MINIO, ~/.cache/thaw-tools/minio-{MINIO_VERSION}/minio, PATH): \
             run scripts/install-test-deps.sh"
        )
    })
}

/// [`minio_binary`], or `None` when there is none.
pub(crate) fn find_minio_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("THAW_MINIO") {
        return Some(PathBuf::from(p));
    }
    let cached = std::env::var_os("HOME").map(|home| {
        PathBuf::from(home).join(".cache/thaw-tools").join(format!("minio-{MINIO_VERSION}")).join("minio")
    });
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join("minio")).collect::<Vec<_>>())
        .unwrap_or_default();
    cached.into_iter().chain(on_path).find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind ephemeral port")
        .local_addr()
        .expect("addr")
        .port()
}

/// One `minio server` process under its wrapper: the arguments to start it with, the
/// directory it owns, and its log.
struct Process {
    name: String,
    dir: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    args: Vec<String>,
    wrapper: Option<(Child, ChildStdin)>,
}

impl Process {
    /// A process of a server listening on `addr` (and its console on `console`), serving
    /// `drives`; `dir` holds its log and is removed with it.
    fn new(name: String, dir: PathBuf, addr: SocketAddr, console: SocketAddr, drives: Vec<String>) -> Self {
        let mut args = vec![
            "server".to_owned(),
            "--quiet".to_owned(),
            "--address".to_owned(),
            addr.to_string(),
            "--console-address".to_owned(),
            console.to_string(),
            // Without it MinIO creates ~/.minio/certs.
            "--certs-dir".to_owned(),
            dir.join("certs").display().to_string(),
        ];
        args.extend(drives);
        let log = dir.join("minio.log");
        Self { name, dir, log, addr, args, wrapper: None }
    }

    fn spawn(&mut self) {
        assert!(self.wrapper.is_none(), "{} is already running", self.name);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg("minio-wrapper")
            .arg(&self.log)
            .arg(&self.dir)
            .arg(minio_binary())
            .args(&self.args)
            .env("MINIO_ROOT_USER", ACCESS_KEY_ID)
            .env("MINIO_ROOT_PASSWORD", SECRET_ACCESS_KEY)
            .env("MINIO_BROWSER", "off")
            .env("MINIO_UPDATE", "off")
            // Lets drives live on the root filesystem (distributed MinIO refuses that otherwise).
            .env("MINIO_CI_CD", "1")
            // Inside a container (`/.dockerenv`) distributed MinIO waits forever for endpoints
            // on a loopback address to "resolve to a valid IP"; this names the node's own
            // endpoint so it starts (the other nodes' stay remote). Ignored outside containers.
            .env("_MINIO_SERVER_LOCAL", self.addr.to_string())
            .env_remove("MINIO_REGION")
            .env_remove("MINIO_SITE_REGION")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for the MinIO wrapper");
        let stdin = child.stdin.take().expect("piped stdin");
        self.wrapper = Some((child, stdin));
    }

    fn is_running(&self) -> bool {
        self.wrapper.is_some()
    }

    /// Panics with the log when the process has exited.
    fn check_alive(&mut self, what: &str) {
        if let Some((child, _)) = &mut self.wrapper {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{} exited while {what} ({status}); its log:\n{}", self.name, self.log_text());
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL (an S3 server that vanishes), keeping its directory.
    fn kill_keep(&mut self) {
        if let Some((mut child, mut stdin)) = self.wrapper.take() {
            let _ = stdin.write_all(b"keep\n");
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Kills it and removes its directory.
    fn kill_remove(&mut self) {
        if let Some((mut child, stdin)) = self.wrapper.take() {
            drop(stdin);
            let _ = child.wait();
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Waits until `GET path` answers 200 (MinIO's health endpoints need no credentials).
    fn wait_for(&mut self, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if http_status(self.addr, path) == Some(200) {
                return;
            }
            self.check_alive("starting");
            assert!(
                Instant::now() < deadline,
                "{} did not answer {path} with 200 in {timeout:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One single-drive MinIO server.
pub(crate) struct Minio {
    process: Process,
}

impl Minio {
    /// Starts a fresh MinIO, waits until it serves, and creates [`BUCKET`].
    pub(crate) fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("thaw-minio-").tempdir().expect("temp dir").keep();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let console = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let drive = dir.join("data").display().to_string();
        let mut me = Self { process: Process::new("MinIO".to_owned(), dir, addr, console, vec![drive]) };
        me.process.spawn();
        me.process.wait_for("/minio/health/ready", Duration::from_secs(60));
        create_bucket(addr);
        me
    }

    /// The MinIO shared by every test of this test binary, started on first use. Its
    /// prefix is the caller's business: use [`unique_prefix`] per test.
    pub(crate) fn shared() -> &'static Minio {
        static SHARED: OnceLock<Minio> = OnceLock::new();
        SHARED.get_or_init(Minio::start)
    }

    /// MinIO's log so far.
    pub(crate) fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Kills MinIO (SIGKILL: an S3 server that vanishes), keeping its data for [`start_again`].
    ///
    /// [`start_again`]: Minio::start_again
    pub(crate) fn stop(&mut self) {
        self.process.kill_keep();
    }

    /// Starts a stopped MinIO again on the same ports and data, and waits until it serves.
    pub(crate) fn start_again(&mut self) {
        self.process.spawn();
        self.process.wait_for("/minio/health/ready", Duration::from_secs(60));
        wait_for_bucket(self.process.addr, Duration::from_secs(60));
    }

    /// `http://127.0.0.1:PORT` of the S3 API.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.process.addr)
    }

    /// The S3 API's address.
    pub(crate) fn s3_addr(&self) -> SocketAddr {
        self.process.addr
    }

    /// The `AWS_*` variables that point the registry (`open_objects`) at this MinIO
    /// through `endpoint`.
    pub(crate) fn env_for(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        env_for(endpoint)
    }

    /// [`Minio::env_for`] its own endpoint.
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        self.env_for(&self.endpoint())
    }

    /// Sets [`Minio::env`] in this process, for registries started in-process. Done once
    /// per process: every in-process registry of the test binary uses this MinIO.
    pub(crate) fn export_env(&'static self) {
        static EXPORTED: OnceLock<()> = OnceLock::new();
        EXPORTED.get_or_init(|| {
            for (k, v) in self.env() {
                std::env::set_var(k, v);
            }
            std::env::remove_var("AWS_SESSION_TOKEN");
        });
    }

    /// `s3://BUCKET/<prefix>`.
    pub(crate) fn storage_url(&self, prefix: &str) -> String {
        storage_url(prefix)
    }

    /// A client for the bucket, for tests that look at (or tamper with) what is stored.
    /// Make one per runtime: its connection pool belongs to the runtime that uses it.
    pub(crate) fn client(&self) -> Arc<dyn ObjectStore> {
        client_for(&self.endpoint())
    }
}

impl Drop for Minio {
    fn drop(&mut self) {
        self.process.kill_remove();
    }
}

/// Distributed MinIO: `nodes` server processes on loopback, each with `drives_per_node`
/// drives of its own, forming one erasure set over all the drives (MinIO's default parity
/// for it). Every node serves the whole bucket.
pub(crate) struct MinioCluster {
    nodes: Vec<Process>,
    /// Each node's drive directories.
    drives: Vec<Vec<PathBuf>>,
}

impl MinioCluster {
    /// Starts the cluster, waits until every node serves, and creates [`BUCKET`].
    pub(crate) fn start(nodes: usize, drives_per_node: usize) -> Self {
        let root = tempfile::Builder::new().prefix("thaw-minio-cluster-").tempdir().expect("temp dir").keep();
        let addrs: Vec<SocketAddr> =
            (0..nodes).map(|_| SocketAddr::from(([127, 0, 0, 1], free_port()))).collect();
        let drive_dirs: Vec<Vec<PathBuf>> = (0..nodes)
            .map(|n| (0..drives_per_node).map(|d| root.join(format!("node{n}/drive{d}"))).collect())
            .collect();
        // Every node is told every drive of the cluster, as `http://host:port/path`; each
        // serves the ones whose host:port is its own address.
        let drives: Vec<String> = addrs
            .iter()
            .zip(&drive_dirs)
            .flat_map(|(addr, dirs)| dirs.iter().map(move |d| format!("http://{addr}{}", d.display())))
            .collect();
        let mut processes: Vec<Process> = addrs
            .iter()
            .enumerate()
            .map(|(n, &addr)| {
                let dir = root.join(format!("node{n}"));
                std::fs::create_dir_all(&dir).expect("node directory");
                let console = SocketAddr::from(([127, 0, 0, 1], free_port()));
                Process::new(format!("MinIO node {n}"), dir, addr, console, drives.clone())
            })
            .collect();
        for p in &mut processes {
            p.spawn();
        }
        // Nodes wait for each other (and format the drives together) before they serve.
        for p in &mut processes {
            p.wait_for("/minio/health/ready", Duration::from_secs(120));
        }
        let me = Self { nodes: processes, drives: drive_dirs };
        create_bucket(me.nodes[0].addr);
        for p in &me.nodes {
            wait_for_bucket(p.addr, Duration::from_secs(60));
        }
        me
    }

    /// How many nodes the cluster has.
    pub(crate) fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `http://127.0.0.1:PORT` of node `n`'s S3 API.
    pub(crate) fn endpoint(&self, n: usize) -> String {
        format!("http://{}", self.nodes[n].addr)
    }

    /// Node `n`'s S3 API address.
    pub(crate) fn s3_addr(&self, n: usize) -> SocketAddr {
        self.nodes[n].addr
    }

    /// Node `n`'s drive directories (MinIO keeps object `KEY` of a bucket at
    /// `DRIVE/BUCKET/KEY/xl.meta`).
    pub(crate) fn drive_dirs(&self, n: usize) -> Vec<PathBuf> {
        self.drives[n].clone()
    }

    /// Node `n`'s log so far.
    pub(crate) fn log_text(&self, n: usize) -> String {
        self.nodes[n].log_text()
    }

    /// Whether node `n` is running (not stopped).
    pub(crate) fn is_running(&self, n: usize) -> bool {
        self.nodes[n].is_running()
    }

    /// Kills node `n` (SIGKILL), keeping its drives for [`start_again`].
    ///
    /// [`start_again`]: MinioCluster::start_again
    pub(crate) fn stop(&mut self, n: usize) {
        self.nodes[n].kill_keep();
    }

    /// Starts stopped node `n` again on the same ports and drives and waits until it
    /// serves. MinIO then heals what was written while it was away.
    pub(crate) fn start_again(&mut self, n: usize) {
        self.nodes[n].spawn();
        self.nodes[n].wait_for("/minio/health/ready", Duration::from_secs(120));
        wait_for_bucket(self.nodes[n].addr, Duration::from_secs(120));
    }

    /// The HTTP status of node `n`'s cluster health check (`/minio/health/cluster`: 200
    /// when the cluster has write quorum), or `None` when the node does not answer.
    pub(crate) fn cluster_health(&self, n: usize) -> Option<u16> {
        http_status(self.nodes[n].addr, "/minio/health/cluster")
    }

    /// The `AWS_*` variables that point the registry at the cluster through `endpoint`.
    pub(crate) fn env_for(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        env_for(endpoint)
    }

    /// `s3://BUCKET/<prefix>`.
    pub(crate) fn storage_url(&self, prefix: &str) -> String {
        storage_url(prefix)
    }

    /// A client for the bucket through node `n`.
    pub(crate) fn client(&self, n: usize) -> Arc<dyn ObjectStore> {
        client_for(&self.endpoint(n))
    }
}

impl Drop for MinioCluster {
    fn drop(&mut self) {
        for p in &mut self.nodes {
            p.kill_remove();
        }
        // The nodes' directories are under one root; remove what is left of it.
        if let Some(root) = self.nodes.first().and_then(|p| p.dir.parent()) {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

fn env_for(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT", endpoint.to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
        ("AWS_REGION", REGION.to_owned()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_owned()),
        ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false".to_owned()),
    ]
}

fn storage_url(prefix: &str) -> String {
    format!("s3://{BUCKET}/{prefix}")
}

fn client_for(endpoint: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_region(REGION)
            .with_bucket_name(BUCKET)
            .with_access_key_id(ACCESS_KEY_ID)
            .with_secret_access_key(SECRET_ACCESS_KEY)
            .build()
            .expect("S3 client for the test MinIO"),
    )
}

/// Creates [`BUCKET`] with a signed `PUT /BUCKET` (`object_store` has no bucket call; MinIO
/// has no option to create one at start), retrying while MinIO is still initializing (it
/// reports ready on `/minio/health/ready` before its S3 API is).
fn create_bucket(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = signed_request(addr, "PUT", &format!("/{BUCKET}"));
        // 409 BucketAlreadyOwnedByYou: a restarted node of a cluster, or a second call.
        if response.starts_with("HTTP/1.1 200") || response.contains("BucketAlreadyOwnedByYou") {
            return;
        }
        assert!(
            response.starts_with("HTTP/1.1 503") && Instant::now() < deadline,
            "MinIO refused to create bucket {BUCKET}:\n{response}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a signed `HEAD /BUCKET` answers 200: the S3 API serves the bucket.
fn wait_for_bucket(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let response = signed_request(addr, "HEAD", &format!("/{BUCKET}"));
        if response.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(Instant::now() < deadline, "MinIO did not serve bucket {BUCKET} in {timeout:?}:\n{response}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `METHOD path` with no body, signed with the root credentials, and returns the
/// whole response (empty when MinIO does not answer).
fn signed_request(addr: SocketAddr, method: &str, path: &str) -> String {
    let credential = AwsCredential {
        key_id: ACCESS_KEY_ID.to_owned(),
        secret_key: SECRET_ACCESS_KEY.to_owned(),
        token: None,
    };
    let mut request = object_store::client::HttpRequest::new(Vec::<u8>::new().into());
    *request.method_mut() = method.parse().expect("method");
    *request.uri_mut() = format!("http://{addr}{path}").parse().expect("URI");
    AwsAuthorizer::new(&credential, "s3", REGION).authorize(&mut request, None);
    let mut head = format!("{method} {path} HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n");
    for (name, value) in request.headers() {
        head.push_str(&format!("{}: {}\r\n", name.as_str(), value.to_str().expect("ASCII header")));
    }
    head.push_str("\r\n");
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    if s.write_all(head.as_bytes()).is_err() {
        return String::new();
    }
    let mut response = Vec::new();
    // A HEAD response has no body: stop at the end of the head rather than wait for close.
    let mut byte = [0u8; 1];
    while s.read(&mut byte).is_ok_and(|n| n == 1) {
        response.push(byte[0]);
        if method == "HEAD" && response.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

/// A key prefix no other test (of this or any concurrent test process) uses.
pub(crate) fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{tag}-{}-{}-{nanos:x}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Every key under `prefix` in `store`, sorted.
pub(crate) async fn list_keys(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let prefix = object_store::path::Path::from(prefix);
    let mut keys: Vec<String> = store
        .list(Some(&prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .expect("list bucket");
    keys.sort();
    keys
}

/// The status of `GET path` on `addr`, or `None` when nothing answers.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
