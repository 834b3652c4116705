//! Commands of the `thaw` CLI. Exit codes: 0 success, 1 failure, 2 usage error.
//! Machine-readable output goes to stdout (`--json` for a full report); progress and
//! summaries go to stderr (`--quiet` silences them).

mod cache;
mod progress;

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use thaw_client::auth::{docker_config_path, save_credentials};
use thaw_client::snapshot::{snapshot_files, RoleOverrides};
use thaw_client::{
    ClientOptions, Credentials, Error, PullOptions, PushOptions, Reference, Registry, Result, Stats,
};

use progress::{human_bytes, Progress};

/// Push, pull and inspect microVM snapshots in OCI registries.
#[derive(Debug, Parser)]
#[command(name = "thaw", version)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// Speak plain HTTP, without TLS (for a registry on localhost or a trusted network).
    #[arg(long, global = true, env = "THAW_PLAIN_HTTP")]
    plain_http: bool,
    /// Trust the CA certificates in this PEM file besides the system roots (repeatable).
    #[arg(long, global = true, env = "THAW_CA_CERT", value_name = "FILE")]
    ca_cert: Vec<PathBuf>,
    /// Registry for references written without a host.
    #[arg(long, global = true, env = "THAW_REGISTRY", value_name = "HOST[:PORT]")]
    registry: Option<String>,
    /// No progress or summaries on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Print a JSON report on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Docker config file with credentials [default: $DOCKER_CONFIG/config.json or ~/.docker/config.json].
    #[arg(long, global = true, value_name = "FILE")]
    docker_config: Option<PathBuf>,
    /// Use plain OCI only, even where the registry offers the `_thaw` extension.
    #[arg(long, global = true)]
    no_thaw: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Push the snapshot in DIR (memory, vmstate, disk, info files) to REF; prints the manifest digest.
    Push {
        /// Reference, e.g. `localhost:5000/functions/hello:rev-1`.
        reference: String,
        /// Directory with the snapshot files (roles found by name).
        dir: Option<PathBuf>,
        /// The guest memory file, if not found by name in DIR.
        #[arg(long, value_name = "FILE")]
        memory: Option<PathBuf>,
        /// The microVM state file.
        #[arg(long, value_name = "FILE")]
        vmstate: Option<PathBuf>,
        /// The disk image.
        #[arg(long, value_name = "FILE")]
        disk: Option<PathBuf>,
        /// The info file.
        #[arg(long, value_name = "FILE")]
        info: Option<PathBuf>,
        /// zstd level for chunks.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=22))]
        zstd_level: Option<i32>,
        /// Manifest annotation (repeatable).
        #[arg(long = "annotation", value_name = "KEY=VALUE")]
        annotations: Vec<String>,
        /// A base revision in the same registry (e.g. the previous revision): its chunks are
        /// taken as present, so they are neither asked about nor sent.
        #[arg(long, value_name = "REF")]
        base: Option<String>,
    },
    /// Pull REF into DIR, reusing chunks from seeds and the cache.
    Pull {
        /// Reference, e.g. `localhost:5000/functions/hello:rev-1` or `…@sha256:<hex>`.
        reference: String,
        /// Destination directory (created if needed).
        dir: PathBuf,
        /// A file or directory whose chunks may be reused (repeatable), e.g. the previous revision.
        #[arg(long = "seed", value_name = "PATH")]
        seeds: Vec<PathBuf>,
        /// Chunk cache directory: read before fetching, filled with what is fetched.
        #[arg(long, value_name = "DIR", env = "THAW_CACHE")]
        cache: Option<PathBuf>,
        /// Do not reuse chunks of files already in DIR.
        #[arg(long)]
        no_dest_seed: bool,
    },
    /// Show an artifact's files, sizes, chunk counts, zero bytes and dedup ratio.
    Inspect {
        /// Reference, e.g. `localhost:5000/functions/hello:rev-1` or `…@sha256:<hex>`.
        reference: String,
    },
    /// List the tags of a repository.
    Tags {
        /// Repository, e.g. `localhost:5000/functions/hello`.
        reference: String,
    },
    /// Copy an artifact between registries or repositories (digest unchanged).
    Copy {
        /// Source reference.
        source: String,
        /// Destination reference.
        destination: String,
        /// Plain HTTP for the source only.
        #[arg(long)]
        src_plain_http: bool,
        /// Plain HTTP for the destination only.
        #[arg(long)]
        dst_plain_http: bool,
    },
    /// Talk to the node cache on this machine (thaw-node-cache's local API).
    Cache {
        /// The node cache's local API.
        #[arg(long, env = "THAW_NODE_CACHE", default_value = "http://127.0.0.1:7700", value_name = "URL")]
        url: String,
        #[command(subcommand)]
        command: cache::CacheCommand,
    },
    /// Store credentials for HOST in the Docker config file, after checking them.
    Login {
        /// Registry host, e.g. `registry.example.com` or `localhost:5000`.
        host: String,
        /// User name.
        #[arg(long, short)]
        username: String,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
    },
}

/// Runs the CLI.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("THAW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("thaw: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut shown = e.to_string();
            eprintln!("thaw: error: {shown}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let text = s.to_string();
                if !shown.contains(&text) {
                    eprintln!("  caused by: {text}");
                    shown = text;
                }
                source = s.source();
            }
            if let Some(hint) = e.hint() {
                eprintln!("  hint: {hint}");
            }
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

struct Ctx {
    global: Global,
    stats: Arc<Stats>,
}

impl Ctx {
    fn reference(&self, s: &str) -> Result<Reference> {
        Reference::parse_with_default(s, self.global.registry.as_deref())
    }

    fn options(&self, plain_http: bool) -> ClientOptions {
        ClientOptions {
            plain_http: self.global.plain_http || plain_http,
            docker_config: self.global.docker_config.clone(),
            use_thaw: !self.global.no_thaw,
            ca_certs: self.global.ca_cert.clone(),
            ..ClientOptions::default()
        }
    }

    fn registry(&self, reference: &Reference, plain_http: bool) -> Result<Registry> {
        Registry::for_reference(reference, &self.options(plain_http), self.stats.clone())
    }

    /// Prints `report` as JSON, or `human` (if any) on stdout.
    fn output<T: Serialize>(&self, report: &T, human: Option<String>) {
        let mut out = std::io::stdout().lock();
        if self.global.json {
            let _ = writeln!(out, "{}", serde_json::to_string_pretty(report).expect("reports serialize"));
        } else if let Some(h) = human {
            let _ = write!(out, "{h}");
        }
    }

    fn note(&self, text: String) {
        if !self.global.quiet {
            eprintln!("{text}");
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx { global: cli.global, stats: Arc::new(Stats::new()) };
    match cli.command {
        Command::Push { reference, dir, memory, vmstate, disk, info, zstd_level, annotations, base } => {
            let reference = ctx.reference(&reference)?;
            let overrides = RoleOverrides { memory, vmstate, disk, info };
            if dir.is_none()
                && overrides.memory.is_none()
                && overrides.vmstate.is_none()
                && overrides.disk.is_none()
                && overrides.info.is_none()
            {
                return Err(Error::Usage("push needs a snapshot directory (DIR) or files given with --memory/--vmstate/--disk/--info".into()));
            }
            let files = snapshot_files(dir.as_deref(), &overrides)?;
            let mut options = PushOptions::default();
            if let Some(b) = base {
                options.base = Some(ctx.reference(&b)?);
            }
            if let Some(level) = zstd_level {
                options.upload.zstd_level = level;
            }
            for a in annotations {
                let (k, v) = a
                    .split_once('=')
                    .ok_or_else(|| Error::Usage(format!("annotation {a:?} is not KEY=VALUE")))?;
                options.annotations.insert(k.to_owned(), v.to_owned());
            }
            let registry = ctx.registry(&reference, false)?;
            let report = {
                let _progress = Progress::start(ctx.stats.clone(), ctx.global.quiet);
                thaw_client::push(&registry, &reference, &files, &options).await?
            };
            let size: u64 = report.files.iter().map(|f| f.blob.size).sum();
            let s = &report.stats;
            ctx.note(format!(
                "pushed {} ({} files, {}) via {}: sent {}, {} chunks new, {} already there, {} zero; {} blobs skipped",
                report.reference,
                report.files.len(),
                human_bytes(size),
                if report.thaw { "_thaw" } else { "plain OCI" },
                human_bytes(s.bytes_sent),
                s.chunks_transferred,
                s.chunks_present,
                s.chunks_zero,
                s.blobs_skipped
            ));
            ctx.output(&report, Some(format!("{}\n", report.digest)));
        }
        Command::Pull { reference, dir, seeds, cache, no_dest_seed } => {
            let reference = ctx.reference(&reference)?;
            let registry = ctx.registry(&reference, false)?;
            let options = PullOptions { seeds, cache, no_destination_seed: no_dest_seed };
            let report = {
                let _progress = Progress::start(ctx.stats.clone(), ctx.global.quiet);
                thaw_client::pull(&registry, &reference, &dir, &options).await?
            };
            let size: u64 = report.files.iter().map(|f| f.size).sum();
            let s = &report.stats;
            ctx.note(format!(
                "pulled {} into {} ({} files, {}) via {}: received {}, {} from local seeds/cache ({} chunks), {} zero chunks as holes",
                report.reference,
                dir.display(),
                report.files.len(),
                human_bytes(size),
                if report.thaw { "_thaw" } else { "plain OCI" },
                human_bytes(s.bytes_received),
                human_bytes(s.bytes_local),
                s.chunks_local,
                s.chunks_zero
            ));
            ctx.output(&report, Some(format!("{}\n", report.digest)));
        }
        Command::Inspect { reference } => {
            let reference = ctx.reference(&reference)?;
            let registry = ctx.registry(&reference, false)?;
            let report = thaw_client::inspect(&registry, &reference).await?;
            let mut text = format!(
                "{}\ndigest: {}\nmedia type: {}\n",
                report.reference, report.digest, report.media_type
            );
            if let Some(a) = &report.artifact_type {
                text.push_str(&format!("artifact type: {a}\n"));
            }
            for f in &report.files {
                text.push_str(&format!(
                    "  {:<16} {:>10}  {}  {}\n",
                    f.title.as_deref().unwrap_or("(untitled)"),
                    human_bytes(f.size),
                    f.digest,
                    f.media_type
                ));
                if let Some(r) = &f.recipe {
                    text.push_str(&format!(
                        "  {:<16} {} chunks ({} distinct, {} zero = {}), unique {}, chunker {:?} {}/{}/{}\n",
                        "",
                        r.chunks,
                        r.distinct_chunks,
                        r.zero_chunks,
                        human_bytes(r.zero_bytes),
                        human_bytes(r.unique_bytes),
                        r.chunker.kind,
                        r.chunker.min,
                        r.chunker.avg,
                        r.chunker.max
                    ));
                }
            }
            text.push_str(&format!("total {}", human_bytes(report.total_bytes)));
            if let Some(ratio) = report.dedup_ratio {
                text.push_str(&format!(
                    ", zero {}, unique {}, dedup ratio {ratio:.2}",
                    human_bytes(report.zero_bytes),
                    human_bytes(report.unique_bytes)
                ));
            }
            text.push('\n');
            ctx.output(&report, Some(text));
        }
        Command::Tags { reference } => {
            let reference = ctx.reference(&reference)?;
            let registry = ctx.registry(&reference, false)?;
            let tags = registry.tags(reference.repository()).await?;
            let text: String = tags.iter().map(|t| format!("{t}\n")).collect();
            ctx.output(&tags, Some(text));
        }
        Command::Copy { source, destination, src_plain_http, dst_plain_http } => {
            let source = ctx.reference(&source)?;
            let destination = ctx.reference(&destination)?;
            let src = ctx.registry(&source, src_plain_http)?;
            let dst = ctx.registry(&destination, dst_plain_http)?;
            let report = {
                let _progress = Progress::start(ctx.stats.clone(), ctx.global.quiet);
                thaw_client::copy(&src, &source, &dst, &destination, &Default::default()).await?
            };
            ctx.note(format!(
                "copied {} to {}: {} blobs copied, {} already there; sent {}, received {}",
                report.source,
                report.destination,
                report.blobs_copied,
                report.blobs_skipped,
                human_bytes(report.stats.bytes_sent),
                human_bytes(report.stats.bytes_received)
            ));
            ctx.output(&report, Some(format!("{}\n", report.digest)));
        }
        Command::Cache { url, command } => cache::run(&url, command, ctx.global.json).await?,
        Command::Login { host, username, password_stdin } => {
            let password = read_password(password_stdin)?;
            let credentials = Credentials { username, password };
            let options = ClientOptions { credentials: Some(credentials.clone()), ..ctx.options(false) };
            let registry = Registry::new(&host, &options, ctx.stats.clone())?;
            registry.ping().await?;
            let path = ctx.global.docker_config.clone().or_else(docker_config_path).ok_or_else(|| {
                Error::Usage(
                    "no Docker config path: set DOCKER_CONFIG or HOME, or pass --docker-config".into(),
                )
            })?;
            save_credentials(&path, &host, &credentials)?;
            ctx.note(format!("login to {host} succeeded; credentials stored in {}", path.display()));
            ctx.output(&serde_json::json!({ "host": host, "config": path }), None);
        }
    }
    Ok(())
}

/// The password from stdin (`--password-stdin`) or typed at the terminal without echo.
fn read_password(from_stdin: bool) -> Result<String> {
    let stdin_err = |source| Error::Io { op: "reading the password from", path: "stdin".into(), source };
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map_err(stdin_err)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage("no password: pass --password-stdin and write it to stdin".into()));
    }
    let stty = |arg: &str| {
        std::fs::File::open("/dev/tty")
            .and_then(|tty| std::process::Command::new("stty").arg(arg).stdin(tty).status())
            .is_ok_and(|s| s.success())
    };
    eprint!("Password: ");
    let hidden = stty("-echo");
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if hidden {
        stty("echo");
        eprintln!();
    }
    read.map_err(stdin_err)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}
