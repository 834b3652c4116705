//! Working sets end to end (issue 20, part 3): a first lazy restore records the order its VM
//! touched the memory file's chunks and publishes it as a referrer of the snapshot manifest;
//! a second node finds it through the referrers API and fetches those chunks first; a bad
//! working set is ignored; a node that may not push still restores. Real `thaw-registry`
//! and `thaw-node-cache` processes, and the Firecracker stand-in.
//!
//! Every wait is bounded: a page or an artifact that never comes fails the test.

mod support;

#[path = "support/firecracker_stand_in.rs"]
mod firecracker_stand_in;
#[path = "support/lazy.rs"]
mod lazy_support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use firecracker_stand_in::{FirecrackerStandIn, PAGE};
use lazy_support::{access_runs, ensure_lazy, metric, metrics, touch_and_check, wait_cached, PAGES_DEADLINE};
use serde_json::{json, Value};
use support::common::{client_for, test_options};
use support::{push, Launch, NodeCache, Pushed, RegistryProcess, SnapshotData};
use thaw_client::{Credentials, PushOptions, Reference, Registry, Stats};
use thaw_schema::dto::FetchChunksRequest;
use thaw_schema::manifest::Reference as Descriptor;
use thaw_schema::working_set::{working_set_manifest, WorkingSet, EMPTY_CONFIG};
use thaw_schema::{media, ChunkId, Recipe, RecipeEntry, Sha256Digest};

/// Guest memory pages of the test snapshots (16 MiB).
const PAGES: usize = 4096;
/// Quiet period after which a recording is published, kept short for the tests.
const QUIET_MS: &str = "300";

/// A registry holding one snapshot, and what the tests compare against.
struct Setup {
    _registry: RegistryProcess,
    host: String,
    snap: Pushed,
    recipe: Recipe,
    subject: Descriptor,
}

/// Starts a registry and pushes a snapshot of [`PAGES`] pages as `repo_tag`.
async fn setup(repo_tag: &str, seed: u64) -> Setup {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    let snap = push(&host, repo_tag, SnapshotData::new(PAGES, 64, seed)).await;
    let (recipe, subject) = (memory_recipe(&snap).await, manifest_descriptor(&snap).await);
    Setup { _registry: registry, host, snap, recipe, subject }
}

/// The memory file's recipe of a pushed snapshot.
async fn memory_recipe(snap: &Pushed) -> Recipe {
    let recipes = support::recipes(&snap.reference).await;
    recipes.into_iter().find(|r| r.size == snap.data.memory.len() as u64).expect("the memory file's recipe")
}

/// The snapshot manifest's descriptor (what a working set names as its subject).
async fn manifest_descriptor(snap: &Pushed) -> Descriptor {
    let reference = Reference::parse(&snap.reference).unwrap();
    let m = client_for(&reference)
        .get_manifest(reference.repository(), &reference.manifest_reference())
        .await
        .unwrap();
    Descriptor { digest: m.digest, size: m.body.len() as u64, media_type: m.media_type, recipe: None }
}

/// The recipe entries a VM touching `trace` (one page at a time, in order) touches first:
/// the data entries holding those pages, each once.
fn first_touches(recipe: &Recipe, trace: &[usize]) -> Vec<u32> {
    let mut seen = HashSet::new();
    trace
        .iter()
        .filter_map(|&offset| recipe.entry_at(offset as u64))
        .filter(|(i, _)| matches!(recipe.entries[*i], RecipeEntry::Data { .. }) && seen.insert(*i))
        .map(|(i, _)| i as u32)
        .collect()
}

/// `GET /v2/<repo>/referrers/<digest>?artifactType=…` over plain HTTP, as any OCI client.
async fn working_set_referrers(host: &str, repo: &str, subject: &Sha256Digest) -> Vec<Value> {
    let url =
        format!("http://{host}/v2/{repo}/referrers/{subject}?artifactType={}", media::WORKING_SET_ARTIFACT);
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200);
    let index: Value = r.json().await.unwrap();
    assert_eq!(index["mediaType"], media::OCI_INDEX);
    index["manifests"].as_array().unwrap().clone()
}

/// Waits until the snapshot has `n` working-set referrers; answers them.
async fn wait_referrers(host: &str, repo: &str, subject: &Sha256Digest, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = working_set_referrers(host, repo, subject).await;
        if found.len() >= n {
            assert_eq!(found.len(), n, "more working sets than expected: {found:?}");
            return found;
        }
        assert!(Instant::now() < deadline, "{n} working sets never appeared: {found:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a working-set referrer over plain HTTP and checks its manifest: artifactType,
/// subject, one layer of the working-set type. Answers the decoded list.
async fn read_working_set(host: &str, repo: &str, referrer: &Value, subject: &Descriptor) -> WorkingSet {
    assert_eq!(referrer["artifactType"], media::WORKING_SET_ARTIFACT);
    let url = format!("http://{host}/v2/{repo}/manifests/{}", referrer["digest"].as_str().unwrap());
    let m: Value = reqwest::Client::new()
        .get(url)
        .header("accept", media::OCI_MANIFEST)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["artifactType"], media::WORKING_SET_ARTIFACT, "{m}");
    assert_eq!(m["subject"]["digest"], subject.digest.to_string(), "{m}");
    assert_eq!(m["subject"]["size"], subject.size, "{m}");
    assert_eq!(m["subject"]["mediaType"], subject.media_type, "{m}");
    assert_eq!(m["config"]["mediaType"], media::OCI_EMPTY, "{m}");
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{m}");
    assert_eq!(layers[0]["mediaType"], media::WORKING_SET_LAYER);
    let url = format!("http://{host}/v2/{repo}/blobs/{}", layers[0]["digest"].as_str().unwrap());
    let blob = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(blob.len() as u64, layers[0]["size"].as_u64().unwrap());
    WorkingSet::decode(&blob).expect("the published working set decodes")
}

/// A first lazy restore on a node of its own whose VM touches `trace` one page at a time;
/// answers the node (its cache directory with it) and the VM.
async fn first_restore(
    host: &str,
    snap: &Pushed,
    trace: &[usize],
    name: &str,
) -> (NodeCache, tempfile::TempDir, Arc<FirecrackerStandIn>) {
    let dir = tempfile::tempdir().unwrap();
    let node =
        NodeCache::start_with(host, dir.path(), 1 << 30, name, &["--working-set-quiet-ms", QUIET_MS]).await;
    let answer = ensure_lazy(&node, &snap.reference).await;
    let memory = Arc::new(snap.data.memory.clone());
    let vm = Arc::new(
        FirecrackerStandIn::load(answer["memory_socket"].as_str().unwrap().as_ref(), memory.len(), &[])
            .expect("handshake"),
    );
    touch_and_check(&vm, &memory, trace.to_vec(), 1, PAGES_DEADLINE);
    (node, dir, vm)
}

/// A short trace: a dozen runs of up to 6 pages, so the working set fits one background batch.
fn short_trace(seed: u64) -> Vec<usize> {
    access_runs(PAGES, seed, 12, 6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_lazy_restore_publishes_the_order_its_vm_touched() {
    let Setup { _registry, host, snap, recipe, subject } = setup("fn/ws:v1", 61).await;
    let trace = short_trace(8);
    let expected = first_touches(&recipe, &trace);
    assert!(expected.len() > 3, "the trace should touch data: {expected:?}");

    let (node, _dir, _vm) = first_restore(&host, &snap, &trace, "node-ws").await;
    let found = wait_referrers(&host, "fn/ws", &subject.digest, 1).await;
    let set = read_working_set(&host, "fn/ws", &found[0], &subject).await;
    assert_eq!(set.memory, recipe.digest);
    assert_eq!(set.entry_count as usize, recipe.entries.len());
    assert_eq!(set.order, expected, "the working set is not the order the VM touched");
    let text = metrics(&node).await;
    assert_eq!(metric(&text, "thaw_lazy_working_sets_published_total"), 1);
    assert_eq!(metric(&text, "thaw_lazy_working_sets_used_total"), 0);
}

/// What a recording proxy saw: each request's path and body, in arrival order.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A TCP proxy to `upstream` that reads each HTTP request whole (its `Content-Length` body),
/// records its path and body, and passes it on; answers come back untouched.
async fn recording_proxy(upstream: String) -> (String, Seen) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let (upstream, log) = (upstream.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let (mut down_r, mut down_w) = down.into_split();
                let (mut up_r, mut up_w) = up.into_split();
                let answers = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut up_r, &mut down_w).await;
                });
                let mut buf = Vec::new();
                let mut piece = vec![0u8; 64 * 1024];
                'requests: loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match down_r.read(&mut piece).await {
                            Ok(0) | Err(_) => break 'requests,
                            Ok(n) => buf.extend_from_slice(&piece[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match down_r.read(&mut piece).await {
                            Ok(0) | Err(_) => break 'requests,
                            Ok(n) => buf.extend_from_slice(&piece[..n]),
                        }
                    }
                    log.lock().unwrap().push((path, buf[head_end..head_end + len].to_vec()));
                    if up_w.write_all(&buf[..head_end + len]).await.is_err() {
                        break;
                    }
                    buf.drain(..head_end + len);
                }
                answers.abort();
            });
        }
    });
    (addr, seen)
}

/// The chunks of blob `memory` asked of `_thaw/chunks/fetch`, in the order asked.
fn fetched_chunks(seen: &Seen, memory: &Sha256Digest) -> Vec<ChunkId> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(path, _)| path.ends_with("/_thaw/chunks/fetch"))
        .filter_map(|(_, body)| serde_json::from_slice::<FetchChunksRequest>(body).ok())
        .filter(|r| r.blob == *memory)
        .flat_map(|r| r.chunks)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_fetches_the_working_set_first_in_recorded_order() {
    let Setup { _registry, host, snap, recipe, subject } = setup("fn/ws2:v1", 62).await;
    let (_a, _dir_a, _vm_a) = first_restore(&host, &snap, &short_trace(9), "node-a").await;
    let found = wait_referrers(&host, "fn/ws2", &subject.digest, 1).await;
    let set = read_working_set(&host, "fn/ws2", &found[0], &subject).await;
    let mut distinct = HashSet::new();
    let expected: Vec<ChunkId> = set
        .order
        .iter()
        .filter_map(|&i| recipe.entries[i as usize].chunk_id().copied())
        .filter(|id| distinct.insert(*id))
        .collect();

    // The second node talks to the registry through a proxy that records its requests.
    let (proxy, seen) = recording_proxy(host.clone()).await;
    let reference = snap.reference.replacen(&host, &proxy, 1);
    let dir_b = tempfile::tempdir().unwrap();
    let b =
        NodeCache::start_with(&proxy, dir_b.path(), 1 << 30, "node-b", &["--working-set-quiet-ms", QUIET_MS])
            .await;
    let answer = ensure_lazy(&b, &reference).await;
    let digest = answer["digest"].as_str().unwrap().to_owned();
    wait_cached(&b, &digest).await;
    let fetched = fetched_chunks(&seen, &recipe.digest);
    assert_eq!(fetched.len(), recipe.distinct_chunks().len(), "every memory chunk is fetched once");
    assert_eq!(
        fetched[..expected.len()],
        expected[..],
        "the second node's first chunk requests are not the working set in recorded order"
    );
    let text = metrics(&b).await;
    assert_eq!(metric(&text, "thaw_lazy_working_sets_used_total"), 1);

    // Its pages are the memory file's, and it publishes no second working set.
    let memory = Arc::new(snap.data.memory.clone());
    let vm = Arc::new(
        FirecrackerStandIn::load(answer["memory_socket"].as_str().unwrap().as_ref(), memory.len(), &[])
            .expect("handshake"),
    );
    touch_and_check(&vm, &memory, (0..PAGES).map(|p| p * PAGE).collect(), 2, PAGES_DEADLINE);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(working_set_referrers(&host, "fn/ws2", &subject.digest).await.len(), 1);
    assert_eq!(metric(&metrics(&b).await, "thaw_lazy_working_sets_published_total"), 0);
}

/// Attaches `blob` to `subject` as a working set (whatever its bytes), as a tenant with push
/// rights could.
async fn attach(client: &Registry, repo: &str, subject: &Descriptor, blob: Vec<u8>) {
    let config = Sha256Digest::of(EMPTY_CONFIG);
    client.upload_blob_bytes(repo, &config, EMPTY_CONFIG.to_vec().into()).await.unwrap();
    let digest = Sha256Digest::of(&blob);
    let size = blob.len() as u64;
    client.upload_blob_bytes(repo, &digest, blob.into()).await.unwrap();
    let body = working_set_manifest(subject, digest, size).unwrap();
    let at = Sha256Digest::of(&body).to_string();
    client.put_manifest(repo, &at, body.into(), media::OCI_MANIFEST).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_out_of_range_working_sets_are_ignored() {
    let Setup { _registry, host, snap, recipe, subject } = setup("fn/bad:v1", 63).await;
    let client = client_for(&Reference::parse(&snap.reference).unwrap());
    let entries = recipe.entries.len() as u32;
    let data = recipe.entries.iter().position(|e| e.chunk_id().is_some()).unwrap() as u32;
    let set = |order: Vec<u32>| WorkingSet { memory: recipe.digest, entry_count: entries, order };
    // Not a working set; longer than a recipe of this size allows; an index past the end.
    attach(&client, "fn/bad", &subject, b"these bytes are no working set".to_vec()).await;
    attach(&client, "fn/bad", &subject, set(vec![data; entries as usize + 8]).encode()).await;
    attach(&client, "fn/bad", &subject, set(vec![data, entries + 3]).encode()).await;
    assert_eq!(working_set_referrers(&host, "fn/bad", &subject.digest).await.len(), 3);

    let trace = short_trace(10);
    let (node, _dir, vm) = first_restore(&host, &snap, &trace, "node-bad").await;
    // None was usable, so this restore's own recording is published next to them.
    let found = wait_referrers(&host, "fn/bad", &subject.digest, 4).await;
    let mut usable = Vec::new();
    for r in &found {
        let url = format!("http://{host}/v2/fn/bad/manifests/{}", r["digest"].as_str().unwrap());
        let m: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        let blob_url =
            format!("http://{host}/v2/fn/bad/blobs/{}", m["layers"][0]["digest"].as_str().unwrap());
        let blob = reqwest::get(blob_url).await.unwrap().bytes().await.unwrap();
        if let Some(order) = WorkingSet::decode(&blob).ok().filter(|s| s.order_in(&recipe).is_ok()) {
            usable.push(order.order);
        }
    }
    assert_eq!(usable, vec![first_touches(&recipe, &trace)], "exactly one usable working set: this node's");

    let memory = Arc::new(snap.data.memory.clone());
    touch_and_check(&vm, &memory, (0..PAGES).map(|p| p * PAGE).collect(), 2, PAGES_DEADLINE);
    wait_cached(&node, &subject.digest.to_string()).await;
    let text = metrics(&node).await;
    assert!(metric(&text, "thaw_lazy_working_sets_rejected_total") >= 3, "{text}");
    assert_eq!(metric(&text, "thaw_lazy_working_sets_used_total"), 0);
    support::assert_files(&node.ensure(&snap.reference).await, &snap.data);
}

/// `htpasswd -B` (cost 10) of `PASSWORD`, for both users.
const PASSWORD_HASH: &str = "$2b$10$vsU8Q8V1IL.pDf46KMNjm.hEWxjMyb0pLDzC12epWV.69mZzZp6Zi";
const PASSWORD: &str = "load-pw";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_pull_only_credentials_restores_and_counts_the_refused_publish() {
    let auth = tempfile::tempdir().unwrap();
    std::fs::write(auth.path().join("htpasswd"), format!("writer:{PASSWORD_HASH}\nreader:{PASSWORD_HASH}\n"))
        .unwrap();
    let config = json!({
        "htpasswd": "htpasswd",
        "grants": [
            {"user": "writer", "repository": "fn/*", "actions": ["pull", "push"]},
            {"user": "reader", "repository": "fn/*", "actions": ["pull"]},
        ],
        "nodes-read": ["reader"],
        "nodes-write": ["reader"],
    });
    let config_path = auth.path().join("auth.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let registry =
        RegistryProcess::start_with(&Launch::default(), &["--auth-config", config_path.to_str().unwrap()])
            .await;
    let host = registry.host();
    let data = SnapshotData::new(PAGES, 64, 64);
    let files = tempfile::tempdir().unwrap();
    data.write(files.path());
    let reference = Reference::parse(&format!("{host}/fn/locked:v1")).unwrap();
    let credentials = |user: &str| Credentials { username: user.into(), password: PASSWORD.into() };
    let writer = Registry::for_reference(
        &reference,
        &thaw_client::ClientOptions { credentials: Some(credentials("writer")), ..test_options() },
        Arc::new(Stats::new()),
    )
    .unwrap();
    thaw_client::push_dir(&writer, &reference, files.path(), &PushOptions::default()).await.expect("push");
    let manifest = writer.get_manifest("fn/locked", "v1").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("THAW_REGISTRY_USER", "reader"),
        ("THAW_REGISTRY_PASSWORD", PASSWORD),
        ("THAW_WORKING_SET_QUIET_MS", QUIET_MS),
    ];
    let node = NodeCache::start_env(&host, dir.path(), 1 << 30, "node-reader", &env).await;
    let answer = ensure_lazy(&node, &reference.to_string()).await;
    let memory = Arc::new(data.memory.clone());
    let vm = Arc::new(
        FirecrackerStandIn::load(answer["memory_socket"].as_str().unwrap().as_ref(), memory.len(), &[])
            .expect("handshake"),
    );
    touch_and_check(&vm, &memory, short_trace(11), 1, PAGES_DEADLINE);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&metrics(&node).await, "thaw_lazy_working_sets_publish_refused_total") == 0 {
        assert!(Instant::now() < deadline, "the refused publish was never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    touch_and_check(&vm, &memory, (0..PAGES).map(|p| p * PAGE).collect(), 2, PAGES_DEADLINE);
    wait_cached(&node, &manifest.digest.to_string()).await;
    let text = metrics(&node).await;
    assert_eq!(metric(&text, "thaw_lazy_working_sets_publish_refused_total"), 1);
    assert_eq!(metric(&text, "thaw_lazy_working_sets_published_total"), 0);
    assert_eq!(metric(&text, "thaw_lazy_working_sets_publish_failed_total"), 0);
    let referrers =
        writer.referrers("fn/locked", &manifest.digest, Some(media::WORKING_SET_ARTIFACT)).await.unwrap();
    assert!(referrers.is_empty(), "a pull-only node published a working set: {referrers:?}");
    support::assert_files(&node.ensure(&reference.to_string()).await, &data);
}
