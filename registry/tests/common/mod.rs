//! Shared helpers for the registry's black-box tests.
//!
//! Everything here talks to the registry the way a client would: over HTTP, plus
//! read-only looks at the storage directory. Wire formats of the `_thaw` extension are
//! built by hand from docs/FORMAT.md so the tests do not depend on the implementation.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub(crate) mod minio;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) const MANIFEST_V1: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const INDEX_V1: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const CONFIG_V1: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const EMPTY_JSON_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub(crate) const RECIPE_TYPE: &str = "application/vnd.thaw.recipe.v1";
pub(crate) const CHUNKS_TYPE: &str = "application/vnd.thaw.chunks.v1";

/// A digest that no test ever uploads content for.
pub(crate) const UNKNOWN_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000001";

// ---------------------------------------------------------------------------
// Registries
// ---------------------------------------------------------------------------

/// A reqwest client that never goes through a proxy and never follows redirects
/// (so a redirect shows up as what it is). Like real clients (and the spec's conformance
/// suite) it sends an `Accept` naming the OCI manifest types.
pub(crate) fn client() -> Client {
    let mut headers = HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static(
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*",
        ),
    );
    Client::builder()
        .default_headers(headers)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(600))
        .build()
        .expect("build reqwest client")
}

// ---------------------------------------------------------------------------
// Storage backend of the black-box suites
// ---------------------------------------------------------------------------

/// True when `THAW_TEST_STORAGE=s3`: every [`TestRegistry`] then stores into its own prefix
/// of the test binary's shared MinIO bucket instead of a temporary directory, and the
/// storage-inspection helpers below ([`list_files`], [`reachable_state`], …) read the
/// bucket. Anything else (or unset) means the filesystem.
pub(crate) fn s3_mode() -> bool {
    match std::env::var("THAW_TEST_STORAGE").as_deref() {
        Ok("s3") => true,
        Ok("" | "fs" | "filesystem") | Err(_) => false,
        Ok(other) => panic!("THAW_TEST_STORAGE={other:?}: use `s3` or `fs`"),
    }
}

/// Storage roots that live in S3: the local path a test sees (`TestRegistry::storage()`)
/// and the bucket prefix it stands for.
static S3_ROOTS: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

/// The bucket key prefix `path` stands for, when it lies under an S3 storage root.
fn s3_key_of(path: &Path) -> Option<String> {
    let roots = S3_ROOTS.lock().expect("lock");
    roots.iter().find_map(|(root, prefix)| {
        let rel = path.strip_prefix(root).ok()?;
        let rel = rel.to_str().expect("UTF-8 path").trim_matches('/');
        Some(if rel.is_empty() { prefix.clone() } else { format!("{prefix}/{rel}") })
    })
}

/// Runs `f` with a fresh S3 client on a thread of its own (the sync helpers are called
/// from async tests, whose runtime must not be blocked on from inside).
fn with_s3<T: Send>(
    f: impl FnOnce(std::sync::Arc<dyn object_store::ObjectStore>) -> futures::future::BoxFuture<'static, T> + Send,
) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(f(minio::Minio::shared().client()))
            })
            .join()
            .expect("S3 inspection thread")
    })
}

/// An in-process registry on an ephemeral port, storing into its own temporary directory
/// (or, with `THAW_TEST_STORAGE=s3`, its own prefix of the shared MinIO bucket).
pub(crate) struct TestRegistry {
    pub(crate) base: String,
    pub(crate) client: Client,
    running: Option<thaw_registry::RunningRegistry>,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// A registry on the backend `THAW_TEST_STORAGE` names (the filesystem by default).
    pub(crate) async fn start() -> Self {
        Self::start_on(s3_mode()).await
    }

    /// A registry on the test binary's shared MinIO, whatever `THAW_TEST_STORAGE` says.
    pub(crate) async fn start_s3() -> Self {
        Self::start_on(true).await
    }

    /// A registry on the `THAW_TEST_STORAGE` backend with `options` (limits, faults).
    pub(crate) async fn start_with(options: thaw_registry::ServeOptions) -> Self {
        Self::start_on_with(s3_mode(), options).await
    }

    async fn start_on(s3: bool) -> Self {
        Self::start_on_with(s3, thaw_registry::ServeOptions::default()).await
    }

    async fn start_on_with(s3: bool, options: thaw_registry::ServeOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("create storage dir");
        let storage_spec = if s3 {
            let minio = minio::Minio::shared();
            minio.export_env();
            let prefix = minio::unique_prefix("registry");
            S3_ROOTS.lock().expect("lock").push((storage.clone(), prefix.clone()));
            minio.storage_url(&prefix)
        } else {
            storage.to_str().expect("utf-8 temp path").to_owned()
        };
        let cfg = thaw_registry::RegistryConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            storage: storage_spec,
        };
        let running = thaw_registry::spawn_with(cfg, options).await.expect("spawn in-process registry");
        let base = running.url();
        let client = client();
        wait_ready(&client, &base).await;
        Self { base, client, running: Some(running), dir }
    }

    /// Where the registry stores. In S3 mode this local path stands for the registry's
    /// bucket prefix: the inspection helpers ([`list_files`], [`reachable_state`]) read the
    /// bucket for it, while the directory itself stays empty.
    pub(crate) fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.running.as_ref().expect("running").addr()
    }

    /// `path` is everything after the host, starting with `/`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Resolves a `Location` header (absolute or relative) against the registry.
    pub(crate) fn resolve(&self, location: &str) -> String {
        resolve(&self.base, location)
    }

    pub(crate) fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub(crate) async fn get(&self, path: &str) -> Response {
        self.req(Method::GET, path).send().await.expect("GET")
    }

    pub(crate) async fn head(&self, path: &str) -> Response {
        self.req(Method::HEAD, path).send().await.expect("HEAD")
    }

    pub(crate) async fn delete(&self, path: &str) -> Response {
        self.req(Method::DELETE, path).send().await.expect("DELETE")
    }

    /// `POST /v2/<name>/blobs/uploads/`, asserting 202 and a `Location`; returns the
    /// absolute upload URL.
    pub(crate) async fn start_upload(&self, name: &str) -> String {
        let resp = self
            .req(Method::POST, &format!("/v2/{name}/blobs/uploads/"))
            .header("Content-Length", "0")
            .send()
            .await
            .expect("POST upload");
        assert_eq!(
            resp.status(),
            StatusCode::ACCEPTED,
            "POST /v2/{name}/blobs/uploads/ should open a session"
        );
        let loc = location(&resp).expect("202 from POST uploads must carry Location");
        self.resolve(&loc)
    }

    /// Monolithic upload (POST, then PUT ?digest= with the whole body). Asserts 201.
    pub(crate) async fn push_blob(&self, name: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let url = self.start_upload(name).await;
        let resp = self
            .client
            .put(with_query(&url, &[("digest", &digest)]))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .expect("PUT upload");
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "monolithic PUT of {digest} to {name}: {}",
            body_text(resp).await
        );
        digest
    }

    /// Chunked upload: PATCH pieces of `piece` bytes with `Content-Range`, then an empty
    /// PUT ?digest=. Asserts every status. Returns the digest.
    pub(crate) async fn push_blob_chunked(&self, name: &str, data: &[u8], piece: usize) -> String {
        let digest = sha256_digest(data);
        let mut url = self.start_upload(name).await;
        let mut off = 0usize;
        while off < data.len() {
            let end = (off + piece).min(data.len());
            let resp = self
                .client
                .patch(&url)
                .header("Content-Type", "application/octet-stream")
                .header("Content-Range", format!("{}-{}", off, end - 1))
                .body(data[off..end].to_vec())
                .send()
                .await
                .expect("PATCH");
            assert_eq!(resp.status(), StatusCode::ACCEPTED, "PATCH {off}-{} of {digest}", end - 1);
            url = self.resolve(&location(&resp).expect("PATCH 202 must carry Location"));
            off = end;
        }
        let resp = self
            .client
            .put(with_query(&url, &[("digest", &digest)]))
            .header("Content-Length", "0")
            .send()
            .await
            .expect("PUT commit");
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "closing PUT of chunked upload {digest}: {}",
            body_text(resp).await
        );
        digest
    }

    /// `PUT /v2/<name>/manifests/<reference>`; returns the raw response.
    pub(crate) async fn put_manifest(
        &self,
        name: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Response {
        self.req(Method::PUT, &format!("/v2/{name}/manifests/{reference}"))
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .expect("PUT manifest")
    }

    /// Pushes a manifest and asserts 201; returns its digest.
    pub(crate) async fn push_manifest(
        &self,
        name: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let resp = self.put_manifest(name, reference, media_type, body).await;
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "PUT manifest {name}:{reference}: {}",
            body_text(resp).await
        );
        sha256_digest(body)
    }

    /// Pushes a small config blob and one layer blob, then an image manifest naming them
    /// under `reference`. Returns (manifest bytes, manifest digest).
    pub(crate) async fn push_simple_image(
        &self,
        name: &str,
        reference: &str,
        layer: &[u8],
    ) -> (Vec<u8>, String) {
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        self.push_blob(name, config).await;
        self.push_blob(name, layer).await;
        let manifest =
            image_manifest(descriptor(CONFIG_V1, config), vec![descriptor(LAYER_TAR, layer)], json!({}));
        let digest = self.push_manifest(name, reference, MANIFEST_V1, &manifest).await;
        (manifest, digest)
    }

    /// Reads a whole blob through `GET`, asserting 200.
    pub(crate) async fn get_blob(&self, name: &str, digest: &str) -> Vec<u8> {
        let resp = self.get(&format!("/v2/{name}/blobs/{digest}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "GET blob {name}@{digest}");
        resp.bytes().await.expect("blob body").to_vec()
    }

    /// Streams a blob through `GET` and returns (sha256 digest, length) of what arrived.
    pub(crate) async fn get_blob_digest(&self, name: &str, digest: &str) -> (String, u64) {
        let mut resp = self.get(&format!("/v2/{name}/blobs/{digest}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "GET blob {name}@{digest}");
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = resp.chunk().await.expect("blob body chunk") {
            n += chunk.len() as u64;
            h.update(&chunk);
        }
        (format!("sha256:{}", hex::encode(h.finalize())), n)
    }

    pub(crate) async fn tags(&self, name: &str) -> Vec<String> {
        let resp = self.get(&format!("/v2/{name}/tags/list")).await;
        if resp.status() == StatusCode::NOT_FOUND {
            return Vec::new();
        }
        assert_eq!(resp.status(), StatusCode::OK, "tags/list of {name}");
        let v: Value = resp.json().await.expect("tags/list JSON");
        v["tags"]
            .as_array()
            .map(|a| a.iter().map(|t| t.as_str().expect("tag string").to_owned()).collect())
            .unwrap_or_default()
    }

    pub(crate) async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// Polls `GET /v2/` until 200, for up to 30 s.
pub(crate) async fn wait_ready(client: &Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = client.get(format!("{base}/v2/")).send().await {
            if resp.status() == StatusCode::OK {
                return;
            }
        }
        assert!(Instant::now() < deadline, "registry at {base} never answered GET /v2/ with 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `thaw-registry` binary, run as a child process.
pub(crate) struct BinRegistry {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) base: String,
}

impl BinRegistry {
    /// Starts the binary on a free loopback port with `--storage storage`, logging to
    /// `log`, and waits until it is ready.
    pub(crate) async fn start(storage: &Path, log: &Path) -> Self {
        Self::start_with(storage.as_os_str(), log, &[]).await
    }

    /// Starts the binary with `--storage storage` (a directory or `s3://…`) and extra
    /// environment variables (`AWS_*` for S3), on a free loopback port.
    pub(crate) async fn start_with(storage: &std::ffi::OsStr, log: &Path, env: &[(&str, String)]) -> Self {
        let addr = free_port();
        let log_file =
            std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open registry log");
        let child = Command::new(env!("CARGO_BIN_EXE_thaw-registry"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--storage")
            .arg(storage)
            .env_remove("THAW_LISTEN")
            .env_remove("THAW_STORAGE")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file)
            .spawn()
            .expect("spawn thaw-registry binary");
        let base = format!("http://{addr}");
        let mut me = Self { child, addr, base };
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = client();
        loop {
            if let Ok(resp) = c.get(format!("{}/v2/", me.base)).send().await {
                if resp.status() == StatusCode::OK {
                    return me;
                }
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!(
                    "thaw-registry exited early with {status}; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "thaw-registry binary never became ready; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL (what `Child::kill` sends on unix) and reap.
    pub(crate) fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL thaw-registry");
        self.child.wait().expect("reap thaw-registry");
    }
}

impl Drop for BinRegistry {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback address whose port was free a moment ago.
pub(crate) fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind ephemeral port");
    l.local_addr().expect("local addr")
}

// ---------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------

pub(crate) fn resolve(base: &str, location: &str) -> String {
    let base = reqwest::Url::parse(base).expect("base URL");
    base.join(location).unwrap_or_else(|e| panic!("Location {location:?} does not resolve: {e}")).to_string()
}

/// Appends query pairs to a URL that may already carry a query.
pub(crate) fn with_query(url: &str, pairs: &[(&str, &str)]) -> String {
    let mut u = reqwest::Url::parse(url).expect("URL");
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    u.to_string()
}

pub(crate) fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.to_str().expect("ASCII header").to_owned())
}

pub(crate) fn location(resp: &Response) -> Option<String> {
    header(resp.headers(), "location")
}

/// The `Content-Length` header as sent (not reqwest's body size hint, which is 0 on HEAD).
pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    header(h, "content-length").map(|v| v.parse().expect("numeric Content-Length"))
}

/// An upload `Range` header (`0-<end>`, optionally written `bytes=0-<end>`) as (start, end).
pub(crate) fn upload_range(h: &HeaderMap) -> Option<(u64, u64)> {
    let v = header(h, "range")?;
    let v = v.strip_prefix("bytes=").unwrap_or(&v);
    let (a, b) = v.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

pub(crate) async fn body_text(resp: Response) -> String {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    format!("status {status}, body {text}")
}

/// The `code`s of a spec error body `{"errors":[{"code":…}]}`.
pub(crate) fn error_codes(body: &[u8]) -> Vec<String> {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    v["errors"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["code"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Asserts a status and that the error body's first code is one of `codes`.
/// Returns the body for further checks.
pub(crate) async fn expect_error(resp: Response, status: u16, codes: &[&str], what: &str) -> Vec<u8> {
    let got = resp.status().as_u16();
    let body = resp.bytes().await.expect("error body").to_vec();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(got, status, "{what}: want status {status}, got {got}; body {text}");
    let found = error_codes(&body);
    assert!(
        found.first().is_some_and(|c| codes.contains(&c.as_str())),
        "{what}: want error code in {codes:?}, got {found:?}; body {text}"
    );
    body
}

/// Raw HTTP/1.1 over TCP for requests reqwest refuses to send (paths with `..` segments,
/// bodies shorter than their `Content-Length`). Writes `head` then `body`, half-closes when
/// `half_close`, and reads whatever comes back until EOF or 10 s. Returns the status if a
/// response arrived.
pub(crate) async fn raw_http(
    addr: SocketAddr,
    head: &str,
    body: &[u8],
    half_close: bool,
) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write head");
    // The server may answer (and close) before the body is consumed; that is fine.
    let _ = s.write_all(body).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())?;
    Some((status, text))
}

/// Like [`raw_http`], for a server that may reject a request from its headers alone
/// (an oversized `Content-Length`): sends `head`, waits up to 5 s for an early answer, and
/// sends `body` only if none came. An early answer is then read before the server can
/// reset the connection for the unsent body.
pub(crate) async fn raw_http_early(addr: SocketAddr, head: &str, body: &[u8]) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write head");
    let mut buf = vec![0u8; 64 * 1024];
    let got = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(n)) => {
            buf.truncate(n);
            // The rest of the early answer (its body may come in a later segment).
            let mut chunk = vec![0u8; 64 * 1024];
            while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut chunk)).await {
                if m == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..m]);
            }
            buf
        }
        Ok(Err(_)) => Vec::new(),
        Err(_) => {
            let _ = s.write_all(body).await;
            let _ = s.shutdown().await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
            rest
        }
    };
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())?;
    Some((status, text))
}

// ---------------------------------------------------------------------------
// Digests and OCI documents
// ---------------------------------------------------------------------------

pub(crate) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub(crate) fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("sha256 digest")
}

pub(crate) fn descriptor(media_type: &str, data: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": sha256_digest(data),
        "size": data.len(),
    })
}

/// An OCI image manifest; `extra`'s fields (artifactType, subject, annotations…) are
/// merged in.
pub(crate) fn image_manifest(config: Value, layers: Vec<Value>, extra: Value) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_V1,
        "config": config,
        "layers": layers,
    });
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&m).expect("manifest JSON")
}

/// An OCI image index; `extra` merged as for manifests.
pub(crate) fn image_index(manifests: Vec<Value>, extra: Value) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_V1,
        "manifests": manifests,
    });
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&m).expect("index JSON")
}

// ---------------------------------------------------------------------------
// Storage inspection
// ---------------------------------------------------------------------------

/// Every regular file under `dir` (relative path → size). Missing dir → empty. Under an
/// S3 storage root, the objects under the prefix `dir` stands for.
pub(crate) fn list_files(dir: &Path) -> BTreeMap<PathBuf, u64> {
    if let Some(prefix) = s3_key_of(dir) {
        return with_s3(move |store| {
            Box::pin(async move {
                use futures::TryStreamExt;
                let prefix = object_store::path::Path::from(prefix);
                let objects: Vec<object_store::ObjectMeta> =
                    store.list(Some(&prefix)).try_collect().await.expect("list the test bucket");
                objects
                    .into_iter()
                    .map(|m| {
                        let rel = m.location.prefix_match(&prefix).expect("listed under prefix");
                        let rel: PathBuf = rel.map(|p| p.as_ref().to_owned()).collect();
                        (rel, m.size)
                    })
                    .collect()
            })
        });
    }
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.insert(p.strip_prefix(dir).expect("under dir").to_path_buf(), len);
            }
        }
    }
    out
}

/// The bytes of one stored file (or, under an S3 storage root, object).
pub(crate) fn read_stored(path: &Path) -> Option<Vec<u8>> {
    match s3_key_of(path) {
        None => std::fs::read(path).ok(),
        Some(key) => with_s3(move |store| {
            Box::pin(async move {
                let key = object_store::path::Path::from(key);
                match store.get(&key).await {
                    Ok(r) => Some(r.bytes().await.expect("read test bucket object").to_vec()),
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => panic!("reading {key} from the test bucket: {e}"),
                }
            })
        }),
    }
}

/// (file count, total bytes) under `dir`.
pub(crate) fn dir_usage(dir: &Path) -> (usize, u64) {
    let files = list_files(dir);
    (files.len(), files.values().sum())
}

/// Every file under `repositories/` with its contents: links, tags, revisions.
/// Used to prove a failed request made nothing newly reachable.
pub(crate) fn reachable_state(storage: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let root = storage.join("repositories");
    list_files(&root)
        .into_keys()
        .map(|p| {
            let bytes = read_stored(&root.join(&p)).unwrap_or_default();
            (p, bytes)
        })
        .collect()
}

/// Asserts that `repositories/` is byte-for-byte what it was.
pub(crate) fn assert_nothing_new_reachable(storage: &Path, before: &BTreeMap<PathBuf, Vec<u8>>, what: &str) {
    let after = reachable_state(storage);
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let changed: Vec<_> =
        after.iter().filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v)).map(|(k, _)| k).collect();
    let removed: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert!(
        added.is_empty() && changed.is_empty() && removed.is_empty(),
        "{what}: repositories/ changed: added {added:?}, changed {changed:?}, removed {removed:?}"
    );
}

// ---------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------

/// splitmix64: a tiny deterministic generator, so test data is reproducible.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with pseudo-random bytes (8 at a time).
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

// ---------------------------------------------------------------------------
// `_thaw` wire formats, from docs/FORMAT.md
// ---------------------------------------------------------------------------

pub(crate) const CODEC_RAW: u8 = 0;
pub(crate) const CODEC_ZSTD: u8 = 1;

/// One entry of a chunk batch, fields as they go on the wire.
#[derive(Clone)]
pub(crate) struct BatchEntry {
    pub(crate) id: [u8; 32],
    pub(crate) codec: u8,
    pub(crate) uncompressed_len: u32,
    pub(crate) payload: Vec<u8>,
}

pub(crate) fn chunk_id(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// Encodes a chunk as FORMAT.md says: zstd when it shrinks, raw otherwise.
pub(crate) fn encode_chunk(data: &[u8]) -> BatchEntry {
    let z = zstd::bulk::compress(data, 3).expect("zstd");
    let (codec, payload) = if z.len() < data.len() { (CODEC_ZSTD, z) } else { (CODEC_RAW, data.to_vec()) };
    BatchEntry {
        id: chunk_id(data),
        codec,
        uncompressed_len: u32::try_from(data.len()).expect("chunk fits u32"),
        payload,
    }
}

/// A chunk batch body: magic `THAWCHK\x01`, then the entries.
pub(crate) fn chunk_batch(entries: &[BatchEntry]) -> Vec<u8> {
    let mut out = b"THAWCHK\x01".to_vec();
    for e in entries {
        out.extend_from_slice(&e.id);
        out.push(e.codec);
        out.extend_from_slice(&e.uncompressed_len.to_le_bytes());
        let plen = u32::try_from(e.payload.len()).expect("payload fits u32");
        out.extend_from_slice(&plen.to_le_bytes());
        out.extend_from_slice(&e.payload);
    }
    out
}

/// One recipe entry: a data chunk (with id) or a zero run.
#[derive(Clone, Copy)]
pub(crate) enum RecipeEntry {
    Data { len: u32, id: [u8; 32] },
    Zero { len: u32 },
}

/// Recipe header fields.
pub(crate) struct RecipeHeader {
    pub(crate) sha256: [u8; 32],
    pub(crate) size: u64,
    pub(crate) kind: u8,
    pub(crate) min: u32,
    pub(crate) avg: u32,
    pub(crate) max: u32,
}

/// Serializes a recipe byte-exactly per FORMAT.md, ending in the BLAKE3 of all that
/// precedes it.
pub(crate) fn recipe_bytes(h: &RecipeHeader, entries: &[RecipeEntry]) -> Vec<u8> {
    let mut out = b"THAWRCP\x01".to_vec();
    out.extend_from_slice(&h.sha256);
    out.extend_from_slice(&h.size.to_le_bytes());
    out.push(h.kind);
    out.extend_from_slice(&h.min.to_le_bytes());
    out.extend_from_slice(&h.avg.to_le_bytes());
    out.extend_from_slice(&h.max.to_le_bytes());
    let count = u32::try_from(entries.len()).expect("entry count fits u32");
    out.extend_from_slice(&count.to_le_bytes());
    for e in entries {
        match e {
            RecipeEntry::Data { len, id } => {
                out.push(0);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(id);
            }
            RecipeEntry::Zero { len } => {
                out.push(1);
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
    }
    let sum = *blake3::hash(&out).as_bytes();
    out.extend_from_slice(&sum);
    out
}

/// A blob cut by the fixed chunker (kind 0) into `size`-byte chunks: its recipe and the
/// batch entries of its distinct non-zero chunks.
pub(crate) struct FixedChunked {
    pub(crate) digest: String,
    pub(crate) recipe: Vec<u8>,
    pub(crate) entries: Vec<BatchEntry>,
}

pub(crate) fn fixed_chunked(blob: &[u8], size: u32) -> FixedChunked {
    let mut entries = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut recipe_entries = Vec::new();
    for piece in blob.chunks(size as usize) {
        let len = u32::try_from(piece.len()).expect("len");
        if piece.iter().all(|b| *b == 0) {
            recipe_entries.push(RecipeEntry::Zero { len });
        } else {
            let e = encode_chunk(piece);
            recipe_entries.push(RecipeEntry::Data { len, id: e.id });
            if seen.insert(e.id) {
                entries.push(e);
            }
        }
    }
    let header = RecipeHeader {
        sha256: Sha256::digest(blob).into(),
        size: blob.len() as u64,
        kind: 0,
        min: size,
        avg: size,
        max: size,
    };
    FixedChunked { digest: sha256_digest(blob), recipe: recipe_bytes(&header, &recipe_entries), entries }
}
