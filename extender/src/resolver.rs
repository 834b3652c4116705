//! The registry side, all off the request path except one bounded wait: tags to manifest
//! digests (cached for a TTL, served stale while refreshed), manifests and recipes to
//! profiles (cached forever: a manifest digest names immutable content), single-flight per
//! reference, failures remembered for a while so a missing snapshot costs the registry one
//! request per `retry_after`, not one per pod.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt as _, Shared};
use futures::StreamExt as _;
use thaw_client::manifest::{file_layers, ManifestDoc};
use thaw_client::{ClientOptions, Reference, Registry, Stats};
use thaw_schema::holdings::NodeHoldings;
use thaw_schema::Sha256Digest;

use crate::metrics::Metrics;
use crate::scorer::{Scorer, SnapshotChunks};

/// How the resolver talks to the registry.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// How long a tag's digest is trusted before it is asked again (the old answer is used
    /// while the new one is fetched).
    pub tag_ttl: Duration,
    /// How long a `/prioritize` waits for a snapshot not yet cached before answering neutral
    /// (the fetch goes on in the background either way). Zero: never wait.
    pub cold_wait: Duration,
    /// How long a failed lookup (unknown snapshot, unreachable registry) is not retried.
    pub retry_after: Duration,
    /// Limit for one whole snapshot lookup (manifest and every recipe).
    pub fetch_timeout: Duration,
    /// Snapshot lookups in flight at once for background warming.
    pub warm_concurrency: usize,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            tag_ttl: Duration::from_secs(30),
            cold_wait: Duration::from_millis(250),
            retry_after: Duration::from_secs(5),
            fetch_timeout: Duration::from_secs(10),
            warm_concurrency: 4,
        }
    }
}

/// What is known about a pod's snapshot right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Its profile is cached: score it.
    Ready(Sha256Digest),
    /// Still being fetched.
    Pending,
    /// The last lookup failed (unknown snapshot, unreachable registry, not a snapshot).
    Failed,
}

type Flight = Shared<BoxFuture<'static, ()>>;

/// Resolves references to cached profiles.
#[derive(Debug)]
pub struct Resolver {
    default_host: String,
    options: ClientOptions,
    config: ResolverConfig,
    scorer: Arc<Scorer>,
    metrics: Arc<Metrics>,
    clients: Mutex<HashMap<String, Arc<Registry>>>,
    tags: Mutex<HashMap<String, (Sha256Digest, Instant)>>,
    failures: Mutex<HashMap<String, Instant>>,
    inflight: Mutex<HashMap<String, Flight>>,
}

impl Resolver {
    /// A resolver fetching from `default_host` (and any other host a reference names) with
    /// `options`.
    pub fn new(
        default_host: &str,
        options: ClientOptions,
        config: ResolverConfig,
        scorer: Arc<Scorer>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            default_host: default_host.to_owned(),
            options,
            config,
            scorer,
            metrics,
            clients: Mutex::new(HashMap::new()),
            tags: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The registry host references without one resolve against.
    pub fn default_host(&self) -> &str {
        &self.default_host
    }

    /// A client for `host`, made once.
    pub fn client(&self, host: &str) -> thaw_client::Result<Arc<Registry>> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some(c) = clients.get(host) {
            return Ok(c.clone());
        }
        let c = Arc::new(Registry::new(host, &self.options, Arc::new(Stats::new()))?);
        clients.insert(host.to_owned(), c.clone());
        Ok(c)
    }

    /// The digest `reference` names, from the reference itself or the tag cache (stale
    /// entries are returned and refreshed in the background).
    fn known_digest(self: &Arc<Self>, reference: &Reference) -> Option<Sha256Digest> {
        if let Some(d) = reference.digest() {
            return Some(d);
        }
        let key = reference.to_string();
        let (digest, at) = *self.tags.lock().expect("tags lock").get(&key)?;
        if at.elapsed() >= self.config.tag_ttl {
            drop(self.start(reference.clone())); // spawned: runs without us
        }
        Some(digest)
    }

    /// Where `reference` stands; when it is not cached, starts fetching it and waits up to
    /// `cold_wait` for it.
    pub async fn lookup(self: &Arc<Self>, reference: &Reference) -> Lookup {
        if let Some(d) = self.known_digest(reference) {
            if self.scorer.has_profile(&d) {
                return Lookup::Ready(d);
            }
        }
        let key = reference.to_string();
        if self.recently_failed(&key) {
            return Lookup::Failed;
        }
        let flight = self.start(reference.clone());
        if !self.config.cold_wait.is_zero() {
            let _ = tokio::time::timeout(self.config.cold_wait, flight).await;
        }
        match self.known_digest(reference) {
            Some(d) if self.scorer.has_profile(&d) => Lookup::Ready(d),
            _ if self.recently_failed(&key) => Lookup::Failed,
            _ => Lookup::Pending,
        }
    }

    fn recently_failed(&self, key: &str) -> bool {
        let mut failures = self.failures.lock().expect("failures lock");
        match failures.get(key) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                failures.remove(key);
                false
            }
            None => false,
        }
    }

    /// Starts (or joins) the lookup of `reference`.
    fn start(self: &Arc<Self>, reference: Reference) -> Flight {
        let key = reference.to_string();
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if let Some(f) = inflight.get(&key) {
            return f.clone();
        }
        let this = self.clone();
        let k = key.clone();
        let flight = async move {
            let started = Instant::now();
            let result = tokio::time::timeout(this.config.fetch_timeout, this.fetch(&reference)).await;
            let failure = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(format!("no answer within {:?}", this.config.fetch_timeout)),
            };
            if let Some(why) = failure {
                this.metrics.count_lookup_failure();
                tracing::warn!(reference = %k, error = %why, "snapshot lookup failed; its pods score neutral for now");
                this.failures.lock().expect("failures lock").insert(k.clone(), Instant::now() + this.config.retry_after);
            } else {
                tracing::debug!(reference = %k, millis = started.elapsed().as_millis() as u64, "snapshot cached");
            }
            this.inflight.lock().expect("inflight lock").remove(&k);
        }
        .boxed()
        .shared();
        inflight.insert(key, flight.clone());
        drop(inflight);
        tokio::spawn(flight.clone());
        flight
    }

    /// Resolves `reference` and caches its profile.
    async fn fetch(&self, reference: &Reference) -> Result<(), String> {
        let registry = self.client(reference.registry()).map_err(|e| e.to_string())?;
        let repo = reference.repository();
        if reference.digest().is_some_and(|d| self.scorer.has_profile(&d)) {
            return Ok(());
        }
        let manifest =
            registry.get_manifest(repo, &reference.manifest_reference()).await.map_err(|e| e.to_string())?;
        if reference.digest().is_none() {
            self.tags
                .lock()
                .expect("tags lock")
                .insert(reference.to_string(), (manifest.digest, Instant::now()));
        }
        if self.scorer.has_profile(&manifest.digest) {
            return Ok(());
        }
        let doc = ManifestDoc::parse(&manifest).map_err(|e| e.to_string())?;
        if ManifestDoc::is_index(&manifest.media_type) || !doc.manifests.is_empty() {
            return Err("an index, not a snapshot manifest".into());
        }
        let what = reference.to_string();
        let mut chunks = SnapshotChunks::default();
        for layer in file_layers(&doc, &what).map_err(|e| e.to_string())? {
            let d = layer.descriptor.digest;
            match registry.recipe(repo, &d).await.map_err(|e| e.to_string())? {
                Some(recipe) => chunks.add_recipe(&recipe),
                None => chunks.add_opaque(&d, layer.descriptor.size),
            }
        }
        let scorer = self.scorer.clone();
        let digest = manifest.digest;
        tokio::task::spawn_blocking(move || scorer.insert_profile(digest, &chunks))
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Fetches, in the background, the profiles of every held snapshot not yet cached.
    pub async fn warm_held(self: &Arc<Self>, nodes: &[NodeHoldings]) {
        let todo: Vec<Reference> = Scorer::held_snapshots(nodes)
            .into_iter()
            .filter(|(d, _)| !self.scorer.has_profile(d))
            .filter_map(|(d, r)| match Reference::parse_with_default(&r, Some(&self.default_host)) {
                Ok(r) => Some(r.with_digest(d)),
                Err(e) => {
                    tracing::debug!(reference = r, error = %e, "a held snapshot's reference does not parse");
                    None
                }
            })
            .filter(|r| !self.recently_failed(&r.to_string()))
            .collect();
        // `start` spawns, so starting inside the stream keeps at most `warm_concurrency` going.
        futures::stream::iter(todo)
            .for_each_concurrent(self.config.warm_concurrency.max(1), |r| self.start(r))
            .await;
    }
}
