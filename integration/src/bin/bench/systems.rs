//! The three systems the benchmark compares, each behind a byte-counting [`Proxy`]:
//!
//! - **thaw**: the real `thaw-registry` binary on filesystem storage, driven by the real
//!   `thaw` CLI (`push`, `pull [--seed]`);
//! - **oras**: Debian's `docker-registry` (distribution 2.8) on filesystem storage, driven by
//!   oras-py through `integration/scripts/oras_roundtrip.py`;
//! - **s3**: the four snapshot files PUT and GET whole on MinIO, the reference system's
//!   way (multipart with 16 MiB parts above 16 MiB, as minio-go does), with `object_store`.
//!
//! Every system starts empty for each repetition and serves only loopback.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use thaw_integration::corpus::Snapshot;

use crate::link::Net;
use crate::proxy::{Proxy, Wire};

/// Part size of the reference system's multipart uploads.
const S3_PART: usize = 16 << 20;
/// One client invocation may take this long before it is killed and the run fails.
const CLIENT_DEADLINE: Duration = Duration::from_secs(600);

/// One measured operation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Wall time of the whole client operation, in seconds.
    pub(crate) secs: f64,
    /// Bytes on the wire, counted by the proxy in front of the server.
    pub(crate) wire: Wire,
    /// The client's own byte counters, where it reports them (thaw's `--json`).
    pub(crate) client: Option<Wire>,
}

/// Which system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Thaw,
    Oras,
    S3,
}

impl Kind {
    pub(crate) const ALL: [Kind; 3] = [Kind::Thaw, Kind::Oras, Kind::S3];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Thaw => "thaw",
            Kind::Oras => "oras-py + docker-registry",
            Kind::S3 => "S3 whole files (MinIO)",
        }
    }

    pub(crate) fn short(self) -> &'static str {
        match self {
            Kind::Thaw => "thaw",
            Kind::Oras => "oras",
            Kind::S3 => "S3",
        }
    }
}

/// What every system can do.
pub(crate) trait System {
    /// Stores one snapshot under `function:revision`.
    fn push(&mut self, snap: &Snapshot) -> Result<Sample>;
    /// Restores `snap` into `dst` (absent or empty); `seed` is the previous revision's
    /// directory on this node, used by systems that can use it.
    fn pull(&mut self, snap: &Snapshot, dst: &Path, seed: Option<&Path>) -> Result<Sample>;
    /// Bytes the server stores now (file lengths, or object sizes in the bucket).
    fn stored_bytes(&mut self) -> Result<u64>;
}

/// A child process killed (and reaped) when dropped.
pub(crate) struct Daemon {
    child: std::process::Child,
    what: String,
}

impl Daemon {
    pub(crate) fn spawn(mut cmd: Command, what: &str, log: &Path) -> Result<Self> {
        let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {what} ({cmd:?})"))?;
        Ok(Self { child, what: what.to_owned() })
    }

    /// Waits until `addr` accepts connections, failing if the process exits first.
    pub(crate) fn wait_listening(&mut self, addr: SocketAddr, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited while starting ({status}); its log:\n{}",
                    self.what,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            ensure!(Instant::now() < deadline, "{} did not listen on {addr} within 30 s", self.what);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A port free on the host's loopback, used for daemons in the link's namespace too (where
/// nothing else listens).
pub(crate) fn free_port() -> Result<u16> {
    Ok(free_addr()?.port())
}

/// Runs a client to completion (killed after [`CLIENT_DEADLINE`]); returns its stdout and
/// the wall time. Fails with its output if it exits non-zero.
fn run_client(mut cmd: Command) -> Result<(Vec<u8>, f64)> {
    let shown = format!("{cmd:?}");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    // Read both pipes on threads so a chatty client never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > CLIENT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {CLIENT_DEADLINE:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let secs = started.elapsed().as_secs_f64();
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    ensure!(
        status.success(),
        "{shown} failed ({status})\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&stdout).trim_end(),
        String::from_utf8_lossy(&stderr).trim_end()
    );
    Ok((stdout, secs))
}

/// Waits a moment for the proxy's pipe threads to count the last bytes of a finished
/// exchange, then returns the traffic since `before`.
pub(crate) fn wire_since(proxy: &Proxy, before: Wire) -> Wire {
    std::thread::sleep(Duration::from_millis(50));
    proxy.wire().since(before)
}

/// Sum of the lengths of the regular files under `dir`.
pub(crate) fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

pub(crate) fn reference(proxy: &Proxy, snap: &Snapshot) -> String {
    format!("{}/bench/{}:{}", proxy.addr(), snap.function, snap.revision)
}

// ---------------------------------------------------------------------------------------
// thaw
// ---------------------------------------------------------------------------------------

pub(crate) struct Thaw {
    _server: Daemon,
    proxy: Proxy,
    storage: PathBuf,
    cli: PathBuf,
    net: Net,
}

impl Thaw {
    pub(crate) fn start(registry_bin: &Path, cli: &Path, dir: &Path, net: &Net) -> Result<Self> {
        let storage = dir.join("storage");
        let uploads = dir.join("uploads");
        std::fs::create_dir_all(&storage)?;
        std::fs::create_dir_all(&uploads)?;
        let addr = free_addr()?;
        let log = dir.join("thaw-registry.log");
        let mut cmd = Command::new(registry_bin);
        cmd.arg("--listen").arg(addr.to_string()).arg("--storage").arg(&storage);
        cmd.env("THAW_UPLOAD_DIR", &uploads).env_remove("THAW_LISTEN").env_remove("THAW_STORAGE");
        let mut server = Daemon::spawn(cmd, "thaw-registry", &log)?;
        server.wait_listening(addr, &log)?;
        Ok(Self {
            _server: server,
            proxy: Proxy::start(net.server_ip, addr)?,
            storage,
            cli: cli.to_owned(),
            net: net.clone(),
        })
    }

    /// The byte-counting proxy in front of the registry, for the node-side scenarios.
    pub(crate) fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    fn cli(&self) -> Command {
        let mut cmd = self.net.command(&self.cli);
        cmd.args(["--plain-http", "--json", "--quiet"]);
        for var in ["THAW_CACHE", "THAW_REGISTRY", "THAW_LOG", "DOCKER_CONFIG"] {
            cmd.env_remove(var);
        }
        cmd
    }

    fn run(&self, cmd: Command) -> Result<Sample> {
        let before = self.proxy.wire();
        let (stdout, secs) = run_client(cmd)?;
        let wire = wire_since(&self.proxy, before);
        let report: serde_json::Value =
            serde_json::from_slice(&stdout).context("thaw --json printed no JSON report")?;
        let stats = &report["stats"];
        let client = match (stats["bytes_sent"].as_u64(), stats["bytes_received"].as_u64()) {
            (Some(up), Some(down)) => Some(Wire { up, down }),
            _ => None,
        };
        Ok(Sample { secs, wire, client })
    }
}

impl System for Thaw {
    fn push(&mut self, snap: &Snapshot) -> Result<Sample> {
        let mut cmd = self.cli();
        cmd.arg("push").arg(reference(&self.proxy, snap)).arg(&snap.dir);
        self.run(cmd)
    }

    fn pull(&mut self, snap: &Snapshot, dst: &Path, seed: Option<&Path>) -> Result<Sample> {
        let mut cmd = self.cli();
        cmd.arg("pull");
        if let Some(seed) = seed {
            cmd.arg("--seed").arg(seed);
        }
        cmd.arg(reference(&self.proxy, snap)).arg(dst);
        self.run(cmd)
    }

    fn stored_bytes(&mut self) -> Result<u64> {
        dir_bytes(&self.storage)
    }
}

// ---------------------------------------------------------------------------------------
// oras-py + docker-registry
// ---------------------------------------------------------------------------------------

pub(crate) struct Oras {
    _server: Daemon,
    proxy: Proxy,
    data: PathBuf,
    python: String,
    script: PathBuf,
    net: Net,
}

impl Oras {
    pub(crate) fn start(python: &str, script: &Path, dir: &Path, net: &Net) -> Result<Self> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let addr = free_addr()?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  \
                 filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                data.display()
            ),
        )?;
        let log = dir.join("docker-registry.log");
        let mut cmd = Command::new("/usr/bin/docker-registry");
        cmd.arg("serve").arg(&config);
        let mut server = Daemon::spawn(cmd, "docker-registry", &log)?;
        server.wait_listening(addr, &log)?;
        Ok(Self {
            _server: server,
            proxy: Proxy::start(net.server_ip, addr)?,
            data,
            python: python.to_owned(),
            script: script.to_owned(),
            net: net.clone(),
        })
    }

    fn script(&self, command: &str, snap: &Snapshot) -> Command {
        let mut cmd = self.net.command(&self.python);
        cmd.arg(&self.script)
            .arg(command)
            .arg("--registry")
            .arg(self.proxy.addr().to_string())
            .arg("--target")
            .arg(format!("bench/{}:{}", snap.function, snap.revision));
        cmd
    }

    fn run(&self, cmd: Command) -> Result<Sample> {
        let before = self.proxy.wire();
        let (_, secs) = run_client(cmd)?;
        Ok(Sample { secs, wire: wire_since(&self.proxy, before), client: None })
    }
}

impl System for Oras {
    fn push(&mut self, snap: &Snapshot) -> Result<Sample> {
        let mut cmd = self.script("push", snap);
        cmd.arg("--src").arg(&snap.dir);
        self.run(cmd)
    }

    fn pull(&mut self, snap: &Snapshot, dst: &Path, _seed: Option<&Path>) -> Result<Sample> {
        let mut cmd = self.script("pull", snap);
        cmd.arg("--dst").arg(dst);
        self.run(cmd)
    }

    fn stored_bytes(&mut self) -> Result<u64> {
        dir_bytes(&self.data)
    }
}

// ---------------------------------------------------------------------------------------
// S3 whole files on MinIO
// ---------------------------------------------------------------------------------------

pub(crate) struct S3 {
    /// This benchmark binary: the S3 client runs as `bench s3-client …`, a process like
    /// the other clients, in the network namespace when there is one.
    exe: PathBuf,
    proxy: Arc<Proxy>,
    env: Vec<(&'static str, String)>,
    bucket: String,
    prefix: String,
    net: Net,
}

impl S3 {
    /// The reference client for `bucket` through `proxy`, with MinIO's `AWS_*` settings in
    /// `env`, keeping every key under `prefix`.
    pub(crate) fn new(
        proxy: Arc<Proxy>,
        env: Vec<(&'static str, String)>,
        bucket: &str,
        prefix: String,
        net: &Net,
    ) -> Result<Self> {
        let exe = std::env::current_exe()?;
        Ok(Self { exe, proxy, env, bucket: bucket.to_owned(), prefix, net: net.clone() })
    }

    fn client(&self, verb: &str, snap: &Snapshot, dir: &Path) -> Command {
        let mut cmd = self.net.command(&self.exe);
        cmd.arg("s3-client")
            .arg(verb)
            .arg(format!("http://{}", self.proxy.addr()))
            .arg(&self.bucket)
            .arg(format!("{}/{}/{}", self.prefix, snap.function, snap.revision))
            .arg(dir)
            .arg(&snap.dir);
        for (k, v) in &self.env {
            if !matches!(*k, "AWS_ENDPOINT") {
                cmd.env(k, v);
            }
        }
        cmd
    }

    fn run(&self, cmd: Command) -> Result<Sample> {
        let before = self.proxy.wire();
        let (_, secs) = run_client(cmd)?;
        Ok(Sample { secs, wire: wire_since(&self.proxy, before), client: None })
    }
}

/// `bench s3-client put|get ENDPOINT BUCKET PREFIX DIR NAMES_FROM`: the reference system's
/// client. `put` uploads every file of DIR to `PREFIX/<name>` (one PUT up to 16 MiB,
/// multipart with 16 MiB parts, 4 in flight, above); `get` downloads the keys named by the
/// files of NAMES_FROM into DIR, streaming to disk. Credentials and region from `AWS_*`.
pub(crate) fn s3_client_main(args: &[String]) -> Result<()> {
    let [verb, endpoint, bucket, prefix, dir, names_from] = args else {
        bail!("usage: bench s3-client put|get ENDPOINT BUCKET PREFIX DIR NAMES_FROM");
    };
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set"));
    let store: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_region(var("AWS_REGION")?)
            .with_bucket_name(bucket)
            .with_access_key_id(var("AWS_ACCESS_KEY_ID")?)
            .with_secret_access_key(var("AWS_SECRET_ACCESS_KEY")?)
            .build()
            .context("S3 client")?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (dir, names) = (Path::new(dir), snapshot_files(Path::new(names_from))?);
    std::fs::create_dir_all(dir)?;
    for name in names {
        let key = Key::from(format!("{prefix}/{name}"));
        let path = dir.join(&name);
        let store = store.clone();
        match verb.as_str() {
            "put" => rt.block_on(async move {
                let data =
                    Bytes::from(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
                if data.len() <= S3_PART {
                    store.put(&key, PutPayload::from(data)).await?;
                } else {
                    let upload = store.put_multipart(&key).await?;
                    let mut w = WriteMultipart::new_with_chunk_size(upload, S3_PART);
                    for piece in data.chunks(S3_PART) {
                        w.wait_for_capacity(4).await?;
                        w.put(data.slice_ref(piece));
                    }
                    w.finish().await?;
                }
                anyhow::Ok(())
            })?,
            "get" => rt.block_on(async move {
                let mut stream = store.get(&key).await?.into_stream();
                let mut file = std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
                );
                while let Some(piece) = stream.next().await {
                    std::io::Write::write_all(&mut file, &piece?)?;
                }
                std::io::Write::flush(&mut file)?;
                anyhow::Ok(())
            })?,
            other => bail!("s3-client: unknown verb {other}"),
        }
    }
    Ok(())
}

/// Bytes stored under `prefix` in `bucket` (sizes of the objects), asked directly of MinIO.
pub(crate) fn s3_stored_bytes(env: &[(&'static str, String)], bucket: &str, prefix: &str) -> Result<u64> {
    let get = |k: &str| env.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone()).unwrap_or_default();
    let store = AmazonS3Builder::new()
        .with_endpoint(get("AWS_ENDPOINT"))
        .with_allow_http(true)
        .with_region(get("AWS_REGION"))
        .with_bucket_name(bucket)
        .with_access_key_id(get("AWS_ACCESS_KEY_ID"))
        .with_secret_access_key(get("AWS_SECRET_ACCESS_KEY"))
        .build()
        .context("S3 client for MinIO")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let prefix = Key::from(prefix);
    rt.block_on(async move {
        let mut total = 0;
        let mut list = store.list(Some(&prefix));
        while let Some(meta) = list.next().await {
            total += meta?.size;
        }
        anyhow::Ok(total)
    })
}

/// The regular files of a snapshot directory, by name.
pub(crate) fn snapshot_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.metadata()?.is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

impl System for S3 {
    fn push(&mut self, snap: &Snapshot) -> Result<Sample> {
        self.run(self.client("put", snap, &snap.dir))
    }

    fn pull(&mut self, snap: &Snapshot, dst: &Path, _seed: Option<&Path>) -> Result<Sample> {
        self.run(self.client("get", snap, dst))
    }

    fn stored_bytes(&mut self) -> Result<u64> {
        s3_stored_bytes(&self.env, &self.bucket, &self.prefix)
    }
}
