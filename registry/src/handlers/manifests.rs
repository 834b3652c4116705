//! Manifests, tags, referrers and the catalog.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};
use thaw_schema::manifest::{summarize, MAX_MANIFEST_LEN};
use thaw_schema::names::is_valid_tag;
use thaw_schema::{media, ErrorCode, Sha256Digest};

use super::{check_declared_length, header, paginate, read_body, AppState, Request};
use crate::error::{ApiError, ApiResult};
use crate::routes::parse_digest;

/// A manifest reference: a digest, or a tag.
enum Reference {
    Digest(Sha256Digest),
    Tag(String),
}

fn parse_reference(reference: &str) -> ApiResult<Reference> {
    if reference.contains(':') {
        return parse_digest(reference).map(Reference::Digest);
    }
    if !is_valid_tag(reference) {
        return Err(ApiError::new(ErrorCode::ManifestInvalid, format!("invalid tag {reference:?}"))
            .with_detail(json!({ "tag": reference })));
    }
    Ok(Reference::Tag(reference.to_owned()))
}

fn manifest_unknown(name: &str, reference: &str) -> ApiError {
    ApiError::new(ErrorCode::ManifestUnknown, format!("manifest {reference} is not in repository {name}"))
}

/// The digest a reference resolves to in `name`, if any.
async fn resolve(state: &AppState, name: &str, reference: &Reference) -> ApiResult<Option<Sha256Digest>> {
    Ok(match reference {
        Reference::Digest(d) => Some(*d),
        Reference::Tag(t) => state.store.get_tag(name, t).await?,
    })
}

pub(super) async fn get(
    state: &Arc<AppState>,
    name: &str,
    reference: &str,
    head: bool,
) -> ApiResult<Response> {
    let parsed = parse_reference(reference)?;
    let digest = resolve(state, name, &parsed).await?.ok_or_else(|| manifest_unknown(name, reference))?;
    let media_type = state
        .store
        .manifest_media_type(name, &digest)
        .await?
        .ok_or_else(|| manifest_unknown(name, reference))?;
    let body = state.store.get_manifest(&digest).await?.ok_or_else(|| {
        ApiError::new(ErrorCode::Unknown, format!("manifest {digest} is linked but not stored"))
    })?;
    let len = body.len();
    let mut response =
        if head { StatusCode::OK.into_response() } else { (StatusCode::OK, body).into_response() };
    header(&mut response, "content-type", media_type);
    header(&mut response, "content-length", len.to_string());
    header(&mut response, "docker-content-digest", digest.to_string());
    header(&mut response, "etag", format!("\"{digest}\""));
    Ok(response)
}

pub(super) async fn put(
    state: &Arc<AppState>,
    name: &str,
    reference: &str,
    req: Request,
) -> ApiResult<Response> {
    let parsed = parse_reference(reference)?;
    check_declared_length(&req.headers, MAX_MANIFEST_LEN, "manifest")?;
    let content_type = req.headers.get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body: Bytes = read_body(req.body, MAX_MANIFEST_LEN, "manifest").await?;
    let digest = Sha256Digest::of(&body);
    if let Reference::Digest(expected) = parsed {
        if expected != digest {
            return Err(ApiError::digest_invalid(format!("manifest hashes to {digest}, not {expected}")));
        }
    }
    let summary = summarize(&body, content_type.as_deref())
        .map_err(|e| ApiError::new(ErrorCode::ManifestInvalid, e.to_string()))?;

    // Everything a manifest references must already be readable here, with the declared size.
    for blob in &summary.blobs {
        match state.store.blob_size(name, &blob.digest).await? {
            None => {
                return Err(ApiError::new(
                    ErrorCode::ManifestBlobUnknown,
                    format!("manifest references blob {} that is not in repository {name}", blob.digest),
                )
                .with_detail(json!({ "digest": blob.digest.to_string() })))
            }
            Some(size) if size != blob.size => {
                return Err(ApiError::new(
                    ErrorCode::ManifestInvalid,
                    format!("blob {} is {size} bytes, the manifest says {}", blob.digest, blob.size),
                ))
            }
            Some(_) => {}
        }
    }
    let warnings = check_recipe_annotations(state, &summary.blobs).await?;
    for child in &summary.manifests {
        if state.store.manifest_media_type(name, &child.digest).await?.is_none() {
            return Err(ApiError::new(
                ErrorCode::ManifestBlobUnknown,
                format!("index references manifest {} that is not in repository {name}", child.digest),
            )
            .with_detail(json!({ "digest": child.digest.to_string() })));
        }
    }

    // Content first, then the link that makes it visible, then the tag.
    let size = body.len();
    state.store.put_manifest(&digest, body).await?;
    if let Some(subject) = &summary.subject {
        let mut descriptor =
            json!({ "mediaType": summary.media_type, "digest": digest.to_string(), "size": size });
        if let Some(t) = &summary.artifact_type {
            descriptor["artifactType"] = Value::String(t.clone());
        }
        if let Some(a) = &summary.annotations {
            descriptor["annotations"] = a.clone();
        }
        state.store.put_referrer(name, &subject.digest, &digest, &descriptor).await?;
    }
    state.store.link_manifest(name, &digest, &summary.media_type).await?;
    if let Reference::Tag(tag) = &parsed {
        state.store.set_tag(name, tag, &digest).await?;
    }
    tracing::info!(repository = %name, %digest, reference, "manifest pushed");
    let mut response = StatusCode::CREATED.into_response();
    header(&mut response, "location", format!("/v2/{name}/manifests/{digest}"));
    header(&mut response, "docker-content-digest", digest.to_string());
    header(&mut response, "content-length", "0");
    if let Some(subject) = &summary.subject {
        header(&mut response, "oci-subject", subject.digest.to_string());
    }
    for warning in warnings {
        // The distribution spec's warning form: code 299, agent "-", a quoted message.
        let value = format!("299 - \"{}\"", warning.replace(['"', '\\'], "'"));
        if let Ok(value) = value.parse() {
            response.headers_mut().append("warning", value);
        }
    }
    Ok(response)
}

/// Checks each layer's `dev.thaw.recipe` annotation against the recipe this registry holds
/// for its blob (every stored blob has one). A mismatch is accepted with a warning, not
/// refused: a plain OCI tool that copies a thaw artifact here uploads whole blobs, which
/// this registry cuts its own way, and refusing would break such mirrors. Nothing depends
/// on a wrong annotation: a client uses the chain only when the recipe it fetched hashes
/// to the annotation, and verifies the whole file otherwise (docs/FORMAT.md).
async fn check_recipe_annotations(
    state: &Arc<AppState>,
    blobs: &[thaw_schema::manifest::Reference],
) -> ApiResult<Vec<String>> {
    let mut warnings = Vec::new();
    let mut mismatched = 0usize;
    // Each blob's recipe is encoded and hashed once, off the async threads, however many
    // layers name it (a recipe may be 64 MiB; a manifest may list thousands of layers).
    let mut held_by_blob: std::collections::HashMap<Sha256Digest, Option<Sha256Digest>> =
        std::collections::HashMap::new();
    for blob in blobs {
        let Some(named) = blob.recipe else { continue };
        let held = match held_by_blob.get(&blob.digest) {
            Some(held) => *held,
            None => {
                let held = match state.store.get_recipe(&blob.digest).await? {
                    Some(recipe) => Some(
                        tokio::task::spawn_blocking(move || recipe.encoded_digest())
                            .await
                            .map_err(|e| ApiError::new(ErrorCode::Unknown, e.to_string()))?,
                    ),
                    None => None,
                };
                held_by_blob.insert(blob.digest, held);
                held
            }
        };
        if held != Some(named) {
            mismatched += 1;
            if warnings.len() < MAX_WARNINGS {
                tracing::warn!(blob = %blob.digest, %named, held = ?held, "a manifest's recipe annotation does not match the stored recipe");
                warnings.push(format!(
                    "layer {}: annotation {} names recipe {named}, but this registry keeps the blob by {}; clients will verify the whole file",
                    blob.digest,
                    media::ANNOTATION_RECIPE,
                    held.map_or_else(|| "no recipe".to_owned(), |d| d.to_string()),
                ));
            }
        }
    }
    if mismatched > warnings.len() {
        warnings.push(format!(
            "{} more layers name another recipe than the one this registry keeps",
            mismatched - warnings.len()
        ));
    }
    Ok(warnings)
}

/// Warning headers a manifest push answers with at most (one per mismatched layer, then
/// one counting the rest), so a manifest of many layers cannot make a huge answer.
const MAX_WARNINGS: usize = 8;

pub(super) async fn delete(state: &Arc<AppState>, name: &str, reference: &str) -> ApiResult<Response> {
    match parse_reference(reference)? {
        Reference::Tag(tag) => {
            if !state.store.delete_tag(name, &tag).await? {
                return Err(manifest_unknown(name, reference));
            }
        }
        Reference::Digest(digest) => {
            if state.store.manifest_media_type(name, &digest).await?.is_none() {
                return Err(manifest_unknown(name, reference));
            }
            // Forget it as a referrer, drop the tags pointing at it, then unlink it.
            if let Some(body) = state.store.get_manifest(&digest).await? {
                if let Ok(summary) = summarize(&body, None) {
                    if let Some(subject) = summary.subject {
                        state.store.delete_referrer(name, &subject.digest, &digest).await?;
                    }
                }
            }
            for tag in state.store.list_tags(name).await? {
                if state.store.get_tag(name, &tag).await? == Some(digest) {
                    state.store.delete_tag(name, &tag).await?;
                }
            }
            state.store.unlink_manifest(name, &digest).await?;
        }
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

pub(super) async fn tags(state: &Arc<AppState>, name: &str, req: Request) -> ApiResult<Response> {
    if !state.store.repository_exists(name).await? {
        return Err(ApiError::new(ErrorCode::NameUnknown, format!("repository {name} is not known")));
    }
    let (tags, next) = paginate(state.store.list_tags(name).await?, &req)?;
    let mut response = axum::Json(json!({ "name": name, "tags": tags })).into_response();
    if let Some((n, last)) = next {
        header(&mut response, "link", format!("</v2/{name}/tags/list?n={n}&last={last}>; rel=\"next\""));
    }
    Ok(response)
}

pub(super) async fn catalog(state: &Arc<AppState>, req: Request) -> ApiResult<Response> {
    let (repositories, next) = paginate(state.store.list_repositories().await?, &req)?;
    let mut response = axum::Json(json!({ "repositories": repositories })).into_response();
    if let Some((n, last)) = next {
        header(&mut response, "link", format!("</v2/_catalog?n={n}&last={last}>; rel=\"next\""));
    }
    Ok(response)
}

pub(super) async fn referrers(
    state: &Arc<AppState>,
    name: &str,
    digest: &str,
    req: Request,
) -> ApiResult<Response> {
    let subject = parse_digest(digest)?;
    let mut manifests = state.store.list_referrers(name, &subject).await?;
    // A referrer whose manifest was unlinked since is no longer served.
    let mut live = Vec::with_capacity(manifests.len());
    for m in manifests.drain(..) {
        let linked =
            match m.get("digest").and_then(Value::as_str).and_then(|d| d.parse::<Sha256Digest>().ok()) {
                Some(d) => state.store.manifest_media_type(name, &d).await?.is_some(),
                None => false,
            };
        if linked {
            live.push(m);
        }
    }
    let filter = req.query.get("artifactType");
    if let Some(wanted) = filter {
        live.retain(|m| m.get("artifactType").and_then(Value::as_str) == Some(wanted));
    }
    live.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    let index = json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": live });
    let body = serde_json::to_vec(&index).expect("JSON value serializes");
    let mut response = (StatusCode::OK, body).into_response();
    header(&mut response, "content-type", media::OCI_INDEX);
    if filter.is_some() {
        header(&mut response, "oci-filters-applied", "artifactType");
    }
    Ok(response)
}
