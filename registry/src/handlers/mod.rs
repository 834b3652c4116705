//! Request handling: one dispatcher parses the path (see `routes`) and hands the request
//! to the handler of its route and method.

mod blobs;
mod manifests;
mod nodes;
mod thaw;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use thaw_schema::chunker::ChunkerParams;
use thaw_schema::ErrorCode;

use crate::error::{ApiError, ApiResult};
use crate::routes::{self, Query, Route};
use crate::storage::Store;
use crate::uploads::Uploads;

/// Everything a request handler needs.
pub struct AppState {
    /// The registry's storage.
    pub(crate) store: Arc<Store>,
    /// Open upload sessions.
    pub(crate) uploads: Uploads,
    /// Chunker for blobs that arrive through plain OCI uploads.
    pub(crate) chunker: ChunkerParams,
    /// zstd level for chunks the registry compresses itself.
    pub(crate) zstd_level: i32,
    /// Rate and concurrency limits (`limits`).
    pub(crate) limiter: crate::limits::Limiter,
}

/// The registry's router: everything goes through [`dispatch`].
pub fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new().fallback(dispatch).with_state(state)
}

/// A parsed request, handed to handlers.
pub(crate) struct Request {
    pub(crate) method: Method,
    pub(crate) headers: HeaderMap,
    /// The query, parsed once (`routes::Query`): the value the auth layer authorized.
    pub(crate) query: Query,
    pub(crate) body: Body,
    /// The TCP peer's address (`None` for a router called without one, as tests do).
    pub(crate) client: Option<IpAddr>,
}

async fn dispatch(State(state): State<Arc<AppState>>, request: axum::extract::Request) -> Response {
    // Rate and in-flight limits are enforced by the outermost layer (`limits::enforce`),
    // before authentication.
    let (parts, body) = request.into_parts();
    // Present when served through `serve`/`spawn`; a router called directly (`oneshot`)
    // has no peer.
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    // The auth layer leaves the query it authorized in the extensions; without auth it is
    // parsed here, by the same function.
    let query = match parts.extensions.get::<Query>() {
        Some(query) => Ok(query.clone()),
        None => Query::parse(parts.uri.query().unwrap_or(""), &[]),
    };
    let mut response = match query {
        Ok(query) => route(&state, parts.method, &parts.uri, query, parts.headers, body, peer).await,
        Err(e) => e.into_response(),
    };
    response
        .headers_mut()
        .insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    response
}

async fn route(
    state: &Arc<AppState>,
    method: Method,
    uri: &Uri,
    query: Query,
    headers: HeaderMap,
    body: Body,
    client: Option<IpAddr>,
) -> Response {
    let request = Request { method, headers, query, body, client };
    match routes::parse(uri.path()) {
        Ok(route) => handle(state, route, request).await.unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}

async fn handle(state: &Arc<AppState>, route: Route, req: Request) -> ApiResult<Response> {
    use Method as M;
    let m = req.method.clone();
    match (route, m) {
        (Route::Base, M::GET | M::HEAD) => Ok(StatusCode::OK.into_response()),
        (Route::Catalog, M::GET) => manifests::catalog(state, req).await,
        (Route::Discover, M::GET) => Ok(thaw::discover()),
        (Route::NodeDirectory, M::GET) => nodes::list(state).await,
        (Route::Node { node }, M::GET) => nodes::get(state, &node).await,
        (Route::Node { node }, M::PUT) => nodes::put(state, &node, req).await,
        (Route::Node { node }, M::DELETE) => nodes::delete(state, &node).await,
        (Route::Manifest { name, reference }, M::GET | M::HEAD) => {
            manifests::get(state, &name, &reference, req.method == M::HEAD).await
        }
        (Route::Manifest { name, reference }, M::PUT) => manifests::put(state, &name, &reference, req).await,
        (Route::Manifest { name, reference }, M::DELETE) => manifests::delete(state, &name, &reference).await,
        (Route::Blob { name, digest }, M::GET | M::HEAD) => blobs::get(state, &name, &digest, req).await,
        (Route::Blob { name, digest }, M::DELETE) => blobs::delete(state, &name, &digest).await,
        (Route::UploadStart { name }, M::POST) => blobs::start_upload(state, &name, req).await,
        (Route::Upload { name, id }, M::GET) => blobs::upload_status(state, &name, &id).await,
        (Route::Upload { name, id }, M::PATCH) => blobs::patch_upload(state, &name, &id, req).await,
        (Route::Upload { name, id }, M::PUT) => blobs::finish_upload(state, &name, &id, req).await,
        (Route::Upload { name, id }, M::DELETE) => blobs::cancel_upload(state, &name, &id).await,
        (Route::Tags { name }, M::GET) => manifests::tags(state, &name, req).await,
        (Route::Referrers { name, digest }, M::GET) => manifests::referrers(state, &name, &digest, req).await,
        (Route::ThawMissing { name }, M::POST) => thaw::missing(state, &name, req).await,
        (Route::ThawChunks { name }, M::POST) => thaw::upload_chunks(state, &name, req).await,
        (Route::ThawFetch { name }, M::POST) => thaw::fetch_chunks(state, &name, req).await,
        (Route::ThawCommit { name, digest }, M::PUT) => thaw::commit(state, &name, &digest, req).await,
        (Route::ThawRecipe { name, digest }, M::GET | M::HEAD) => {
            thaw::recipe(state, &name, &digest, req.method == M::HEAD).await
        }
        (route, method) => {
            Err(ApiError::new(ErrorCode::Unsupported, format!("{method} is not supported on {route:?}"))
                .with_status(StatusCode::METHOD_NOT_ALLOWED))
        }
    }
}

/// Reads a whole request body of at most `limit` bytes (413 `SIZE_INVALID` past it).
pub(crate) async fn read_body(body: Body, limit: usize, what: &str) -> ApiResult<Bytes> {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| {
            ApiError::new(
                ErrorCode::BlobUploadInvalid,
                format!("{what}: request body ended early or broke: {e}"),
            )
        })?;
        if buf.len() + piece.len() > limit {
            return Err(ApiError::too_large(what, limit));
        }
        buf.extend_from_slice(&piece);
    }
    Ok(buf.freeze())
}

/// Rejects a body whose declared Content-Length is over `limit` before reading it.
pub(crate) fn check_declared_length(headers: &HeaderMap, limit: usize, what: &str) -> ApiResult<()> {
    match content_length(headers) {
        Some(n) if n > limit as u64 => Err(ApiError::too_large(what, limit)),
        _ => Ok(()),
    }
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get("content-length")?.to_str().ok()?.parse().ok()
}

pub(crate) fn header(response: &mut Response, name: &'static str, value: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
        response.headers_mut().insert(name, v);
    }
}

/// The `n` and `last` pagination parameters of tag and catalog listings.
/// One page of a listing, and the `(n, last)` of the next page when there is one.
pub(crate) type Page = (Vec<String>, Option<(usize, String)>);

pub(crate) fn paginate(all: Vec<String>, req: &Request) -> ApiResult<Page> {
    let n = match req.query.get("n") {
        None => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            ApiError::new(ErrorCode::Unsupported, format!("n must be a non-negative integer, got {v:?}"))
                .with_status(StatusCode::BAD_REQUEST)
        })?),
    };
    let last = req.query.get("last");
    let mut items: Vec<String> = match last {
        Some(last) => all.into_iter().filter(|t| t.as_str() > last).collect(),
        None => all,
    };
    let mut next = None;
    if let Some(n) = n {
        if items.len() > n {
            items.truncate(n);
            if let Some(last_item) = items.last() {
                next = Some((n, last_item.clone()));
            }
        }
    }
    Ok((items, next))
}
