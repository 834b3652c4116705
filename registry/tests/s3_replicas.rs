//! Two `thaw-registry` processes serving one bucket (a real MinIO on loopback), as
//! replicas behind a load balancer would: a push through one is pulled byte-identical
//! through the other, the `_thaw` fast path works with its calls spread over both, and
//! concurrent pushes of overlapping snapshots through both lose nothing and corrupt
//! nothing (checked at the end by reading back every recipe's chunks from the bucket).

mod common;

use std::sync::Arc;

use common::minio::{list_keys, unique_prefix, Minio};
use common::*;
use futures::TryStreamExt;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use thaw_registry::Store;
use thaw_schema::Sha256Digest;

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

fn memory_like(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let pool: Vec<Vec<u8>> = (0..1024).map(|_| rng.bytes(PAGE)).collect();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = 1 + rng.below(32) as usize;
        let zero = rng.below(100) < 40;
        for _ in 0..run {
            if zero {
                out.extend_from_slice(&[0u8; PAGE]);
            } else {
                out.extend_from_slice(&pool[rng.below(1024) as usize]);
            }
        }
    }
    out.truncate(len);
    out
}

/// `base` with `share` of its pages rewritten, in runs.
fn edited(base: &[u8], share: f64, seed: u64) -> Vec<u8> {
    let mut out = base.to_vec();
    let mut rng = Rng::new(seed);
    let pages = out.len() / PAGE;
    let mut done = 0usize;
    while (done as f64) < share * pages as f64 {
        let at = rng.below(pages as u64) as usize;
        let run = 1 + rng.below(16) as usize;
        for p in at..(at + run).min(pages) {
            rng.fill(&mut out[p * PAGE..(p + 1) * PAGE]);
        }
        done += run;
    }
    out
}

/// Two registry processes on one bucket prefix.
struct Replicas {
    a: BinRegistry,
    b: BinRegistry,
    prefix: String,
    _logs: tempfile::TempDir,
}

impl Replicas {
    async fn start() -> Self {
        let minio = Minio::shared();
        let prefix = unique_prefix("replicas");
        let storage = minio.storage_url(&prefix);
        let logs = tempfile::tempdir().unwrap();
        let spool = |name: &str| ("THAW_UPLOAD_DIR", logs.path().join(name).display().to_string());
        let env_a = [minio.env(), vec![spool("a.uploads")]].concat();
        let env_b = [minio.env(), vec![spool("b.uploads")]].concat();
        let a = BinRegistry::start_with(storage.as_ref(), &logs.path().join("a.log"), &env_a).await;
        let b = BinRegistry::start_with(storage.as_ref(), &logs.path().join("b.log"), &env_b).await;
        Self { a, b, prefix, _logs: logs }
    }

    /// The bucket under the replicas' prefix, as a cold store would see it.
    fn bucket(&self) -> Arc<dyn ObjectStore> {
        Arc::new(PrefixStore::new(Minio::shared().client(), self.prefix.as_str()))
    }
}

async fn push_blob(c: &Client, base: &str, repo: &str, data: &[u8]) -> String {
    let digest = sha256_digest(data);
    let resp = c.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let url = resolve(base, &location(&resp).unwrap());
    let resp = c.put(with_query(&url, &[("digest", &digest)])).body(data.to_vec()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "push {digest} to {base}: {}", body_text(resp).await);
    digest
}

async fn push_manifest(c: &Client, base: &str, repo: &str, tag: &str, body: &[u8]) {
    let resp = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", MANIFEST_V1)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "manifest {repo}:{tag} at {base}: {}",
        body_text(resp).await
    );
}

/// Pushes the files and a manifest naming them, tagged `tag`.
async fn push_snapshot(c: &Client, base: &str, repo: &str, tag: &str, files: &[&[u8]]) -> Vec<u8> {
    let config = format!(r#"{{"tag":"{tag}"}}"#).into_bytes();
    push_blob(c, base, repo, &config).await;
    let mut layers = Vec::new();
    for f in files {
        push_blob(c, base, repo, f).await;
        layers.push(descriptor(LAYER_TAR, f));
    }
    let manifest = image_manifest(descriptor(CONFIG_V1, &config), layers, json!({}));
    push_manifest(c, base, repo, tag, &manifest).await;
    manifest
}

/// Pulls `repo:tag` through `base` and checks the manifest and every layer against `files`.
async fn assert_pulls(c: &Client, base: &str, repo: &str, tag: &str, manifest: &[u8], files: &[&[u8]]) {
    let resp = c
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", MANIFEST_V1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "manifest {repo}:{tag} through {base}");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), manifest, "manifest {repo}:{tag} through {base}");
    for f in files {
        let digest = sha256_digest(f);
        let resp = c.get(format!("{base}/v2/{repo}/blobs/{digest}")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "blob {digest} through {base}");
        let got = resp.bytes().await.unwrap();
        assert!(got.as_ref() == *f, "blob {digest} through {base} came back different ({} bytes)", got.len());
    }
}

/// Reads every recipe in the bucket and every chunk it names, verified, through a store
/// that has seen nothing before; and checks every blob link has its recipe.
async fn assert_bucket_consistent(bucket: Arc<dyn ObjectStore>) -> (usize, usize) {
    let store = Arc::new(Store::new(bucket.clone()));
    let recipes = list_keys(bucket.as_ref(), "recipes/sha256").await;
    let mut chunks = 0;
    for key in &recipes {
        let digest: Sha256Digest = format!("sha256:{}", key.rsplit('/').next().unwrap()).parse().unwrap();
        let recipe = store.get_recipe(&digest).await.unwrap().expect("listed recipe");
        let ids = recipe.distinct_chunks();
        chunks += ids.len();
        let read: Vec<_> =
            store.read_chunks(ids).try_collect().await.unwrap_or_else(|e| panic!("recipe {digest}: {e}"));
        let distinct_bytes: u64 = read.iter().map(|b| b.len() as u64).sum();
        assert!(
            distinct_bytes + recipe.zero_bytes() <= recipe.size,
            "recipe {digest}: chunks longer than the blob"
        );
    }
    for link in list_keys(bucket.as_ref(), "repositories").await {
        if let Some((_, hex)) = link.split_once("/_layers/sha256/") {
            assert!(recipes.iter().any(|r| r.ends_with(hex)), "blob link {link} has no recipe");
        }
    }
    (recipes.len(), chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_through_one_replica_is_pulled_identical_through_the_other() {
    let r = Replicas::start().await;
    let c = client();
    let memory = memory_like(48 * MIB, 1);
    let vmstate = Rng::new(2).bytes(50_000);
    let files: [&[u8]; 2] = [&memory, &vmstate];
    let manifest = push_snapshot(&c, &r.a.base, "fn/hello", "v1", &files).await;
    assert_pulls(&c, &r.b.base, "fn/hello", "v1", &manifest, &files).await;
    let tags: Value =
        c.get(format!("{}/v2/fn/hello/tags/list", r.b.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"], json!(["v1"]));
    let catalog: Value =
        c.get(format!("{}/v2/_catalog", r.b.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(catalog["repositories"], json!(["fn/hello"]));

    // The fast path with its calls spread over both: chunks to A, the question and the
    // commit to B (which must find A's chunks), fetch from A, read from B.
    let blob = memory_like(8 * MIB, 3);
    let fixed = fixed_chunked(&blob, 64 * 1024);
    let ids: Vec<String> = fixed.entries.iter().map(|e| hex::encode(e.id)).collect();
    let resp = c
        .post(format!("{}/v2/fn/fast/_thaw/chunks", r.a.base))
        .header("content-type", CHUNKS_TYPE)
        .body(chunk_batch(&fixed.entries))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);
    let resp = c
        .post(format!("{}/v2/fn/fast/_thaw/chunks/missing", r.b.base))
        .json(&json!({ "chunks": ids }))
        .send()
        .await
        .unwrap();
    let missing: Value = resp.json().await.unwrap();
    assert_eq!(missing["missing"], json!([]), "B sees the chunks A stored");
    let resp = c
        .put(format!("{}/v2/fn/fast/_thaw/blobs/{}", r.b.base, fixed.digest))
        .header("content-type", RECIPE_TYPE)
        .body(fixed.recipe.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "commit through B: {}", body_text(resp).await);
    let resp = c
        .post(format!("{}/v2/fn/fast/_thaw/chunks/fetch", r.a.base))
        .json(&json!({ "blob": fixed.digest, "chunks": ids }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let fetched = thaw_schema::batch::parse_batch(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(fetched.len(), ids.len());
    for (id, frame) in &fetched {
        frame.decode(id).expect("fetched through A, committed through B");
    }
    let got = c
        .get(format!("{}/v2/fn/fast/blobs/{}", r.b.base, fixed.digest))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got.as_ref() == blob.as_slice());
    assert_bucket_consistent(r.bucket()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overlapping_pushes_through_both_replicas_lose_and_corrupt_nothing() {
    let r = Replicas::start().await;
    let c = client();
    let mem1 = memory_like(40 * MIB, 10);
    let mem2 = edited(&mem1, 0.3, 11); // the next revision: most pages shared with v1
    let disk = memory_like(16 * MIB, 12); // the same disk in both
    let shared_vm = Rng::new(13).bytes(64 * 1024); // the same small file in both
    let v1: [&[u8]; 3] = [&mem1, &disk, &shared_vm];
    let v2: [&[u8]; 3] = [&mem2, &disk, &shared_vm];
    // Three rounds: both replicas push at once, the same repository, different tags, and
    // in round 2 the very same snapshot through both.
    let (m1, m2) = tokio::join!(
        push_snapshot(&c, &r.a.base, "fn/app", "v1", &v1),
        push_snapshot(&c, &r.b.base, "fn/app", "v2", &v2),
    );
    let (m1b, m1c) = tokio::join!(
        push_snapshot(&c, &r.a.base, "fn/again", "x", &v1),
        push_snapshot(&c, &r.b.base, "fn/again", "x", &v1),
    );
    assert_eq!(m1b, m1c, "the same snapshot makes the same manifest");
    for base in [&r.a.base, &r.b.base] {
        assert_pulls(&c, base, "fn/app", "v1", &m1, &v1).await;
        assert_pulls(&c, base, "fn/app", "v2", &m2, &v2).await;
        assert_pulls(&c, base, "fn/again", "x", &m1b, &v1).await;
    }
    let (recipes, chunks) = assert_bucket_consistent(r.bucket()).await;
    // v1's four blobs (memory, disk, vmstate, config), v2's memory and config, and the
    // configs of round 2 (identical, one recipe): 7 recipes.
    assert_eq!(recipes, 7, "recipes in the bucket");
    println!("replicas: {recipes} recipes, {chunks} chunk references, all read back verified");
}
