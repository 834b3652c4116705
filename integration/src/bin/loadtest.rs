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
//! (`--quick`), or `--out FILE`, and is printed. Exit status 1 on any error or corruption.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use thaw_client::{ClientOptions, PullOptions, PushOptions, Reference, Registry, Stats};
use thaw_integration::corpus;
use thaw_schema::digest::{ChunkId, Sha256Digest, Sha256Hasher};

#[path = "loadtest/attacker.rs"]
mod attacker;

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

/// The operation kinds of the mix, with their weights (out of 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ManifestGet,
    Pull,
    PullSeeded,
    PushRevision,
    Missing,
    Inspect,
    Tags,
    RangeGet,
}

const MIX: [(Kind, u64); 8] = [
    (Kind::ManifestGet, 10),
    (Kind::Pull, 15),
    (Kind::PullSeeded, 15),
    (Kind::PushRevision, 8),
    (Kind::Missing, 17),
    (Kind::Inspect, 10),
    (Kind::Tags, 5),
    (Kind::RangeGet, 20),
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::ManifestGet => "manifest GET",
            Self::Pull => "pull",
            Self::PullSeeded => "pull with seed",
            Self::PushRevision => "push revision",
            Self::Missing => "`_thaw` missing query",
            Self::Inspect => "inspect",
            Self::Tags => "tag list",
            Self::RangeGet => "blob GET with Range",
        }
    }
}

/// xorshift64: a fixed-seed generator, so a run's mix can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One file of a pushed snapshot, with what it must hash to.
#[derive(Debug, Clone)]
struct SourceFile {
    title: String,
    path: PathBuf,
    digest: Sha256Digest,
    size: u64,
}

/// A snapshot in the registry, and where its source files are.
struct Snapshot {
    reference: Reference,
    files: Vec<SourceFile>,
    /// A directory to seed pulls of this snapshot with (its base revision, or a sibling).
    seed: PathBuf,
    /// Chunk ids of its memory recipe that the registry must have (a sample).
    known_chunks: Vec<ChunkId>,
    /// The base this was derived from (itself for base snapshots).
    base: usize,
    /// For revisions: the directory holding its files, removed once nobody uses it.
    _dir: Option<tempfile::TempDir>,
}

/// Every snapshot clients may use: the base set, then live revisions.
struct Catalog {
    bases: Vec<Arc<Snapshot>>,
    revisions: Mutex<Vec<(usize, Arc<Snapshot>)>>,
}

impl Catalog {
    fn pick(&self, rng: &mut Rng) -> Arc<Snapshot> {
        let revisions = self.revisions.lock().unwrap();
        let total = self.bases.len() + revisions.len();
        let i = rng.below(total as u64) as usize;
        if i < self.bases.len() {
            self.bases[i].clone()
        } else {
            revisions[i - self.bases.len()].1.clone()
        }
    }
}

#[derive(Default)]
struct Outcome {
    latencies: BTreeMap<Kind, Vec<Duration>>,
    /// Manifest GETs started before the attack and during it.
    manifest_quiet: Vec<Duration>,
    manifest_attacked: Vec<Duration>,
    errors: Vec<String>,
    corrupt: Vec<String>,
    bytes_pulled: u64,
}

/// Answers counted across clients.
#[derive(Default)]
struct Counters {
    /// 503s seen by the raw HTTP operations (retried, like thaw-client does).
    raw_503: AtomicU64,
    /// 429s seen by the raw HTTP operations.
    raw_429: AtomicU64,
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

fn sha256_file(path: &Path) -> Result<Sha256Digest> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

fn source_files(dir: &Path) -> Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for name in ["memory", "vmstate", "disk.ext4", "info.json"] {
        let path = dir.join(name);
        if path.is_file() {
            let size = path.metadata()?.len();
            files.push(SourceFile { title: name.to_owned(), digest: sha256_file(&path)?, path, size });
        }
    }
    Ok(files)
}

async fn drive(
    args: &Args,
    snapshots: &[corpus::Snapshot],
    registry: &RegistryProcess,
    work: &Path,
) -> Result<(String, bool)> {
    let host = registry.addr.clone();
    let setup = client(&host)?;
    let mut bases = Vec::new();
    let push_started = Instant::now();
    for (i, s) in snapshots.iter().enumerate() {
        let reference = Reference::parse(&format!("{host}/load/{}:{}", s.function, s.revision))?;
        thaw_client::push_dir(&setup, &reference, &s.dir, &PushOptions::default())
            .await
            .with_context(|| format!("pushing the base snapshot {reference}"))?;
        let dir = s.dir.clone();
        let files = tokio::task::spawn_blocking(move || source_files(&dir)).await??;
        let memory = files.iter().find(|f| f.title == "memory").context("a memory file")?;
        let recipe = setup
            .recipe(reference.repository(), &memory.digest)
            .await?
            .with_context(|| format!("{reference}: the registry has no recipe for its memory"))?;
        let known_chunks: Vec<ChunkId> =
            recipe.entries.iter().filter_map(|e| e.chunk_id().copied()).step_by(7).take(200).collect();
        // Seed with a sibling revision when there is one, else with another function.
        let seed = snapshots
            .iter()
            .find(|o| o.function == s.function && o.revision != s.revision)
            .unwrap_or(&snapshots[(i + 1) % snapshots.len()])
            .dir
            .clone();
        bases.push(Arc::new(Snapshot { reference, files, seed, known_chunks, base: i, _dir: None }));
    }
    let base_push = push_started.elapsed();
    eprintln!(
        "pushed {} base snapshots in {:.1} s; running {} clients for {} s",
        bases.len(),
        base_push.as_secs_f64(),
        args.clients,
        args.seconds
    );

    let catalog = Arc::new(Catalog { bases, revisions: Mutex::new(Vec::new()) });
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    // The attack runs for the second half, so one run measures both.
    let attack_from = args.attacker.then(|| started + Duration::from_secs(args.seconds) / 2);
    let attack = attack_from.map(|from| {
        let (host, entries) = (host.clone(), args.amplification_entries);
        let memory = catalog.bases[0].files.iter().find(|f| f.title == "memory").cloned();
        let repository = catalog.bases[0].reference.repository().to_owned();
        tokio::spawn(attacker::run(host, repository, memory.map(|f| f.digest), entries, from, deadline))
    });
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let catalog = catalog.clone();
        let counters = counters.clone();
        let host = host.clone();
        let dir = work.join(format!("client-{c}"));
        tasks.push(tokio::spawn(async move {
            client_loop(c, &host, &catalog, &counters, &dir, deadline, attack_from).await
        }));
    }
    let mut outcome = Outcome::default();
    for t in tasks {
        let o = t.await.context("a client task panicked")?;
        for (k, v) in o.latencies {
            outcome.latencies.entry(k).or_default().extend(v);
        }
        outcome.manifest_quiet.extend(o.manifest_quiet);
        outcome.manifest_attacked.extend(o.manifest_attacked);
        outcome.errors.extend(o.errors);
        outcome.corrupt.extend(o.corrupt);
        outcome.bytes_pulled += o.bytes_pulled;
    }
    let attack = match attack {
        Some(task) => Some(task.await.context("the attacker task panicked")?),
        None => None,
    };
    let elapsed = started.elapsed();
    let revisions = catalog.revisions.lock().unwrap().len();
    drop(catalog);
    let (mut md, ok) = report(args, snapshots, &outcome, &counters, elapsed, base_push, revisions);
    let attack_ok = attack.as_ref().is_none_or(attacker::Report::held);
    if let Some(attack) = &attack {
        md.push_str(&attack.markdown(&outcome.manifest_quiet, &outcome.manifest_attacked));
    }
    Ok((md, ok && attack_ok))
}

async fn client_loop(
    c: usize,
    host: &str,
    catalog: &Catalog,
    counters: &Counters,
    dir: &Path,
    deadline: Instant,
    attack_from: Option<Instant>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((c as u64 + 1) * 0x1000_0001));
    let registry = match client(host) {
        Ok(r) => r,
        Err(e) => {
            outcome.errors.push(format!("client {c}: {e:#}"));
            return outcome;
        }
    };
    let http = reqwest::Client::new();
    let mut pushes = 0usize;
    while Instant::now() < deadline {
        let mut roll = rng.below(100);
        let kind = MIX
            .iter()
            .find(|(_, w)| {
                if roll < *w {
                    true
                } else {
                    roll -= w;
                    false
                }
            })
            .map_or(Kind::Tags, |(k, _)| *k);
        let snapshot = catalog.pick(&mut rng);
        let started = Instant::now();
        let result = match kind {
            Kind::Pull | Kind::PullSeeded => {
                pull(&registry, &snapshot, &dir.join("pull"), kind == Kind::PullSeeded).await.map(|bytes| {
                    outcome.bytes_pulled += bytes;
                })
            }
            Kind::PushRevision => {
                pushes += 1;
                push_revision(&registry, catalog, c, pushes, &mut rng, dir).await
            }
            Kind::ManifestGet => manifest_get(&http, host, &snapshot, counters).await,
            Kind::Missing => missing(&http, host, &snapshot, &mut rng, counters).await,
            Kind::Inspect => inspect(&registry, &snapshot).await,
            Kind::Tags => tags(&registry, &snapshot).await,
            Kind::RangeGet => range_get(&http, host, &snapshot, &mut rng, counters).await,
        };
        let took = started.elapsed();
        match result {
            Ok(()) => {
                outcome.latencies.entry(kind).or_default().push(took);
                if kind == Kind::ManifestGet {
                    match attack_from {
                        Some(at) if started >= at => outcome.manifest_attacked.push(took),
                        _ => outcome.manifest_quiet.push(took),
                    }
                }
            }
            Err(e) => {
                let line = format!("client {c}, {} of {}: {e:#}", kind.name(), snapshot.reference);
                eprintln!("ERROR {line}");
                if format!("{e:#}").contains("CORRUPT:") {
                    outcome.corrupt.push(line);
                } else {
                    outcome.errors.push(line);
                }
            }
        }
    }
    // The directory is left in place: it holds this client's revisions, which other clients
    // may still be pulling or reading; each revision's files go when its last user drops it.
    outcome
}

/// Pulls into a fresh directory and hashes every file against its source; answers the
/// bytes pulled.
async fn pull(registry: &Registry, snapshot: &Snapshot, dest: &Path, seeded: bool) -> Result<u64> {
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    let options = PullOptions {
        seeds: if seeded { vec![snapshot.seed.clone()] } else { Vec::new() },
        cache: None,
        no_destination_seed: true,
    };
    let report = thaw_client::pull(registry, &snapshot.reference, dest, &options).await?;
    let expected = snapshot.files.clone();
    let pulled: Vec<(String, PathBuf)> =
        report.files.iter().map(|f| (f.title.clone(), f.path.clone())).collect();
    let reference = snapshot.reference.to_string();
    let bytes = tokio::task::spawn_blocking(move || -> Result<u64> {
        ensure!(
            pulled.len() == expected.len(),
            "CORRUPT: {} files pulled, {} pushed",
            pulled.len(),
            expected.len()
        );
        let mut bytes = 0;
        for want in &expected {
            let (_, path) = pulled
                .iter()
                .find(|(t, _)| *t == want.title)
                .with_context(|| format!("CORRUPT: {reference}: {} was not pulled", want.title))?;
            let got = sha256_file(path)?;
            ensure!(
                got == want.digest,
                "CORRUPT: {reference}: {} hashes to {got}, not {}",
                want.title,
                want.digest
            );
            bytes += want.size;
        }
        Ok(bytes)
    })
    .await??;
    std::fs::remove_dir_all(dest)?;
    Ok(bytes)
}

/// Derives a revision of a base snapshot (a few memory pages rewritten; the other files
/// shared by hard link), pushes it with the base as `base`, and lists it.
async fn push_revision(
    registry: &Registry,
    catalog: &Catalog,
    c: usize,
    n: usize,
    rng: &mut Rng,
    dir: &Path,
) -> Result<()> {
    let base = catalog.bases[rng.below(catalog.bases.len() as u64) as usize].clone();
    std::fs::create_dir_all(dir)?;
    let rev_dir = tempfile::Builder::new().prefix("rev-").tempdir_in(dir)?;
    let seeds: Vec<u64> = (0..CHANGED_PAGES * 2 + 1).map(|_| rng.next()).collect();
    let (base_files, target) = (base.files.clone(), rev_dir.path().to_owned());
    let files = tokio::task::spawn_blocking(move || -> Result<Vec<SourceFile>> {
        for f in &base_files {
            let to = target.join(&f.title);
            if f.title == "memory" {
                let status = Command::new("cp").arg("--sparse=always").arg(&f.path).arg(&to).status()?;
                ensure!(status.success(), "cp {} failed", f.path.display());
                let file = std::fs::OpenOptions::new().write(true).open(&to)?;
                let pages = f.size / PAGE;
                for i in 0..CHANGED_PAGES {
                    let page = seeds[2 * i] % pages;
                    let mut bytes = vec![0u8; PAGE as usize];
                    let mut r = Rng(seeds[2 * i + 1] | 1);
                    for chunk in bytes.chunks_mut(8) {
                        chunk.copy_from_slice(&r.next().to_le_bytes());
                    }
                    file.write_all_at(&bytes, page * PAGE)?;
                }
            } else if f.title == "info.json" {
                let mut info = std::fs::read(&f.path)?;
                info.extend_from_slice(
                    format!("{{\"loadtest_revision\":{}}}\n", seeds[CHANGED_PAGES * 2]).as_bytes(),
                );
                std::fs::File::create(&to)?.write_all(&info)?;
            } else {
                std::fs::hard_link(&f.path, &to)?;
            }
        }
        source_files(&target)
    })
    .await??;
    let repository = base.reference.repository();
    let reference = Reference::parse(&format!("{}/{repository}:c{c}-r{n}", registry.host()))?;
    let options = PushOptions { base: Some(base.reference.clone()), ..PushOptions::default() };
    thaw_client::push_dir(registry, &reference, rev_dir.path(), &options).await?;
    let snapshot = Arc::new(Snapshot {
        reference,
        files,
        seed: base.files[0].path.parent().context("base directory")?.to_owned(),
        known_chunks: base.known_chunks.clone(),
        base: base.base,
        _dir: Some(rev_dir),
    });
    let mut revisions = catalog.revisions.lock().unwrap();
    revisions.push((c, snapshot));
    // Forget this client's oldest revisions; a pull still using one keeps its files alive.
    while revisions.iter().filter(|(owner, _)| *owner == c).count() > REVISIONS_KEPT_PER_CLIENT {
        let oldest = revisions.iter().position(|(owner, _)| *owner == c).expect("one of them");
        revisions.remove(oldest);
    }
    Ok(())
}

/// Sends a raw request, retrying 503/429 with backoff as thaw-client does (counted).
async fn send_retrying(
    counters: &Counters,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response> {
    let mut delay = Duration::from_millis(200);
    for attempt in 1.. {
        let resp = build().send().await?;
        let status = resp.status().as_u16();
        if (status == 503 || status == 429) && attempt < 5 {
            let counter = if status == 503 { &counters.raw_503 } else { &counters.raw_429 };
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            delay *= 2;
            continue;
        }
        return Ok(resp);
    }
    unreachable!("the loop returns")
}

/// Asks `_thaw` which of some stored and some made-up chunk ids are missing: exactly the
/// made-up ones must be.
async fn missing(
    http: &reqwest::Client,
    host: &str,
    snapshot: &Snapshot,
    rng: &mut Rng,
    counters: &Counters,
) -> Result<()> {
    let mut ids: Vec<String> = snapshot.known_chunks.iter().map(ChunkId::hex).collect();
    let invented: Vec<String> = (0..50).map(|_| ChunkId::of(&rng.next().to_le_bytes()).hex()).collect();
    for (i, id) in invented.iter().enumerate() {
        let at = (i * 7) % (ids.len() + 1);
        ids.insert(at, id.clone());
    }
    let url = format!("http://{host}/v2/{}/_thaw/chunks/missing", snapshot.reference.repository());
    let body = serde_json::json!({ "chunks": ids });
    let resp =
        send_retrying(counters, || http.post(&url).basic_auth(USER, Some(PASSWORD)).json(&body)).await?;
    let status = resp.status();
    let text = resp.text().await?;
    ensure!(status.as_u16() == 200, "POST {url}: {status}: {text}");
    let answer: serde_json::Value = serde_json::from_str(&text).context("the missing answer")?;
    let got: HashSet<&str> = answer["missing"]
        .as_array()
        .context("no `missing` list")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let want: HashSet<&str> = invented.iter().map(String::as_str).collect();
    ensure!(
        got == want,
        "CORRUPT: missing answer lists {} ids, {} invented ones expected",
        got.len(),
        want.len()
    );
    Ok(())
}

/// A plain manifest GET by tag: the body must hash to the `Docker-Content-Digest` answered.
async fn manifest_get(
    http: &reqwest::Client,
    host: &str,
    snapshot: &Snapshot,
    counters: &Counters,
) -> Result<()> {
    let reference = &snapshot.reference;
    let url = format!(
        "http://{host}/v2/{}/manifests/{}",
        reference.repository(),
        reference.tag().context("a tagged reference")?
    );
    let resp = send_retrying(counters, || {
        http.get(&url)
            .basic_auth(USER, Some(PASSWORD))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
    })
    .await?;
    let status = resp.status();
    let digest = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = resp.bytes().await?;
    ensure!(status.as_u16() == 200, "GET {url}: {status}: {}", String::from_utf8_lossy(&body));
    let got = Sha256Digest::of(&body).to_string();
    ensure!(digest.as_deref() == Some(got.as_str()), "CORRUPT: {url} hashes to {got}, answered {digest:?}");
    Ok(())
}

async fn inspect(registry: &Registry, snapshot: &Snapshot) -> Result<()> {
    let report = thaw_client::inspect(registry, &snapshot.reference).await?;
    for want in &snapshot.files {
        let found = report.files.iter().find(|f| f.title.as_deref() == Some(&want.title));
        ensure!(
            found.is_some_and(|f| f.digest == want.digest && f.size == want.size),
            "CORRUPT: inspect shows {} not as pushed",
            want.title
        );
    }
    Ok(())
}

async fn tags(registry: &Registry, snapshot: &Snapshot) -> Result<()> {
    let tags = registry.tags(snapshot.reference.repository()).await?;
    let tag = snapshot.reference.tag().unwrap_or_default();
    ensure!(
        tags.iter().any(|t| t == tag),
        "CORRUPT: tag list of {} lacks {tag}",
        snapshot.reference.repository()
    );
    Ok(())
}

/// A plain OCI blob GET with `Range`, compared with the source file's bytes.
async fn range_get(
    http: &reqwest::Client,
    host: &str,
    snapshot: &Snapshot,
    rng: &mut Rng,
    counters: &Counters,
) -> Result<()> {
    let file = &snapshot.files[rng.below(snapshot.files.len() as u64) as usize];
    let len = (1 + rng.below(1 << 20)).min(file.size.max(1));
    let start = rng.below(file.size.saturating_sub(len) + 1);
    let end = start + len - 1;
    let url = format!("http://{host}/v2/{}/blobs/{}", snapshot.reference.repository(), file.digest);
    let resp = send_retrying(counters, || {
        http.get(&url).basic_auth(USER, Some(PASSWORD)).header("Range", format!("bytes={start}-{end}"))
    })
    .await?;
    let status = resp.status();
    ensure!(
        status.as_u16() == 206,
        "GET {url} bytes={start}-{end}: {status}: {}",
        resp.text().await.unwrap_or_default()
    );
    let body = resp.bytes().await?;
    let path = file.path.clone();
    let expected = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(start))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf)?;
        Ok(buf)
    })
    .await??;
    ensure!(
        body[..] == expected[..],
        "CORRUPT: {} bytes={start}-{end} differ from the source ({} bytes got)",
        file.title,
        body.len()
    );
    Ok(())
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.0}")
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok())
        })
        .map_or("?".into(), |k| format!("{:.0} GiB", k as f64 / 1048576.0));
    format!("{cores} cores ({cpu}), {mem} RAM, Linux {}", command_line("uname", &["-r"]))
}

fn report(
    args: &Args,
    snapshots: &[corpus::Snapshot],
    outcome: &Outcome,
    counters: &Counters,
    elapsed: Duration,
    base_push: Duration,
    revisions: usize,
) -> (String, bool) {
    let total_ops: usize = outcome.latencies.values().map(Vec::len).sum();
    let secs = elapsed.as_secs_f64();
    let mut md = String::new();
    let ok = outcome.errors.is_empty() && outcome.corrupt.is_empty();
    md.push_str("### Load test: concurrent clients pushing and pulling mixed snapshots\n\n");
    md.push_str(&format!(
        "Written by `cargo run -p thaw-integration --release --bin loadtest{}` (issue #9). {} concurrent clients \
         (tokio tasks, each with its own `thaw_client::Registry`) against one `thaw-registry` process \
         (filesystem storage, `--auth-config` with one user whom every client logs in as, default limits but \
         {PER_CLIENT_CAP} requests in flight per client address, as all honest clients share 127.0.0.1: {} requests \
         in flight, then a {} s wait before 503). Clients start \
         operations for {} s; the run ends when the last one finishes ({:.0} s), and rates are over that time. \
         Clients and registry share the machine's cores, so latencies include the clients' own chunking, \
         hashing and verification.\n\n",
        if args.quick { " -- --quick" } else { "" },
        args.clients,
        thaw_registry_limits().0,
        thaw_registry_limits().1,
        args.seconds,
        secs
    ));
    md.push_str(&format!(
        "- Machine: {}\n- Versions: thaw {} (git {}), {}\n- Corpus: `{}` ({} snapshots: {}), pushed first in {:.1} s\n\
         - Mix (weights of 100): {}\n- Revisions rewrite {CHANGED_PAGES} memory pages of a base and push with it as `base`\n\n",
        machine(),
        env!("CARGO_PKG_VERSION"),
        command_line("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]),
        command_line("rustc", &["--version"]),
        args.corpus.strip_prefix(workspace_root()).unwrap_or(&args.corpus).display(),
        snapshots.len(),
        snapshots.iter().map(|s| s.label()).collect::<Vec<_>>().join(", "),
        base_push.as_secs_f64(),
        MIX.iter().map(|(k, w)| format!("{} {w}", k.name())).collect::<Vec<_>>().join(", "),
    ));
    md.push_str("| Operation | Count | Per second | p50 ms | p95 ms | p99 ms | max ms |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for (kind, _) in MIX {
        let mut l = outcome.latencies.get(&kind).cloned().unwrap_or_default();
        l.sort();
        md.push_str(&format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} |\n",
            kind.name(),
            l.len(),
            l.len() as f64 / secs,
            ms(percentile(&l, 50.0)),
            ms(percentile(&l, 95.0)),
            ms(percentile(&l, 99.0)),
            ms(l.last().copied().unwrap_or_default()),
        ));
    }
    md.push_str(&format!(
        "\n- Operations: {total_ops} ({:.1}/s); pulled and verified {:.1} GiB ({:.0} MiB/s of snapshot files)\n\
         - Revisions pushed: {}; still listed at the end: {revisions}\n\
         - Errors: **{}**; corrupt answers: **{}**\n\
         - 503s seen (and retried) by the raw HTTP operations: {}; 429s: {} (thaw-client retries transient answers \
         itself and does not count them)\n- Registry peak RSS (`VmHWM`): {{RSS_PEAK}}\n",
        total_ops as f64 / secs,
        outcome.bytes_pulled as f64 / (1u64 << 30) as f64,
        outcome.bytes_pulled as f64 / (1u64 << 20) as f64 / secs,
        outcome.latencies.get(&Kind::PushRevision).map_or(0, Vec::len),
        outcome.errors.len(),
        outcome.corrupt.len(),
        counters.raw_503.load(Ordering::Relaxed),
        counters.raw_429.load(Ordering::Relaxed),
    ));
    for e in outcome.corrupt.iter().chain(&outcome.errors).take(20) {
        md.push_str(&format!("  - {e}\n"));
    }
    (md, ok)
}

/// The registry's default inflight limit and wait, as documented in its limits module.
fn thaw_registry_limits() -> (usize, u64) {
    (128, 5)
}
