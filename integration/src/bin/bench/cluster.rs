//! The node-side scenarios, against the thaw-registry of the run (issue #8's later items):
//!
//! - **node cache**: a real `thaw-node-cache` with a fresh cache directory: `ensure` of the
//!   new revision on an empty cache (cold), with the previous revision cached, and warm
//!   hits (ensure + release pairs);
//! - **P2P egress**: several node caches, one warm with the new revision, the others cold at
//!   once, with peer fetching on (`--peer-listen`, a cluster token) and off;
//! - **extender**: a real `thaw-extender --holdings registry`, the node directory holding
//!   the node caches' own records plus synthetic ones, timed on `/prioritize` and `/filter`
//!   with kube-scheduler's `ExtenderArgs`.
//!
//! Node caches run where the network's clients run (in the link's namespace with
//! `--link-mbit`), so their registry traffic crosses the limited link; every byte is
//! counted by the proxy in front of the registry. Peers in the namespace reach one another
//! inside it, without the limit (a rack-local network in front of a remote registry).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use thaw_integration::corpus::Snapshot;

use crate::link::Net;
use crate::proxy::{Proxy, Wire};
use crate::systems::{free_port, reference, wire_since, Daemon};

/// Warm hits timed per network.
const HIT_PAIRS: usize = 1000;
/// Extender calls timed per verb.
const EXTENDER_CALLS: usize = 200;
/// Synthetic nodes in the directory the extender reads.
const SYNTHETIC_NODES: usize = 100;
/// One HTTP call to a daemon may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// The daemons, found next to the bench binary.
pub(crate) struct Daemons {
    pub(crate) node_cache: PathBuf,
    pub(crate) extender: PathBuf,
}

/// One measured `ensure` that fetched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ensure {
    /// Wall time around the HTTP call, seconds.
    pub(crate) secs: f64,
    /// Registry traffic the call caused, counted by the proxy.
    pub(crate) wire: Wire,
    /// The answer's uncompressed chunk bytes by source.
    pub(crate) local: u64,
    pub(crate) peers: u64,
    pub(crate) registry: u64,
}

/// One P2P round: the cold nodes ensuring at once.
#[derive(Debug, Clone)]
pub(crate) struct Round {
    /// Until the last cold node had its answer, seconds.
    pub(crate) secs_to_last: f64,
    /// Registry traffic of the whole round (node-directory reads and holdings included).
    pub(crate) wire: Wire,
    /// Sums over the cold nodes of their answers' bytes by source.
    pub(crate) peers: u64,
    pub(crate) registry: u64,
}

/// Everything measured on one network.
#[derive(Debug, Default, Clone)]
pub(crate) struct NodeResults {
    pub(crate) cold: Vec<Ensure>,
    pub(crate) previous_cached: Vec<Ensure>,
    /// Warm-hit ensure latencies, milliseconds.
    pub(crate) hits_ms: Vec<f64>,
    pub(crate) p2p_on: Vec<Round>,
    pub(crate) p2p_off: Vec<Round>,
    /// Node caches in each P2P round (one warm, the rest cold).
    pub(crate) nodes: usize,
}

/// The extender's latencies.
#[derive(Debug, Default, Clone)]
pub(crate) struct ExtenderResults {
    pub(crate) nodes: usize,
    /// Distinct snapshots the synthetic nodes hold.
    pub(crate) snapshots: usize,
    pub(crate) prioritize_ms: Vec<f64>,
    pub(crate) filter_ms: Vec<f64>,
    /// Nodes scored above 0 for the pod (a check that scoring happened).
    pub(crate) scored_nodes: usize,
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

pub(crate) fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(CALL_TIMEOUT).build()?)
}

pub(crate) async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Result<Value> {
    let resp = http.post(url).json(body).send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    ensure!(status.is_success(), "POST {url} answered {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("POST {url} answered no JSON: {text}"))
}

/// A running `thaw-node-cache`.
pub(crate) struct NodeCache {
    _daemon: Daemon,
    /// `http://ADDR` of its local API.
    pub(crate) api: String,
    pub(crate) name: String,
    /// A client of its own: a pooled connection to a stopped node cache whose port a new
    /// one reuses would fail the first call.
    pub(crate) http: reqwest::Client,
}

/// Starts a node cache with a fresh cache directory under `dir`, its local API (and peer
/// service, with `peer_token`) on the network's client address, with `extra` arguments.
pub(crate) fn start_node(
    bin: &Path,
    dir: &Path,
    name: &str,
    registry: &Proxy,
    net: &Net,
    peer_token: Option<&Path>,
    extra: &[&str],
) -> Result<NodeCache> {
    let home = dir.join(name);
    std::fs::create_dir_all(&home)?;
    let listen = SocketAddr::new(net.client_ip, free_port()?);
    let mut cmd = net.command(bin);
    cmd.arg("--registry")
        .arg(format!("http://{}", registry.addr()))
        .arg("--cache-dir")
        .arg(home.join("cache"))
        .args(["--capacity", "8G", "--node-name", name])
        .arg("--listen")
        .arg(listen.to_string())
        .args(extra);
    match peer_token {
        Some(token) => {
            cmd.arg("--peer-listen")
                .arg(SocketAddr::new(net.client_ip, free_port()?).to_string())
                .arg("--peer-token-file")
                .arg(token);
        }
        // Alone, it has nothing to publish for: keep the registry's count to the restore.
        None => {
            cmd.arg("--no-publish");
        }
    }
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("THAW_") {
            cmd.env_remove(var);
        }
    }
    cmd.env("RUST_LOG", "warn");
    let log = home.join("node-cache.log");
    let mut daemon = Daemon::spawn(cmd, "thaw-node-cache", &log)?;
    daemon.wait_listening(listen, &log)?;
    Ok(NodeCache { _daemon: daemon, api: format!("http://{listen}"), name: name.to_owned(), http: http()? })
}

impl NodeCache {
    /// `ensure` then `release`; answers the ensure's wall time and answer.
    async fn ensure_release(&self, reference: &str) -> Result<(f64, Value)> {
        let http = &self.http;
        let started = Instant::now();
        let answer =
            post_json(http, &format!("{}/v1/snapshots/ensure", self.api), &json!({"reference": reference}))
                .await
                .with_context(|| format!("{}: ensure {reference}", self.name))?;
        let secs = started.elapsed().as_secs_f64();
        let lease = answer["lease"].clone();
        post_json(http, &format!("{}/v1/snapshots/release", self.api), &json!({"lease": lease}))
            .await
            .with_context(|| format!("{}: release {reference}", self.name))?;
        Ok((secs, answer))
    }
}

fn bytes_of(answer: &Value, source: &str) -> u64 {
    answer["bytes"][source].as_u64().unwrap_or(0)
}

/// One timed ensure that fetches (cold or seeded), its registry traffic counted.
pub(crate) async fn measured_ensure(node: &NodeCache, registry: &Proxy, reference: &str) -> Result<Ensure> {
    let before = registry.wire();
    let (secs, answer) = node.ensure_release(reference).await?;
    ensure!(answer["hit"] != json!(true), "{}: ensure of {reference} was a hit on a fresh cache", node.name);
    Ok(Ensure {
        secs,
        wire: wire_since(registry, before),
        local: bytes_of(&answer, "local"),
        peers: bytes_of(&answer, "peers"),
        registry: bytes_of(&answer, "registry"),
    })
}

/// Node-cache and P2P scenarios on `net` against the registry behind `registry`, which holds
/// the whole corpus. `reps` fresh caches for each fetching scenario; `nodes` caches per P2P
/// round.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_node_scenarios(
    daemons: &Daemons,
    registry: &Proxy,
    net: &Net,
    previous: &Snapshot,
    new: &Snapshot,
    dir: &Path,
    reps: usize,
    nodes: usize,
) -> Result<NodeResults> {
    let rt = runtime()?;
    let http = http()?;
    let (prev_ref, new_ref) = (reference(registry, previous), reference(registry, new));
    let mut out = NodeResults { nodes, ..Default::default() };
    let say = |what: &str, e: &Ensure| {
        eprintln!(
            "bench:   node  {what:<34} {:>8.2} s  registry down {:>6.1} MiB  (local {:.1}, peers {:.1}, registry {:.1} MiB of chunks)",
            e.secs,
            crate::mib(e.wire.down),
            crate::mib(e.local),
            crate::mib(e.peers),
            crate::mib(e.registry)
        )
    };
    for rep in 0..reps {
        let rep_dir = dir.join(format!("single-{rep}"));
        let node = start_node(&daemons.node_cache, &rep_dir, "bench-cold", registry, net, None, &[])?;
        let e = rt.block_on(measured_ensure(&node, registry, &new_ref))?;
        say("ensure, empty cache", &e);
        out.cold.push(e);
        if rep == 0 {
            // Warm hits on the node that now holds the snapshot.
            rt.block_on(async {
                for _ in 0..HIT_PAIRS {
                    let (secs, answer) = node.ensure_release(&new_ref).await?;
                    ensure!(answer["hit"] == json!(true), "{}: a repeated ensure was not a hit", node.name);
                    out.hits_ms.push(secs * 1e3);
                }
                anyhow::Ok(())
            })?;
            eprintln!(
                "bench:   node  {HIT_PAIRS} warm hits: p50 {:.2} ms, p99 {:.2} ms",
                percentile(&out.hits_ms, 0.50),
                percentile(&out.hits_ms, 0.99)
            );
        }
        drop(node);

        let node = start_node(&daemons.node_cache, &rep_dir, "bench-seeded", registry, net, None, &[])?;
        rt.block_on(node.ensure_release(&prev_ref))?;
        let e = rt.block_on(measured_ensure(&node, registry, &new_ref))?;
        say("ensure, previous revision cached", &e);
        out.previous_cached.push(e);
        drop(node);
        std::fs::remove_dir_all(&rep_dir)?;
    }

    let token = dir.join("cluster-token");
    std::fs::write(
        &token,
        format!("bench-token-{:032x}\n", std::process::id() as u128 * 0x9e37_79b9_7f4a_7c15),
    )?;
    for rep in 0..reps {
        for p2p in [true, false] {
            let round_dir = dir.join(format!("p2p-{rep}-{}", if p2p { "on" } else { "off" }));
            let round = rt.block_on(p2p_round(
                daemons,
                registry,
                net,
                &new_ref,
                &round_dir,
                nodes,
                p2p.then_some(token.as_path()),
                rep,
                &http,
            ))?;
            eprintln!(
                "bench:   p2p {:<3} {} cold nodes: last in {:.2} s, registry down {:.1} MiB (peers {:.1}, registry {:.1} MiB of chunks)",
                if p2p { "on" } else { "off" },
                nodes - 1,
                round.secs_to_last,
                crate::mib(round.wire.down),
                crate::mib(round.peers),
                crate::mib(round.registry)
            );
            if p2p {
                out.p2p_on.push(round)
            } else {
                out.p2p_off.push(round)
            }
            std::fs::remove_dir_all(&round_dir)?;
        }
    }
    Ok(out)
}

/// One P2P round: `nodes` fresh caches, node 0 made warm with `reference` (and, with P2P,
/// listed in the node directory as holding it), then every other node ensures it at once.
#[allow(clippy::too_many_arguments)]
async fn p2p_round(
    daemons: &Daemons,
    registry: &Proxy,
    net: &Net,
    reference: &str,
    dir: &Path,
    nodes: usize,
    token: Option<&Path>,
    rep: usize,
    http: &reqwest::Client,
) -> Result<Round> {
    let tag = if token.is_some() { "p2p" } else { "nop2p" };
    let mut caches = Vec::new();
    for i in 0..nodes {
        caches.push(start_node(
            &daemons.node_cache,
            dir,
            &format!("bench-{tag}-{rep}-{i}"),
            registry,
            net,
            token,
            &[],
        )?);
    }
    let (_, warm) = caches[0].ensure_release(reference).await?;
    let digest = warm["digest"].as_str().context("ensure answered no digest")?.to_owned();
    if token.is_some() {
        wait_listed(http, registry, &caches[0].name, &digest).await?;
    }
    let before = registry.wire();
    let started = Instant::now();
    let answers = futures::future::join_all(caches[1..].iter().map(|c| async move {
        let (_, answer) = c.ensure_release(reference).await?;
        anyhow::Ok(answer)
    }))
    .await;
    let secs_to_last = started.elapsed().as_secs_f64();
    let wire = wire_since(registry, before);
    let (mut peers, mut from_registry) = (0, 0);
    for answer in answers {
        let answer = answer?;
        peers += bytes_of(&answer, "peers");
        from_registry += bytes_of(&answer, "registry");
    }
    // Their records would otherwise stay in the directory the extender reads later.
    for c in &caches {
        let _ = http.delete(format!("http://{}/v2/_thaw/nodes/{}", registry.addr(), c.name)).send().await;
    }
    Ok(Round { secs_to_last, wire, peers, registry: from_registry })
}

/// Waits until the registry's node directory lists `node` holding `digest` (the holdings
/// publisher debounces), so the cold nodes can find their peer.
async fn wait_listed(http: &reqwest::Client, registry: &Proxy, node: &str, digest: &str) -> Result<()> {
    let url = format!("http://{}/v2/_thaw/nodes/{node}", registry.addr());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = http.get(&url).send().await {
            if resp.status().is_success() {
                let record: Value = resp.json().await.unwrap_or(Value::Null);
                let holds = record["snapshots"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|h| h["digest"] == json!(digest)));
                if holds && record["peerEndpoint"].is_string() {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{node} was not listed in the node directory holding {digest} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Knative Serving pod as kube-scheduler passes it in `ExtenderArgs.Pod`, annotated with
/// its snapshot (the shape of extender/tests/support).
fn knative_pod(reference: &str) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "fn-json-00002-deployment-7d9f8b6c5d-x2k4p",
            "generateName": "fn-json-00002-deployment-7d9f8b6c5d-",
            "namespace": "bench",
            "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            "resourceVersion": "48213",
            "labels": {
                "app": "fn-json-00002",
                "serving.knative.dev/configuration": "fn-json",
                "serving.knative.dev/revision": "fn-json-00002",
                "serving.knative.dev/service": "fn-json"
            },
            "annotations": {
                "autoscaling.knative.dev/min-scale": "0",
                "thaw.dev/snapshot": reference
            }
        },
        "spec": {
            "containers": [{
                "name": "user-container",
                "image": "registry.local/fn-json@sha256:6b3a5d0e1f2c4b7a8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c",
                "ports": [{"name": "user-port", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}}
            }],
            "schedulerName": "default-scheduler",
            "runtimeClassName": "firecracker"
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"}
    })
}

/// The extender against the registry behind `registry` (loopback): `SYNTHETIC_NODES`
/// records published in the node directory, node `i` holding snapshot `i mod n` of the
/// corpus, then `/prioritize` and `/filter` for a pod of the new revision over every node.
pub(crate) fn run_extender(
    daemons: &Daemons,
    registry: &Proxy,
    snapshots: &[&Snapshot],
    new: &Snapshot,
    dir: &Path,
) -> Result<ExtenderResults> {
    let rt = runtime()?;
    let http = http()?;
    rt.block_on(async {
        // Each snapshot's manifest digest, as a node cache would publish it.
        let mut held = Vec::new();
        for s in snapshots {
            let url = format!("http://{}/v2/bench/{}/manifests/{}", registry.addr(), s.function, s.revision);
            let resp = http
                .head(&url)
                .header("Accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .with_context(|| format!("HEAD {url}"))?;
            ensure!(resp.status().is_success(), "HEAD {url} answered {}", resp.status());
            let digest = resp
                .headers()
                .get("Docker-Content-Digest")
                .and_then(|v| v.to_str().ok())
                .context("no Docker-Content-Digest")?
                .to_owned();
            let size = systems_size(&s.dir)?;
            held.push((reference(registry, s), digest, size));
        }
        let names: Vec<String> = (0..SYNTHETIC_NODES).map(|i| format!("bench-node-{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            let (reference, digest, size) = &held[i % held.len()];
            let record = json!({
                "node": name, "capacityBytes": 16u64 << 30, "usedBytes": size,
                "snapshots": [{"reference": reference, "digest": digest, "sizeBytes": size, "cachedBytes": size}]
            });
            let url = format!("http://{}/v2/_thaw/nodes/{name}", registry.addr());
            let resp = http.put(&url).json(&record).send().await?;
            ensure!(resp.status().is_success(), "PUT {url} answered {}", resp.status());
        }

        let listen = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), free_port()?);
        let mut cmd = Command::new(&daemons.extender);
        cmd.arg("--listen")
            .arg(listen.to_string())
            .arg("--registry")
            .arg(format!("http://{}", registry.addr()))
            .args(["--holdings", "registry", "--poll-interval-ms", "200", "--herd-window", "0"]);
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("THAW_") {
                cmd.env_remove(var);
            }
        }
        cmd.env("RUST_LOG", "warn");
        let log = dir.join("extender.log");
        let mut daemon = Daemon::spawn(cmd, "thaw-extender", &log)?;
        daemon.wait_listening(listen, &log)?;

        let body = json!({"Pod": knative_pod(&reference(registry, new)), "Nodes": null, "NodeNames": names});
        let base = format!("http://{listen}");
        // Warm up: until the directory is read and the pod's snapshot's recipes fetched,
        // answers are neutral.
        let deadline = Instant::now() + Duration::from_secs(60);
        let scored_nodes = loop {
            let answer = post_json(&http, &format!("{base}/prioritize"), &body).await?;
            let scored =
                answer.as_array().map_or(0, |a| a.iter().filter(|p| p["Score"].as_i64().unwrap_or(0) > 0).count());
            if scored > 0 {
                break scored;
            }
            ensure!(Instant::now() < deadline, "thaw-extender scored no node above 0 within 60 s: {answer}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut out = ExtenderResults { nodes: SYNTHETIC_NODES, snapshots: held.len(), scored_nodes, ..Default::default() };
        for (verb, times) in [("prioritize", &mut out.prioritize_ms), ("filter", &mut out.filter_ms)] {
            for _ in 0..EXTENDER_CALLS {
                let started = Instant::now();
                let answer = post_json(&http, &format!("{base}/{verb}"), &body).await?;
                times.push(started.elapsed().as_secs_f64() * 1e3);
                if verb == "filter" {
                    ensure!(answer["NodeNames"].is_array(), "/filter answered no NodeNames: {answer}");
                }
            }
        }
        for name in &names {
            let _ = http.delete(format!("http://{}/v2/_thaw/nodes/{name}", registry.addr())).send().await;
        }
        drop(daemon);
        Ok(out)
    })
}

fn systems_size(dir: &Path) -> Result<u64> {
    crate::systems::dir_bytes(dir)
}

/// The `q` quantile (nearest rank) of `v`; NaN when empty.
pub(crate) fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}
