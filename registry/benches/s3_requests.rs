//! S3 request efficiency of thaw-registry's storage, against the reference system's way.
//!
//! One run, one MinIO on loopback, the same realistic snapshot (four files) moved three
//! ways:
//!
//! - **reference**: the four files PUT whole to S3 (multipart with 16 MiB parts above
//!   16 MiB, as minio-go does) and GET whole: what the system thaw replaces did;
//! - **thaw OCI**: a plain OCI push (one monolithic upload per file) and pull through
//!   thaw-registry on `s3://`;
//! - **thaw `_thaw`**: the chunk-level fast path (missing query, chunk batches, commit by
//!   recipe; pull by recipe and chunk fetch) through thaw-registry on `s3://`, every file cut
//!   with FastCDC 16/64/256 KiB;
//! - **thaw `_thaw` 4K**: the same with memory and disk cut into fixed 4 KiB pages, the
//!   page size docs/DECISIONS.md D7 aims at (the client cuts 64 KiB until group frames land).
//!
//! Each way pushes snapshot v1 into an empty bucket prefix, pulls it, then pushes and pulls
//! v2 (a later snapshot of the same function: most pages unchanged). For every step it
//! reports the S3 requests by kind, requests and S3 bytes per GiB of snapshot moved, and the
//! wall time. Requests are counted by `thaw_registry::Counted` around the registry's store
//! (and around the reference client's store): one count per HTTP request, listings one per
//! started page of 1000 keys.
//!
//! Run: `cargo bench -p thaw-registry --bench s3_requests` (needs MinIO, as the S3 tests
//! do). Environment (paths absolute: cargo runs benches in the package directory):
//! `THAW_BENCH_SNAPSHOT=DIR` uses a real snapshot (`memory`, `vmstate`, `disk.ext4` or
//! `disk`, `info.json`, as `integration/corpus/make-corpus.sh` writes them) as v1, and
//! `THAW_BENCH_SNAPSHOT_V2=DIR` a later one of the same function as v2 (without it, v2 is
//! v1 with 5% of its memory pages rewritten);
//! `THAW_BENCH_MEMORY_MIB` sizes the synthetic memory file (default 512);
//! `THAW_BENCH_REPORT=FILE` also writes the Markdown report to FILE.

#[path = "../tests/common/minio.rs"]
#[allow(dead_code)]
mod minio;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use reqwest::{Client, StatusCode};
use thaw_registry::{process_storage_metrics, Counted, RegistryConfig, StorageCounts, StorageMetrics};
use thaw_schema::batch::{parse_batch, BatchWriter};
use thaw_schema::chunker::ChunkerParams;
use thaw_schema::digest::Sha256Hasher;
use thaw_schema::dto::{FetchChunksRequest, MissingChunksRequest, MissingChunksResponse};
use thaw_schema::frame::EncodedChunk;
use thaw_schema::manifest::{snapshot_manifest, SnapshotFile};
use thaw_schema::media::{self, FileRole};
use thaw_schema::recipe::{RecipeBuilder, RecipeEntry};
use thaw_schema::{ChunkId, Recipe, Sha256Digest};

type Result<T> = anyhow::Result<T>;

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// Part size of the reference multipart uploads.
const REFERENCE_PART: usize = 16 * MIB;
/// Largest `_thaw` chunk batch the benchmark client sends (the registry accepts 64 MiB).
const BATCH_BYTES: usize = 32 * MIB;
/// Uncompressed bytes per `_thaw` fetch request (what thaw-client asks for at once).
const FETCH_RAW_BYTES: u64 = 16 * MIB as u64;

// ---------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------

struct Snapshot {
    files: Vec<(FileRole, &'static str, Bytes)>,
}

impl Snapshot {
    fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, _, b)| b.len() as u64).sum()
    }
}

/// splitmix64, so the synthetic snapshot is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Guest-memory-like bytes: runs of zero pages (~40%), of pages from a pool shared by the
/// kernel and runtime (~45%), and of compressible text pages (~15%).
fn synthetic_memory(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let pool: Vec<Vec<u8>> = (0..8192)
        .map(|_| {
            let mut p = vec![0u8; PAGE];
            rng.fill(&mut p);
            p
        })
        .collect();
    let words: [&[u8]; 8] =
        [b"kernel ", b"python ", b"import ", b"lambda ", b"return ", b"snapshot ", b"memory ", b"runtime "];
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = 1 + rng.below(64) as usize;
        let kind = rng.below(100);
        for _ in 0..run {
            if out.len() >= len {
                break;
            }
            if kind < 40 {
                out.resize(out.len() + PAGE, 0);
            } else if kind < 85 {
                out.extend_from_slice(&pool[rng.below(pool.len() as u64) as usize]);
            } else {
                let start = out.len();
                while out.len() < start + PAGE {
                    out.extend_from_slice(words[rng.below(words.len() as u64) as usize]);
                }
                out.truncate(start + PAGE);
            }
        }
    }
    out.truncate(len);
    out
}

/// An ext4-image-like disk: half zero blocks, the rest random 4 KiB blocks.
fn synthetic_disk(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = vec![0u8; len];
    for block in out.chunks_mut(PAGE) {
        if rng.below(2) == 0 {
            rng.fill(block);
        }
    }
    out
}

/// A later snapshot of the same function: `share` of the memory pages rewritten in runs,
/// a few disk blocks changed, a new vmstate and info.
fn next_revision(v1: &Snapshot, share: f64, seed: u64) -> Snapshot {
    let mut rng = Rng(seed);
    let files = v1
        .files
        .iter()
        .map(|(role, title, data)| {
            let mut data = data.to_vec();
            match role {
                FileRole::Memory => {
                    let pages = data.len() / PAGE;
                    let mut rewritten = 0usize;
                    while (rewritten as f64) < share * pages as f64 {
                        let run = 1 + rng.below(16) as usize;
                        let at = rng.below(pages as u64) as usize;
                        for p in at..(at + run).min(pages) {
                            rng.fill(&mut data[p * PAGE..(p + 1) * PAGE]);
                        }
                        rewritten += run;
                    }
                }
                FileRole::Disk => {
                    let blocks = data.len() / PAGE;
                    for _ in 0..(blocks / 200).max(1) {
                        let b = rng.below(blocks as u64) as usize;
                        rng.fill(&mut data[b * PAGE..(b + 1) * PAGE]);
                    }
                }
                FileRole::Vmstate => rng.fill(&mut data),
                FileRole::Info => data = br#"{"function":"bench","revision":"v2"}"#.to_vec(),
            }
            (*role, *title, Bytes::from(data))
        })
        .collect();
    Snapshot { files }
}

fn read_snapshot(dir: &std::path::Path) -> Result<Snapshot> {
    let read = |names: &[&str]| -> Result<Bytes> {
        for n in names {
            if let Ok(b) = std::fs::read(dir.join(n)) {
                return Ok(Bytes::from(b));
            }
        }
        anyhow::bail!("{} has none of {names:?}", dir.display())
    };
    Ok(Snapshot {
        files: vec![
            (FileRole::Memory, "memory", read(&["memory", "mem"])?),
            (FileRole::Vmstate, "vmstate", read(&["vmstate", "snapshot"])?),
            (FileRole::Disk, "disk.ext4", read(&["disk.ext4", "disk"])?),
            (
                FileRole::Info,
                "info.json",
                read(&["info.json", "info"]).unwrap_or_else(|_| Bytes::from_static(b"{}")),
            ),
        ],
    })
}

/// Snapshots v1 and v2 and a description of them.
fn load_or_make_snapshots() -> Result<(Snapshot, Snapshot, String)> {
    if let Some(dir) = std::env::var_os("THAW_BENCH_SNAPSHOT") {
        let v1 = read_snapshot(std::path::Path::new(&dir))?;
        return Ok(match std::env::var_os("THAW_BENCH_SNAPSHOT_V2") {
            Some(dir2) => {
                let v2 = read_snapshot(std::path::Path::new(&dir2))?;
                let what = format!(
                    "real snapshots: v1 {}, v2 {}",
                    std::path::Path::new(&dir).display(),
                    std::path::Path::new(&dir2).display()
                );
                (v1, v2, what)
            }
            None => {
                let v2 = next_revision(&v1, 0.05, 7);
                let what = format!(
                    "real snapshot {} (v2: 5% of its memory pages rewritten)",
                    std::path::Path::new(&dir).display()
                );
                (v1, v2, what)
            }
        });
    }
    let mem_mib: usize =
        std::env::var("THAW_BENCH_MEMORY_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    let mut vmstate = vec![0u8; 48 * 1024];
    Rng(3).fill(&mut vmstate[..16 * 1024]);
    let files = vec![
        (FileRole::Memory, "memory", Bytes::from(synthetic_memory(mem_mib * MIB, 1))),
        (FileRole::Vmstate, "vmstate", Bytes::from(vmstate)),
        (FileRole::Disk, "disk.ext4", Bytes::from(synthetic_disk(64 * MIB, 2))),
        (FileRole::Info, "info.json", Bytes::from_static(br#"{"function":"bench","revision":"v1"}"#)),
    ];
    let v1 = Snapshot { files };
    let v2 = next_revision(&v1, 0.05, 7);
    Ok((
        v1,
        v2,
        format!(
            "synthetic snapshot, {mem_mib} MiB memory-like file + 64 MiB disk (v2: 5% of pages rewritten)"
        ),
    ))
}

// ---------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------

struct Row {
    way: &'static str,
    step: &'static str,
    moved: u64,
    counts: StorageCounts,
    secs: f64,
}

async fn measure<F, Fut>(
    rows: &mut Vec<Row>,
    metrics: &StorageMetrics,
    way: &'static str,
    step: &'static str,
    moved: u64,
    f: F,
) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let before = metrics.snapshot();
    let started = Instant::now();
    f().await.map_err(|e| e.context(format!("{way}: {step}")))?;
    let secs = started.elapsed().as_secs_f64();
    let counts = metrics.snapshot().since(&before);
    eprintln!("  {way:<12} {step:<10} {:>7} requests {:>8.2} s", counts.requests(), secs);
    rows.push(Row { way, step, moved, counts, secs });
    Ok(())
}

fn report(rows: &[Row], what: &str, total: u64) -> String {
    let mut out = format!(
        "S3 requests per snapshot move, MinIO {} on loopback; {what}, {:.1} MiB per snapshot.\n\n",
        minio::MINIO_VERSION,
        total as f64 / MIB as f64
    );
    out.push_str(
        "| way | step | S3 requests | GET | HEAD | PUT | LIST | requests/GiB | S3 MiB written/GiB | S3 MiB read/GiB | wall s | MiB/s |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let gib = r.moved as f64 / GIB;
        let c = &r.counts;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.2} | {:.0} |\n",
            r.way,
            r.step,
            c.requests(),
            c.gets,
            c.heads,
            c.puts,
            c.lists,
            c.requests() as f64 / gib,
            c.bytes_written as f64 / MIB as f64 / gib,
            c.bytes_read as f64 / MIB as f64 / gib,
            r.secs,
            r.moved as f64 / MIB as f64 / r.secs,
        ));
    }
    out
}

// ---------------------------------------------------------------------------
// The reference system: whole files
// ---------------------------------------------------------------------------

async fn reference_put(store: &Arc<dyn ObjectStore>, prefix: &str, snap: &Snapshot) -> Result<()> {
    for (_, title, data) in &snap.files {
        let key = Key::from(format!("{prefix}/{title}"));
        if data.len() <= REFERENCE_PART {
            store.put(&key, PutPayload::from(data.clone())).await?;
        } else {
            let upload = store.put_multipart(&key).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, REFERENCE_PART);
            for piece in data.chunks(REFERENCE_PART) {
                w.wait_for_capacity(4).await?;
                w.put(data.slice_ref(piece));
            }
            w.finish().await?;
        }
    }
    Ok(())
}

async fn reference_get(store: &Arc<dyn ObjectStore>, prefix: &str, snap: &Snapshot) -> Result<()> {
    for (_, title, data) in &snap.files {
        let got = store.get(&Key::from(format!("{prefix}/{title}"))).await?.bytes().await?;
        anyhow::ensure!(got == *data, "{title} came back different");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// thaw: plain OCI
// ---------------------------------------------------------------------------

fn digest(data: &[u8]) -> Sha256Digest {
    Sha256Digest::of(data)
}

async fn oci_push_blob(c: &Client, base: &str, repo: &str, data: Bytes) -> Result<()> {
    let d = digest(&data);
    let resp = c.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await?;
    anyhow::ensure!(resp.status() == StatusCode::ACCEPTED, "POST upload: {}", resp.status());
    let loc = resp.headers()["location"].to_str()?.to_owned();
    let url = reqwest::Url::parse(base)?.join(&loc)?;
    let sep = if url.query().is_some() { '&' } else { '?' };
    let resp = c.put(format!("{url}{sep}digest={d}")).body(data).send().await?;
    anyhow::ensure!(
        resp.status() == StatusCode::CREATED,
        "PUT blob: {} {}",
        resp.status(),
        resp.text().await?
    );
    Ok(())
}

fn manifest_of(snap: &Snapshot, config: &[u8]) -> Result<Vec<u8>> {
    let files: Vec<SnapshotFile> = snap
        .files
        .iter()
        .map(|(role, title, data)| SnapshotFile {
            role: *role,
            title: (*title).to_owned(),
            digest: digest(data),
            size: data.len() as u64,
            recipe: None,
        })
        .collect();
    let m = snapshot_manifest(digest(config), config.len() as u64, &files, HashMap::new())?;
    Ok(serde_json::to_vec(&m)?)
}

async fn push_manifest(c: &Client, base: &str, repo: &str, tag: &str, body: Vec<u8>) -> Result<()> {
    let resp = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", media::OCI_MANIFEST)
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(
        resp.status() == StatusCode::CREATED,
        "PUT manifest: {} {}",
        resp.status(),
        resp.text().await?
    );
    Ok(())
}

async fn oci_push(c: &Client, base: &str, repo: &str, tag: &str, snap: &Snapshot) -> Result<()> {
    let config = Bytes::from_static(br#"{"function":"bench"}"#);
    oci_push_blob(c, base, repo, config.clone()).await?;
    for (_, _, data) in &snap.files {
        oci_push_blob(c, base, repo, data.clone()).await?;
    }
    push_manifest(c, base, repo, tag, manifest_of(snap, &config)?).await
}

/// Layer digests of `repo:tag`.
async fn layers(c: &Client, base: &str, repo: &str, tag: &str) -> Result<Vec<Sha256Digest>> {
    let resp = c
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", media::OCI_MANIFEST)
        .send()
        .await?;
    anyhow::ensure!(resp.status() == StatusCode::OK, "GET manifest: {}", resp.status());
    let m: serde_json::Value = resp.json().await?;
    m["layers"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("manifest without layers"))?
        .iter()
        .map(|l| Ok(l["digest"].as_str().unwrap_or_default().parse()?))
        .collect()
}

async fn oci_pull(c: &Client, base: &str, repo: &str, tag: &str) -> Result<()> {
    for d in layers(c, base, repo, tag).await? {
        let mut resp = c.get(format!("{base}/v2/{repo}/blobs/{d}")).send().await?;
        anyhow::ensure!(resp.status() == StatusCode::OK, "GET blob {d}: {}", resp.status());
        let mut h = Sha256Hasher::new();
        while let Some(piece) = resp.chunk().await? {
            h.update(&piece);
        }
        anyhow::ensure!(h.finish() == d, "blob {d} came back different");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// thaw: the `_thaw` fast path
// ---------------------------------------------------------------------------

struct Cut {
    recipe: Recipe,
    chunks: HashMap<ChunkId, EncodedChunk>,
}

/// How the `_thaw` client cuts a file: FastCDC 16/64/256 KiB for everything, or (`pages`)
/// fixed 4 KiB pages for memory and disk, the target of docs/DECISIONS.md D7.
fn chunker_for(role: FileRole, pages: bool) -> ChunkerParams {
    match role {
        FileRole::Memory | FileRole::Disk if pages => ChunkerParams::fixed(4096),
        _ => ChunkerParams::REGISTRY_DEFAULT,
    }
}

fn cut(data: &[u8], params: ChunkerParams) -> Result<Cut> {
    let mut builder = RecipeBuilder::new(params);
    let mut chunks = HashMap::new();
    for chunk in params.chunks(data)? {
        let chunk = chunk?;
        let len = chunk.data.len() as u32;
        if chunk.is_zero() {
            builder.push_zero(len);
            continue;
        }
        let id = ChunkId::of(&chunk.data);
        builder.push_data(len, id);
        chunks.entry(id).or_insert_with(|| EncodedChunk::compress(&chunk.data, 3));
    }
    Ok(Cut { recipe: builder.finish(digest(data)), chunks })
}

async fn thaw_push(
    c: &Client,
    base: &str,
    repo: &str,
    tag: &str,
    snap: &Snapshot,
    pages: bool,
) -> Result<()> {
    let config = Bytes::from_static(br#"{"function":"bench"}"#);
    oci_push_blob(c, base, repo, config.clone()).await?;
    for (role, _, data) in &snap.files {
        let data = data.clone();
        let params = chunker_for(*role, pages);
        let cut = tokio::task::spawn_blocking(move || cut(&data, params)).await??;
        let ids: Vec<ChunkId> = cut.recipe.distinct_chunks();
        let resp = c
            .post(format!("{base}/v2/{repo}/_thaw/chunks/missing"))
            .json(&MissingChunksRequest { chunks: ids })
            .send()
            .await?;
        anyhow::ensure!(resp.status() == StatusCode::OK, "missing: {}", resp.status());
        let missing: MissingChunksResponse = resp.json().await?;
        let mut batches = Vec::new();
        let mut batch = BatchWriter::new();
        for id in &missing.missing {
            let chunk = &cut.chunks[id];
            if !batch.is_empty() && batch.len() + chunk.payload.len() > BATCH_BYTES {
                batches.push(std::mem::take(&mut batch).finish());
            }
            batch.push(id, chunk);
        }
        if !batch.is_empty() {
            batches.push(batch.finish());
        }
        futures::stream::iter(batches)
            .map(|body| async move {
                let resp = c
                    .post(format!("{base}/v2/{repo}/_thaw/chunks"))
                    .header("content-type", media::CHUNK_BATCH)
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    resp.status() == StatusCode::OK,
                    "chunk batch: {} {}",
                    resp.status(),
                    resp.text().await?
                );
                Ok(())
            })
            .buffer_unordered(2)
            .try_collect::<Vec<()>>()
            .await?;
        let d = cut.recipe.digest;
        let resp = c
            .put(format!("{base}/v2/{repo}/_thaw/blobs/{d}"))
            .header("content-type", media::RECIPE)
            .body(cut.recipe.encode())
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == StatusCode::CREATED,
            "commit {d}: {} {}",
            resp.status(),
            resp.text().await?
        );
    }
    push_manifest(c, base, repo, tag, manifest_of(snap, &config)?).await
}

async fn thaw_pull(c: &Client, base: &str, repo: &str, tag: &str) -> Result<()> {
    for d in layers(c, base, repo, tag).await? {
        let resp = c.get(format!("{base}/v2/{repo}/_thaw/blobs/{d}/recipe")).send().await?;
        anyhow::ensure!(resp.status() == StatusCode::OK, "recipe {d}: {}", resp.status());
        let recipe = Recipe::decode(&resp.bytes().await?)?;
        // Distinct ids in first-use order, FETCH_RAW_BYTES of them per request.
        let mut seen = std::collections::HashSet::new();
        let mut requests: Vec<Vec<ChunkId>> = vec![Vec::new()];
        let mut raw = 0u64;
        for e in &recipe.entries {
            if let RecipeEntry::Data { id, len } = e {
                if seen.insert(*id) {
                    if raw >= FETCH_RAW_BYTES {
                        requests.push(Vec::new());
                        raw = 0;
                    }
                    raw += u64::from(*len);
                    requests.last_mut().expect("a request").push(*id);
                }
            }
        }
        requests.retain(|r| !r.is_empty());
        let mut chunks: HashMap<ChunkId, Bytes> = HashMap::with_capacity(seen.len());
        let fetched: Vec<Vec<(ChunkId, Vec<u8>)>> = futures::stream::iter(requests)
            .map(|ids| async move {
                let resp = c
                    .post(format!("{base}/v2/{repo}/_thaw/chunks/fetch"))
                    .json(&FetchChunksRequest { blob: d, chunks: ids })
                    .send()
                    .await?;
                anyhow::ensure!(resp.status() == StatusCode::OK, "fetch: {}", resp.status());
                let body = resp.bytes().await?;
                tokio::task::spawn_blocking(move || -> Result<Vec<(ChunkId, Vec<u8>)>> {
                    parse_batch(&body)?.into_iter().map(|(id, ch)| Ok((id, ch.decode(&id)?))).collect()
                })
                .await?
            })
            .buffered(2)
            .try_collect()
            .await?;
        for (id, data) in fetched.into_iter().flatten() {
            chunks.insert(id, Bytes::from(data));
        }
        let mut h = Sha256Hasher::new();
        let zeros = vec![0u8; thaw_schema::MAX_CHUNK_LEN as usize];
        for e in &recipe.entries {
            match e {
                RecipeEntry::Zero { len } => h.update(&zeros[..*len as usize]),
                RecipeEntry::Data { id, .. } => h.update(&chunks[id]),
            }
        }
        anyhow::ensure!(h.finish() == d, "blob {d} reassembled different");
    }
    Ok(())
}

// ---------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    eprintln!("s3_requests: preparing snapshots");
    let (v1, v2, what) = load_or_make_snapshots()?;
    let total = v1.bytes();
    eprintln!("s3_requests: starting MinIO");
    let minio: &'static minio::Minio = Box::leak(Box::new(minio::Minio::start()));
    minio.export_env();
    let mut rows = Vec::new();

    // The reference system: whole files.
    let ref_metrics = StorageMetrics::new();
    let reference: Arc<dyn ObjectStore> = Arc::new(Counted::new(minio.client(), ref_metrics.clone()));
    let prefix = minio::unique_prefix("reference");
    for (step, snap, tag) in
        [("push v1", &v1, "v1"), ("pull v1", &v1, "v1"), ("push v2", &v2, "v2"), ("pull v2", &v2, "v2")]
    {
        let p = format!("{prefix}/{tag}");
        let r = &reference;
        measure(&mut rows, &ref_metrics, "reference", step, snap.bytes(), || async move {
            if step.starts_with("push") {
                reference_put(r, &p, snap).await
            } else {
                reference_get(r, &p, snap).await
            }
        })
        .await?;
    }

    let client = Client::builder().no_proxy().build()?;
    let metrics = process_storage_metrics();
    for way in ["thaw OCI", "thaw _thaw", "thaw _thaw 4K"] {
        let storage = minio.storage_url(&minio::unique_prefix("bench"));
        let registry = thaw_registry::spawn(RegistryConfig::new("127.0.0.1:0".parse()?, storage)).await?;
        let base = registry.url();
        let (c, b) = (&client, base.as_str());
        for (step, snap, tag) in
            [("push v1", &v1, "v1"), ("pull v1", &v1, "v1"), ("push v2", &v2, "v2"), ("pull v2", &v2, "v2")]
        {
            measure(&mut rows, &metrics, way, step, snap.bytes(), || async move {
                match (way, step.starts_with("push")) {
                    ("thaw OCI", true) => oci_push(c, b, "bench/fn", tag, snap).await,
                    ("thaw OCI", false) => oci_pull(c, b, "bench/fn", tag).await,
                    (_, true) => thaw_push(c, b, "bench/fn", tag, snap, way.ends_with("4K")).await,
                    (_, false) => thaw_pull(c, b, "bench/fn", tag).await,
                }
            })
            .await?;
        }
        registry.shutdown().await;
    }

    let text = report(&rows, &what, total);
    println!("\n{text}");
    if let Some(path) = std::env::var_os("THAW_BENCH_REPORT") {
        std::fs::write(&path, &text)?;
    }
    Ok(())
}
