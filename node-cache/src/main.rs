//! `thaw-node-cache`: configuration, logging, signals, then serve the local API (and the
//! peer API, with `--peer-listen`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use thaw_client::{ClientOptions, Registry, Stats};
use thaw_node_cache::holdings::{run_publisher, RegistryDirectory};
use thaw_node_cache::kube_publisher::KubePublisher;
use thaw_node_cache::{
    api, peer, Cache, CacheConfig, PeerOptions, PeerToken, WorkingSetMode, WorkingSetOptions,
};

/// Where holdings are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Holdings {
    /// The registry's node directory (`PUT /v2/_thaw/nodes/<node>`).
    Registry,
    /// The node's `NodeSnapshotCache` status, by server-side apply.
    Kube,
}

/// What lazy restores do with working sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WorkingSets {
    /// Fetch a snapshot's working set first; record and publish one when it has none.
    Share,
    /// Fetch a snapshot's working set first; never publish one.
    Use,
    /// Ignore working sets.
    Off,
}

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
    /// Seconds a lease lasts unless renewed (`POST /v1/snapshots/renew`); then the cache
    /// releases it itself, so a crashed orchestrator does not pin capacity forever.
    #[arg(long, env = "THAW_LEASE_TTL", default_value_t = 600)]
    lease_ttl: u64,
    /// The only directory tree `POST /v1/snapshots/publish` may read snapshots from (where
    /// the orchestrator writes new snapshots). Without it, publishing is off. Must not
    /// overlap the cache directory.
    #[arg(long, env = "THAW_PUBLISH_ROOT")]
    publish_root: Option<PathBuf>,
    /// Do not publish holdings anywhere (see --holdings).
    #[arg(long)]
    no_publish: bool,
    /// Where holdings are published: the registry's node directory, or this node's
    /// `NodeSnapshotCache` (in-cluster service account or $KUBECONFIG).
    #[arg(long, env = "THAW_HOLDINGS", value_enum, default_value = "registry")]
    holdings: Holdings,
    /// Serve chunks to other nodes on this address (`host:port`), apart from the local API.
    /// Needs a cluster token (`--peer-token-file`, `THAW_PEER_TOKEN`) or `--peer-insecure`.
    #[arg(long, env = "THAW_PEER_LISTEN")]
    peer_listen: Option<String>,
    /// The `host:port` other nodes reach the peer service at, published in the holdings;
    /// default: the address `--peer-listen` bound (which must then not be a wildcard).
    #[arg(long, env = "THAW_PEER_ADVERTISE")]
    peer_advertise: Option<String>,
    /// A file holding the cluster token (at least 16 printable characters): required from
    /// peers, presented to them. With a token, this node fetches chunks from peers. Several
    /// lines while rotating: the first is presented, all are accepted.
    /// Without it, the token is read from `THAW_PEER_TOKEN` if set.
    #[arg(long, env = "THAW_PEER_TOKEN_FILE")]
    peer_token_file: Option<PathBuf>,
    /// Serve and fetch peer chunks without a token: anyone who reaches the peer port can
    /// read every cached snapshot. Only for isolated test networks.
    #[arg(long)]
    peer_insecure: bool,
    /// Milliseconds a peer may stay quiet while answering (before its answer, or between
    /// two pieces of it) before it counts as failed; a whole answer may take 4 times this.
    #[arg(long, env = "THAW_PEER_TIMEOUT_MS", default_value_t = 5000)]
    peer_timeout_ms: u64,
    /// Seconds a failed peer is avoided.
    #[arg(long, env = "THAW_PEER_PENALTY_SECS", default_value_t = 60)]
    peer_penalty_secs: u64,
    /// Peer requests served at once, in total.
    #[arg(long, env = "THAW_PEER_MAX_UPLOADS", default_value_t = 8)]
    peer_max_uploads: usize,
    /// Peer requests served at once to one peer address (a fetching node has up to 3 batches
    /// in flight).
    #[arg(long, env = "THAW_PEER_MAX_UPLOADS_PER_PEER", default_value_t = 3)]
    peer_max_uploads_per_peer: usize,
    /// Serve the peer port with HTTPS, this PEM certificate chain; also the client
    /// certificate presented to peers that require one. Re-read on change and SIGHUP.
    #[arg(long, env = "THAW_PEER_TLS_CERT", value_name = "FILE", requires = "peer_tls_key")]
    peer_tls_cert: Option<PathBuf>,
    /// PEM private key for --peer-tls-cert.
    #[arg(long, env = "THAW_PEER_TLS_KEY", value_name = "FILE", requires = "peer_tls_cert")]
    peer_tls_key: Option<PathBuf>,
    /// Fetch from peers over HTTPS, trusting the CAs in this PEM file.
    #[arg(long, env = "THAW_PEER_TLS_CA", value_name = "FILE")]
    peer_tls_ca: Option<PathBuf>,
    /// Require peers to present a client certificate signed by a CA in this PEM file
    /// (mutual TLS; the cluster token is still checked). Needs --peer-tls-cert.
    #[arg(long, env = "THAW_PEER_TLS_CLIENT_CA", value_name = "FILE", requires = "peer_tls_cert")]
    peer_tls_client_ca: Option<PathBuf>,
    /// Lazy restores: `share` fetches a snapshot's working set (the chunks its first restore
    /// touched, in order) first, and records and publishes one to the registry when it has
    /// none (needs push on the repository); `use` never publishes; `off` ignores them.
    #[arg(long, env = "THAW_WORKING_SETS", value_enum, default_value = "share")]
    working_sets: WorkingSets,
    /// Milliseconds without a new chunk touched after which a first restore's working set is
    /// published.
    #[arg(long, env = "THAW_WORKING_SET_QUIET_MS", default_value_t = 3000)]
    working_set_quiet_ms: u64,
    /// Trust the CA certificates in this PEM file for the registry, besides the system roots.
    #[arg(long, env = "THAW_CA_CERT", value_name = "FILE")]
    ca_cert: Vec<PathBuf>,
}

/// The P2P options from the command line, and the peer listener if one is wanted.
async fn peer_setup(
    args: &Args,
) -> anyhow::Result<(PeerOptions, Option<tokio::net::TcpListener>, Option<String>)> {
    let from_env = std::env::var("THAW_PEER_TOKEN").ok().filter(|t| !t.is_empty());
    let token = match (&args.peer_token_file, from_env) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--peer-token-file {}: {e}", path.display()))?;
            Some(
                PeerToken::from_lines(&text)
                    .map_err(|e| anyhow::anyhow!("--peer-token-file {}: {e}", path.display()))?,
            )
        }
        (None, Some(t)) => Some(PeerToken::new(&t).map_err(|e| anyhow::anyhow!("THAW_PEER_TOKEN: {e}"))?),
        (None, None) => None,
    };
    let options = PeerOptions {
        token,
        insecure: args.peer_insecure,
        timeout: Duration::from_millis(args.peer_timeout_ms),
        penalty: Duration::from_secs(args.peer_penalty_secs),
        max_uploads: args.peer_max_uploads,
        max_uploads_per_peer: args.peer_max_uploads_per_peer,
        tls_ca: args.peer_tls_ca.clone(),
        tls_identity: args.peer_tls_cert.clone().zip(args.peer_tls_key.clone()),
    };
    let Some(addr) = &args.peer_listen else {
        return Ok((options, None, None));
    };
    if options.token.is_none() && !options.insecure {
        anyhow::bail!(
            "--peer-listen {addr}: the peer service needs a cluster token (--peer-token-file or \
             THAW_PEER_TOKEN); --peer-insecure serves without one"
        );
    }
    if options.token.is_none() {
        tracing::warn!("serving peers WITHOUT authentication (--peer-insecure)");
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--peer-listen {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let advertise = match &args.peer_advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => anyhow::bail!(
            "--peer-listen {addr} binds every address; say which one peers use with --peer-advertise"
        ),
        None => bound.to_string(),
    };
    Ok((options, Some(listener), Some(advertise)))
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
    let (host, plain_http) = thaw_client::parse_registry_url(&args.registry, args.plain_http)?;
    let client = ClientOptions { plain_http, ca_certs: args.ca_cert.clone(), ..ClientOptions::default() };
    let peer_tls = match (&args.peer_tls_cert, &args.peer_tls_key) {
        (Some(cert), Some(key)) => Some(
            thaw_tls::ReloadingConfig::load(thaw_tls::TlsFiles {
                client_ca: args.peer_tls_client_ca.clone(),
                ..thaw_tls::TlsFiles::new(cert, key)
            })
            .map_err(|e| {
                anyhow::anyhow!("peer TLS (--peer-tls-cert/--peer-tls-key/--peer-tls-client-ca): {e}")
            })?,
        ),
        _ => None,
    };
    let (peer_options, peer_listener, peer_endpoint) = peer_setup(&args).await?;
    let config = CacheConfig {
        registry: host.clone(),
        client: client.clone(),
        cache_dir: args.cache_dir.clone(),
        capacity: args.capacity,
        node_name: args.node_name.clone(),
        tag_ttl: Duration::from_secs(args.tag_ttl),
        peer_endpoint,
        peer: peer_options,
        lease_ttl: Duration::from_secs(args.lease_ttl),
        publish_root: args.publish_root.clone(),
        working_sets: WorkingSetOptions {
            mode: match args.working_sets {
                WorkingSets::Share => WorkingSetMode::Share,
                WorkingSets::Use => WorkingSetMode::Use,
                WorkingSets::Off => WorkingSetMode::Off,
            },
            quiet: Duration::from_millis(args.working_set_quiet_ms),
        },
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
    // A few checks per TTL, at most one a second.
    let reap_every = Duration::from_secs(args.lease_ttl.div_ceil(4).clamp(1, 30));
    tokio::spawn(cache.clone().run_lease_reaper(reap_every));
    if !args.no_publish {
        match args.holdings {
            Holdings::Registry => {
                let registry = Registry::new(&host, &client, Arc::new(Stats::new()))?;
                tokio::spawn(run_publisher(
                    cache.clone(),
                    RegistryDirectory::new(registry),
                    Duration::from_millis(250),
                ));
            }
            Holdings::Kube => {
                let kube = kube::Client::try_default().await.map_err(|e| {
                    anyhow::anyhow!("--holdings kube: no Kubernetes client configuration ({e}); run in a pod or set KUBECONFIG")
                })?;
                tokio::spawn(run_publisher(
                    cache.clone(),
                    KubePublisher::new(kube, &args.node_name),
                    Duration::from_millis(250),
                ));
            }
        }
    }
    if let Some(listener) = peer_listener {
        tracing::info!(addr = %listener.local_addr()?, advertised = ?cache.config().peer_endpoint, tls = peer_tls.is_some(), mtls = args.peer_tls_client_ca.is_some(), "peer service listening");
        let app = peer::serve::app(cache.clone()).into_make_service_with_connect_info::<SocketAddr>();
        match peer_tls {
            None => {
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "the peer service stopped");
                    }
                });
            }
            Some(config) => {
                use axum::serve::ListenerExt as _;
                // `tap_io` is how axum hands a custom listener's peer address to `ConnectInfo`.
                let listener = thaw_tls::TlsListener::new(listener, config)?.tap_io(|_| {});
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "the peer service stopped");
                    }
                });
            }
        }
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
