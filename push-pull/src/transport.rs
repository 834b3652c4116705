//! HTTP to one registry host: URLs, authentication (anonymous, basic, bearer token flow),
//! retries with backoff for idempotent requests, error bodies, and byte counting.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use thaw_schema::ErrorResponse;
use tokio::io::AsyncSeekExt as _;

use crate::auth::{parse_challenge, Challenge, Credentials};
use crate::error::{Error, RegistryCode, Result};
use crate::stats::{Counter, Stats};

/// How often and how patiently to retry transient failures (connection errors, 429, 5xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (1 = no retries).
    pub attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub base_delay: Duration,
    /// Longest delay between tries (also caps `Retry-After`).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 5, base_delay: Duration::from_millis(200), max_delay: Duration::from_secs(10) }
    }
}

impl RetryPolicy {
    fn delay(&self, retry: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << retry.min(16));
        // Up to 25% jitter, so clients that failed together do not retry together.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = exp.mul_f64(f64::from(nanos % 1000) / 4000.0);
        (exp + jitter).min(self.max_delay)
    }
}

/// A request body that can be sent again: retries re-create it.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    Empty,
    Bytes(Bytes),
    /// `len` bytes of the file at `path` from `offset`, streamed.
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Self::Empty => 0,
            Self::Bytes(b) => b.len() as u64,
            Self::File { len, .. } => *len,
        }
    }
}

/// What a request may do in a repository, for bearer token scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Registry-wide requests (`/v2/`, discovery).
    Registry,
    /// Read from a repository.
    Pull(String),
    /// Read and write a repository.
    Push(String),
    /// The registry's node directory: read, or publish (`write`).
    Nodes {
        /// Publishing (PUT) rather than reading.
        write: bool,
    },
}

impl Scope {
    fn token_scope(&self) -> Option<String> {
        match self {
            Self::Registry => None,
            Self::Pull(r) => Some(format!("repository:{r}:pull")),
            Self::Push(r) => Some(format!("repository:{r}:pull,push")),
            Self::Nodes { write: false } => Some("registry:nodes:read".into()),
            Self::Nodes { write: true } => Some("registry:nodes:write".into()),
        }
    }
}

/// One request, described so it can be sent again.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) method: Method,
    pub(crate) url: Url,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Body,
    /// Safe to repeat after a transient failure.
    pub(crate) idempotent: bool,
    pub(crate) scope: Scope,
}

impl Request {
    pub(crate) fn new(method: Method, url: Url, scope: Scope) -> Self {
        let idempotent = matches!(method, Method::GET | Method::HEAD | Method::PUT | Method::DELETE);
        Self { method, url, headers: HeaderMap::new(), body: Body::Empty, idempotent, scope }
    }

    pub(crate) fn header(mut self, name: &'static str, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(HeaderName::from_static(name), v);
        }
        self
    }

    pub(crate) fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// Marks a request as safe (or not) to repeat, overriding the method's default.
    pub(crate) fn idempotent(mut self, yes: bool) -> Self {
        self.idempotent = yes;
        self
    }
}

#[derive(Debug, Default)]
struct AuthState {
    /// The registry asked for Basic authentication.
    basic: bool,
    /// Bearer tokens by scope.
    tokens: HashMap<String, String>,
}

/// HTTP to one registry host.
#[derive(Debug)]
pub(crate) struct Transport {
    http: reqwest::Client,
    host: String,
    base: Url,
    credentials: Option<Credentials>,
    retry: RetryPolicy,
    stats: Arc<Stats>,
    auth: Mutex<AuthState>,
}

fn is_transient_status(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS
        || s == StatusCode::REQUEST_TIMEOUT
        || matches!(s.as_u16(), 500 | 502 | 503 | 504)
}

fn is_transient_error(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let secs: u64 = resp.headers().get("retry-after")?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

impl Transport {
    pub(crate) fn new(
        http: reqwest::Client,
        host: &str,
        plain_http: bool,
        credentials: Option<Credentials>,
        retry: RetryPolicy,
        stats: Arc<Stats>,
    ) -> Result<Self> {
        let scheme = if plain_http { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{host}/")).map_err(|e| Error::InvalidReference {
            input: host.to_owned(),
            why: format!("not a usable registry address: {e}"),
        })?;
        Ok(Self {
            http,
            host: host.to_owned(),
            base,
            credentials,
            retry,
            stats,
            auth: Mutex::new(AuthState::default()),
        })
    }

    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    pub(crate) fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// `scheme://host/<path>`; `path` starts with `/`.
    pub(crate) fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("registry paths are valid URL paths")
    }

    /// Resolves a `Location` header against the registry's address.
    pub(crate) fn resolve(&self, location: &str) -> Result<Url> {
        self.base
            .join(location)
            .map_err(|e| Error::protocol("following Location", format!("{location:?}: {e}")))
    }

    fn authorize(&self, mut rb: reqwest::RequestBuilder, scope: &Scope) -> reqwest::RequestBuilder {
        let state = self.auth.lock().expect("auth state lock");
        let key = scope.token_scope().unwrap_or_default();
        if let Some(token) = state.tokens.get(&key) {
            rb = rb.header("authorization", format!("Bearer {token}"));
        } else if state.basic {
            if let Some(c) = &self.credentials {
                rb = rb.header("authorization", c.basic_header());
            }
        }
        rb
    }

    async fn body_for(&self, body: &Body) -> std::io::Result<reqwest::Body> {
        Ok(match body {
            Body::Empty => reqwest::Body::from(Bytes::new()),
            Body::Bytes(b) => {
                self.stats.add(Counter::BytesSent, b.len() as u64);
                reqwest::Body::from(b.clone())
            }
            Body::File { path, offset, len } => {
                let mut file = tokio::fs::File::open(path).await?;
                file.seek(std::io::SeekFrom::Start(*offset)).await?;
                let stats = self.stats.clone();
                let reader = tokio::io::AsyncReadExt::take(file, *len);
                let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024)
                    .inspect_ok(move |b| stats.add(Counter::BytesSent, b.len() as u64));
                reqwest::Body::wrap_stream(stream)
            }
        })
    }

    /// Sends `req`, handling authentication challenges and retrying transient failures when
    /// the request is idempotent. Returns any answer but 401; see [`Transport::expect`].
    pub(crate) async fn send(&self, op: &str, req: &Request) -> Result<reqwest::Response> {
        let mut retries = 0u32;
        let mut challenged = false;
        loop {
            let mut rb = self.http.request(req.method.clone(), req.url.clone()).headers(req.headers.clone());
            rb = self.authorize(rb, &req.scope);
            if !matches!(req.body, Body::Empty)
                || matches!(req.method, Method::PUT | Method::POST | Method::PATCH)
            {
                let body = self.body_for(&req.body).await.map_err(|e| match &req.body {
                    Body::File { path, .. } => Error::io("reading", path, e),
                    _ => Error::protocol(op, e.to_string()),
                })?;
                rb = rb.header("content-length", req.body.len()).body(body);
            }
            let can_retry = req.idempotent && retries + 1 < self.retry.attempts;
            match rb.send().await {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    if challenged {
                        let why = if self.credentials.is_some() {
                            "the registry rejected the credentials"
                        } else {
                            "the registry requires a login and no credentials are configured for it"
                        };
                        return Err(Error::Auth {
                            op: op.to_owned(),
                            host: self.host.clone(),
                            why: why.to_owned(),
                        });
                    }
                    challenged = true;
                    self.answer_challenge(op, &resp, &req.scope).await?;
                }
                Ok(resp) if is_transient_status(resp.status()) && can_retry => {
                    let wait = retry_after(&resp)
                        .unwrap_or_else(|| self.retry.delay(retries))
                        .min(self.retry.max_delay);
                    tracing::debug!(op, status = %resp.status(), ?wait, "transient answer; retrying");
                    retries += 1;
                    tokio::time::sleep(wait).await;
                }
                Ok(resp) => return Ok(resp),
                Err(e) if is_transient_error(&e) && can_retry => {
                    let wait = self.retry.delay(retries);
                    tracing::debug!(op, error = %e, ?wait, "transient failure; retrying");
                    retries += 1;
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(Error::Transport { op: op.to_owned(), source: e }),
            }
        }
    }

    async fn answer_challenge(&self, op: &str, resp: &reqwest::Response, scope: &Scope) -> Result<()> {
        let auth_err = |why: String| Error::Auth { op: op.to_owned(), host: self.host.clone(), why };
        let header = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| auth_err("401 without a WWW-Authenticate challenge".into()))?;
        match parse_challenge(header) {
            Some(Challenge::Basic) => {
                if self.credentials.is_none() {
                    return Err(auth_err(
                        "the registry requires a login and no credentials are configured for it".into(),
                    ));
                }
                self.auth.lock().expect("auth state lock").basic = true;
                Ok(())
            }
            Some(Challenge::Bearer { realm, service, scope: challenge_scope }) => {
                let token = self
                    .fetch_token(op, &realm, service.as_deref(), challenge_scope.or(scope.token_scope()))
                    .await?;
                let key = scope.token_scope().unwrap_or_default();
                self.auth.lock().expect("auth state lock").tokens.insert(key, token);
                Ok(())
            }
            None => Err(auth_err(format!("unsupported authentication challenge {header:?}"))),
        }
    }

    async fn fetch_token(
        &self,
        op: &str,
        realm: &str,
        service: Option<&str>,
        scope: Option<String>,
    ) -> Result<String> {
        let auth_err = |why: String| Error::Auth { op: op.to_owned(), host: self.host.clone(), why };
        let mut url =
            Url::parse(realm).map_err(|e| auth_err(format!("token realm {realm:?} is not a URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            if let Some(s) = &scope {
                q.append_pair("scope", s);
            }
        }
        // A busy token service (503 while the registry's credential checks are queued, 429)
        // is retried like any other request: the credentials were not judged.
        let mut retries = 0;
        let resp = loop {
            let mut rb = self.http.get(url.clone());
            if let Some(c) = &self.credentials {
                rb = rb.header("authorization", c.basic_header());
            }
            let resp = rb.send().await.map_err(|e| Error::Transport {
                op: format!("{op} (token request to {realm})"),
                source: e,
            })?;
            if is_transient_status(resp.status()) && retries + 1 < self.retry.attempts {
                let wait =
                    retry_after(&resp).unwrap_or_else(|| self.retry.delay(retries)).min(self.retry.max_delay);
                retries += 1;
                tokio::time::sleep(wait).await;
                continue;
            }
            break resp;
        };
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| Error::Transport { op: format!("{op} (token request)"), source: e })?;
        if !status.is_success() {
            let why = if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                format!("the token service {realm} refused the credentials ({status})")
            } else {
                format!("the token service {realm} answered {status}")
            };
            return Err(auth_err(why));
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| auth_err(format!("token service answer is not JSON: {e}")))?;
        answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| auth_err("token service answered without a token".into()))
    }

    /// Passes `resp` through when its status is one of `ok`, else turns it into
    /// [`Error::Registry`] with the code and message of the spec error body.
    pub(crate) async fn expect(
        &self,
        op: &str,
        resp: reqwest::Response,
        ok: &[u16],
    ) -> Result<reqwest::Response> {
        let status = resp.status();
        if ok.contains(&status.as_u16()) {
            return Ok(resp);
        }
        let body = self.read_limited(op, resp, 64 * 1024).await.unwrap_or_default();
        let (code, message) = match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(e) if !e.errors.is_empty() => {
                let first = &e.errors[0];
                let mut message = first.message.clone();
                if let Some(detail) = &first.detail {
                    message.push_str(&format!(" ({detail})"));
                }
                (Some(RegistryCode::parse(&first.code)), message)
            }
            _ => {
                let text = String::from_utf8_lossy(&body);
                let text = text.trim();
                let reason = status.canonical_reason().unwrap_or("error").to_owned();
                (None, if text.is_empty() { reason } else { format!("{reason}: {}", truncate(text, 300)) })
            }
        };
        Err(Error::Registry { op: op.to_owned(), status: status.as_u16(), code, message })
    }

    /// Reads a whole response body of at most `limit` bytes.
    pub(crate) async fn read_limited(
        &self,
        op: &str,
        mut resp: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes> {
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(Error::protocol(
                op,
                format!(
                    "answer of {} bytes is over the {limit}-byte limit",
                    resp.content_length().unwrap_or(0)
                ),
            ));
        }
        let mut buf = bytes::BytesMut::new();
        while let Some(piece) = self.next_piece(op, &mut resp).await? {
            if buf.len() + piece.len() > limit {
                return Err(Error::protocol(op, format!("answer is over the {limit}-byte limit")));
            }
            buf.extend_from_slice(&piece);
        }
        Ok(buf.freeze())
    }

    /// The next piece of a response body, counted.
    pub(crate) async fn next_piece(&self, op: &str, resp: &mut reqwest::Response) -> Result<Option<Bytes>> {
        match resp.chunk().await {
            Ok(Some(b)) => {
                self.stats.add(Counter::BytesReceived, b.len() as u64);
                Ok(Some(b))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(Error::Transport { op: format!("{op} (reading the answer)"), source: e }),
        }
    }

    /// Sends an idempotent request whose whole answer is wanted, retrying when the answer
    /// body breaks off (not only when the request fails).
    pub(crate) async fn fetch_all(
        &self,
        op: &str,
        req: &Request,
        ok: &[u16],
        limit: usize,
    ) -> Result<(HeaderMap, Bytes)> {
        let mut retries = 0u32;
        loop {
            let resp = self.send(op, req).await?;
            let resp = self.expect(op, resp, ok).await?;
            let headers = resp.headers().clone();
            let declared = resp.content_length();
            match self.read_limited(op, resp, limit).await {
                Ok(body) if declared.is_none_or(|n| n == body.len() as u64) => return Ok((headers, body)),
                Ok(body) => {
                    return Err(Error::integrity(
                        op,
                        format!(
                            "answer has {} bytes, Content-Length said {}",
                            body.len(),
                            declared.unwrap_or(0)
                        ),
                    ))
                }
                Err(Error::Transport { source, .. })
                    if req.idempotent && retries + 1 < self.retry.attempts =>
                {
                    tracing::debug!(op, error = %source, "answer broke off; retrying");
                    tokio::time::sleep(self.retry.delay(retries)).await;
                    retries += 1;
                }
                Err(Error::Transport { source, .. }) => {
                    return Err(Error::integrity(
                        op,
                        format!("the answer was cut short, {} times ({source})", retries + 1),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The retry policy, for callers that retry whole operations.
    pub(crate) fn retry(&self) -> RetryPolicy {
        self.retry
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
