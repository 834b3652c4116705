//! Blob reads, deletes and the upload protocol (monolithic, POST-with-digest, chunked,
//! streamed, cross-repository mount).

use std::sync::Arc;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use thaw_schema::{ErrorCode, Sha256Digest};

use super::{content_length, header, AppState, Request};
use crate::error::{ApiError, ApiResult};
use crate::ingest;
use crate::routes::parse_digest;
use crate::storage::StoreError;

pub(super) async fn get(
    state: &Arc<AppState>,
    name: &str,
    digest: &str,
    req: Request,
) -> ApiResult<Response> {
    let digest = parse_digest(digest)?;
    let size = state.store.blob_size(name, &digest).await?.ok_or_else(|| blob_unknown(name, &digest))?;
    let range = match req.headers.get("range") {
        None => None,
        Some(v) => Some(parse_range(v.to_str().unwrap_or(""), size)?),
    };
    let (start, end) = range.unwrap_or((0, size));
    let head = req.method == axum::http::Method::HEAD;
    let body = if head {
        Body::empty()
    } else {
        let recipe = state.store.get_recipe(&digest).await?.ok_or_else(|| {
            ApiError::new(ErrorCode::Unknown, format!("blob {digest} is linked in {name} but has no recipe"))
        })?;
        if recipe.size != size {
            return Err(ApiError::from(StoreError::Corrupt {
                key: format!("blob {digest} in {name}"),
                why: format!("linked as {size} bytes, its recipe says {}", recipe.size),
            }));
        }
        let mut stream = ingest::read_range(state.store.clone(), recipe, start, end);
        // Every piece is verified before it is sent. The first one decides the status: when
        // the first window of chunks is unreadable (corrupt or unreachable) the client gets
        // an error body, not a 200 cut short; a later failure can only cut the body short
        // (the Content-Length tells the client it did).
        let first = stream.try_next().await?;
        let rest = stream.inspect_err(
            move |e| tracing::error!(%digest, error = %e, "aborting blob response: stored data unreadable"),
        );
        Body::from_stream(futures::stream::iter(first.map(Ok)).chain(rest))
    };
    let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let mut response = (status, body).into_response();
    header(&mut response, "content-type", "application/octet-stream");
    header(&mut response, "content-length", (end - start).to_string());
    header(&mut response, "docker-content-digest", digest.to_string());
    header(&mut response, "accept-ranges", "bytes");
    header(&mut response, "etag", format!("\"{digest}\""));
    if range.is_some() {
        header(&mut response, "content-range", format!("bytes {start}-{}/{size}", end.saturating_sub(1)));
    }
    Ok(response)
}

fn blob_unknown(name: &str, digest: &Sha256Digest) -> ApiError {
    ApiError::new(ErrorCode::BlobUnknown, format!("blob {digest} is not in repository {name}"))
        .with_detail(serde_json::json!({ "digest": digest.to_string() }))
}

/// Parses a single `bytes=` range against a blob of `size` bytes into `[start, end)`.
fn parse_range(value: &str, size: u64) -> ApiResult<(u64, u64)> {
    let unsatisfiable = || {
        ApiError::new(
            ErrorCode::SizeInvalid,
            format!("range {value:?} is not satisfiable for a {size}-byte blob"),
        )
        .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
        .with_header("content-range", format!("bytes */{size}"))
    };
    let spec = value.trim().strip_prefix("bytes=").ok_or_else(unsatisfiable)?;
    let (a, b) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| unsatisfiable())?;
            if n == 0 {
                return Err(unsatisfiable());
            }
            (size.saturating_sub(n), size)
        }
        (first, "") => (first.parse().map_err(|_| unsatisfiable())?, size),
        (first, last) => {
            let first: u64 = first.parse().map_err(|_| unsatisfiable())?;
            let last: u64 = last.parse().map_err(|_| unsatisfiable())?;
            if last < first {
                return Err(unsatisfiable());
            }
            (first, last.saturating_add(1).min(size))
        }
    };
    if start >= size || start >= end {
        return Err(unsatisfiable());
    }
    Ok((start, end))
}

pub(super) async fn delete(state: &Arc<AppState>, name: &str, digest: &str) -> ApiResult<Response> {
    let digest = parse_digest(digest)?;
    if !state.store.unlink_blob(name, &digest).await? {
        return Err(blob_unknown(name, &digest));
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

fn upload_location(name: &str, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn upload_progress(status: StatusCode, name: &str, id: &str, size: u64) -> Response {
    let mut response = status.into_response();
    header(&mut response, "location", upload_location(name, id));
    header(&mut response, "range", format!("0-{}", size.saturating_sub(1)));
    header(&mut response, "docker-upload-uuid", id);
    header(&mut response, "content-length", "0");
    response
}

/// 201 for a blob now readable in `name`.
pub(super) fn blob_created(name: &str, digest: &Sha256Digest) -> Response {
    let mut response = StatusCode::CREATED.into_response();
    header(&mut response, "location", format!("/v2/{name}/blobs/{digest}"));
    header(&mut response, "docker-content-digest", digest.to_string());
    header(&mut response, "content-length", "0");
    response
}

pub(super) async fn start_upload(state: &Arc<AppState>, name: &str, req: Request) -> ApiResult<Response> {
    if let Some(mount) = req.query.get("mount") {
        let digest = parse_digest(mount)?;
        if let Some(from) = req.query.get("from") {
            if thaw_schema::names::is_valid_repository_name(from) {
                if let Some(size) = state.store.blob_size(from, &digest).await? {
                    state.store.link_blob(name, &digest, size).await?;
                    tracing::info!(%digest, from = %from, to = %name, "mounted blob");
                    return Ok(blob_created(name, &digest));
                }
            }
        }
        // Not mountable: the spec says to fall back to an ordinary upload session.
    }
    let id = state.uploads.create(name, req.client)?;
    if let Some(digest) = req.query.get("digest") {
        let digest = match parse_digest(digest) {
            Ok(d) => d,
            Err(e) => {
                state.uploads.remove(&id).await;
                return Err(e);
            }
        };
        append_or_abort(state, name, &id, req.body).await?;
        return commit(state, name, &id, digest).await;
    }
    Ok(upload_progress(StatusCode::ACCEPTED, name, &id, 0))
}

pub(super) async fn upload_status(state: &Arc<AppState>, name: &str, id: &str) -> ApiResult<Response> {
    let session = state.uploads.get(name, id)?;
    let size = session.lock().await.size;
    Ok(upload_progress(StatusCode::NO_CONTENT, name, id, size))
}

/// Parses `Content-Range: <start>-<end>` (the spec's form; a `bytes ` prefix is tolerated).
fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let v = value.trim();
    let v = v.strip_prefix("bytes ").unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

pub(super) async fn patch_upload(
    state: &Arc<AppState>,
    name: &str,
    id: &str,
    req: Request,
) -> ApiResult<Response> {
    let session = state.uploads.get(name, id)?;
    let mut s = session.lock().await;
    let expected_len = match req.headers.get("content-range") {
        None => None, // streamed upload: append whatever arrives
        Some(v) => {
            let out_of_order = |why: String| {
                ApiError::new(ErrorCode::BlobUploadInvalid, why)
                    .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .with_header("location", upload_location(name, id))
                    .with_header("range", format!("0-{}", s.size.saturating_sub(1)))
            };
            let text = v.to_str().unwrap_or("");
            let (first, last) = parse_content_range(text)
                .ok_or_else(|| out_of_order(format!("malformed Content-Range {text:?}")))?;
            if first != s.size {
                return Err(out_of_order(format!(
                    "chunk starts at byte {first} but the upload has {} bytes: chunks must be sent in order, once",
                    s.size
                )));
            }
            let len = last - first + 1;
            if content_length(&req.headers).is_some_and(|n| n != len) {
                return Err(out_of_order(format!("Content-Range {text:?} does not match Content-Length")));
            }
            Some(len)
        }
    };
    let written = s.append(req.body.into_data_stream()).await?;
    if let Some(len) = expected_len {
        if written != len {
            return Err(ApiError::new(
                ErrorCode::BlobUploadInvalid,
                format!("Content-Range announced {len} bytes but the body had {written}"),
            ));
        }
    }
    Ok(upload_progress(StatusCode::ACCEPTED, name, id, s.size))
}

pub(super) async fn finish_upload(
    state: &Arc<AppState>,
    name: &str,
    id: &str,
    req: Request,
) -> ApiResult<Response> {
    // An unknown session is 404 whatever the parameters say.
    state.uploads.get(name, id)?;
    let Some(digest) = req.query.get("digest") else {
        return Err(ApiError::digest_invalid("the closing PUT needs a ?digest= parameter"));
    };
    let digest = match parse_digest(digest) {
        Ok(d) => d,
        Err(e) => {
            state.uploads.remove(id).await;
            return Err(e);
        }
    };
    append_or_abort(state, name, id, req.body).await?;
    commit(state, name, id, digest).await
}

pub(super) async fn cancel_upload(state: &Arc<AppState>, name: &str, id: &str) -> ApiResult<Response> {
    state.uploads.get(name, id)?;
    state.uploads.remove(id).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Appends a closing body to a session; a broken body ends the session.
async fn append_or_abort(state: &Arc<AppState>, name: &str, id: &str, body: Body) -> ApiResult<()> {
    let session = state.uploads.get(name, id)?;
    let appended = session.lock().await.append(body.into_data_stream()).await;
    if appended.is_err() {
        state.uploads.remove(id).await;
    }
    appended.map(drop)
}

/// Verifies the received bytes against `digest`, stores them as chunks plus a recipe
/// (unless the registry already holds that blob) and only then links the blob into
/// `name`. The session ends either way.
async fn commit(state: &Arc<AppState>, name: &str, id: &str, digest: Sha256Digest) -> ApiResult<Response> {
    let result = commit_inner(state, name, id, digest).await;
    state.uploads.remove(id).await;
    result
}

async fn commit_inner(
    state: &Arc<AppState>,
    name: &str,
    id: &str,
    digest: Sha256Digest,
) -> ApiResult<Response> {
    let session = state.uploads.get(name, id)?;
    let mut s = session.lock().await;
    let received = s.finish().await?;
    if received != digest {
        return Err(ApiError::digest_invalid(format!(
            "uploaded content ({} bytes) hashes to {received}, not {digest}",
            s.size
        )));
    }
    if !state.store.has_recipe(&digest).await? {
        let recipe =
            ingest::ingest_file(state.store.clone(), s.path.clone(), state.chunker, state.zstd_level)
                .await
                .map_err(|e| e.into_api(&format!("storing blob {digest}")))?;
        if recipe.digest != digest || recipe.size != s.size {
            return Err(ApiError::new(
                ErrorCode::Unknown,
                format!("upload spool changed under us: read back {} ({} bytes)", recipe.digest, recipe.size),
            ));
        }
        state.store.put_recipe(&recipe).await?;
    }
    state.store.link_blob(name, &digest, s.size).await?;
    tracing::info!(repository = %name, %digest, size = s.size, "blob committed");
    Ok(blob_created(name, &digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), (0, 10));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=95-200", 100).unwrap(), (95, 100));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=5-1", 100).is_err());
        assert!(parse_range("items=0-1", 100).is_err());
        assert_eq!(
            parse_range("bytes=100-200", 100).unwrap_err().status(),
            StatusCode::RANGE_NOT_SATISFIABLE
        );
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19)));
        assert_eq!(parse_content_range("9-1"), None);
        assert_eq!(parse_content_range("x"), None);
    }
}
