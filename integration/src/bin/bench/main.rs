//! The benchmark runner (issue #8, first cut; and issue #3's push/pull benchmark): thaw
//! against oras-py with Debian's `docker-registry`, and against the reference system's way
//! (the four snapshot files PUT/GET whole on S3, here MinIO, the reference system's store), on the same corpus, in one
//! run, and writes `docs/BENCHMARKS.md` with plots.
//!
//! ```text
//! integration/corpus/make-corpus.sh                       # target/corpus
//! cargo build --release --locked -p thaw-registry -p thaw-client -p thaw-integration --bin bench
//! target/release/bench [--quick] [--corpus DIR] [--reps N] [--out FILE]
//! ```
//!
//! The runner starts the real `thaw-registry` and drives the real `thaw` CLI (both found
//! next to this binary), starts `docker-registry` and runs oras-py, and starts a
//! single-drive MinIO (as the registry's S3 tests do). Each server sits behind a
//! byte-counting proxy, so bytes on the wire are counted the same way for all three.
//! Nothing timed is asserted: this is a benchmark, not a test; but every restore is checked
//! byte for byte (and every page a lazy restore serves by fault), and a wrong byte fails the
//! run.

mod cluster;
#[path = "../../../../node-cache/tests/support/fault_trace.rs"]
mod fault_trace;
#[path = "../../../../node-cache/tests/support/firecracker_stand_in.rs"]
mod firecracker_stand_in;
mod ingest;
mod lazy;
mod lazy_report;
mod link;
#[path = "../../../../registry/tests/common/minio.rs"]
#[allow(dead_code, unreachable_pub)]
mod minio;
mod nodes_report;
mod plot;
mod proxy;
mod report;
mod systems;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use thaw_integration::corpus::{self, Snapshot};

use systems::{Kind, Oras, Sample, System, Thaw, S3};

const USAGE: &str =
    "usage: bench [--quick] [--corpus DIR] [--reps N] [--out FILE] [--work DIR] [--link-mbit N]
             [--nodes N] [--ingest-only]

  --quick        CI scale: the corpus target/corpus-quick, 1 repetition, report in
                 target/bench-quick/BENCHMARKS.md unless --out is given
  --corpus DIR   made by integration/corpus/make-corpus.sh (default target/corpus)
  --reps N       repetitions; medians are reported (default 3, --quick 1)
  --out FILE     the Markdown report (default docs/BENCHMARKS.md); plots go to
                 benchmarks/*.png beside it
  --work DIR     scratch space for servers and restores (default target/bench-work)
  --link-mbit N  also run every scenario with the clients behind an N Mbit/s link (a network
                 namespace, a veth pair and tc tbf on both ends; needs root and iproute2);
                 the node caches of the node-side scenarios run behind it too
  --nodes N      node caches in the P2P scenario, one warm and N-1 cold (default 4,
                 --quick 2)
  --ingest-only  only the ingest section (chunk + hash + compress, and its ratio to zstd
                 alone), printed to standard output; no servers, no report file";

/// Scenario names, in report order.
pub(crate) const PUSH_BASE: &str = "push the corpus";
pub(crate) const PUSH_NEW: &str = "push new revision";
pub(crate) const PULL_EMPTY: &str = "restore, empty node";
pub(crate) const PULL_SEEDED: &str = "restore, previous revision on node";

pub(crate) struct Args {
    pub(crate) corpus: PathBuf,
    pub(crate) reps: usize,
    pub(crate) out: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) link_mbit: Option<u32>,
    pub(crate) nodes: usize,
    pub(crate) ingest_only: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut quick = false;
    let (mut corpus, mut reps, mut out, mut work, mut link_mbit) = (None, None, None, None, None);
    let mut nodes = None;
    let mut ingest_only = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--ingest-only" => ingest_only = true,
            "--corpus" => corpus = Some(PathBuf::from(it.next().ok_or("--corpus needs a directory")?)),
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a file")?)),
            "--work" => work = Some(PathBuf::from(it.next().ok_or("--work needs a directory")?)),
            "--reps" => {
                reps = Some(
                    it.next()
                        .and_then(|v| v.parse::<usize>().ok())
                        .filter(|&n| (1..=20).contains(&n))
                        .ok_or("--reps needs a number from 1 to 20")?,
                )
            }
            "--link-mbit" => {
                link_mbit = Some(
                    it.next()
                        .and_then(|v| v.parse::<u32>().ok())
                        .filter(|&n| (1..=100_000).contains(&n))
                        .ok_or("--link-mbit needs a rate in Mbit/s from 1 to 100000")?,
                )
            }
            "--nodes" => {
                nodes = Some(
                    it.next()
                        .and_then(|v| v.parse::<usize>().ok())
                        .filter(|&n| (2..=16).contains(&n))
                        .ok_or("--nodes needs a number from 2 to 16")?,
                )
            }
            "-h" | "--help" => return Err(String::new()),
            s => return Err(format!("unexpected argument {s}")),
        }
    }
    Ok(Args {
        corpus: corpus
            .unwrap_or_else(|| PathBuf::from(if quick { "target/corpus-quick" } else { "target/corpus" })),
        reps: reps.unwrap_or(if quick { 1 } else { 3 }),
        out: out.unwrap_or_else(|| {
            PathBuf::from(if quick { "target/bench-quick/BENCHMARKS.md" } else { "docs/BENCHMARKS.md" })
        }),
        work: work.unwrap_or_else(|| PathBuf::from("target/bench-work")),
        link_mbit,
        nodes: nodes.unwrap_or(if quick { 2 } else { 4 }),
        ingest_only,
    })
}

/// The programs the run needs.
pub(crate) struct Tools {
    pub(crate) thaw: PathBuf,
    pub(crate) registry: PathBuf,
    pub(crate) python: String,
    pub(crate) oras_script: PathBuf,
    /// MinIO, or the reason it cannot be found.
    pub(crate) minio: Result<PathBuf, String>,
    pub(crate) daemons: cluster::Daemons,
}

fn find_tools() -> Result<Tools> {
    let exe = std::env::current_exe()?;
    let bin_dir = exe.parent().context("the bench binary has no directory")?;
    let thaw = bin_dir.join("thaw");
    let registry = bin_dir.join("thaw-registry");
    let daemons = cluster::Daemons {
        node_cache: bin_dir.join("thaw-node-cache"),
        extender: bin_dir.join("thaw-extender"),
    };
    for p in [&thaw, &registry, &daemons.node_cache, &daemons.extender] {
        ensure!(
            p.is_file(),
            "{} is missing: build it next to the bench with `cargo build --release --locked \
             -p thaw-registry -p thaw-client -p thaw-node-cache -p thaw-extender`",
            p.display()
        );
    }
    let oras_script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/oras_roundtrip.py");
    ensure!(oras_script.is_file(), "{} is missing", oras_script.display());
    ensure!(
        Path::new("/usr/bin/docker-registry").is_file(),
        "/usr/bin/docker-registry is missing: run scripts/install-test-deps.sh (as root)"
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let minio = find_minio();
    Ok(Tools { thaw, registry, python, oras_script, minio, daemons })
}

/// MinIO as the S3 tests find it (`THAW_MINIO`, the install script's cache, `PATH`),
/// without panicking when it is absent.
fn find_minio() -> Result<PathBuf, String> {
    minio::find_minio_binary().ok_or_else(|| {
        format!(
            "minio not found (THAW_MINIO, ~/.cache/thaw-tools/minio-{}/minio, PATH): build it with \
             scripts/install-test-deps.sh",
            minio::MINIO_VERSION
        )
    })
}

/// First line of a command's output, or what went wrong.
pub(crate) fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_owned()
        }
        Ok(o) => format!("`{program}` failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => format!("`{program}` not runnable: {e}"),
    }
}

/// The corpus split into what is stored first and the new revision that follows: the
/// last revision of the first function with two or more.
pub(crate) struct Plan {
    pub(crate) base: Vec<Snapshot>,
    pub(crate) previous: Snapshot,
    pub(crate) new: Snapshot,
}

fn plan(corpus: &Path) -> Result<Plan> {
    if !corpus.is_dir() {
        bail!(
            "corpus {} does not exist: make it with `integration/corpus/make-corpus.sh` \
             (or `--quick` for target/corpus-quick), as root; ~1.5 min",
            corpus.display()
        );
    }
    let all = corpus::load(corpus).with_context(|| format!("reading the corpus {}", corpus.display()))?;
    let mut by_function: BTreeMap<&str, Vec<&Snapshot>> = BTreeMap::new();
    for s in &all {
        by_function.entry(&s.function).or_default().push(s);
    }
    let Some(revisions) = by_function.values().find(|v| v.len() >= 2) else {
        bail!(
            "corpus {} has no function with two revisions (make-corpus.sh builds fn-json v1 and v2)",
            corpus.display()
        );
    };
    let new = (*revisions.last().expect("two or more")).clone();
    let previous = (*revisions[revisions.len() - 2]).clone();
    let base = all.iter().filter(|s| s.dir != new.dir).cloned().collect();
    Ok(Plan { base, previous, new })
}

/// Every sample, by network (index into `nets`), system and scenario, plus stored bytes.
#[derive(Default)]
pub(crate) struct Measured {
    /// Labels of the networks the scenarios ran on; the first is loopback.
    pub(crate) nets: Vec<String>,
    pub(crate) samples: BTreeMap<(usize, Kind, &'static str), Vec<Sample>>,
    pub(crate) stored: BTreeMap<Kind, Vec<u64>>,
    /// Why a system did not run.
    pub(crate) skipped: BTreeMap<Kind, String>,
    /// Node-cache and P2P scenarios, by network.
    pub(crate) nodes: BTreeMap<usize, cluster::NodeResults>,
    pub(crate) extender: Option<cluster::ExtenderResults>,
    /// Lazy-restore scenarios, by network.
    pub(crate) lazy: BTreeMap<usize, Vec<lazy::LazySnapshot>>,
    /// Whole-file S3 restores of every corpus snapshot, seconds, by network and snapshot.
    pub(crate) s3_each: BTreeMap<(usize, String), Vec<f64>>,
}

/// Fails unless every file of `src` is in `dst` with the same bytes.
fn verify_restore(src: &Path, dst: &Path) -> Result<()> {
    use std::io::Read;
    for name in systems::snapshot_files(src)? {
        let (a, b) = (src.join(&name), dst.join(&name));
        let (mut fa, mut fb) = (
            std::fs::File::open(&a).with_context(|| format!("opening {}", a.display()))?,
            std::fs::File::open(&b).with_context(|| format!("restore lacks {}", b.display()))?,
        );
        ensure!(fa.metadata()?.len() == fb.metadata()?.len(), "{} has the wrong size", b.display());
        let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        loop {
            let n = fa.read(&mut ba)?;
            if n == 0 {
                break;
            }
            fb.read_exact(&mut bb[..n])?;
            ensure!(ba[..n] == bb[..n], "{} differs from {}", b.display(), a.display());
        }
    }
    Ok(())
}

/// One repetition of every scenario on a fresh `system`, clients on network `net`.
fn run_scenarios(
    net: usize,
    kind: Kind,
    system: &mut dyn System,
    plan: &Plan,
    dir: &Path,
    m: &mut Measured,
) -> Result<()> {
    let mut record = |scenario: &'static str, s: Sample| {
        eprintln!(
            "bench:   {:<5} {scenario:<34} {:>8.2} s  up {:>9.1} MiB  down {:>9.1} MiB",
            kind.short(),
            s.secs,
            mib(s.wire.up),
            mib(s.wire.down)
        );
        m.samples.entry((net, kind, scenario)).or_default().push(s);
    };
    let mut base = Sample { secs: 0.0, wire: Default::default(), client: None };
    for snap in &plan.base {
        let s = system.push(snap).with_context(|| format!("{}: pushing {}", kind.short(), snap.label()))?;
        base.secs += s.secs;
        base.wire.up += s.wire.up;
        base.wire.down += s.wire.down;
    }
    record(PUSH_BASE, base);
    let s =
        system.push(&plan.new).with_context(|| format!("{}: pushing {}", kind.short(), plan.new.label()))?;
    record(PUSH_NEW, s);
    let stored = system.stored_bytes()?;
    eprintln!("bench:   {:<5} stored {:.1} MiB", kind.short(), mib(stored));
    if net == 0 {
        m.stored.entry(kind).or_default().push(stored);
    }

    for (scenario, seed) in [(PULL_EMPTY, None), (PULL_SEEDED, Some(plan.previous.dir.as_path()))] {
        let dst = dir.join(if seed.is_some() { "restore-seeded" } else { "restore-empty" });
        let s = system
            .pull(&plan.new, &dst, seed)
            .with_context(|| format!("{}: restoring {} ({scenario})", kind.short(), plan.new.label()))?;
        verify_restore(&plan.new.dir, &dst)
            .with_context(|| format!("{}: checking the restore of {}", kind.short(), plan.new.label()))?;
        std::fs::remove_dir_all(&dst)?;
        record(scenario, s);
    }
    Ok(())
}

/// Restores every corpus snapshot from `system` (which stores them all), each checked, and
/// records the wall times by snapshot.
fn restore_each(
    net: usize,
    system: &mut dyn System,
    plan: &Plan,
    dir: &Path,
    m: &mut Measured,
) -> Result<()> {
    for snap in plan.base.iter().chain([&plan.new]) {
        let dst = dir.join("restore-each");
        let s = system.pull(snap, &dst, None).with_context(|| format!("restoring {}", snap.label()))?;
        verify_restore(&snap.dir, &dst)
            .with_context(|| format!("checking the restore of {}", snap.label()))?;
        std::fs::remove_dir_all(&dst)?;
        eprintln!("bench:   S3    restore {:<26} {:>8.2} s", snap.label(), s.secs);
        m.s3_each.entry((net, snap.label())).or_default().push(s.secs);
    }
    Ok(())
}

pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn run(args: &Args) -> Result<()> {
    if args.ingest_only {
        let plan = plan(&args.corpus)?;
        eprintln!("bench: ingest throughput of {}", plan.new.label());
        let ingest = ingest::measure_ingest(&plan.new, args.reps)?;
        let mut md = String::new();
        ingest::write_section(&mut md, &plan.new.label(), args.reps, &ingest);
        print!("{md}");
        return Ok(());
    }
    let started = Instant::now();
    let load_before = report::load_average();
    let tools = find_tools()?;
    let plan = plan(&args.corpus)?;
    eprintln!(
        "bench: corpus {} ({} snapshots), new revision {} after {}, {} repetition(s)",
        args.corpus.display(),
        plan.base.len() + 1,
        plan.new.label(),
        plan.previous.label(),
        args.reps
    );
    let work = args.work.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let work = work.canonicalize()?;

    let mut measured = Measured::default();
    // MinIO: one for the whole run, each repetition and network in its own key prefix.
    let minio = match &tools.minio {
        Ok(bin) => {
            std::env::set_var("THAW_MINIO", bin);
            Some(minio::Minio::start())
        }
        Err(why) => {
            eprintln!("bench: WARNING: S3 baseline skipped: {why}");
            measured.skipped.insert(Kind::S3, why.clone());
            None
        }
    };
    let link = args.link_mbit.map(link::Link::create).transpose()?;
    let mut nets = vec![link::Net::loopback()];
    nets.extend(link.as_ref().map(|l| l.net.clone()));
    measured.nets = nets.iter().map(|n| n.label.clone()).collect();

    for (ni, net) in nets.iter().enumerate() {
        let minio_proxy = match &minio {
            Some(g) => Some(Arc::new(proxy::Proxy::start(net.server_ip, g.s3_addr())?)),
            None => None,
        };
        for rep in 0..args.reps {
            for kind in Kind::ALL {
                let dir = work.join(format!("net{ni}-rep{rep}-{}", kind.short()));
                std::fs::create_dir_all(&dir)?;
                eprintln!("bench: {}, repetition {}/{}: {}", net.label, rep + 1, args.reps, kind.label());
                if kind == Kind::Thaw {
                    let mut thaw = Thaw::start(&tools.registry, &tools.thaw, &dir, net)?;
                    run_scenarios(ni, kind, &mut thaw, &plan, &dir, &mut measured)?;
                    if rep == 0 {
                        // The node-side scenarios repeat on their own, against this
                        // registry, which now holds the whole corpus.
                        eprintln!("bench: {}: node caches, {} node(s) for P2P", net.label, args.nodes);
                        let node_dir = dir.join("nodes");
                        let results = cluster::run_node_scenarios(
                            &tools.daemons,
                            thaw.proxy(),
                            net,
                            &plan.previous,
                            &plan.new,
                            &node_dir,
                            args.reps,
                            args.nodes,
                        )?;
                        measured.nodes.insert(ni, results);
                        eprintln!("bench: {}: lazy restore, every corpus snapshot", net.label);
                        let mut all: Vec<&Snapshot> = plan.base.iter().collect();
                        all.push(&plan.new);
                        let lazy =
                            lazy::run_lazy_scenarios(&tools.daemons, thaw.proxy(), net, &all, args.reps)?;
                        measured.lazy.insert(ni, lazy);
                        if ni == 0 {
                            eprintln!("bench: loopback: thaw-extender");
                            let mut all: Vec<&Snapshot> = plan.base.iter().collect();
                            all.push(&plan.new);
                            let ext =
                                cluster::run_extender(&tools.daemons, thaw.proxy(), &all, &plan.new, &dir)?;
                            eprintln!(
                                "bench:   extender {} nodes: /prioritize p50 {:.2} ms p99 {:.2} ms, /filter p50 {:.2} ms p99 {:.2} ms",
                                ext.nodes,
                                cluster::percentile(&ext.prioritize_ms, 0.5),
                                cluster::percentile(&ext.prioritize_ms, 0.99),
                                cluster::percentile(&ext.filter_ms, 0.5),
                                cluster::percentile(&ext.filter_ms, 0.99)
                            );
                            measured.extender = Some(ext);
                        }
                    }
                    drop(thaw);
                    std::fs::remove_dir_all(&dir)?;
                    continue;
                }
                let mut system: Box<dyn System> = match kind {
                    Kind::Thaw => unreachable!("run above"),
                    Kind::Oras => Box::new(Oras::start(&tools.python, &tools.oras_script, &dir, net)?),
                    Kind::S3 => match (&minio, &minio_proxy) {
                        (Some(g), Some(proxy)) => Box::new(S3::new(
                            proxy.clone(),
                            g.env(),
                            minio::BUCKET,
                            format!("bench-{}-net{ni}-rep{rep}", std::process::id()),
                            net,
                        )?),
                        _ => continue,
                    },
                };
                run_scenarios(ni, kind, system.as_mut(), &plan, &dir, &mut measured)?;
                if kind == Kind::S3 {
                    // The lazy restores' baseline: every snapshot fetched whole.
                    restore_each(ni, system.as_mut(), &plan, &dir, &mut measured)?;
                }
                drop(system);
                std::fs::remove_dir_all(&dir)?;
            }
        }
    }
    drop(link);
    drop(minio);
    let _ = std::fs::remove_dir_all(&work);

    eprintln!("bench: ingest throughput of {}", plan.new.label());
    let ingest = ingest::measure_ingest(&plan.new, args.reps)?;
    let env = report::Environment::gather(&tools, args, load_before);
    report::write(args, &plan, &measured, &ingest, &env, started.elapsed().as_secs_f64())?;
    eprintln!("bench: wrote {} in {:.0} s", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("s3-client") {
        return match systems::s3_client_main(&argv[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench s3-client: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("bench: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
