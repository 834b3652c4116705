//! Request limits applied before any other work, authentication included (the layer is the
//! outermost one, see `router_with_auth`): a per-client token bucket (429 `TOOMANYREQUESTS`
//! with `Retry-After`), a cap on requests in flight per client address and one for the
//! process (requests past either queue for a bounded time, then get 503 `UNAVAILABLE` with
//! `Retry-After`), and a bound on how long a request body may stall. Connection timeouts
//! (request head, keep-alive idle, unread responses) live in `conn`; body size limits with
//! the handlers that read bodies (docs/API.md, "Limits").
//!
//! Whole-blob verifications (a `_thaw` commit hashing every byte its recipe declares, work
//! a small request can ask for) take slots of the same shape, per client and in total,
//! inside the handler (`handlers::thaw`), with the recipe checks they guard.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hyper::body::{Frame, SizeHint};
use thaw_schema::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::handlers::AppState;

/// Default cap on requests being handled at once (see docs/DECISIONS.md D15).
pub const DEFAULT_MAX_INFLIGHT: usize = 128;
/// Default cap on requests one client address has in flight: a quarter of the process cap,
/// so one client (or a few) cannot hold every slot.
pub const DEFAULT_MAX_INFLIGHT_PER_CLIENT: usize = 32;
/// Default time a request past a cap waits for a slot before its 503.
pub const DEFAULT_INFLIGHT_WAIT: Duration = Duration::from_secs(5);
/// Default time a connection has to deliver a complete request head, counted from its
/// accept or from the end of its previous response (so also the keep-alive idle timeout).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// Default time a request body may go without delivering a byte while the handler waits.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a response may wait for the client to read (a write that cannot proceed).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on whole-blob verifications one client address runs at once: thaw's client
/// commits its blobs one after another, so one; a second waits for the first.
pub const DEFAULT_MAX_VERIFICATIONS_PER_CLIENT: usize = 1;
/// Default time a commit waits for a verification slot before its 503: long, since the
/// client has already sent everything and a verification ahead of it may take seconds.
pub const DEFAULT_VERIFY_WAIT: Duration = Duration::from_secs(60);
/// Default bound on how often a recipe may use its data chunks: the bytes its data entries
/// declare may be at most this multiple of the bytes of its distinct chunks. Real snapshot
/// files stay near 2 (docs/CHUNKING.md: 2.12× for five whole guest snapshots together at
/// 4 KiB, 1.70× at 64 KiB, zero pages excluded, as here); 256 leaves room for guests that
/// fill free memory with one pattern, and caps one 4 MiB chunk at 1 GiB of hashing.
pub const DEFAULT_MAX_CHUNK_REPEAT: u32 = 256;

/// Default cap on whole-blob verifications at once in the process: the number of CPUs, and
/// at least 2, so one client at its cap of 1 never holds them all.
pub fn default_max_verifications() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).max(2)
}

/// A token bucket per client IP address: `per_second` requests on average, bursts of up to
/// `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: requests a quiet client may make at once.
    pub burst: f64,
}

/// Limits of one registry process.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Requests handled at once (a streamed response counts until its body ends).
    pub max_inflight: usize,
    /// Requests one client address has in flight; checked before `max_inflight` and before
    /// any authentication work.
    pub max_inflight_per_client: usize,
    /// How long a request past either cap waits before 503 `UNAVAILABLE`.
    pub inflight_wait: Duration,
    /// Per-client rate limit; `None` (the default) for none.
    pub rate: Option<RateLimit>,
    /// Time to deliver a request head, from accept or the previous response's end.
    pub header_timeout: Duration,
    /// Longest stall of a request body the handler is waiting on.
    pub body_timeout: Duration,
    /// Longest time a response write may wait for the client to read.
    pub send_timeout: Duration,
    /// Whole-blob verifications (hashing a `_thaw` commit's recipe) running at once.
    pub max_verifications: usize,
    /// Whole-blob verifications one client address runs at once; checked first.
    pub max_verifications_per_client: usize,
    /// How long a commit waits for a verification slot before 503 `UNAVAILABLE`.
    pub verify_wait: Duration,
    /// A recipe to verify may declare at most this multiple of its distinct chunks' bytes
    /// in data entries (400 `BLOB_UPLOAD_INVALID` past it, before anything is hashed).
    pub max_chunk_repeat: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_inflight_per_client: DEFAULT_MAX_INFLIGHT_PER_CLIENT,
            inflight_wait: DEFAULT_INFLIGHT_WAIT,
            rate: None,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            max_verifications: default_max_verifications(),
            max_verifications_per_client: DEFAULT_MAX_VERIFICATIONS_PER_CLIENT,
            verify_wait: DEFAULT_VERIFY_WAIT,
            max_chunk_repeat: DEFAULT_MAX_CHUNK_REPEAT,
        }
    }
}

/// Buckets kept before idle (full) ones are dropped.
const MAX_BUCKETS: usize = 10_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Slots of one kind handed out per client address and in total: requests in flight, and
/// whole-blob verifications. A client takes its own slot first, so a client at its cap
/// queues alone, and the shared queue holds at most one waiter per client.
#[derive(Debug)]
struct Slots {
    total: Arc<Semaphore>,
    per_client_cap: usize,
    /// One semaphore per client address with slots held or waited for; an entry goes when
    /// its last holder does, so the map is bounded by requests, not by addresses seen.
    per_client: Arc<Mutex<HashMap<IpAddr, Arc<Semaphore>>>>,
}

/// Which cap a refused wait met.
enum Full {
    Client(IpAddr),
    Total,
}

/// Slots taken from [`Slots`]: the client's and the total's, released when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    _total: OwnedSemaphorePermit,
    _client: Option<ClientSlot>,
}

/// The slots one request holds (see [`Limiter::admit`]).
pub(crate) type Admission = Held;

#[derive(Debug)]
struct ClientSlot {
    ip: IpAddr,
    permit: Option<OwnedSemaphorePermit>,
    map: Arc<Mutex<HashMap<IpAddr, Arc<Semaphore>>>>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        let semaphore = permit.semaphore().clone();
        drop(permit);
        let mut map = self.map.lock().expect("per-client map lock");
        // Ours and the map's are the only references: nobody holds or waits for a slot.
        if Arc::strong_count(&semaphore) == 2 && map.get(&self.ip).is_some_and(|s| Arc::ptr_eq(s, &semaphore))
        {
            map.remove(&self.ip);
        }
    }
}

impl Slots {
    fn new(total: usize, per_client: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total.max(1))),
            per_client_cap: per_client.max(1),
            per_client: Arc::default(),
        }
    }

    /// The client's slot, then one of the total, each waited for until `deadline`.
    async fn take(&self, client: Option<IpAddr>, deadline: tokio::time::Instant) -> Result<Held, Full> {
        let client = match client {
            None => None,
            Some(ip) => {
                let semaphore = {
                    let mut map = self.per_client.lock().expect("per-client map lock");
                    map.entry(ip).or_insert_with(|| Arc::new(Semaphore::new(self.per_client_cap))).clone()
                };
                // Registered before waiting, so a queued request keeps the entry alive.
                let mut slot = ClientSlot { ip, permit: None, map: self.per_client.clone() };
                match tokio::time::timeout_at(deadline, semaphore.acquire_owned()).await {
                    Ok(Ok(permit)) => slot.permit = Some(permit),
                    _ => {
                        drop(slot);
                        self.forget_if_unused(ip);
                        return Err(Full::Client(ip));
                    }
                }
                Some(slot)
            }
        };
        match tokio::time::timeout_at(deadline, self.total.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Held { _total: permit, _client: client }),
            _ => Err(Full::Total),
        }
    }

    /// Drops `ip`'s semaphore when nobody holds or waits for it (after a refused wait).
    fn forget_if_unused(&self, ip: IpAddr) {
        let mut map = self.per_client.lock().expect("per-client map lock");
        if map.get(&ip).is_some_and(|s| Arc::strong_count(s) == 1) {
            map.remove(&ip);
        }
    }

    #[cfg(test)]
    fn clients_tracked(&self) -> usize {
        self.per_client.lock().unwrap().len()
    }
}

/// A 503 `UNAVAILABLE` saying when to come back.
fn busy(what: String, retry_after: Duration) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, what)
        .with_status(StatusCode::SERVICE_UNAVAILABLE)
        .with_header("retry-after", retry_after.as_secs().max(1).to_string())
}

/// The live state of [`Limits`].
#[derive(Debug)]
pub(crate) struct Limiter {
    limits: Limits,
    inflight: Slots,
    verifications: Slots,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Limiter {
    pub(crate) fn new(limits: Limits) -> Self {
        let inflight = Slots::new(limits.max_inflight, limits.max_inflight_per_client);
        let verifications = Slots::new(limits.max_verifications, limits.max_verifications_per_client);
        Self { limits, inflight, verifications, buckets: Mutex::new(HashMap::new()) }
    }

    /// The limits it enforces.
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes a token from `client`'s bucket, or says when to come back (429).
    pub(crate) fn check_rate(&self, client: Option<IpAddr>) -> Result<(), ApiError> {
        let (Some(rate), Some(ip)) = (self.limits.rate, client) else { return Ok(()) };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate buckets lock");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * rate.per_second < rate.burst
            });
        }
        let bucket = buckets.entry(ip).or_insert(Bucket { tokens: rate.burst, at: now });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate.per_second).min(rate.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - bucket.tokens) / rate.per_second).ceil().max(1.0) as u64;
        Err(ApiError::new(
            ErrorCode::TooManyRequests,
            format!(
                "too many requests from {ip}: at most {} per second, bursts of {}",
                rate.per_second, rate.burst
            ),
        )
        .with_status(StatusCode::TOO_MANY_REQUESTS)
        .with_header("retry-after", wait.to_string()))
    }

    /// Slots for one request from `client`: first its client's (so a client at its cap
    /// queues without touching the process's slots), then the process's; each waited for
    /// within one `inflight_wait` (then 503).
    pub(crate) async fn admit(&self, client: Option<IpAddr>) -> Result<Admission, ApiError> {
        let deadline = tokio::time::Instant::now() + self.limits.inflight_wait;
        self.inflight.take(client, deadline).await.map_err(|full| match full {
            Full::Client(ip) => busy(
                format!(
                    "{ip} has {} requests in flight, its limit; retry later",
                    self.limits.max_inflight_per_client
                ),
                Duration::from_secs(1),
            ),
            Full::Total => busy(
                format!(
                    "the registry is handling {} requests, its limit; retry later",
                    self.limits.max_inflight
                ),
                Duration::from_secs(1),
            ),
        })
    }

    /// A slot to hash a whole blob for `client` (a `_thaw` commit), held while it hashes:
    /// its client's, then the process's, waited for within `verify_wait` (then 503), so
    /// neither one client nor all of them together can keep more cores hashing than
    /// configured, however many small commits they send.
    pub(crate) async fn verification(&self, client: Option<IpAddr>) -> Result<Held, ApiError> {
        let deadline = tokio::time::Instant::now() + self.limits.verify_wait;
        // Verifications ahead may take seconds: come back a little later than for requests.
        let retry = Duration::from_secs(5);
        self.verifications.take(client, deadline).await.map_err(|full| match full {
            Full::Client(ip) => busy(
                format!(
                    "{ip} has {} blob verifications running, its limit; commit one blob at a time or retry later",
                    self.limits.max_verifications_per_client
                ),
                retry,
            ),
            Full::Total => busy(
                format!(
                    "the registry is verifying {} blobs, its limit; retry later",
                    self.limits.max_verifications
                ),
                retry,
            ),
        })
    }

    #[cfg(test)]
    fn clients_tracked(&self) -> usize {
        self.inflight.clients_tracked()
    }
}

/// The limits middleware, outermost: rate, then the client's and the process's in-flight
/// slots, before any authentication or handler work. The slots are held until the response
/// body has been sent; the request body is cut off when it stalls for `body_timeout`.
pub(crate) async fn enforce(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let limiter = &state.limiter;
    // Present when served through `serve`/`spawn`; a router called directly (`oneshot`)
    // has no peer, so only the process-wide cap applies.
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if let Err(e) = limiter.check_rate(peer) {
        return e.into_response();
    }
    let admission = match limiter.admit(peer).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let timeout = limiter.limits().body_timeout;
    let request = request.map(|body| Body::new(StallTimeout::new(body, timeout)));
    hold_until_sent(next.run(request).await, admission)
}

/// Keeps the request's slots until a streamed body has been sent (a blob GET holds its read
/// buffers that long); bodies already in memory release them at once.
fn hold_until_sent(response: Response, admission: Admission) -> Response {
    if response.body().size_hint().exact().is_some() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let stream = body.into_data_stream().map(move |piece| {
        let _slots = &admission;
        piece
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// A request body that fails with `TimedOut` when the handler has waited `timeout` for its
/// next frame: a client that stops sending mid-body releases its slots instead of holding
/// them forever. The clock runs only while the handler waits, not while it works.
struct StallTimeout {
    inner: Body,
    timeout: Duration,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StallTimeout {
    fn new(inner: Body, timeout: Duration) -> Self {
        Self { inner, timeout, waiting: None }
    }
}

impl HttpBody for StallTimeout {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.waiting = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let waiting = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match waiting.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the request body sent nothing for {timeout:?}"),
                    ))))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_empties_then_names_a_wait_and_clients_are_separate() {
        let limiter = Limiter::new(Limits {
            rate: Some(RateLimit { per_second: 0.5, burst: 3.0 }),
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            limiter.check_rate(Some(a)).unwrap();
        }
        let e = limiter.check_rate(Some(a)).unwrap_err();
        assert_eq!((e.code(), e.status()), (ErrorCode::TooManyRequests, StatusCode::TOO_MANY_REQUESTS));
        limiter.check_rate(Some(b)).unwrap();
        limiter.check_rate(None).unwrap();
    }

    #[tokio::test]
    async fn past_the_cap_a_request_waits_then_is_refused() {
        let limiter = Limiter::new(Limits {
            max_inflight: 1,
            inflight_wait: Duration::from_millis(50),
            ..Limits::default()
        });
        let held = limiter.admit(None).await.unwrap();
        let e = limiter.admit(None).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(held);
        let _slot = limiter.admit(None).await.unwrap();
    }

    #[tokio::test]
    async fn a_client_at_its_cap_queues_alone_and_its_entry_goes_with_its_last_request() {
        let limiter = Limiter::new(Limits {
            max_inflight: 4,
            max_inflight_per_client: 2,
            inflight_wait: Duration::from_millis(50),
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let held = [limiter.admit(Some(a)).await.unwrap(), limiter.admit(Some(a)).await.unwrap()];
        let e = limiter.admit(Some(a)).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let other = [limiter.admit(Some(b)).await.unwrap(), limiter.admit(Some(b)).await.unwrap()];
        assert_eq!(limiter.clients_tracked(), 2);
        drop(held);
        drop(other);
        assert_eq!(limiter.clients_tracked(), 0, "no entry outlives its client's requests");
    }

    #[tokio::test]
    async fn verification_slots_are_separate_from_request_slots_and_capped_per_client() {
        let limiter = Limiter::new(Limits {
            max_verifications: 2,
            max_verifications_per_client: 1,
            verify_wait: Duration::from_millis(50),
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let hashing = limiter.verification(Some(a)).await.unwrap();
        let e = limiter.verification(Some(a)).await.unwrap_err();
        assert_eq!((e.code(), e.status()), (ErrorCode::Unavailable, StatusCode::SERVICE_UNAVAILABLE));
        // Requests of the client at its verification cap are still admitted.
        let _request = limiter.admit(Some(a)).await.unwrap();
        let other = limiter.verification(Some(b)).await.unwrap();
        // Both of the process's verification slots are held: a third client waits, then 503.
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(limiter.verification(Some(c)).await.is_err());
        drop((hashing, other));
        let _slot = limiter.verification(Some(c)).await.unwrap();
    }
}
