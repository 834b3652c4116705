//! Shared by the interop tests: an in-process thaw-registry on a temporary directory, real
//! client processes run with a deadline, and deterministic snapshot-like test data.
//!
//! Every `tests/*.rs` file is its own crate and uses part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use thaw_registry::{RegistryConfig, RunningRegistry};
use tokio::process::Command;

/// What to do when a real client is missing. The interop tests fail rather than skip.
pub(crate) const INSTALL_HINT: &str =
    "run `scripts/install-test-deps.sh` (as root) to install the real OCI clients the interop tests drive";

/// How long one client invocation may take before the test fails (and the process is killed).
/// oras-py retries failed requests with sleeps of 3 s, 5 s, 11 s, …, so a registry that
/// resets connections shows up as a timeout rather than a hang.
pub(crate) const CLIENT_DEADLINE: Duration = Duration::from_secs(240);

/// A thaw-registry serving plain HTTP on 127.0.0.1, storing into a directory that lives as
/// long as it does.
pub(crate) struct TestRegistry {
    running: RunningRegistry,
    _storage: TempDir,
}

impl TestRegistry {
    pub(crate) async fn start() -> Result<Self> {
        let listen: SocketAddr = "127.0.0.1:0".parse()?;
        let storage = tempfile::Builder::new().prefix("thaw-interop-registry-").tempdir()?;
        let running = thaw_registry::spawn(RegistryConfig {
            listen,
            storage: storage.path().to_str().context("temporary directory path is not UTF-8")?.to_owned(),
        })
        .await
        .with_context(|| format!("starting thaw-registry on {listen}"))?;
        Ok(Self { running, _storage: storage })
    }

    /// `127.0.0.1:PORT`, the registry part of a reference.
    pub(crate) fn host(&self) -> String {
        self.running.addr().to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        self.running.url()
    }

    pub(crate) async fn stop(self) {
        self.running.shutdown().await;
    }
}

/// Fails, with [`INSTALL_HINT`], unless `program args…` starts and exits 0.
pub(crate) async fn require_tool(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| anyhow!("`{program}` cannot be run ({e}): {INSTALL_HINT}"))?;
    ensure!(
        output.status.success(),
        "`{program} {}` failed ({}): {}\n{INSTALL_HINT}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Runs a client to completion within `deadline`, with no stdin, and fails with its full
/// output if it cannot start, exits non-zero or runs too long (it is killed then).
pub(crate) async fn run(mut cmd: Command, deadline: Duration) -> Result<Output> {
    let shown = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| anyhow!("cannot start {shown} ({e}): {INSTALL_HINT}"))?;
    let output = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{shown} did not finish within {deadline:?}; killed"))?
        .with_context(|| format!("waiting for {shown}"))?;
    if !output.status.success() {
        bail!(
            "{shown} failed ({})\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim_end(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    Ok(output)
}

/// `sha256:<hex>` of `bytes`, the OCI digest form.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The hex part of a `sha256:<hex>` digest.
pub(crate) fn digest_hex(digest: &str) -> Result<&str> {
    let hex = digest.strip_prefix("sha256:").with_context(|| format!("{digest:?} is not a sha256 digest"))?;
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{digest:?} is not a sha256 digest"
    );
    Ok(hex)
}

/// Fails unless `actual` holds exactly `expected`, naming the first differing byte.
pub(crate) fn ensure_same_bytes(what: &str, expected: &[u8], actual: &[u8]) -> Result<()> {
    if expected == actual {
        return Ok(());
    }
    let first =
        expected.iter().zip(actual).position(|(a, b)| a != b).unwrap_or(expected.len().min(actual.len()));
    bail!(
        "{what}: {} bytes expected, {} bytes read back, first difference at byte {first} \
         (expected {}, read back {})",
        expected.len(),
        actual.len(),
        sha256_digest(expected),
        sha256_digest(actual)
    )
}

/// Fails unless `dir_a/name` and `dir_b/name` hold the same bytes, for every name.
pub(crate) fn ensure_same_files(dir_a: &Path, dir_b: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let a = std::fs::read(dir_a.join(name))
            .with_context(|| format!("reading {}", dir_a.join(name).display()))?;
        let b = std::fs::read(dir_b.join(name))
            .with_context(|| format!("reading {}", dir_b.join(name).display()))?;
        ensure_same_bytes(name, &a, &b)?;
    }
    Ok(())
}

/// A small deterministic generator (xorshift64*): test data is the same on every run.
pub(crate) struct TestRng(u64);

impl TestRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.fill(&mut buf);
        buf
    }
}

/// One file of a Firecracker-style snapshot and its layer media type (DESIGN.md, "Names").
pub(crate) struct SnapshotFile {
    pub(crate) name: &'static str,
    pub(crate) media_type: &'static str,
}

pub(crate) const SNAPSHOT_FILES: [SnapshotFile; 4] = [
    SnapshotFile { name: "memory", media_type: "application/vnd.thaw.snapshot.memory.v1" },
    SnapshotFile { name: "vmstate", media_type: "application/vnd.thaw.snapshot.vmstate.v1" },
    SnapshotFile { name: "disk.ext4", media_type: "application/vnd.thaw.snapshot.disk.v1" },
    SnapshotFile { name: "info.json", media_type: "application/vnd.thaw.snapshot.info.v1+json" },
];

pub(crate) const PAGE: usize = 4096;
/// 32 MiB of guest memory.
pub(crate) const MEMORY_PAGES: usize = 8192;
/// Deliberately not a multiple of the page size.
pub(crate) const VMSTATE_BYTES: usize = 41_234;
/// 4 MiB disk image.
pub(crate) const DISK_BLOCKS: usize = 1024;

/// Guest memory shaped like the real thing: ~40% zero pages (with long zero runs), ~30%
/// copies from a small pool of pages (what snapshots of one kernel and runtime share), the
/// rest unique.
pub(crate) fn memory_image(seed: u64) -> Vec<u8> {
    let mut rng = TestRng::new(seed);
    let pool: Vec<Vec<u8>> = (0..48).map(|_| rng.bytes(PAGE)).collect();
    let mut memory = vec![0u8; MEMORY_PAGES * PAGE];
    let mut page = 0;
    while page < MEMORY_PAGES {
        let run = 1 + rng.below(64) as usize;
        let kind = rng.below(10);
        for p in page..(page + run).min(MEMORY_PAGES) {
            let dst = &mut memory[p * PAGE..(p + 1) * PAGE];
            match kind {
                0..=3 => {} // zero pages
                4..=6 => dst.copy_from_slice(&pool[rng.below(pool.len() as u64) as usize]),
                _ => rng.fill(dst),
            }
        }
        page += run;
    }
    memory
}

/// A disk image: a superblock-like header, some data blocks, a repeated text block, and
/// mostly unwritten (zero) blocks.
pub(crate) fn disk_image(seed: u64) -> Vec<u8> {
    let mut rng = TestRng::new(seed);
    let mut disk = vec![0u8; DISK_BLOCKS * PAGE];
    // ext4's superblock magic 0xEF53 sits at offset 1024 + 56.
    disk[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
    let text: Vec<u8> =
        "def handler(event, context):\n    return {'ok': True}\n".bytes().cycle().take(PAGE).collect();
    for block in 1..DISK_BLOCKS {
        let dst = &mut disk[block * PAGE..(block + 1) * PAGE];
        match rng.below(10) {
            0..=1 => rng.fill(dst),
            2 => dst.copy_from_slice(&text),
            _ => {}
        }
    }
    disk
}

pub(crate) fn info_json(memory: &[u8], vmstate: &[u8], disk: &[u8]) -> Vec<u8> {
    format!(
        concat!(
            "{{\n",
            "  \"function\": \"helloworld-python\",\n",
            "  \"revision\": \"helloworld-python-00001\",\n",
            "  \"vcpus\": 1,\n",
            "  \"memory_bytes\": {},\n",
            "  \"vmstate_bytes\": {},\n",
            "  \"disk_bytes\": {}\n",
            "}}\n"
        ),
        memory.len(),
        vmstate.len(),
        disk.len()
    )
    .into_bytes()
}

/// Writes the four snapshot files into `dir` (created if needed) and returns their paths.
pub(crate) fn write_snapshot(dir: &Path, seed: u64) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let memory = memory_image(seed);
    let vmstate = TestRng::new(seed ^ 0x5eed).bytes(VMSTATE_BYTES);
    let disk = disk_image(seed ^ 0xd15c);
    let info = info_json(&memory, &vmstate, &disk);
    let mut paths = Vec::new();
    for (file, bytes) in SNAPSHOT_FILES.iter().zip([&memory, &vmstate, &disk, &info]) {
        let path = dir.join(file.name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// The names of the snapshot files, in [`SNAPSHOT_FILES`] order.
pub(crate) fn snapshot_names() -> Vec<&'static str> {
    SNAPSHOT_FILES.iter().map(|f| f.name).collect()
}

/// A reqwest client for checking the registry's raw HTTP answers.
pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("building a reqwest client")
}

/// The value of a response header as text, failing if it is absent or not text.
pub(crate) fn header<'a>(response: &'a reqwest::Response, name: &str) -> Result<&'a str> {
    response
        .headers()
        .get(name)
        .with_context(|| {
            format!(
                "{} {}: no {name} header (headers: {:?})",
                response.status(),
                response.url(),
                response.headers()
            )
        })?
        .to_str()
        .with_context(|| format!("{name} header is not text"))
}
