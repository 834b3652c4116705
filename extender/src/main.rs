//! `thaw-extender`: configuration, logging, signals, then serve the extender API.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use thaw_extender::herd::HerdConfig;
use thaw_extender::{AppState, Config};

/// Where node holdings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Holdings {
    /// The registry's node directory (`GET /v2/_thaw/nodes`).
    Registry,
    /// `NodeSnapshotCache` objects through a kube reflector (in-cluster config or kubeconfig).
    Kube,
}

/// kube-scheduler HTTP extender: scores nodes by the bytes of a pod's snapshot they hold.
#[derive(Debug, Parser)]
#[command(name = "thaw-extender", version)]
struct Args {
    /// Where to listen (`host:port`); kube-scheduler's `urlPrefix` is `http://ADDR`.
    #[arg(long, env = "THAW_LISTEN", default_value = "127.0.0.1:8888")]
    listen: String,
    /// The registry: `http://host:port` (plain HTTP), `https://host` or `host[:port]`.
    #[arg(long, env = "THAW_REGISTRY")]
    registry: String,
    /// Speak plain HTTP to a registry given without a scheme.
    #[arg(long, env = "THAW_PLAIN_HTTP")]
    plain_http: bool,
    /// Trust the CA certificates in this PEM file for the registry, besides the system roots.
    #[arg(long, env = "THAW_CA_CERT", value_name = "FILE")]
    ca_cert: Vec<std::path::PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key); re-read when it changes
    /// and on SIGHUP. kube-scheduler's `urlPrefix` is then `https://ADDR`.
    #[arg(long, env = "THAW_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "THAW_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Where node holdings come from.
    #[arg(long, env = "THAW_HOLDINGS", value_enum, default_value = "registry")]
    holdings: Holdings,
    /// Reference for a Knative pod without the `thaw.dev/snapshot` annotation. Placeholders:
    /// {registry} {namespace} {service} {configuration} {revision}. Empty: no mapping.
    #[arg(long, env = "THAW_KNATIVE_TEMPLATE", default_value = thaw_extender::snapshot::DEFAULT_KNATIVE_TEMPLATE)]
    knative_template: String,
    /// Milliseconds between reads of the node directory (`--holdings registry`).
    #[arg(long, env = "THAW_POLL_INTERVAL_MS", default_value_t = 1000)]
    poll_interval_ms: u64,
    /// Seconds a tag's digest is trusted before it is asked again.
    #[arg(long, env = "THAW_TAG_TTL", default_value_t = 30)]
    tag_ttl: u64,
    /// Milliseconds a /prioritize waits for a snapshot not yet cached (0: answer neutral at once).
    #[arg(long, env = "THAW_COLD_WAIT_MS", default_value_t = 250)]
    cold_wait_ms: u64,
    /// Seconds a failed snapshot lookup is not retried.
    #[arg(long, env = "THAW_RETRY_AFTER", default_value_t = 5)]
    retry_after: u64,
    /// Seconds a top pick counts against a node for the same snapshot (0: no herd damping).
    #[arg(long, env = "THAW_HERD_WINDOW", default_value_t = 10)]
    herd_window: u64,
    /// Points taken from a node's score per recent top pick for the same snapshot.
    #[arg(long, env = "THAW_HERD_PENALTY", default_value_t = 1)]
    herd_penalty: i64,
    /// Most points herd damping takes from one node.
    #[arg(long, env = "THAW_HERD_MAX_PENALTY", default_value_t = 3)]
    herd_max_penalty: i64,
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
            eprintln!("thaw-extender: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (host, plain_http) = thaw_client::parse_registry_url(&args.registry, args.plain_http)?;
    if args.herd_penalty < 0 || args.herd_max_penalty < 0 {
        anyhow::bail!("--herd-penalty and --herd-max-penalty must not be negative");
    }
    if args.poll_interval_ms == 0 {
        anyhow::bail!("--poll-interval-ms must be at least 1");
    }
    let mut config = Config::new(&host, plain_http);
    config.ca_certs = args.ca_cert.clone();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            thaw_tls::ReloadingConfig::load(thaw_tls::TlsFiles::new(cert, key))
                .map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key: {e}"))?,
        ),
        _ => None,
    };
    config.knative_template = Some(args.knative_template).filter(|t| !t.trim().is_empty());
    config.poll_interval = Duration::from_millis(args.poll_interval_ms);
    config.resolver.tag_ttl = Duration::from_secs(args.tag_ttl);
    config.resolver.cold_wait = Duration::from_millis(args.cold_wait_ms);
    config.resolver.retry_after = Duration::from_secs(args.retry_after);
    config.herd = HerdConfig {
        window: Duration::from_secs(args.herd_window),
        penalty: args.herd_penalty,
        max_penalty: args.herd_max_penalty,
    };
    let state = AppState::new(&config)?;
    match args.holdings {
        Holdings::Registry => drop(state.spawn_background()),
        Holdings::Kube => {
            // In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config.
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!("--holdings kube: no Kubernetes client configuration ({e}); run in a pod or set KUBECONFIG")
            })?;
            drop(state.spawn_kube(client));
        }
    }
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, registry = %host, tls = tls.is_some(), "listening");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    thaw_extender::serve(listener, state, tls, shutdown).await?;
    Ok(())
}
