//! `thaw-registry`: configuration, logging and signals; the work is in the library.

use std::net::SocketAddr;

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
    /// How long a request past --max-inflight waits for a slot, in milliseconds.
    #[arg(long, env = "THAW_INFLIGHT_WAIT_MS", default_value_t = thaw_registry::DEFAULT_INFLIGHT_WAIT.as_millis() as u64)]
    inflight_wait_ms: u64,
    /// Requests per second allowed per client IP address (token bucket); 0 turns the rate
    /// limit off (the default). Past it: 429 TOOMANYREQUESTS with Retry-After.
    #[arg(long, env = "THAW_RATE_LIMIT", default_value_t = 0.0)]
    rate_limit: f64,
    /// Requests a quiet client may make at once under --rate-limit (default: 10 seconds'
    /// worth, at least 1).
    #[arg(long, env = "THAW_RATE_BURST")]
    rate_burst: Option<f64>,
}

impl Args {
    fn limits(&self) -> Result<Limits, String> {
        if self.max_inflight == 0 {
            return Err("--max-inflight (THAW_MAX_INFLIGHT) must be at least 1".into());
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
            inflight_wait: std::time::Duration::from_millis(self.inflight_wait_ms),
            rate,
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
    let limits = match args.limits() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("thaw-registry: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let config = RegistryConfig::new(args.listen, args.storage);
    let options = ServeOptions::default().with_limits(limits);
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
