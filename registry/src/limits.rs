//! Request limits applied before any handler runs: a per-client token bucket (429
//! `TOOMANYREQUESTS` with `Retry-After`) and a cap on requests in flight (requests past it
//! queue for a bounded time, then get 503 `UNAVAILABLE` with `Retry-After`). Body size
//! limits live with the handlers that read bodies (docs/API.md, "Limits").

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use thaw_schema::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// Default cap on requests being handled at once (see docs/DECISIONS.md D15).
pub const DEFAULT_MAX_INFLIGHT: usize = 128;
/// Default time a request past the cap waits for a slot before its 503.
pub const DEFAULT_INFLIGHT_WAIT: Duration = Duration::from_secs(5);

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
    /// How long a request past `max_inflight` waits before 503 `UNAVAILABLE`.
    pub inflight_wait: Duration,
    /// Per-client rate limit; `None` (the default) for none.
    pub rate: Option<RateLimit>,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_inflight: DEFAULT_MAX_INFLIGHT, inflight_wait: DEFAULT_INFLIGHT_WAIT, rate: None }
    }
}

/// Buckets kept before idle (full) ones are dropped.
const MAX_BUCKETS: usize = 10_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The live state of [`Limits`].
#[derive(Debug)]
pub(crate) struct Limiter {
    limits: Limits,
    inflight: Arc<Semaphore>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Limiter {
    pub(crate) fn new(limits: Limits) -> Self {
        let inflight = Arc::new(Semaphore::new(limits.max_inflight.max(1)));
        Self { limits, inflight, buckets: Mutex::new(HashMap::new()) }
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

    /// A slot for one request, waiting up to `inflight_wait` for one (then 503).
    pub(crate) async fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        let acquire = self.inflight.clone().acquire_owned();
        match tokio::time::timeout(self.limits.inflight_wait, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "the registry is handling {} requests, its limit; retry later",
                    self.limits.max_inflight
                ),
            )
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
            .with_header("retry-after", "1".to_owned())),
        }
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
        let limiter =
            Limiter::new(Limits { max_inflight: 1, inflight_wait: Duration::from_millis(50), rate: None });
        let held = limiter.admit().await.unwrap();
        let e = limiter.admit().await.unwrap_err();
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(held);
        let _slot = limiter.admit().await.unwrap();
    }
}
