//! `thaw-registry`: configuration, logging and signals; the work is in the library.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use thaw_registry::{Limits, RateLimit, RegistryConfig, ServeOptions};

/// An OCI registry that stores snapshots as deduplicated, compressed chunks.
#[derive(Debug, Parser)]
#[command(name = "thaw-registry", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "THAW_LISTEN", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// Storage: a directory path, or s3://BUCKET/PREFIX (configured by the AWS_* variables).
    #[arg(long, env = "THAW_STORAGE", default_value = "./thaw-data")]
    storage: String,
    /// Requests handled at once; past it a request waits up to --inflight-wait-ms, then
    /// gets 503 UNAVAILABLE with Retry-After.
    #[arg(long, env = "THAW_MAX_INFLIGHT", default_value_t = thaw_registry::DEFAULT_MAX_INFLIGHT)]
    max_inflight: usize,
    /// Requests one client address may have in flight, counted before any authentication
    /// work; past it the client's requests wait up to --inflight-wait-ms, then get 503.
    #[arg(long, env = "THAW_MAX_INFLIGHT_PER_CLIENT", default_value_t = thaw_registry::DEFAULT_MAX_INFLIGHT_PER_CLIENT)]
    max_inflight_per_client: usize,
    /// How long a request past --max-inflight or --max-inflight-per-client waits for a
    /// slot, in milliseconds.
    #[arg(long, env = "THAW_INFLIGHT_WAIT_MS", default_value_t = thaw_registry::DEFAULT_INFLIGHT_WAIT.as_millis() as u64)]
    inflight_wait_ms: u64,
    /// Time a connection has to send a complete request head, counted from its accept or
    /// its previous response's end (so also the keep-alive idle timeout).
    #[arg(long, env = "THAW_HEADER_TIMEOUT", value_parser = parse_duration, default_value = "20s")]
    header_timeout: Duration,
    /// Longest a request body may send nothing while the registry waits for it.
    #[arg(long, env = "THAW_BODY_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    body_timeout: Duration,
    /// Longest a response may wait for the client to read before the connection is closed.
    #[arg(long, env = "THAW_SEND_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    send_timeout: Duration,
    /// Whole-blob verifications (a `_thaw` commit hashing every byte of its blob) run at
    /// once; past it a commit waits up to --verify-wait, then gets 503 with Retry-After.
    /// Default: the number of CPUs, at least 2.
    #[arg(long, env = "THAW_MAX_VERIFICATIONS")]
    max_verifications: Option<usize>,
    /// Whole-blob verifications one client address runs at once (counted before the
    /// process-wide cap).
    #[arg(long, env = "THAW_MAX_VERIFICATIONS_PER_CLIENT", default_value_t = thaw_registry::DEFAULT_MAX_VERIFICATIONS_PER_CLIENT)]
    max_verifications_per_client: usize,
    /// How long a commit waits for a verification slot.
    #[arg(long, env = "THAW_VERIFY_WAIT", value_parser = parse_duration, default_value = "60s")]
    verify_wait: Duration,
    /// A `_thaw` recipe to verify may declare at most this multiple of its distinct chunks'
    /// bytes in data entries (zero runs not counted); past it the commit is refused before
    /// anything is hashed.
    #[arg(long, env = "THAW_MAX_CHUNK_REPEAT", default_value_t = thaw_registry::DEFAULT_MAX_CHUNK_REPEAT)]
    max_chunk_repeat: u32,
    /// bcrypt checks of Basic credentials run at once, on threads of their own.
    #[arg(long, env = "THAW_CREDENTIAL_THREADS", default_value_t = thaw_registry::auth::DEFAULT_CREDENTIAL_THREADS)]
    credential_threads: usize,
    /// Longest a request with Basic credentials waits for a credential-check thread before
    /// it is answered 503 with Retry-After (retryable; nothing is said about the credentials).
    #[arg(long, env = "THAW_CREDENTIAL_WAIT", value_parser = parse_duration, default_value = "10s")]
    credential_wait: Duration,
    /// Requests per second allowed per client IP address (token bucket); 0 turns the rate
    /// limit off (the default). Past it: 429 TOOMANYREQUESTS with Retry-After.
    #[arg(long, env = "THAW_RATE_LIMIT", default_value_t = 0.0)]
    rate_limit: f64,
    /// Requests a quiet client may make at once under --rate-limit (default: 10 seconds'
    /// worth, at least 1).
    #[arg(long, env = "THAW_RATE_BURST")]
    rate_burst: Option<f64>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key); re-read when it
    /// changes and on SIGHUP.
    #[arg(long, env = "THAW_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "THAW_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Collect garbage inside the registry this often (e.g. 6h); off by default.
    #[arg(long, env = "THAW_GC_INTERVAL", value_parser = parse_duration)]
    gc_interval: Option<Duration>,
    /// Grace period of those runs: content younger than this is kept.
    #[arg(long, env = "THAW_GC_GRACE", value_parser = parse_duration, default_value = "1h")]
    gc_grace: Duration,
    /// Upload sessions untouched this long are ended (checked on their own clock, GC or not).
    #[arg(long, env = "THAW_UPLOAD_MAX_AGE", value_parser = parse_duration, default_value = "24h")]
    upload_max_age: Duration,
    /// Upload sessions open at once in this process; past it, new ones get 429.
    #[arg(long, env = "THAW_MAX_UPLOAD_SESSIONS", default_value_t = thaw_registry::DEFAULT_MAX_UPLOAD_SESSIONS)]
    max_upload_sessions: usize,
    /// Upload sessions open at once from one client IP address; past it, new ones get 429.
    #[arg(long, env = "THAW_MAX_UPLOAD_SESSIONS_PER_CLIENT", default_value_t = thaw_registry::DEFAULT_MAX_UPLOAD_SESSIONS_PER_CLIENT)]
    max_upload_sessions_per_client: usize,
    /// Turn authentication on: a JSON file naming the htpasswd file, grants and token key
    /// (docs/OPERATIONS.md). Without it the registry serves everyone.
    #[arg(long, env = "THAW_AUTH_CONFIG", value_name = "FILE")]
    auth_config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Delete what no tag, manifest or blob link reaches, once older than --grace, and
    /// rewrite packs that became mostly garbage. Refused while a registry serves the storage.
    Gc {
        /// Storage: a directory path, or s3://BUCKET/PREFIX.
        #[arg(long, env = "THAW_STORAGE", default_value = "./thaw-data")]
        storage: String,
        /// Content younger than this is kept (e.g. 90s, 30m, 1h).
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        grace: Duration,
        /// Print what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rewrite packs whose live fraction is below this.
        #[arg(long, default_value_t = thaw_registry::DEFAULT_REWRITE_BELOW)]
        rewrite_below: f64,
    },
    /// Verify every stored chunk against its id; drop the bad ones from their pack indexes
    /// so they count as missing and the next push stores them again. Exits 1 when bad
    /// chunks were found with --dry-run.
    Scrub {
        /// Storage: a directory path, or s3://BUCKET/PREFIX.
        #[arg(long, env = "THAW_STORAGE", default_value = "./thaw-data")]
        storage: String,
        /// Report the bad chunks; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `500ms`, `90s`, `30m`, `6h`, `1d`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 90s, 30m or 1h"))?;
    let millis = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    Ok(Duration::from_millis(n.saturating_mul(millis)))
}

async fn run_gc(storage: &str, options: thaw_registry::GcOptions) -> std::process::ExitCode {
    match thaw_registry::collect_garbage(storage, &options).await {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("thaw-registry gc: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_scrub(storage: &str, dry_run: bool) -> std::process::ExitCode {
    let progress = |done: u64, total: u64, so_far: &thaw_registry::ScrubReport| {
        eprintln!(
            "scrub: pack {done}/{total}, {} chunks checked, {} bad",
            so_far.chunks,
            so_far.bad_chunks.len()
        );
    };
    match thaw_registry::scrub(storage, dry_run, &progress).await {
        Ok(report) => {
            println!("{report}");
            if dry_run && !report.bad_chunks.is_empty() {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("thaw-registry scrub: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

impl Args {
    fn limits(&self) -> Result<Limits, String> {
        if self.max_inflight == 0 {
            return Err("--max-inflight (THAW_MAX_INFLIGHT) must be at least 1".into());
        }
        if self.max_inflight_per_client == 0 {
            return Err("--max-inflight-per-client (THAW_MAX_INFLIGHT_PER_CLIENT) must be at least 1".into());
        }
        let max_verifications =
            self.max_verifications.unwrap_or_else(thaw_registry::default_max_verifications);
        for (name, n) in [
            ("--max-verifications (THAW_MAX_VERIFICATIONS)", max_verifications),
            (
                "--max-verifications-per-client (THAW_MAX_VERIFICATIONS_PER_CLIENT)",
                self.max_verifications_per_client,
            ),
            ("--max-chunk-repeat (THAW_MAX_CHUNK_REPEAT)", self.max_chunk_repeat as usize),
        ] {
            if n == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.credential_threads == 0 {
            return Err("--credential-threads (THAW_CREDENTIAL_THREADS) must be at least 1".into());
        }
        for (name, d) in [
            ("--header-timeout (THAW_HEADER_TIMEOUT)", self.header_timeout),
            ("--body-timeout (THAW_BODY_TIMEOUT)", self.body_timeout),
            ("--send-timeout (THAW_SEND_TIMEOUT)", self.send_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be more than 0"));
            }
        }
        if !(self.rate_limit >= 0.0 && self.rate_limit.is_finite()) {
            return Err(format!("--rate-limit (THAW_RATE_LIMIT) must be 0 or more, got {}", self.rate_limit));
        }
        let rate = (self.rate_limit > 0.0).then(|| RateLimit {
            per_second: self.rate_limit,
            burst: self.rate_burst.unwrap_or(self.rate_limit * 10.0).max(1.0),
        });
        Ok(Limits {
            max_inflight: self.max_inflight,
            max_inflight_per_client: self.max_inflight_per_client,
            inflight_wait: std::time::Duration::from_millis(self.inflight_wait_ms),
            rate,
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            send_timeout: self.send_timeout,
            max_verifications,
            max_verifications_per_client: self.max_verifications_per_client,
            verify_wait: self.verify_wait,
            max_chunk_repeat: self.max_chunk_repeat,
        })
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THAW_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(Command::Gc { storage, grace, dry_run, rewrite_below }) = &args.command {
        let options = thaw_registry::GcOptions {
            grace: *grace,
            dry_run: *dry_run,
            rewrite_below: *rewrite_below,
            ..Default::default()
        };
        return run_gc(storage, options).await;
    }
    if let Some(Command::Scrub { storage, dry_run }) = &args.command {
        return run_scrub(storage, *dry_run).await;
    }
    let limits = match args.limits() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("thaw-registry: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let config = RegistryConfig::new(args.listen, args.storage);
    let mut options = ServeOptions::default().with_limits(limits);
    options.gc_interval = args.gc_interval;
    options.gc.grace = args.gc_grace;
    options.gc.upload_max_age = args.upload_max_age;
    options.uploads = thaw_registry::UploadLimits {
        max_sessions: args.max_upload_sessions,
        max_sessions_per_client: args.max_upload_sessions_per_client,
        max_age: args.upload_max_age,
    };
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        options = options.with_tls(thaw_registry::tls::TlsFiles::new(cert, key));
    }
    if let Some(path) = &args.auth_config {
        match thaw_registry::auth::Auth::load(path) {
            Ok(auth) => {
                let auth = auth
                    .with_tls(options.tls.is_some())
                    .with_credential_threads(args.credential_threads)
                    .with_credential_wait(args.credential_wait);
                options.auth = Some(std::sync::Arc::new(auth))
            }
            Err(e) => {
                eprintln!("thaw-registry: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    match thaw_registry::serve_with(config, options, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thaw-registry: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
