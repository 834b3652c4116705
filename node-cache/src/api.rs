//! The local HTTP API (DESIGN.md "Node-cache local API"), for the orchestrator on this node
//! and `thaw cache`. Bodies are the DTOs of `thaw_schema::cache_api`; errors are
//! `{"error": {"code", "message"}}` with the status of [`CacheError::status`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use thaw_schema::cache_api::{
    EnsureRequest, MemoryMode, PublishRequest, ReleaseRequest, RenewRequest, RenewResponse,
};

use crate::cache::Cache;
use crate::error::{CacheError, Result};

/// The router over a cache.
pub fn app(cache: Arc<Cache>) -> Router {
    Router::new()
        .route("/v1/snapshots", get(list))
        .route("/v1/snapshots/ensure", post(ensure))
        .route("/v1/snapshots/release", post(release))
        .route("/v1/snapshots/renew", post(renew))
        .route("/v1/snapshots/prefetch", post(prefetch))
        .route("/v1/snapshots/publish", post(publish))
        .route("/v1/scrub", post(scrub))
        .route("/v1/disk", get(disk))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { CacheError::NotFound("no such endpoint; see docs/API.md".into()) })
        .with_state(cache)
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| CacheError::BadRequest(format!("malformed request body: {e}")))
}

async fn list(State(cache): State<Arc<Cache>>) -> Response {
    Json(cache.listing()).into_response()
}

async fn ensure(State(cache): State<Arc<Cache>>, body: Bytes) -> Result<Response> {
    let req: EnsureRequest = parse(&body)?;
    let answer = match req.memory {
        MemoryMode::File => cache.ensure(&req.reference).await?,
        MemoryMode::Uffd => cache.ensure_lazy(&req.reference).await?,
    };
    Ok(Json(answer).into_response())
}

async fn release(State(cache): State<Arc<Cache>>, body: Bytes) -> Result<Response> {
    let req: ReleaseRequest = parse(&body)?;
    // Ending a lease deletes its disk copy: filesystem work, kept off the async threads.
    let id =
        tokio::task::spawn_blocking(move || cache.release(req.lease.as_deref(), req.reference.as_deref()))
            .await
            .map_err(|source| CacheError::Task { what: "release", source })??;
    Ok(Json(serde_json::json!({ "released": id })).into_response())
}

async fn renew(State(cache): State<Arc<Cache>>, body: Bytes) -> Result<Response> {
    let req: RenewRequest = parse(&body)?;
    let lease_expires_ms = cache.renew(&req.lease).await?;
    Ok(Json(RenewResponse { lease: req.lease, lease_expires_ms }).into_response())
}

async fn prefetch(State(cache): State<Arc<Cache>>, body: Bytes) -> Result<Response> {
    let req: EnsureRequest = parse(&body)?;
    let reference = cache.prefetch(&req.reference).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "reference": reference }))).into_response())
}

async fn publish(State(cache): State<Arc<Cache>>, body: Bytes) -> Result<Response> {
    let req: PublishRequest = parse(&body)?;
    Ok(Json(cache.publish(&req.reference, &req.dir).await?).into_response())
}

async fn scrub(State(cache): State<Arc<Cache>>) -> Result<Response> {
    Ok(Json(cache.scrub().await?).into_response())
}

async fn disk(State(cache): State<Arc<Cache>>) -> Result<Response> {
    Ok(Json(cache.disk_report()?).into_response())
}

async fn metrics(State(cache): State<Arc<Cache>>) -> Response {
    let text = cache.metrics.render()
        + &cache.peers.render()
        + &cache.lazy.render()
        + &cache.lazy.working_sets.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
