//! `thaw-registry`: configuration, logging and signals; the work is in the library.

use std::net::SocketAddr;

use clap::Parser;
use thaw_registry::RegistryConfig;

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
    let config = RegistryConfig::new(args.listen, args.storage);
    match thaw_registry::serve(config, shutdown_signal()).await {
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
