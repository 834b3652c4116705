//! Shared by the client tests: registries to talk to (in-process thaw-registry, Debian's
//! `docker-registry` as a child process), realistic snapshot files, and file comparisons.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use thaw_client::{ClientOptions, Reference, Registry, RetryPolicy, Stats};
use thaw_registry::{RegistryConfig, RunningRegistry};

pub const PAGE: usize = 4096;

/// A thaw-registry on 127.0.0.1 with its storage in a temporary directory.
pub struct ThawRegistry {
    pub running: RunningRegistry,
    _storage: TempDir,
}

impl ThawRegistry {
    pub async fn start() -> Self {
        let storage = tempfile::tempdir().unwrap();
        let config = RegistryConfig::new("127.0.0.1:0".parse().unwrap(), storage.path().to_str().unwrap());
        let running = thaw_registry::spawn(config).await.expect("starting thaw-registry");
        Self { running, _storage: storage }
    }

    pub fn host(&self) -> String {
        self.running.addr().to_string()
    }
}

/// Debian's `docker-registry` (distribution 2.8) serving a temporary directory; killed on drop.
pub struct DockerRegistry {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl DockerRegistry {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry must be installed (Debian package docker-registry)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start listening on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr, _dir: dir }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Options for a plain-HTTP test registry, with quick retries and no credentials file.
pub fn test_options() -> ClientOptions {
    ClientOptions {
        plain_http: true,
        docker_config: Some(PathBuf::from("/nonexistent/thaw-test/config.json")),
        retry: RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
        },
        ..ClientOptions::default()
    }
}

/// A client for `reference`'s registry with fresh counters.
pub fn client_for(reference: &Reference) -> Registry {
    Registry::for_reference(reference, &test_options(), Arc::new(Stats::new())).unwrap()
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let w = self.next().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

/// A page of program-text-like bytes (compressible, distinct per `n`).
pub fn text_page(n: u64) -> Vec<u8> {
    let line = format!("def handler_{n}(event, context):\n    return {{'ok': True, 'n': {n}}}\n");
    line.bytes().cycle().take(PAGE).collect()
}

/// Guest memory of `pages` pages, like the real thing: ~40% zero pages in runs, pages from
/// a pool shared by every snapshot (kernel, runtime), program text, and unique pages.
pub fn memory_image(pages: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut pool_rng = Rng::new(0x9001); // the same pool for every seed
    let pool: Vec<Vec<u8>> = (0..256)
        .map(|_| {
            let mut p = vec![0u8; PAGE];
            pool_rng.fill(&mut p);
            p
        })
        .collect();
    let mut memory = vec![0u8; pages * PAGE];
    let mut page = 0;
    while page < pages {
        let run = 1 + rng.below(48) as usize;
        let kind = rng.below(20);
        for p in page..(page + run).min(pages) {
            let dst = &mut memory[p * PAGE..(p + 1) * PAGE];
            match kind {
                0..=7 => {}
                8..=13 => dst.copy_from_slice(&pool[rng.below(pool.len() as u64) as usize]),
                14..=16 => dst.copy_from_slice(&text_page(rng.below(1000))),
                _ => rng.fill(dst),
            }
        }
        page += run;
    }
    memory
}

/// A disk image: mostly unwritten blocks, some data and text blocks.
pub fn disk_image(blocks: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut disk = vec![0u8; blocks * PAGE];
    disk[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
    for b in 1..blocks {
        let dst = &mut disk[b * PAGE..(b + 1) * PAGE];
        match rng.below(10) {
            0 => rng.fill(dst),
            1 => dst.copy_from_slice(&text_page(b as u64)),
            _ => {}
        }
    }
    disk
}

/// The four files of a snapshot.
pub struct SnapshotData {
    pub memory: Vec<u8>,
    pub vmstate: Vec<u8>,
    pub disk: Vec<u8>,
    pub info: Vec<u8>,
}

pub const NAMES: [&str; 4] = ["memory", "vmstate", "disk.ext4", "info.json"];

impl SnapshotData {
    pub fn new(memory_pages: usize, disk_blocks: usize, seed: u64) -> Self {
        let mut vmstate = vec![0u8; 48 * 1024];
        Rng::new(seed ^ 0x5eed).fill(&mut vmstate);
        let memory = memory_image(memory_pages, seed);
        let disk = disk_image(disk_blocks, seed ^ 0xd15c);
        let info = format!(
            "{{\"function\":\"hello\",\"revision\":\"hello-{seed:05}\",\"memory_bytes\":{}}}\n",
            memory.len()
        )
        .into_bytes();
        Self { memory, vmstate, disk, info }
    }

    pub fn files(&self) -> [(&'static str, &[u8]); 4] {
        [
            ("memory", &self.memory),
            ("vmstate", &self.vmstate),
            ("disk.ext4", &self.disk),
            ("info.json", &self.info),
        ]
    }

    pub fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, data) in self.files() {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}

/// Asserts that `dir` holds exactly the snapshot's files with the same bytes.
pub fn assert_same_files(data: &SnapshotData, dir: &Path) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected, "files in {}", dir.display());
    for (name, bytes) in data.files() {
        let got = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(got.len(), bytes.len(), "{name}: size");
        assert!(got == bytes, "{name}: content differs");
    }
}

/// Bytes allocated on disk for a file (holes are free).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Bytes of `data` in aligned all-zero pages.
pub fn zero_page_bytes(data: &[u8]) -> u64 {
    data.chunks(PAGE).filter(|p| p.iter().all(|&b| b == 0)).map(|p| p.len() as u64).sum()
}

/// The entries of a directory (names), for "nothing was left behind" checks.
pub fn entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A request as the raw test server saw it.
pub struct RawRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A response for the raw test server to write, byte for byte.
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Content-Length to declare when it should not be the body's length (a lie).
    pub declared: Option<usize>,
}

pub type RawHandler = Arc<dyn Fn(&RawRequest) -> RawResponse + Send + Sync>;

/// An HTTP/1.1 server written by hand over a TcpListener, one request per connection, so a
/// test controls every byte (lying lengths, cut bodies). Returns `127.0.0.1:PORT`.
pub async fn serve_raw(handler: RawHandler) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let head_end = loop {
                    let mut piece = [0u8; 4096];
                    let n = match sock.read(&mut piece).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&piece[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let mut lines = head.lines();
                let mut first = lines.next().unwrap_or_default().split(' ');
                let method = first.next().unwrap_or_default().to_owned();
                let path = first.next().unwrap_or_default().to_owned();
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .collect();
                let mut request = RawRequest { method, path, headers, body: buf[head_end..].to_vec() };
                let length: usize = request.header("content-length").map_or(0, |v| v.parse().unwrap_or(0));
                while request.body.len() < length {
                    let mut piece = vec![0u8; 64 * 1024];
                    match sock.read(&mut piece).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.body.extend_from_slice(&piece[..n]),
                    }
                }
                let lengths =
                    request.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).count();
                let r = if lengths > 1 {
                    RawResponse {
                        status: 400,
                        headers: vec![],
                        body: b"duplicate content-length".to_vec(),
                        declared: None,
                    }
                } else {
                    handler(&request)
                };
                let mut out = format!(
                    "HTTP/1.1 {} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                    r.status,
                    r.declared.unwrap_or(r.body.len())
                );
                for (k, v) in &r.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                let _ = sock.write_all(out.as_bytes()).await;
                if request.method != "HEAD" {
                    let _ = sock.write_all(&r.body).await;
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    addr.to_string()
}
