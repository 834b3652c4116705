//! The honest clients: the operation mix, the catalog of snapshots they pick from, and
//! each client's loop.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use thaw_client::{PushOptions, Reference};
use thaw_integration::corpus;
use thaw_schema::digest::{ChunkId, Sha256Digest, Sha256Hasher};

use crate::ops::{inspect, manifest_get, missing, pull, push_revision, range_get, tags};
use crate::report::report;
use crate::{attacker, client, Args, RegistryProcess};

/// The operation kinds of the mix, with their weights (out of 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    ManifestGet,
    Pull,
    PullSeeded,
    PushRevision,
    Missing,
    Inspect,
    Tags,
    RangeGet,
}

pub(crate) const MIX: [(Kind, u64); 8] = [
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
    pub(crate) fn name(self) -> &'static str {
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
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One file of a pushed snapshot, with what it must hash to.
#[derive(Debug, Clone)]
pub(crate) struct SourceFile {
    pub(crate) title: String,
    pub(crate) path: PathBuf,
    pub(crate) digest: Sha256Digest,
    pub(crate) size: u64,
}

/// A snapshot in the registry, and where its source files are.
pub(crate) struct Snapshot {
    pub(crate) reference: Reference,
    pub(crate) files: Vec<SourceFile>,
    /// A directory to seed pulls of this snapshot with (its base revision, or a sibling).
    pub(crate) seed: PathBuf,
    /// Chunk ids of its memory recipe that the registry must have (a sample).
    pub(crate) known_chunks: Vec<ChunkId>,
    /// The base this was derived from (itself for base snapshots).
    pub(crate) base: usize,
    /// For revisions: the directory holding its files, removed once nobody uses it.
    pub(crate) _dir: Option<tempfile::TempDir>,
}

/// Every snapshot clients may use: the base set, then live revisions.
pub(crate) struct Catalog {
    pub(crate) bases: Vec<Arc<Snapshot>>,
    pub(crate) revisions: Mutex<Vec<(usize, Arc<Snapshot>)>>,
}

impl Catalog {
    pub(crate) fn pick(&self, rng: &mut Rng) -> Arc<Snapshot> {
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
pub(crate) struct Outcome {
    pub(crate) latencies: BTreeMap<Kind, Vec<Duration>>,
    /// Manifest GETs started before the attack and during it.
    pub(crate) manifest_quiet: Vec<Duration>,
    pub(crate) manifest_attacked: Vec<Duration>,
    pub(crate) errors: Vec<String>,
    pub(crate) corrupt: Vec<String>,
    pub(crate) bytes_pulled: u64,
}

/// Answers counted across clients.
#[derive(Default)]
pub(crate) struct Counters {
    /// 503s seen by the raw HTTP operations (retried, like thaw-client does).
    pub(crate) raw_503: AtomicU64,
    /// 429s seen by the raw HTTP operations.
    pub(crate) raw_429: AtomicU64,
}

pub(crate) fn sha256_file(path: &Path) -> Result<Sha256Digest> {
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

pub(crate) fn source_files(dir: &Path) -> Result<Vec<SourceFile>> {
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

pub(crate) async fn drive(
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
