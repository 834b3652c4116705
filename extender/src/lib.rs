//! `thaw-extender`: a kube-scheduler HTTP extender that scores each candidate node by the share
//! of a pod's snapshot bytes the node already holds (chunk coverage, not just whole-snapshot
//! hits), so pods go where their snapshot already is.
//!
//! It owns the extender protocol (`wire`, exactly as kube-scheduler speaks it), the mapping of
//! pods to snapshots (`snapshot`), coverage scoring in memory (`scorer`), herd damping
//! (`herd`) and the registry side (`resolver`: tags, manifests and recipes, cached). Holdings
//! come from the registry's node directory, polled in the background, or from
//! `NodeSnapshotCache` objects through a kube reflector (`kube_holdings`).
//!
//! It must not block or fail scheduling: every problem (a pod without a snapshot, an unknown
//! snapshot, an unreachable registry, a snapshot not yet cached) answers neutral scores (all
//! 0) with 200, `/filter` never filters a node out, and no registry call on the request path
//! waits longer than `cold_wait`.
#![warn(missing_docs)]

pub mod herd;
pub mod kube_holdings;
pub mod metrics;
pub mod resolver;
pub mod scorer;
pub mod snapshot;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use thaw_client::{ClientOptions, Registry, RetryPolicy};
use thaw_schema::holdings::NodeHoldings;

use crate::herd::HerdConfig;
use crate::metrics::{Metrics, Neutral, Verb};
use crate::resolver::{Lookup, Resolver, ResolverConfig};
use crate::scorer::Scorer;
use crate::snapshot::SnapshotRules;
use crate::wire::{ExtenderArgs, ExtenderFilterResult, HostPriority};

/// Largest request body accepted (a `NodeList` of 5,000 full Node objects fits).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Everything the extender is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Registry `host[:port]`: the node directory, and references without a host.
    pub registry: String,
    /// Speak plain HTTP to registries.
    pub plain_http: bool,
    /// Knative revision → reference template (`None`: off). See [`SnapshotRules`].
    pub knative_template: Option<String>,
    /// How often the node directory is read.
    pub poll_interval: Duration,
    /// Registry lookups.
    pub resolver: ResolverConfig,
    /// Herd damping.
    pub herd: HerdConfig,
    /// PEM files of CAs to trust for the registry besides the built-in roots.
    pub ca_certs: Vec<std::path::PathBuf>,
}

impl Config {
    /// Defaults for `registry`.
    pub fn new(registry: &str, plain_http: bool) -> Self {
        Self {
            registry: registry.to_owned(),
            plain_http,
            knative_template: Some(snapshot::DEFAULT_KNATIVE_TEMPLATE.to_owned()),
            poll_interval: Duration::from_secs(1),
            resolver: ResolverConfig::default(),
            herd: HerdConfig::default(),
            ca_certs: Vec::new(),
        }
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            plain_http: self.plain_http,
            retry: RetryPolicy {
                attempts: 2,
                base_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(500),
            },
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(10),
            ca_certs: self.ca_certs.clone(),
            ..ClientOptions::default()
        }
    }
}

/// The extender's shared state.
#[derive(Debug)]
pub struct AppState {
    /// Coverage scoring.
    pub scorer: Arc<Scorer>,
    /// Registry lookups.
    pub resolver: Arc<Resolver>,
    /// Pod → snapshot mapping.
    pub rules: SnapshotRules,
    /// Counters.
    pub metrics: Arc<Metrics>,
    directory: Arc<Registry>,
    poll_interval: Duration,
}

impl AppState {
    /// State for `config`; nothing is fetched until [`AppState::spawn_background`].
    pub fn new(config: &Config) -> anyhow::Result<Arc<Self>> {
        Self::with_scorer(config, Arc::new(Scorer::new(config.herd)))
    }

    /// State around an existing scorer (benchmarks inject synthetic profiles and holdings).
    pub fn with_scorer(config: &Config, scorer: Arc<Scorer>) -> anyhow::Result<Arc<Self>> {
        let options = config.client_options();
        let metrics = Arc::new(Metrics::default());
        let resolver = Arc::new(Resolver::new(
            &config.registry,
            options.clone(),
            config.resolver.clone(),
            scorer.clone(),
            metrics.clone(),
        ));
        // The directory is read with the resolver's client for that host: one connection pool.
        let directory = resolver.client(&config.registry)?;
        Ok(Arc::new(Self {
            scorer,
            resolver,
            rules: SnapshotRules {
                registry: config.registry.clone(),
                knative_template: config.knative_template.clone(),
            },
            metrics,
            directory,
            poll_interval: config.poll_interval,
        }))
    }

    /// Starts the holdings poller (and, through it, profile warming). Runs until the
    /// runtime stops.
    pub fn spawn_background(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.poll_holdings().await })
    }

    /// Reads the node directory every `poll_interval`; a failed read keeps the last holdings.
    async fn poll_holdings(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut warming: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            ticker.tick().await;
            let read = tokio::time::timeout(Duration::from_secs(10), self.directory.node_directory()).await;
            match read {
                Ok(Ok(dir)) => {
                    self.metrics.directory_read(true);
                    if failing {
                        tracing::info!(nodes = dir.nodes.len(), "node directory readable again");
                        failing = false;
                    }
                    self.apply_holdings(dir.nodes, &mut warming);
                    self.scorer.prune_herd(Instant::now());
                }
                Ok(Err(e)) => self.directory_failed(&mut failing, e.to_string()),
                Err(_) => self.directory_failed(&mut failing, "no answer within 10 s".into()),
            }
        }
    }

    /// Replaces the scorer's holdings with `nodes` and, unless a pass is still running,
    /// starts fetching the profiles of what they hold (one warming pass at a time, so
    /// `warm_concurrency` bounds the fetches).
    pub(crate) fn apply_holdings(
        &self,
        nodes: Vec<NodeHoldings>,
        warming: &mut Option<tokio::task::JoinHandle<()>>,
    ) {
        self.scorer.set_holdings(&nodes);
        if warming.as_ref().is_none_or(|w| w.is_finished()) {
            let resolver = self.resolver.clone();
            *warming = Some(tokio::spawn(async move { resolver.warm_held(&nodes).await }));
        }
    }

    /// Starts the `NodeSnapshotCache` reflector on `client` instead of the directory poller
    /// (`--holdings kube`). Runs until the runtime stops.
    pub fn spawn_kube(self: &Arc<Self>, client: kube::Client) -> tokio::task::JoinHandle<()> {
        tokio::spawn(kube_holdings::run(self.clone(), client))
    }

    fn directory_failed(&self, failing: &mut bool, why: String) {
        self.metrics.directory_read(false);
        if !*failing {
            tracing::warn!(error = %why, "cannot read the node directory; scoring from the last holdings read");
            *failing = true;
        }
    }

    /// Scores for a request (all 0 when the pod's snapshot is unknown or not cached).
    pub async fn prioritize(&self, args: &ExtenderArgs) -> Vec<HostPriority> {
        let nodes = args.candidates();
        let scores = match self.scores(args, &nodes).await {
            Some(s) => s,
            None => vec![0; nodes.len()],
        };
        nodes.into_iter().zip(scores).map(|(host, score)| HostPriority { host, score }).collect()
    }

    async fn scores(&self, args: &ExtenderArgs, nodes: &[String]) -> Option<Vec<i64>> {
        let pod = args.pod.as_ref()?;
        let reference = match self.rules.reference_for(pod) {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!(pod = pod.display_name(), ?why, "no snapshot: neutral scores");
                self.metrics.count_neutral(Neutral::NoSnapshot);
                return None;
            }
        };
        let digest = match self.resolver.lookup(&reference).await {
            Lookup::Ready(d) => d,
            other => {
                tracing::debug!(pod = pod.display_name(), %reference, ?other, "snapshot not cached: neutral scores");
                self.metrics.count_neutral(if other == Lookup::Pending {
                    Neutral::Pending
                } else {
                    Neutral::Failed
                });
                return None;
            }
        };
        let scorer = self.scorer.clone();
        let nodes = nodes.to_vec();
        let scores = tokio::task::spawn_blocking(move || scorer.prioritize(&digest, &nodes, Instant::now()))
            .await
            .ok()?;
        tracing::debug!(pod = pod.display_name(), %reference, %digest, ?scores, "scored");
        Some(scores)
    }
}

/// The extender's HTTP API: `POST /prioritize`, `POST /filter`, `GET /healthz`, `GET /metrics`.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/prioritize", post(prioritize))
        .route("/filter", post(filter))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves [`app`] on `listener` until `shutdown`: HTTPS when `tls` is set (its files are
/// reloaded when they change), else plain HTTP.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    tls: Option<thaw_tls::ReloadingConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => axum::serve(listener, app(state)).with_graceful_shutdown(shutdown).await,
        Some(config) => {
            let listener = thaw_tls::TlsListener::new(listener, config)?;
            axum::serve(listener, app(state)).with_graceful_shutdown(shutdown).await
        }
    }
}

fn parse_args(body: &[u8]) -> Result<ExtenderArgs, (StatusCode, String)> {
    serde_json::from_slice(body).map_err(|e| {
        tracing::warn!(error = %e, "malformed extender request");
        (StatusCode::BAD_REQUEST, format!("not an ExtenderArgs: {e}\n"))
    })
}

async fn prioritize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let started = Instant::now();
    let args = match parse_args(&body) {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    let answer = state.prioritize(&args).await;
    state.metrics.observe(Verb::Prioritize, started.elapsed());
    Json(answer).into_response()
}

/// Never filters: a cold cache is a reason to score lower, not to refuse a node.
async fn filter(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let started = Instant::now();
    let args = match parse_args(&body) {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    let result = ExtenderFilterResult::keep_all(args);
    state.metrics.observe(Verb::Filter, started.elapsed());
    Json(result).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(state.scorer.sizes());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
