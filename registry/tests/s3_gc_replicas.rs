//! GC across replicas with real `thaw-registry` processes on one MinIO bucket (issue 18,
//! finding 6; docs/DECISIONS.md D26): a replica killed (SIGKILL) in the middle of its GC
//! sweep while another keeps accepting pushes, then GC run again; and replicas whose clocks
//! are off (run under libfaketime), serving and collecting. What is checked is what D26
//! promises: nothing acknowledged is lost, every acknowledged blob pulls byte-identical
//! through every replica, a commit of content an open sweep may delete is refused (503)
//! until a later run closes that sweep, and the next lock holder closes a dead run's sweep.
//!
//! Skews stay within MinIO's 15 minutes (past it every request of the skewed replica is
//! refused as `RequestTimeTooSkewed`, as AWS S3 does): ±12 minutes, so two replicas are 24
//! minutes apart. That each process's clock is really off is checked from what it wrote:
//! pack names carry the writer's clock, log lines its timestamps.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::minio::{list_keys, unique_prefix, Minio};
use common::*;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const KIB: usize = 1024;

/// One bucket prefix served by several replicas, with their logs and spool directories.
struct Bucket {
    prefix: String,
    storage: String,
    dir: tempfile::TempDir,
}

impl Bucket {
    fn new(tag: &str) -> Self {
        let prefix = unique_prefix(tag);
        let storage = Minio::shared().storage_url(&prefix);
        Self { prefix, storage, dir: tempfile::tempdir().expect("temp dir") }
    }

    fn env(&self, name: &str, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut env = Minio::shared().env();
        let spool = self.dir.path().join(format!("{name}.uploads"));
        env.push(("THAW_UPLOAD_DIR", spool.display().to_string()));
        env.extend(extra.iter().cloned());
        env
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A replica named `name` (its log is `<name>.log`).
    async fn replica(&self, name: &str, extra: &[(&'static str, String)]) -> BinRegistry {
        let log = self.dir.path().join(format!("{name}.log"));
        BinRegistry::start_with(self.storage.as_ref(), &log, &self.env(name, extra)).await
    }

    fn objects(&self) -> Arc<dyn ObjectStore> {
        Arc::new(PrefixStore::new(Minio::shared().client(), self.prefix.as_str()))
    }

    async fn keys(&self, under: &str) -> Vec<String> {
        list_keys(self.objects().as_ref(), under).await
    }

    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.objects().get(&key.into()).await {
            Ok(r) => Some(r.bytes().await.expect("read object").to_vec()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("GET {key}: {e}"),
        }
    }

    /// The sweep records: epoch → closed.
    async fn sweeps(&self) -> BTreeMap<u64, bool> {
        let mut out = BTreeMap::new();
        for key in self.keys("gc/sweeps").await {
            let name = key.rsplit('/').next().expect("name");
            let (digits, done) = match name.strip_suffix(".done") {
                Some(d) => (d, true),
                None => (name, false),
            };
            if let Ok(epoch) = digits.parse::<u64>() {
                *out.entry(epoch).or_insert(false) |= done;
            }
        }
        out
    }

    /// Runs `thaw-registry gc` over the bucket (through `wrapper`) to its end: whether it
    /// succeeded, and its output.
    async fn gc(&self, extra: &[(&'static str, String)], grace: &str) -> (bool, String) {
        let args = ["gc", "--storage", self.storage.as_str(), "--grace", grace].map(str::to_owned);
        let env = self.env("gc", extra);
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_thaw-registry"))
                .args(&args)
                .env_remove("THAW_STORAGE")
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .output()
                .expect("run thaw-registry gc");
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (out.status.success(), text)
        })
        .await
        .expect("gc thread")
    }
}

/// libfaketime as Debian installs it (`install-test-deps.sh` installs the package).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The environment that runs a process with its wall clock `offset` off (libfaketime's
/// syntax, e.g. `+12m`), durations and timers left true. The library is preloaded into the
/// registry itself rather than run through the `faketime` wrapper, which forks: killing the
/// wrapper would leave the registry running.
fn clock_off(offset: &str) -> Vec<(&'static str, String)> {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: install Debian's faketime (scripts/install-test-deps.sh does)"
    );
    vec![
        ("LD_PRELOAD", LIBFAKETIME.to_owned()),
        ("FAKETIME", offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
}

/// What a push attempt came to.
#[derive(Debug)]
enum Pushed {
    Acknowledged,
    /// The last answer, every try having been refused.
    Refused(u16, String),
}

/// Pushes `data` as a blob of `repo` (OCI monolithic upload), retrying a 503 (the answer
/// to a commit whose content GC took) up to `tries` times, as a client does.
async fn push_blob(c: &Client, base: &str, repo: &str, data: &[u8], tries: u32) -> Pushed {
    let digest = sha256_digest(data);
    let mut last = (0, String::new());
    for _ in 0..tries {
        let resp = c.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.expect("POST upload");
        if resp.status() != StatusCode::ACCEPTED {
            last = (resp.status().as_u16(), body_text(resp).await);
        } else {
            let url = resolve(base, &location(&resp).expect("Location"));
            let resp = c
                .put(with_query(&url, &[("digest", &digest)]))
                .body(data.to_vec())
                .send()
                .await
                .expect("PUT");
            match resp.status() {
                StatusCode::CREATED => return Pushed::Acknowledged,
                s => last = (s.as_u16(), body_text(resp).await),
            }
        }
        assert!(last.0 == 503, "push of {digest} to {base} answered {}: {}", last.0, last.1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Pushed::Refused(last.0, last.1)
}

async fn push_manifest(c: &Client, base: &str, repo: &str, tag: &str, body: &[u8], tries: u32) -> Pushed {
    let mut last = (0, String::new());
    for _ in 0..tries {
        let resp = c
            .put(format!("{base}/v2/{repo}/manifests/{tag}"))
            .header("content-type", MANIFEST_V1)
            .body(body.to_vec())
            .send()
            .await
            .expect("PUT manifest");
        match resp.status() {
            StatusCode::CREATED => return Pushed::Acknowledged,
            s => last = (s.as_u16(), body_text(resp).await),
        }
        assert!(last.0 == 503, "manifest {repo}:{tag} at {base} answered {}: {}", last.0, last.1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Pushed::Refused(last.0, last.1)
}

async fn assert_blob(c: &Client, base: &str, repo: &str, data: &[u8], what: &str) {
    let digest = sha256_digest(data);
    let resp = c.get(format!("{base}/v2/{repo}/blobs/{digest}")).send().await.expect("GET blob");
    let status = resp.status();
    let got = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    assert_eq!(
        status,
        StatusCode::OK,
        "{what}: {repo}@{digest} through {base}: {}",
        String::from_utf8_lossy(&got)
    );
    assert!(got == data, "{what}: {repo}@{digest} through {base} came back different ({} bytes)", got.len());
}

async fn assert_manifest(c: &Client, base: &str, repo: &str, tag: &str, manifest: &[u8]) {
    let resp = c
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", MANIFEST_V1)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.status(), StatusCode::OK, "acknowledged manifest {repo}:{tag} through {base}");
    assert_eq!(resp.bytes().await.expect("manifest body").as_ref(), manifest, "{repo}:{tag} through {base}");
}

/// Everything acknowledged by the pushes running beside GC.
#[derive(Default)]
struct Acked {
    /// (repository, bytes) of every acknowledged blob.
    blobs: Vec<(String, Vec<u8>)>,
    /// (repository, tag, manifest) of every acknowledged manifest.
    manifests: Vec<(String, String, Vec<u8>)>,
    /// Pushes refused after every retry (never acknowledged).
    refused: usize,
    /// Digests of the garbage blobs pushed again (acknowledged or not).
    garbage_tried: Vec<String>,
}

/// Pushes snapshots (config + a 96 KiB layer + manifest) through `base` until `stop`;
/// every third layer is the bytes of a garbage blob, pushed again while GC may be deleting it.
async fn keep_pushing(
    base: String,
    garbage: Arc<Vec<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
) {
    let c = client();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let repo = "live/app";
        let config = format!(r#"{{"push":{n}}}"#).into_bytes();
        let layer = if n.is_multiple_of(3) {
            let again = garbage[(n as usize / 3) % garbage.len()].clone();
            acked.lock().unwrap().garbage_tried.push(sha256_digest(&again));
            again
        } else {
            Rng::new(1000 + n).bytes(96 * KIB)
        };
        let mut all = true;
        for blob in [&config, &layer] {
            match push_blob(&c, &base, repo, blob, 10).await {
                Pushed::Acknowledged => acked.lock().unwrap().blobs.push((repo.to_owned(), blob.clone())),
                Pushed::Refused(..) => all = false,
            }
        }
        if !all {
            acked.lock().unwrap().refused += 1;
            continue;
        }
        let manifest =
            image_manifest(descriptor(CONFIG_V1, &config), vec![descriptor(LAYER_TAR, &layer)], json!({}));
        let tag = format!("p{n}");
        match push_manifest(&c, &base, repo, &tag, &manifest, 10).await {
            Pushed::Acknowledged => acked.lock().unwrap().manifests.push((repo.to_owned(), tag, manifest)),
            Pushed::Refused(..) => acked.lock().unwrap().refused += 1,
        }
    }
}

/// Pushes `count` blobs of random bytes through `base` into `repo` and deletes their links:
/// garbage for a run without grace, each in a pack of its own.
async fn make_garbage(c: &Client, base: &str, repo: &str, count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..count {
        let data = Rng::new(seed + i as u64).bytes(12 * KIB);
        assert!(matches!(push_blob(c, base, repo, &data, 10).await, Pushed::Acknowledged));
        let resp = c
            .delete(format!("{base}/v2/{repo}/blobs/{}", sha256_digest(&data)))
            .send()
            .await
            .expect("DELETE blob");
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "unlink garbage blob");
        out.push(data);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_in_its_gc_sweep_loses_nothing_acknowledged_and_the_next_run_finishes_it() {
    let bucket = Bucket::new("gc-kill");
    let c = client();
    let b = bucket.replica("b", &[]).await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut garbage: Vec<Vec<u8>> = make_garbage(&c, &b.base, "dead/app", 150, 1).await;
    let pusher =
        tokio::spawn(keep_pushing(b.base.clone(), Arc::new(garbage.clone()), stop.clone(), acked.clone()));

    // Replica A collects every second, without grace; it is killed the moment a sweep
    // record is open (marked, published, deleting). A run that finished before it was seen
    // is not what this test is about: then more garbage, and again (a few times at most).
    let mut open_epoch = None;
    for attempt in 0..4u64 {
        let gc_env = [("THAW_GC_INTERVAL", "1s".to_owned()), ("THAW_GC_GRACE", "0s".to_owned())];
        let mut a = bucket.replica(&format!("a{attempt}"), &gc_env).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        let before: Vec<u64> = bucket.sweeps().await.into_keys().collect();
        loop {
            let sweeps = bucket.sweeps().await;
            if let Some((&epoch, _)) = sweeps.iter().find(|(e, closed)| !**closed && !before.contains(e)) {
                a.kill9();
                open_epoch = (bucket.sweeps().await.get(&epoch) == Some(&false)).then_some(epoch);
                break;
            }
            if sweeps.keys().any(|e| !before.contains(e)) && sweeps.values().all(|closed| *closed) {
                a.kill9();
                break;
            }
            assert!(Instant::now() < deadline, "replica A never started a sweep; log:\n{}", bucket.log("a0"));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if open_epoch.is_some() {
            break;
        }
        garbage.extend(make_garbage(&c, &b.base, "dead/app", 300, 10_000 * (attempt + 1)).await);
    }
    let epoch = open_epoch.expect("replica A was never caught in the middle of a sweep");
    let record: Value = serde_json::from_slice(
        &bucket.get(&format!("gc/sweeps/{epoch:020}")).await.expect("the open sweep record"),
    )
    .expect("sweep record JSON");
    eprintln!(
        "killed replica A in sweep {epoch}: {} packs, {} recipes doomed",
        record["packs"].as_array().map_or(0, Vec::len),
        record["recipes"].as_array().map_or(0, Vec::len)
    );

    // The dead run's record stays open: a commit of a blob it may delete is refused with a
    // 503 on the replica still serving, however often it is retried.
    let doomed: Vec<String> = record["recipes"]
        .as_array()
        .expect("recipes")
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    let by_digest: HashMap<String, &Vec<u8>> = garbage.iter().map(|g| (sha256_digest(g), g)).collect();
    let doomed_blob: Vec<u8> = doomed
        .iter()
        .find_map(|d| by_digest.get(d).map(|g| (*g).clone()))
        .expect("a garbage blob in the open record");
    match push_blob(&c, &b.base, "again/app", &doomed_blob, 3).await {
        Pushed::Refused(503, body) => assert!(body.contains("UNAVAILABLE"), "{body}"),
        other => panic!("a blob the open sweep may delete was committed: {other:?}"),
    }

    // GC again, from another process: it takes the dead holder's lock once it has watched
    // it unchanged for the lock's TTL, closes the dead run's record, and collects.
    let (ok, out) = bucket.gc(&[], "0s").await;
    assert!(ok, "the next GC run failed:\n{out}");
    assert!(out.contains("closing the sweep record of a GC run that stopped midway"), "{out}");
    let sweeps = bucket.sweeps().await;
    assert!(sweeps.values().all(|closed| *closed), "every sweep record closed: {sweeps:?}");
    // With the record closed, the same push is acknowledged and reads back.
    assert!(matches!(push_blob(&c, &b.base, "again/app", &doomed_blob, 10).await, Pushed::Acknowledged));
    assert_blob(&c, &b.base, "again/app", &doomed_blob, "pushed again after the sweep closed").await;

    stop.store(true, Ordering::Relaxed);
    pusher.await.expect("pusher");
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.manifests.len() >= 3, "pushes kept being acknowledged: {}", acked.manifests.len());
    eprintln!(
        "{} blobs and {} manifests acknowledged beside GC, {} pushes refused after retries",
        acked.blobs.len(),
        acked.manifests.len(),
        acked.refused
    );

    // Every replica, including a new one that has seen nothing, serves everything acknowledged.
    let fresh = bucket.replica("fresh", &[]).await;
    for base in [&b.base, &fresh.base] {
        for (repo, data) in &acked.blobs {
            assert_blob(&c, base, repo, data, "acknowledged beside GC").await;
        }
        for (repo, tag, manifest) in &acked.manifests {
            assert_manifest(&c, base, repo, tag, manifest).await;
        }
    }
    // And the garbage nobody pushed again is gone (a refused push may leave its recipe for
    // a later run: those are left out).
    let recipes = bucket.keys("recipes").await;
    let mut collected = 0;
    for g in &garbage {
        let digest = sha256_digest(g);
        if !acked.garbage_tried.contains(&digest) && *g != doomed_blob {
            assert!(
                !recipes.iter().any(|k| k.ends_with(digest_hex(&digest))),
                "garbage {digest} was not collected"
            );
            collected += 1;
        }
    }
    assert!(collected > 0, "some garbage was left untouched to be collected");
}

/// Unix milliseconds in a pack key (`chunks/packs/<13 digits>-<hex>`): the writer's clock.
fn pack_millis(key: &str) -> u64 {
    key.rsplit('/').next().and_then(|n| n.get(..13)).and_then(|m| m.parse().ok()).expect("pack name")
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64
}

/// How far ahead of this process's clock the first log timestamp of `log` (RFC 3339, as
/// the registry's logger writes it) lies, in seconds.
fn log_clock_offset(log: &str) -> i64 {
    let b = log.as_bytes();
    let shape = |i: usize| {
        b.len() >= i + 19
            && (0..19).all(|k| match k {
                4 | 7 => b[i + k] == b'-',
                10 => b[i + k] == b'T',
                13 | 16 => b[i + k] == b':',
                _ => b[i + k].is_ascii_digit(),
            })
    };
    let at = (0..b.len()).find(|&i| shape(i)).expect("a timestamp in the log");
    let num = |from: usize, len: usize| log[at + from..at + from + len].parse::<i64>().expect("digits");
    let (y, m, d) = (num(0, 4), num(5, 2), num(8, 2));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + num(11, 2) * 3600 + num(14, 2) * 60 + num(17, 2);
    secs - now_millis() / 1000
}

/// A replica whose clock is behind names its packs in the past: another replica, whose
/// clock is ahead and whose chunk index has seen its own newer packs, must still find them
/// to serve a blob the first one acknowledged. Its incremental index refresh lists only
/// packs named up to 15 minutes before the newest it has seen; 24 minutes apart, the old
/// registry answered the pull with 500 ("referenced chunk is not stored").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_24_minutes_apart_serve_each_others_blobs() {
    let bucket = Bucket::new("skew-read");
    let c = client();
    let ahead = bucket.replica("ahead", &clock_off("+12m")).await;
    let behind = bucket.replica("behind", &clock_off("-12m")).await;

    let first = Rng::new(1).bytes(300 * KIB);
    let second = Rng::new(2).bytes(300 * KIB);
    for data in [&first, &second] {
        assert!(matches!(push_blob(&c, &ahead.base, "skew/app", data, 3).await, Pushed::Acknowledged));
    }
    let packs_ahead = bucket.keys("chunks/packs").await;
    let late = Rng::new(3).bytes(300 * KIB);
    assert!(matches!(push_blob(&c, &behind.base, "skew/app", &late, 3).await, Pushed::Acknowledged));
    let packs: Vec<String> = bucket.keys("chunks/packs").await;
    let packs_behind: Vec<&String> = packs.iter().filter(|k| !packs_ahead.contains(k)).collect();

    // The clocks are really off: by the names each replica gave its packs.
    let now = now_millis();
    for key in &packs_ahead {
        let off = pack_millis(key) as i64 - now;
        assert!((9 * 60_000..15 * 60_000).contains(&off), "replica ahead named a pack {off} ms off: {key}");
    }
    assert!(!packs_behind.is_empty());
    for key in &packs_behind {
        let off = pack_millis(key) as i64 - now;
        assert!(
            (-15 * 60_000..-9 * 60_000).contains(&off),
            "replica behind named a pack {off} ms off: {key}"
        );
    }

    for base in [&ahead.base, &behind.base] {
        for data in [&first, &second, &late] {
            assert_blob(&c, base, "skew/app", data, "acknowledged by a replica with another clock").await;
        }
    }
}

/// GC on a replica whose clock is ahead by more than the grace period: content is "older
/// than the grace" by the store's clock only. The old registry compared its own clock with
/// the store's timestamps and deleted chunks uploaded seconds before, so the commit that
/// follows their upload (here through a replica whose clock is behind) failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_on_a_replica_with_a_clock_ahead_keeps_what_is_younger_than_the_grace() {
    let bucket = Bucket::new("skew-gc");
    let c = client();
    let serving = bucket.replica("serving", &clock_off("-12m")).await;
    let repo = "skew/gc";

    // Chunks uploaded and acknowledged (200), their commit still to come.
    let blob = Rng::new(7).bytes(1 << 20);
    let fixed = fixed_chunked(&blob, 64 * KIB as u32);
    let resp = c
        .post(format!("{}/v2/{repo}/_thaw/chunks", serving.base))
        .header("content-type", CHUNKS_TYPE)
        .body(chunk_batch(&fixed.entries))
        .send()
        .await
        .expect("POST chunks");
    assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);
    // And a blob pushed and linked: live whatever the clocks say.
    let linked = Rng::new(8).bytes(200 * KIB);
    assert!(matches!(push_blob(&c, &serving.base, repo, &linked, 3).await, Pushed::Acknowledged));

    // GC with a 10-minute grace on a clock 12 minutes ahead.
    let (ok, out) = bucket.gc(&clock_off("+12m"), "10m").await;
    assert!(ok, "gc under a skewed clock failed:\n{out}");
    let offset = log_clock_offset(&out);
    assert!(
        (9 * 60..15 * 60).contains(&offset),
        "the GC process's clock is {offset} s off, not ~12 min:\n{out}"
    );
    let offset = log_clock_offset(&bucket.log("serving"));
    assert!(
        (-15 * 60..-9 * 60).contains(&offset),
        "the serving replica's clock is {offset} s off, not ~-12 min"
    );

    let resp = c
        .put(format!("{}/v2/{repo}/_thaw/blobs/{}", serving.base, fixed.digest))
        .header("content-type", RECIPE_TYPE)
        .body(fixed.recipe.clone())
        .send()
        .await
        .expect("PUT recipe");
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "committing chunks uploaded within the grace period: {}\ngc said:\n{out}",
        body_text(resp).await
    );
    let other = bucket.replica("other", &[]).await;
    for base in [&serving.base, &other.base] {
        assert_blob(&c, base, repo, &blob, "committed after GC").await;
        assert_blob(&c, base, repo, &linked, "linked before GC").await;
    }
}

async fn thaw_push(c: &Client, base: &str, repo: &str, blob: &[u8]) {
    let fixed = fixed_chunked(blob, 64 * KIB as u32);
    let resp = c
        .post(format!("{base}/v2/{repo}/_thaw/chunks"))
        .header("content-type", CHUNKS_TYPE)
        .body(chunk_batch(&fixed.entries))
        .send()
        .await
        .expect("POST chunks");
    assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);
    let resp = c
        .put(format!("{base}/v2/{repo}/_thaw/blobs/{}", fixed.digest))
        .header("content-type", RECIPE_TYPE)
        .body(fixed.recipe)
        .send()
        .await
        .expect("PUT recipe");
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
}

/// GC on one replica rewrites a pack that holds one live chunk among dead ones (the copy
/// goes to a new pack, the old pack is deleted). Another replica that only serves pulls,
/// and so never applied the sweep record, still locates that chunk in the old pack: it
/// must find the copy, not fail the pull of a blob nobody deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_only_reads_follows_a_pack_rewritten_by_gc_elsewhere() {
    let bucket = Bucket::new("gc-rewrite");
    let c = client();
    let writer = bucket.replica("writer", &[]).await;
    let reader = bucket.replica("reader", &[]).await;
    let repo = "rewrite/app";
    // X: four chunks, stored in one pack. Y: X's first chunk and a new one.
    let x = Rng::new(21).bytes(256 * KIB);
    let y = [&x[..64 * KIB], &Rng::new(22).bytes(64 * KIB)[..]].concat();
    thaw_push(&c, &writer.base, repo, &x).await;
    thaw_push(&c, &writer.base, repo, &y).await;
    let resp =
        c.delete(format!("{}/v2/{repo}/blobs/{}", writer.base, sha256_digest(&x))).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    // The reader learns where Y's chunks are.
    assert_blob(&c, &reader.base, repo, &y, "before GC").await;
    let packs_before = bucket.keys("chunks/packs").await;

    let (ok, out) = bucket.gc(&[], "0s").await;
    assert!(ok, "gc failed:\n{out}");
    assert!(out.contains("packs rewritten        1"), "X's pack was rewritten around Y's chunk:\n{out}");
    let packs_after = bucket.keys("chunks/packs").await;
    assert!(packs_before.iter().any(|p| !packs_after.contains(p)), "the old pack was deleted");

    for base in [&reader.base, &writer.base] {
        assert_blob(&c, base, repo, &y, "after another replica's GC rewrote its pack").await;
    }
}
