//! Faults of the S3 server under a running `thaw-registry` process (a real MinIO on
//! loopback; a small TCP proxy in this test delays or withholds bytes between them):
//!
//! - MinIO stopped in the middle of a push: the client gets a spec error body with 503
//!   `UNAVAILABLE` within seconds, nothing half-written becomes visible, and the push
//!   succeeds once MinIO is back. Both before the commit and while it writes packs.
//! - S3 that does not answer at all: requests that need it fail with 503 in bounded time
//!   (the registry's timeouts and retry limits, `AWS_TIMEOUT` honoured), not minutes.
//! - Slow S3: a push stalled on S3 does not hold up requests that do not need S3 (the
//!   base endpoint, upload sessions spooling to local disk).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::minio::{list_keys, unique_prefix, Minio};
use common::*;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use reqwest::{Client, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------
// A TCP proxy that can delay or withhold bytes
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Control {
    /// While set, no byte moves in either direction (connections stay open).
    stalled: AtomicBool,
    /// Sleep before forwarding each read of up to 16 KiB, in microseconds.
    delay_us: AtomicU64,
}

struct Proxy {
    addr: SocketAddr,
    control: Arc<Control>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let control = Arc::new(Control::default());
        let ctl = control.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let ctl = ctl.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, ctl.clone()), pump(sr, cw, ctl));
                });
            }
        });
        Self { addr, control, task }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stall(&self, on: bool) {
        self.control.stalled.store(on, Ordering::SeqCst);
    }

    fn delay_per_16k(&self, d: Duration) {
        self.control.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    ctl: Arc<Control>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while ctl.stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delay = ctl.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Every key under the registry's `repositories/` with its content: what is visible.
async fn visible(bucket: &dyn ObjectStore) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for key in list_keys(bucket, "repositories").await {
        let bytes = bucket.get(&key.as_str().into()).await.unwrap().bytes().await.unwrap();
        out.push((key, bytes.to_vec()));
    }
    out
}

async fn start_upload(c: &Client, base: &str, repo: &str) -> String {
    let resp = c.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "POST upload");
    resolve(base, &location(&resp).unwrap())
}

/// POST, one PATCH with all of `data` (spooled on the registry's disk: no S3 yet);
/// returns the URL for the closing PUT.
async fn upload_without_commit(c: &Client, base: &str, repo: &str, data: &[u8]) -> String {
    let url = start_upload(c, base, repo).await;
    let resp = c
        .patch(&url)
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "PATCH");
    resolve(base, &location(&resp).unwrap())
}

async fn commit(c: &Client, url: &str, digest: &str) -> reqwest::Response {
    c.put(with_query(url, &[("digest", digest)])).header("content-length", "0").send().await.unwrap()
}

async fn push(c: &Client, base: &str, repo: &str, data: &[u8]) {
    let url = upload_without_commit(c, base, repo, data).await;
    let resp = commit(c, &url, &sha256_digest(data)).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "push: {}", body_text(resp).await);
}

async fn assert_reads_back(c: &Client, base: &str, repo: &str, data: &[u8]) {
    let digest = sha256_digest(data);
    let resp = c.get(format!("{base}/v2/{repo}/blobs/{digest}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "GET {digest}");
    assert!(resp.bytes().await.unwrap().as_ref() == data, "blob {digest} came back different");
}

async fn assert_absent(c: &Client, base: &str, repo: &str, digest: &str) {
    let resp = c.head(format!("{base}/v2/{repo}/blobs/{digest}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "blob {digest} must not be visible");
}

/// A registry process on `prefix` of `minio`, reaching S3 through `endpoint`, with extra
/// environment.
async fn registry(
    minio: &Minio,
    endpoint: &str,
    prefix: &str,
    logs: &tempfile::TempDir,
    extra: &[(&'static str, String)],
) -> BinRegistry {
    let mut env = minio.env_for(endpoint);
    env.extend_from_slice(extra);
    // Upload spools in the test's directory, removed with it.
    env.push(("THAW_UPLOAD_DIR", logs.path().join(format!("{prefix}.uploads")).display().to_string()));
    let storage = minio.storage_url(prefix);
    BinRegistry::start_with(storage.as_ref(), &logs.path().join(format!("{prefix}.log")), &env).await
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stopped_before_the_commit_is_503_then_the_push_succeeds() {
    let mut minio = Minio::start();
    let logs = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("stopped");
    let reg = registry(&minio, &minio.endpoint(), &prefix, &logs, &[]).await;
    let c = client();
    let bucket: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(minio.client(), prefix.as_str()));
    push(&c, &reg.base, "fault/seed", b"seed layer").await;
    let before = visible(bucket.as_ref()).await;
    assert!(!before.is_empty());

    let data = Rng::new(1).bytes(24 * MIB);
    let digest = sha256_digest(&data);
    let url = upload_without_commit(&c, &reg.base, "fault/blob", &data).await;
    minio.stop();

    let started = Instant::now();
    let resp = commit(&c, &url, &digest).await;
    let took = started.elapsed();
    expect_error(resp, 503, &["UNAVAILABLE"], "closing PUT with S3 down").await;
    assert!(took < Duration::from_secs(30), "the 503 took {took:?}: retries must give up in seconds");
    println!("S3 down: closing PUT answered 503 UNAVAILABLE after {took:?}");
    // Other calls that need S3 say the same; the base endpoint does not need it.
    let resp = c.get(format!("{}/v2/fault/seed/tags/list", reg.base)).send().await.unwrap();
    expect_error(resp, 503, &["UNAVAILABLE"], "tags/list with S3 down").await;
    let batch = chunk_batch(&[encode_chunk(b"a chunk")]);
    let resp = c
        .post(format!("{}/v2/fault/blob/_thaw/chunks", reg.base))
        .header("content-type", CHUNKS_TYPE)
        .body(batch)
        .send()
        .await
        .unwrap();
    expect_error(resp, 503, &["UNAVAILABLE"], "chunk batch with S3 down").await;
    assert_eq!(c.get(format!("{}/v2/", reg.base)).send().await.unwrap().status(), StatusCode::OK);

    minio.start_again();
    assert_eq!(visible(bucket.as_ref()).await, before, "nothing became visible");
    assert_absent(&c, &reg.base, "fault/blob", &digest).await;
    push(&c, &reg.base, "fault/blob", &data).await;
    assert_reads_back(&c, &reg.base, "fault/blob", &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stopped_while_the_commit_writes_packs_leaves_nothing_visible() {
    let mut minio = Minio::start();
    let proxy = Proxy::start(minio.s3_addr()).await;
    let logs = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("mid-commit");
    let reg = registry(&minio, &proxy.endpoint(), &prefix, &logs, &[]).await;
    let c = client();
    let bucket: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(minio.client(), prefix.as_str()));
    push(&c, &reg.base, "fault/seed", b"seed layer").await;
    let before = visible(bucket.as_ref()).await;

    // 64 MiB that does not compress: four or more packs, written at ~8 MB/s through the
    // proxy, so the commit is still writing when the first pack has landed.
    let data = Rng::new(2).bytes(64 * MIB);
    let digest = sha256_digest(&data);
    let url = upload_without_commit(&c, &reg.base, "fault/blob", &data).await;
    proxy.delay_per_16k(Duration::from_millis(2));
    let pending = tokio::spawn({
        let (c, url, digest) = (c.clone(), url.clone(), digest.clone());
        async move { commit(&c, &url, &digest).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while list_keys(bucket.as_ref(), "chunks/packs").await.is_empty() {
        assert!(Instant::now() < deadline, "no pack was written in 60 s");
        assert!(!pending.is_finished(), "the commit ended before a pack landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    minio.stop();
    let resp = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("commit answers in time")
        .unwrap();
    expect_error(resp, 503, &["UNAVAILABLE"], "commit with S3 gone mid-way").await;

    minio.start_again();
    proxy.delay_per_16k(Duration::ZERO);
    assert_eq!(visible(bucket.as_ref()).await, before, "nothing became visible");
    assert_absent(&c, &reg.base, "fault/blob", &digest).await;
    let packs = list_keys(bucket.as_ref(), "chunks/packs").await;
    println!("S3 stopped mid-commit: {} pack(s) left unreferenced, nothing visible", packs.len());
    push(&c, &reg.base, "fault/blob", &data).await;
    assert_reads_back(&c, &reg.base, "fault/blob", &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_that_never_answers_fails_with_503_in_bounded_time() {
    let minio = Minio::shared();
    let proxy = Proxy::start(minio.s3_addr()).await;
    let logs = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("black-hole");
    // AWS_TIMEOUT is honoured (object_store's client option); 2 s keeps the test short.
    let reg = registry(minio, &proxy.endpoint(), &prefix, &logs, &[("AWS_TIMEOUT", "2s".into())]).await;
    let c = client();
    push(&c, &reg.base, "hole/seed", b"seed").await;
    let data = Rng::new(3).bytes(4 * MIB);
    let url = upload_without_commit(&c, &reg.base, "hole/blob", &data).await;

    proxy.stall(true);
    let started = Instant::now();
    let resp = commit(&c, &url, &sha256_digest(&data)).await;
    let took = started.elapsed();
    expect_error(resp, 503, &["UNAVAILABLE"], "commit with S3 silent").await;
    // Per request: 2 s timeout, at most 3 retries, none started after 10 s.
    assert!(took < Duration::from_secs(30), "the 503 took {took:?}");
    println!("S3 silent: closing PUT answered 503 after {took:?}");
    let resp = c.get(format!("{}/v2/hole/seed/tags/list", reg.base)).send().await.unwrap();
    expect_error(resp, 503, &["UNAVAILABLE"], "tags/list with S3 silent").await;

    proxy.stall(false);
    push(&c, &reg.base, "hole/blob", &data).await;
    assert_reads_back(&c, &reg.base, "hole/blob", &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stalled_on_s3_does_not_hold_up_unrelated_requests() {
    let minio = Minio::shared();
    let proxy = Proxy::start(minio.s3_addr()).await;
    let logs = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("slow");
    let reg = registry(minio, &proxy.endpoint(), &prefix, &logs, &[]).await;
    let c = client();
    push(&c, &reg.base, "slow/seed", b"seed").await;

    let data = Rng::new(4).bytes(16 * MIB);
    let url = upload_without_commit(&c, &reg.base, "slow/blob", &data).await;
    proxy.stall(true);
    let stalled_push = tokio::spawn({
        let (c, url, digest) = (c.clone(), url.clone(), sha256_digest(&data));
        async move { commit(&c, &url, &digest).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // For 5 s, requests that need no S3 keep being answered promptly.
    let local = Rng::new(5).bytes(8 * MIB);
    let until = Instant::now() + Duration::from_secs(5);
    let mut slowest = Duration::ZERO;
    let mut rounds = 0;
    while Instant::now() < until {
        let t = Instant::now();
        assert_eq!(c.get(format!("{}/v2/", reg.base)).send().await.unwrap().status(), StatusCode::OK);
        let upload = start_upload(&c, &reg.base, "slow/other").await;
        let resp = c.patch(&upload).body(local.clone()).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let status = c.get(resolve(&reg.base, &location(&resp).unwrap())).send().await.unwrap();
        assert_eq!(status.status(), StatusCode::NO_CONTENT);
        assert_eq!(upload_range(status.headers()), Some((0, local.len() as u64 - 1)));
        assert_eq!(c.delete(&upload).send().await.unwrap().status(), StatusCode::NO_CONTENT);
        slowest = slowest.max(t.elapsed());
        rounds += 1;
    }
    assert!(!stalled_push.is_finished(), "the push should still be stalled on S3");
    assert!(slowest < Duration::from_secs(2), "an S3-free round took {slowest:?} while a push was stalled");
    println!("S3 stalled: {rounds} rounds of GET /v2/ + upload session + 8 MiB PATCH, slowest {slowest:?}");

    proxy.stall(false);
    let resp =
        tokio::time::timeout(Duration::from_secs(60), stalled_push).await.expect("push resumes").unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "the stalled push completes: {}", body_text(resp).await);
    assert_reads_back(&c, &reg.base, "slow/blob", &data).await;
}
