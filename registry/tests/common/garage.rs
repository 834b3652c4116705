//! A real S3 server for tests: a single-node Garage 2.5 on loopback, with its own temporary
//! metadata and data directories, free ports, one bucket and one key that can read and
//! write it.
//!
//! Garage is started through a small `sh` wrapper that holds the read end of a pipe from
//! this process: when the test process ends, however it ends, the pipe closes and the
//! wrapper kills Garage and removes its directory. So a Garage shared by a whole test
//! binary (a `static`, whose destructor never runs) does not outlive the tests.
//!
//! Garage 2.5 ignores `If-None-Match` on PUT; the registry does not rely on it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::ObjectStore;

/// The bucket every harness Garage creates.
pub(crate) const BUCKET: &str = "thaw-test";
/// The region Garage is configured with (clients must sign for it).
pub(crate) const REGION: &str = "garage";
/// The version the tests are written against (and the install script installs).
pub(crate) const GARAGE_VERSION: &str = "2.5.0";

const ACCESS_KEY_ID: &str = "GK7468617774657374000001";
const SECRET_ACCESS_KEY: &str = "7468617774657374736563726574000000000000000000000000000000000001";
const RPC_SECRET: &str = "7468617774657374727063000000000000000000000000000000000000000001";

/// Runs Garage until a line arrives on stdin or stdin closes; then kills it, and removes its
/// directory unless that line was `keep` (a `stop()` that a `start()` will follow).
const WRAPPER: &str = r#"
"$1" -c "$2" server --single-node --default-bucket >>"$3" 2>&1 &
g=$!
read -r cmd
kill -9 "$g" 2>/dev/null
wait "$g" 2>/dev/null
if [ "$cmd" != keep ]; then rm -rf "$4"; fi
"#;

/// One Garage server.
pub(crate) struct Garage {
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    s3: SocketAddr,
    wrapper: Option<(Child, ChildStdin)>,
}

/// The `garage` binary: `$THAW_GARAGE`, else `garage` on `PATH`, else `~/.cargo/bin/garage`.
pub(crate) fn garage_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("THAW_GARAGE") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("garage");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    match cargo_home.map(|h| h.join("bin").join("garage")) {
        Some(p) if p.is_file() => p,
        _ => panic!(
            "the S3 tests need Garage {GARAGE_VERSION} and no `garage` binary was found \
             (THAW_GARAGE, PATH, ~/.cargo/bin): run scripts/install-test-deps.sh"
        ),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind ephemeral port")
        .local_addr()
        .expect("addr")
        .port()
}

impl Garage {
    /// Starts a fresh Garage and waits until its S3 API answers.
    pub(crate) fn start() -> Self {
        let bin = garage_binary();
        let dir = tempfile::Builder::new().prefix("thaw-garage-").tempdir().expect("temp dir").keep();
        let (s3_port, rpc_port) = (free_port(), free_port());
        let config = dir.join("garage.toml");
        let text = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "lmdb"
replication_factor = 1
metadata_fsync = false
data_fsync = false
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{RPC_SECRET}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
"#,
            meta = dir.join("meta").display(),
            data = dir.join("data").display(),
        );
        std::fs::write(&config, text).expect("write garage.toml");
        // Garage refuses a config file that others can read (it holds the RPC secret).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))
                .expect("chmod garage.toml");
        }
        let log = dir.join("garage.log");
        let mut me =
            Self { dir, config, log, s3: SocketAddr::from(([127, 0, 0, 1], s3_port)), wrapper: None };
        me.spawn(&bin);
        me
    }

    /// The Garage shared by every test of this test binary, started on first use. Its
    /// prefix is the caller's business: use [`unique_prefix`] per test.
    pub(crate) fn shared() -> &'static Garage {
        static SHARED: OnceLock<Garage> = OnceLock::new();
        SHARED.get_or_init(Garage::start)
    }

    fn spawn(&mut self, bin: &Path) {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg("garage-wrapper")
            .arg(bin)
            .arg(&self.config)
            .arg(&self.log)
            .arg(&self.dir)
            .env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY_ID)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_ACCESS_KEY)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for the Garage wrapper");
        let stdin = child.stdin.take().expect("piped stdin");
        self.wrapper = Some((child, stdin));
        self.wait_ready();
    }

    /// Waits until the S3 API answers an anonymous request: Garage creates the layout, key
    /// and bucket before it opens the S3 port.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Anonymous requests are refused (403) once the API serves; a 5xx means not yet.
            if http_status(self.s3).is_some_and(|status| status < 500) {
                return;
            }
            if let Some((child, _)) = &mut self.wrapper {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("Garage exited while starting ({status}); its log:\n{}", self.log_text());
                }
            }
            assert!(
                Instant::now() < deadline,
                "Garage did not open its S3 port in 60 s; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Garage's log so far.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills Garage (SIGKILL: an S3 server that vanishes), keeping its data for [`start_again`].
    ///
    /// [`start_again`]: Garage::start_again
    pub(crate) fn stop(&mut self) {
        if let Some((mut child, mut stdin)) = self.wrapper.take() {
            let _ = stdin.write_all(b"keep\n");
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts a stopped Garage again on the same ports and data.
    pub(crate) fn start_again(&mut self) {
        assert!(self.wrapper.is_none(), "Garage is already running");
        self.spawn(&garage_binary());
    }

    /// `http://127.0.0.1:PORT` of the S3 API.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.s3)
    }

    /// The S3 API's address.
    pub(crate) fn s3_addr(&self) -> SocketAddr {
        self.s3
    }

    /// The `AWS_*` variables that point the registry (`open_objects`) at this Garage
    /// through `endpoint`.
    pub(crate) fn env_for(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", endpoint.to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_owned()),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false".to_owned()),
        ]
    }

    /// [`Garage::env_for`] its own endpoint.
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        self.env_for(&self.endpoint())
    }

    /// Sets [`Garage::env`] in this process, for registries started in-process. Done once
    /// per process: every in-process registry of the test binary uses this Garage.
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
        format!("s3://{BUCKET}/{prefix}")
    }

    /// A client for the bucket, for tests that look at (or tamper with) what is stored.
    /// Make one per runtime: its connection pool belongs to the runtime that uses it.
    pub(crate) fn client(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_region(REGION)
                .with_bucket_name(BUCKET)
                .with_access_key_id(ACCESS_KEY_ID)
                .with_secret_access_key(SECRET_ACCESS_KEY)
                .build()
                .expect("S3 client for the test Garage"),
        )
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.wrapper.take() {
            drop(stdin);
            let _ = child.wait();
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
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

/// The status of `GET /` on `addr`, or `None` when nothing answers.
fn http_status(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
