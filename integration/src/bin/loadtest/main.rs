//! The load test (issue #9): many concurrent thaw clients against one `thaw-registry`
//! process, with every pulled byte checked, and latency percentiles per operation.
//!
//! ```text
//! cargo build --release -p thaw-registry
//! cargo run -p thaw-integration --release --bin loadtest [-- --clients 64 --seconds 60 --quick]
//! ```
//!
//! It starts the registry found next to this binary (filesystem storage under
//! `target/loadtest/`), pushes the corpus (`target/corpus`, or `target/corpus-quick` with
//! `--quick`), then runs `--clients` tokio tasks, each with its own `thaw_client::Registry`,
//! for `--seconds`, each doing a random mix of: pulls of tagged snapshots without and with
//! seeds, pushes of new revisions (a corpus snapshot with a few memory pages rewritten, so
//! most chunks dedup), `_thaw` missing-chunk queries, inspects, tag lists and plain OCI blob
//! GETs with `Range`. Every pulled file is hashed against its source, every ranged read
//! compared with the source bytes, every missing answer checked.
//!
//! The registry runs with `--auth-config` (one user, `load`, with push and pull on `load/*`),
//! so the attacker has something to guess. For the second half of the run an attacker runs
//! beside the honest clients, each part from its own loopback address so the per-client
//! limits see it as another client: slow readers (blob GETs read a KiB every 2 s), slowloris
//! connections (a header line every 2 s), bad passwords, and amplification recipes (one
//! highly compressible 4 MiB chunk named thousands of times; the registry must refuse them
//! with a 4xx). Honest clients must see no error; the report gives the p99 of a manifest GET
//! before and during the attack and the registry's peak RSS. `--no-attacker` leaves it out.
//!
//! The report goes to
//! `docs/benchmarks/load.md` (default scale) or `target/loadtest/load-quick.md`
//! (`--quick`), or `--out FILE`, and is printed. Exit status 1 on any error or corruption.//!
//! Rooms: this file reads the arguments and runs the registry under test; `workload` drives
//! the clients and their mix, `ops` holds each operation with its checks, `attacker` the
//! attack, `report` the Markdown report.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use thaw_client::{ClientOptions, Registry, Stats};
use thaw_integration::corpus;

mod attacker;
mod ops;
mod report;
mod workload;

use workload::drive;

const USAGE: &str = "usage: loadtest [--clients N] [--seconds S] [--quick] [--corpus DIR] \
                     [--registry-bin PATH] [--out FILE] [--no-attacker] [--amplification-entries N]";
/// The one user of the registry under test, and its password (`htpasswd -B`, cost 10).
const USER: &str = "load";
const PASSWORD: &str = "load-pw";
const PASSWORD_HASH: &str = "$2b$10$vsU8Q8V1IL.pDf46KMNjm.hEWxjMyb0pLDzC12epWV.69mZzZp6Zi";
/// Requests in flight per client address: the honest clients all leave from 127.0.0.1 (as
/// pods behind one node's address would), so the cap is half the process cap rather than
/// the default quarter; each attacker address gets the same.
const PER_CLIENT_CAP: usize = 64;
const PAGE: u64 = 4096;
/// Memory pages a pushed revision rewrites.
const CHANGED_PAGES: usize = 8;
/// Revisions each client keeps listed (older ones are forgotten and their files removed).
const REVISIONS_KEPT_PER_CLIENT: usize = 1;

struct Args {
    clients: usize,
    seconds: u64,
    quick: bool,
    corpus: PathBuf,
    registry_bin: PathBuf,
    out: PathBuf,
    attacker: bool,
    amplification_entries: u32,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn parse_args() -> Result<Args> {
    let mut clients = None;
    let mut seconds = None;
    let mut quick = false;
    let mut corpus = None;
    let mut registry_bin = None;
    let mut out = None;
    let mut attacker = true;
    let mut amplification_entries = 2048;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--clients" => clients = Some(value()?.parse().context("--clients")?),
            "--seconds" => seconds = Some(value()?.parse().context("--seconds")?),
            "--quick" => quick = true,
            "--corpus" => corpus = Some(PathBuf::from(value()?)),
            "--registry-bin" => registry_bin = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--no-attacker" => attacker = false,
            "--amplification-entries" => {
                amplification_entries = value()?.parse().context("--amplification-entries")?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let root = workspace_root();
    let exe_dir = std::env::current_exe()?.parent().context("binary directory")?.to_owned();
    let args = Args {
        clients: clients.unwrap_or(if quick { 16 } else { 64 }),
        seconds: seconds.unwrap_or(if quick { 15 } else { 60 }),
        quick,
        corpus: corpus
            .unwrap_or_else(|| root.join(if quick { "target/corpus-quick" } else { "target/corpus" })),
        registry_bin: registry_bin.unwrap_or_else(|| exe_dir.join("thaw-registry")),
        out: out.unwrap_or_else(|| {
            if quick {
                root.join("target/loadtest/load-quick.md")
            } else {
                root.join("docs/benchmarks/load.md")
            }
        }),
        attacker,
        amplification_entries,
    };
    ensure!(args.clients > 0 && args.seconds > 0, "--clients and --seconds must be at least 1");
    Ok(args)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    let args = parse_args()?;
    ensure!(
        args.registry_bin.is_file(),
        "{} is missing: run `cargo build --release -p thaw-registry` (or pass --registry-bin)",
        args.registry_bin.display()
    );
    let snapshots = corpus::load(&args.corpus).with_context(|| {
        format!("reading the corpus {} (integration/corpus/make-corpus.sh)", args.corpus.display())
    })?;
    let work_root = workspace_root().join("target/loadtest");
    std::fs::create_dir_all(&work_root)?;
    let work = tempfile::Builder::new().prefix("run-").tempdir_in(&work_root)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut registry = RegistryProcess::start(&args.registry_bin, work.path())?;
    let result = runtime.block_on(drive(&args, &snapshots, &registry, work.path()));
    let rss_peak = registry.rss_peak_kib();
    registry.stop();
    let (report, ok) = result?;
    let report = report.replace(
        "{RSS_PEAK}",
        &rss_peak.map_or("unknown".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
    );
    print!("{report}");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &report).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(ok)
}

struct RegistryProcess {
    child: Child,
    addr: String,
}

impl RegistryProcess {
    fn start(bin: &Path, work: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let storage = work.join("storage");
        std::fs::create_dir_all(&storage)?;
        let log = std::fs::File::create(work.join("registry.log"))?;
        std::fs::write(work.join("htpasswd"), format!("{USER}:{PASSWORD_HASH}\n"))?;
        let auth = serde_json::json!({
            "htpasswd": "htpasswd",
            "grants": [{"user": USER, "repository": "load/*", "actions": ["pull", "push"]}],
        });
        std::fs::write(work.join("auth.json"), auth.to_string())?;
        let child = Command::new(bin)
            .args(["--listen", &addr, "--storage"])
            .arg(&storage)
            .arg("--auth-config")
            .arg(work.join("auth.json"))
            .args(["--max-inflight-per-client", &PER_CLIENT_CAP.to_string()])
            .env("THAW_LOG", "warn")
            .env("THAW_UPLOAD_DIR", work.join("uploads"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let me = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(&me.addr).is_ok() {
                return Ok(me);
            }
            ensure!(Instant::now() < deadline, "thaw-registry did not listen on {}", me.addr);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident set size (`VmHWM`), in KiB.
    fn rss_peak_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn client(host: &str) -> Result<Registry> {
    let options = ClientOptions {
        plain_http: true,
        use_thaw: true,
        credentials: Some(thaw_client::Credentials { username: USER.into(), password: PASSWORD.into() }),
        ..ClientOptions::default()
    };
    Ok(Registry::new(host, &options, Arc::new(Stats::new()))?)
}
