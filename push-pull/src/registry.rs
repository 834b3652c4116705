//! [`Registry`]: the OCI Distribution calls thaw needs, against any registry (manifests, blobs,
//! uploads, tags, referrers). The `_thaw` extension calls are in `thaw_api`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use thaw_schema::digest::Sha256Hasher;
use thaw_schema::dto::{DiscoverResponse, THAW_EXTENSION};
use thaw_schema::manifest::MAX_MANIFEST_LEN;
use thaw_schema::{media, Sha256Digest};
use tokio::sync::OnceCell;

use crate::auth::{credentials_from_config, docker_config_path, Credentials};
use crate::error::{Error, Result};
use crate::reference::Reference;
use crate::stats::Stats;
use crate::transport::{Body, Request, RetryPolicy, Scope, Transport};
use crate::tuning::UPLOAD_PIECE_BYTES;

/// How to talk to registries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Speak plain HTTP instead of HTTPS (for a registry on localhost or a trusted network).
    pub plain_http: bool,
    /// Use these credentials instead of looking them up in the Docker config file.
    pub credentials: Option<Credentials>,
    /// The Docker config file to read credentials from (default: see [`docker_config_path`]).
    pub docker_config: Option<PathBuf>,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Use the `_thaw` extension where the registry offers it (off: plain OCI only).
    pub use_thaw: bool,
    /// Limit for connecting.
    pub connect_timeout: Duration,
    /// Limit for any one read from a connection to stall.
    pub read_timeout: Duration,
    /// PEM files of CAs to trust besides the built-in roots (a private registry's CA).
    pub ca_certs: Vec<PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            plain_http: false,
            credentials: None,
            docker_config: None,
            retry: RetryPolicy::default(),
            use_thaw: true,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(120),
            ca_certs: Vec::new(),
        }
    }
}

/// A manifest as fetched, verified against its digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// The exact bytes (their SHA-256 is `digest`).
    pub body: Bytes,
    /// Media type, from `Content-Type` or the body's `mediaType`.
    pub media_type: String,
    /// The manifest digest.
    pub digest: Sha256Digest,
}

/// One manifest of a referrers answer (`GET /v2/<name>/referrers/<digest>`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Referrer {
    /// The referring manifest's media type.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Its digest.
    pub digest: Sha256Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its `artifactType`, when it has one.
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
}

/// A client for one registry host. Cheap to share behind `Arc`; all calls take `&self`.
#[derive(Debug)]
pub struct Registry {
    pub(crate) transport: Transport,
    thaw: OnceCell<bool>,
    use_thaw: bool,
}

/// Accept header for manifest requests.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

impl Registry {
    /// A client for `host` (`name[:port]`), counting bytes into `stats`. Credentials come from
    /// `options.credentials`, else from `THAW_REGISTRY_USER` and `THAW_REGISTRY_PASSWORD`
    /// (or `THAW_REGISTRY_PASSWORD_FILE`), else from the Docker config file.
    pub fn new(host: &str, options: &ClientOptions, stats: Arc<Stats>) -> Result<Self> {
        if !crate::reference::is_valid_host(host) {
            return Err(Error::InvalidReference {
                input: host.to_owned(),
                why: "not a registry host[:port]".into(),
            });
        }
        let credentials = match &options.credentials {
            Some(c) => Some(c.clone()),
            None => match crate::auth::credentials_from_env()? {
                Some(c) => Some(c),
                None => match options.docker_config.clone().or_else(docker_config_path) {
                    Some(path) => credentials_from_config(&path, host)?,
                    None => None,
                },
            },
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("thaw/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout);
        let http = thaw_tls::configure_client(http, &options.ca_certs, None)
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .build()
            .map_err(|e| Error::Transport { op: "setting up the HTTP client".into(), source: e })?;
        let transport = Transport::new(http, host, options.plain_http, credentials, options.retry, stats)?;
        Ok(Self { transport, thaw: OnceCell::new(), use_thaw: options.use_thaw })
    }

    /// A client for the registry of `reference`.
    pub fn for_reference(reference: &Reference, options: &ClientOptions, stats: Arc<Stats>) -> Result<Self> {
        Self::new(reference.registry(), options, stats)
    }

    /// The registry's `host[:port]`.
    pub fn host(&self) -> &str {
        self.transport.host()
    }

    /// The byte counters this client adds to.
    pub fn stats(&self) -> &Arc<Stats> {
        self.transport.stats()
    }

    fn path_url(&self, path: &str) -> reqwest::Url {
        self.transport.url(path)
    }

    /// Checks that the registry answers `GET /v2/`, authenticating if it asks to.
    pub async fn ping(&self) -> Result<()> {
        let op = format!("checking {} (GET /v2/)", self.host());
        let req = Request::new(Method::GET, self.path_url("/v2/"), Scope::Registry);
        let resp = self.transport.send(&op, &req).await?;
        self.transport.expect(&op, resp, &[200]).await?;
        Ok(())
    }

    /// True when the registry offers the `_thaw` extension (and the client may use it).
    /// Asked once per client.
    pub async fn has_thaw(&self) -> Result<bool> {
        if !self.use_thaw {
            return Ok(false);
        }
        self.thaw
            .get_or_try_init(|| async {
                let op = format!("discovering extensions of {}", self.host());
                let req = Request::new(Method::GET, self.path_url("/v2/_oci/ext/discover"), Scope::Registry);
                let resp = self.transport.send(&op, &req).await?;
                if resp.status() != StatusCode::OK {
                    return Ok(false);
                }
                let body = self.transport.read_limited(&op, resp, 1024 * 1024).await?;
                let found = serde_json::from_slice::<DiscoverResponse>(&body)
                    .map(|d| d.extensions.iter().any(|e| e.name == THAW_EXTENSION))
                    .unwrap_or(false);
                tracing::debug!(host = self.host(), thaw = found, "extension discovery");
                Ok(found)
            })
            .await
            .copied()
    }

    /// Fetches a manifest by tag or digest and verifies it: against the digest asked for, or
    /// against the `Docker-Content-Digest` the registry sends.
    pub async fn get_manifest(&self, repository: &str, reference: &str) -> Result<FetchedManifest> {
        let op = format!("GET manifest {}", display_ref(self.host(), repository, reference));
        let req = Request::new(
            Method::GET,
            self.path_url(&format!("/v2/{repository}/manifests/{reference}")),
            Scope::Pull(repository.to_owned()),
        )
        .header("accept", MANIFEST_ACCEPT);
        let (headers, body) = self.transport.fetch_all(&op, &req, &[200], MAX_MANIFEST_LEN).await?;
        let digest = Sha256Digest::of(&body);
        let what = format!("manifest {}", display_ref(self.host(), repository, reference));
        if let Ok(asked) = reference.parse::<Sha256Digest>() {
            if asked != digest {
                return Err(Error::integrity(
                    what,
                    format!("asked for {asked}, the body hashes to {digest}"),
                ));
            }
        }
        if let Some(claimed) = headers.get("docker-content-digest").and_then(|v| v.to_str().ok()) {
            match claimed.parse::<Sha256Digest>() {
                Ok(c) if c == digest => {}
                Ok(c) => {
                    return Err(Error::integrity(
                        what,
                        format!("the registry says {c}, the body hashes to {digest}"),
                    ))
                }
                Err(e) => {
                    tracing::debug!(claimed, error = %e, "ignoring a Docker-Content-Digest thaw cannot check")
                }
            }
        }
        let header_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        #[derive(Deserialize)]
        struct Typed {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
        }
        let body_type = serde_json::from_slice::<Typed>(&body).ok().and_then(|t| t.media_type);
        let media_type = body_type
            .or(header_type.filter(|t| t != "application/json" && t != "application/octet-stream"))
            .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
        Ok(FetchedManifest { body, media_type, digest })
    }

    /// Pushes a manifest under `reference` (a tag or its digest); returns its digest after
    /// checking the registry agrees on it.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        body: Bytes,
        media_type: &str,
    ) -> Result<Sha256Digest> {
        let digest = Sha256Digest::of(&body);
        let op = format!("PUT manifest {}", display_ref(self.host(), repository, reference));
        let req = Request::new(
            Method::PUT,
            self.path_url(&format!("/v2/{repository}/manifests/{reference}")),
            Scope::Push(repository.to_owned()),
        )
        .header("content-type", media_type)
        .body(Body::Bytes(body));
        let resp = self.transport.send(&op, &req).await?;
        let resp = self.transport.expect(&op, resp, &[200, 201]).await?;
        check_digest_header(&op, &resp, &digest)?;
        Ok(digest)
    }

    /// The size of a blob if the repository has it (`HEAD`).
    pub async fn blob_exists(&self, repository: &str, digest: &Sha256Digest) -> Result<Option<u64>> {
        let op = format!("HEAD blob {}/{repository}@{digest}", self.host());
        let req =
            Request::new(Method::HEAD, self.blob_url(repository, digest), Scope::Pull(repository.to_owned()));
        let resp = self.transport.send(&op, &req).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.transport.expect(&op, resp, &[200]).await?;
        Ok(Some(resp.content_length().unwrap_or(0)))
    }

    fn blob_url(&self, repository: &str, digest: &Sha256Digest) -> reqwest::Url {
        self.path_url(&format!("/v2/{repository}/blobs/{digest}"))
    }

    /// Starts a blob download at byte `from` (with a Range request when `from > 0`). The
    /// answer is 200 (whole blob) or 206 (the range asked for).
    pub(crate) async fn blob_response(
        &self,
        repository: &str,
        digest: &Sha256Digest,
        from: u64,
    ) -> Result<reqwest::Response> {
        let op = format!("GET blob {}/{repository}@{digest}", self.host());
        let mut req =
            Request::new(Method::GET, self.blob_url(repository, digest), Scope::Pull(repository.to_owned()));
        if from > 0 {
            req = req.header("range", &format!("bytes={from}-"));
        }
        let resp = self.transport.send(&op, &req).await?;
        self.transport.expect(&op, resp, &[200, 206]).await
    }

    /// Downloads a small blob whole (at most `limit` bytes) and verifies its digest.
    pub async fn get_blob_bytes(
        &self,
        repository: &str,
        digest: &Sha256Digest,
        limit: usize,
    ) -> Result<Bytes> {
        let op = format!("GET blob {}/{repository}@{digest}", self.host());
        let req =
            Request::new(Method::GET, self.blob_url(repository, digest), Scope::Pull(repository.to_owned()));
        let (_, body) = self.transport.fetch_all(&op, &req, &[200], limit).await?;
        let actual = Sha256Digest::of(&body);
        if actual != *digest {
            return Err(Error::integrity(
                format!("blob {}/{repository}@{digest}", self.host()),
                format!("the body hashes to {actual}"),
            ));
        }
        Ok(body)
    }

    /// Uploads bytes as a blob with the standard protocol (POST, then PUT with the digest).
    pub async fn upload_blob_bytes(
        &self,
        repository: &str,
        digest: &Sha256Digest,
        data: Bytes,
    ) -> Result<()> {
        debug_assert_eq!(Sha256Digest::of(&data), *digest);
        let len = data.len() as u64;
        self.upload_blob(repository, digest, len, |_, _| Body::Bytes(data.clone())).await
    }

    /// Uploads a file as a blob with the standard protocol, streamed from disk: one PUT up to
    /// 32 MiB, PATCH pieces beyond. A failed upload is started again from the beginning.
    pub async fn upload_blob_file(
        &self,
        repository: &str,
        digest: &Sha256Digest,
        path: PathBuf,
        len: u64,
    ) -> Result<()> {
        self.upload_blob(repository, digest, len, |offset, n| Body::File {
            path: path.clone(),
            offset,
            len: n,
        })
        .await
    }

    async fn upload_blob(
        &self,
        repository: &str,
        digest: &Sha256Digest,
        len: u64,
        piece: impl Fn(u64, u64) -> Body,
    ) -> Result<()> {
        let policy = self.transport.retry();
        let mut retries = 0;
        loop {
            match self.try_upload(repository, digest, len, &piece).await {
                Ok(()) => return Ok(()),
                Err(e) if is_retryable(&e) && retries + 1 < policy.attempts => {
                    tracing::debug!(error = %e, "blob upload failed; starting it again");
                    retries += 1;
                    tokio::time::sleep(policy.base_delay * (1 << retries.min(10))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_upload(
        &self,
        repository: &str,
        digest: &Sha256Digest,
        len: u64,
        piece: &impl Fn(u64, u64) -> Body,
    ) -> Result<()> {
        let op = format!("uploading blob {digest} to {}/{repository}", self.host());
        let scope = Scope::Push(repository.to_owned());
        let start = Request::new(
            Method::POST,
            self.path_url(&format!("/v2/{repository}/blobs/uploads/")),
            scope.clone(),
        );
        let resp = self.transport.send(&op, &start).await?;
        let resp = self.transport.expect(&op, resp, &[202]).await?;
        let mut location = self.location(&op, &resp)?;
        let mut offset = 0u64;
        if len > UPLOAD_PIECE_BYTES {
            while offset < len {
                let n = UPLOAD_PIECE_BYTES.min(len - offset);
                let req = Request::new(Method::PATCH, location.clone(), scope.clone())
                    .header("content-type", "application/octet-stream")
                    .header("content-range", &format!("{offset}-{}", offset + n - 1))
                    .body(piece(offset, n))
                    .idempotent(false);
                let resp = self.transport.send(&op, &req).await?;
                let resp = self.transport.expect(&op, resp, &[202]).await?;
                location = self.location(&op, &resp)?;
                offset += n;
            }
        }
        location.query_pairs_mut().append_pair("digest", &digest.to_string());
        let body = if offset < len { piece(offset, len - offset) } else { Body::Empty };
        let req = Request::new(Method::PUT, location, scope)
            .header("content-type", "application/octet-stream")
            .body(body)
            .idempotent(false);
        let resp = self.transport.send(&op, &req).await?;
        let resp = self.transport.expect(&op, resp, &[201]).await?;
        check_digest_header(&op, &resp, digest)
    }

    fn location(&self, op: &str, resp: &reqwest::Response) -> Result<reqwest::Url> {
        let loc = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::protocol(op, "upload answer without a Location header"))?;
        self.transport.resolve(loc)
    }

    /// The manifests that name `subject` as their subject (the referrers API), those of
    /// `artifact_type` when given (filtered here too: a registry may ignore the filter). A
    /// registry without the referrers API (404) has none. At most 1 MiB of answer is read.
    pub async fn referrers(
        &self,
        repository: &str,
        subject: &Sha256Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        #[derive(Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<Referrer>,
        }
        let op = format!("listing referrers of {}/{repository}@{subject}", self.host());
        let mut url = self.path_url(&format!("/v2/{repository}/referrers/{subject}"));
        if let Some(t) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", t);
        }
        let req = Request::new(Method::GET, url, Scope::Pull(repository.to_owned()));
        let body = match self.transport.fetch_all(&op, &req, &[200], 1024 * 1024).await {
            Ok((_, body)) => body,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let index: Index = serde_json::from_slice(&body)
            .map_err(|e| Error::protocol(&op, format!("the referrers answer is not an index: {e}")))?;
        Ok(index
            .manifests
            .into_iter()
            .filter(|r| artifact_type.is_none() || r.artifact_type.as_deref() == artifact_type)
            .collect())
    }

    /// All tags of a repository, following `Link` pagination.
    pub async fn tags(&self, repository: &str) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let op = format!("listing tags of {}/{repository}", self.host());
        let mut url = self.path_url(&format!("/v2/{repository}/tags/list"));
        url.query_pairs_mut().append_pair("n", "1000");
        let mut all = Vec::new();
        for _ in 0..10_000 {
            let req = Request::new(Method::GET, url.clone(), Scope::Pull(repository.to_owned()));
            let (headers, body) = self.transport.fetch_all(&op, &req, &[200], 16 * 1024 * 1024).await?;
            let page: TagList = serde_json::from_slice(&body)
                .map_err(|e| Error::protocol(&op, format!("tag list is not JSON: {e}")))?;
            all.extend(page.tags.unwrap_or_default());
            match headers.get("link").and_then(|v| v.to_str().ok()).and_then(next_link) {
                Some(next) => url = self.transport.resolve(&next)?,
                None => return Ok(all),
            }
        }
        Err(Error::protocol(op, "tag list pagination does not end"))
    }
}

/// `host/repository:tag` or `host/repository@sha256:…`.
fn display_ref(host: &str, repository: &str, reference: &str) -> String {
    let sep = if reference.contains(':') { '@' } else { ':' };
    format!("{host}/{repository}{sep}{reference}")
}

/// The target of a `Link: <…>; rel="next"` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .contains("rel=\"next\"")
            .then(|| target.trim().trim_start_matches('<').trim_end_matches('>').to_owned())
    })
}

fn check_digest_header(op: &str, resp: &reqwest::Response, expected: &Sha256Digest) -> Result<()> {
    let Some(claimed) = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    match claimed.parse::<Sha256Digest>() {
        Ok(c) if c == *expected => Ok(()),
        Ok(c) => Err(Error::integrity(op, format!("the registry stored {c}, thaw sent {expected}"))),
        Err(_) => Ok(()),
    }
}

/// Errors worth starting a whole operation again for.
pub(crate) fn is_retryable(e: &Error) -> bool {
    match e {
        Error::Transport { source, .. } => {
            source.is_connect() || source.is_timeout() || source.is_request() || source.is_body()
        }
        Error::Registry { status, .. } => matches!(status, 408 | 429 | 500 | 502 | 503 | 504),
        _ => false,
    }
}

/// Streams `reader` through SHA-256 (for blobs hashed before upload).
pub(crate) fn sha256_of_file(path: &std::path::Path) -> Result<(Sha256Digest, u64)> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            return Ok((hasher.finish(), total));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers() {
        assert_eq!(
            next_link(r#"</v2/a/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(next_link(r#"<x>; rel="prev""#), None);
    }
}
