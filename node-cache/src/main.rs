//! `thaw-node-cache`: configuration, logging, signals, then serve the local API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use thaw_client::{ClientOptions, Registry, Stats};
use thaw_node_cache::holdings::{run_publisher, RegistryDirectory};
use thaw_node_cache::{api, Cache, CacheConfig};

/// A bounded snapshot cache on a worker node: restores snapshots from the chunks it lacks.
#[derive(Debug, Parser)]
#[command(name = "thaw-node-cache", version)]
struct Args {
    /// The registry: `http://host:port` (plain HTTP), `https://host` or `host[:port]`.
    #[arg(long, env = "THAW_REGISTRY")]
    registry: String,
    /// Speak plain HTTP to a registry given without a scheme.
    #[arg(long, env = "THAW_PLAIN_HTTP")]
    plain_http: bool,
    /// The cache directory (created if missing).
    #[arg(long, env = "THAW_CACHE_DIR")]
    cache_dir: PathBuf,
    /// Capacity in bytes of allocated disk; suffixes K, M, G, T (powers of 1024) allowed.
    #[arg(long, env = "THAW_CAPACITY", value_parser = parse_bytes)]
    capacity: u64,
    /// Where the local API listens: `host:port`, or `unix:/path/to/socket`.
    #[arg(long, env = "THAW_LISTEN", default_value = "127.0.0.1:7700")]
    listen: String,
    /// This node's name (the Kubernetes node name).
    #[arg(long, env = "THAW_NODE_NAME")]
    node_name: String,
    /// Seconds a tag's resolution is trusted before `ensure` asks the registry again.
    #[arg(long, env = "THAW_TAG_TTL", default_value_t = 60)]
    tag_ttl: u64,
    /// Do not publish holdings to the registry's node directory.
    #[arg(long)]
    no_publish: bool,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a byte count"))?;
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        other => return Err(format!("unknown unit {other:?} in {s:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THAW_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thaw-node-cache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (host, plain_http) = match args.registry.split_once("://") {
        Some(("http", rest)) => (rest.trim_end_matches('/').to_owned(), true),
        Some(("https", rest)) => (rest.trim_end_matches('/').to_owned(), false),
        Some((scheme, _)) => anyhow::bail!("--registry {}: unknown scheme {scheme:?}", args.registry),
        None => (args.registry.clone(), args.plain_http),
    };
    let client = ClientOptions { plain_http, ..ClientOptions::default() };
    let config = CacheConfig {
        registry: host.clone(),
        client: client.clone(),
        cache_dir: args.cache_dir.clone(),
        capacity: args.capacity,
        node_name: args.node_name.clone(),
        tag_ttl: Duration::from_secs(args.tag_ttl),
        peer_endpoint: None,
    };
    thaw_schema::holdings::validate_node_name(&args.node_name)?;
    let cache = Cache::open(config)?;
    let listing = cache.listing();
    tracing::info!(
        dir = %args.cache_dir.display(),
        snapshots = listing.snapshots.len(),
        used = listing.used_bytes,
        capacity = listing.capacity_bytes,
        registry = %host,
        "cache opened"
    );
    tokio::spawn(cache.clone().run_flusher(Duration::from_millis(500)));
    tokio::spawn(cache.clone().run_spare_maker());
    if !args.no_publish {
        let registry = Registry::new(&host, &client, Arc::new(Stats::new()))?;
        tokio::spawn(run_publisher(
            cache.clone(),
            RegistryDirectory::new(registry),
            Duration::from_millis(250),
        ));
    }
    let app = api::app(cache.clone());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    if let Some(path) = args.listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        tracing::info!(socket = path, "listening");
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    } else {
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        tracing::info!(addr = %listener.local_addr()?, "listening");
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    }
    tokio::task::spawn_blocking(move || cache.flush()).await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert!(parse_bytes("5X").is_err());
        assert!(parse_bytes("G").is_err());
    }
}
