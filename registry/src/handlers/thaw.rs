//! The `_thaw` extension: chunk-level dedup on the wire (docs/API.md).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use thaw_schema::batch::{encode_entry, parse_batch, BATCH_MAGIC, ENTRY_HEADER_LEN, MAX_BATCH_RAW_LEN};
use thaw_schema::dto::{
    decode_chunk_id_query, encode_missing_answer, BinaryQueryError, ChunkUploadResponse, DiscoverResponse,
    ExtensionInfo, FetchChunksRequest, MissingChunksRequest, MissingChunksResponse, MAX_IDS_PER_QUERY,
    THAW_EXTENSION,
};
use thaw_schema::frame::{EncodedChunk, FrameError};
use thaw_schema::recipe::RecipeEntry;
use thaw_schema::{media, ChunkId, ErrorCode, Recipe, Sha256Digest};

use super::{check_declared_length, header, read_body, AppState, Request};
use crate::error::{ApiError, ApiResult};
use crate::ingest;
use crate::routes::parse_digest;
use crate::storage::{Store, StoreError};

/// Largest chunk batch body accepted.
pub(crate) const MAX_BATCH_LEN: usize = 64 * 1024 * 1024;
/// Largest sum of the uncompressed lengths a fetch may ask for (clients ask for 16 MiB, plus
/// one chunk past it at most): bounds the bytes a small query can make the registry send.
const MAX_FETCH_RAW_LEN: u64 = 64 * 1024 * 1024;
/// Largest JSON query body (100,000 ids fit with room to spare).
const MAX_QUERY_LEN: usize = 8 * 1024 * 1024;
/// Largest recipe body (a recipe of ~100 GiB at 64 KiB chunks).
const MAX_RECIPE_LEN: usize = 64 * 1024 * 1024;

pub(super) fn discover() -> Response {
    let endpoints = [
        "_thaw/chunks/missing",
        "_thaw/chunks",
        "_thaw/chunks/fetch",
        "_thaw/blobs/<digest>",
        "_thaw/blobs/<digest>/recipe",
    ];
    axum::Json(DiscoverResponse {
        extensions: vec![ExtensionInfo {
            name: THAW_EXTENSION.to_owned(),
            url: "https://thaw.dev/docs/API.md".to_owned(),
            description: "chunk-level deduplicated upload and download of blobs".to_owned(),
            endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
        }],
    })
    .into_response()
}

async fn read_json<T: DeserializeOwned>(req: Request, what: &str) -> ApiResult<T> {
    check_declared_length(&req.headers, MAX_QUERY_LEN, what)?;
    let body = read_body(req.body, MAX_QUERY_LEN, what).await?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(ErrorCode::Unsupported, format!("{what}: malformed JSON body: {e}"))
            .with_status(StatusCode::BAD_REQUEST)
    })
}

fn check_id_count(n: usize) -> ApiResult<()> {
    if n > MAX_IDS_PER_QUERY {
        return Err(ApiError::new(
            ErrorCode::SizeInvalid,
            format!("{n} chunk ids in one request; at most {MAX_IDS_PER_QUERY} are allowed"),
        ));
    }
    Ok(())
}

/// For each id, whether the chunk is stored (answered in order).
async fn which_present(store: &Arc<Store>, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
    store.which_present(ids).await
}

/// The form of a missing-chunks query, from its `Content-Type`.
enum QueryForm {
    Json,
    Binary,
}

fn query_form(req: &Request) -> ApiResult<QueryForm> {
    let Some(value) = req.headers.get("content-type") else { return Ok(QueryForm::Json) };
    let essence = value.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(QueryForm::Json),
        t if t == media::CHUNK_IDS => Ok(QueryForm::Binary),
        other => Err(ApiError::new(
            ErrorCode::Unsupported,
            format!("missing-chunks query of type {other:?}: send application/json or {}", media::CHUNK_IDS),
        )
        .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)),
    }
}

pub(super) async fn missing(state: &Arc<AppState>, _name: &str, req: Request) -> ApiResult<Response> {
    match query_form(&req)? {
        QueryForm::Json => {
            let query: MissingChunksRequest = read_json(req, "missing-chunks query").await?;
            check_id_count(query.chunks.len())?;
            let present = which_present(&state.store, &query.chunks).await?;
            let missing = query.chunks.iter().zip(present).filter(|(_, p)| !p).map(|(id, _)| *id).collect();
            Ok(axum::Json(MissingChunksResponse { missing }).into_response())
        }
        QueryForm::Binary => {
            const WHAT: &str = "binary missing-chunks query";
            check_declared_length(&req.headers, MAX_QUERY_LEN, WHAT)?;
            let body = read_body(req.body, MAX_QUERY_LEN, WHAT).await?;
            let ids = decode_chunk_id_query(&body).map_err(|e| match e {
                BinaryQueryError::TooManyIds(_) => ApiError::new(ErrorCode::SizeInvalid, e.to_string()),
                other => ApiError::new(ErrorCode::Unsupported, format!("{WHAT}: {other}"))
                    .with_status(StatusCode::BAD_REQUEST),
            })?;
            let present = which_present(&state.store, &ids).await?;
            let missing: Vec<bool> = present.into_iter().map(|p| !p).collect();
            let mut response = (StatusCode::OK, encode_missing_answer(&missing)).into_response();
            header(&mut response, "content-type", media::MISSING_CHUNKS);
            Ok(response)
        }
    }
}

pub(super) async fn upload_chunks(state: &Arc<AppState>, name: &str, req: Request) -> ApiResult<Response> {
    check_declared_length(&req.headers, MAX_BATCH_LEN, "chunk batch")?;
    let body = read_body(req.body, MAX_BATCH_LEN, "chunk batch").await?;
    let chunks = parse_batch(&body)
        .map_err(|e| ApiError::new(ErrorCode::BlobUploadInvalid, format!("chunk batch rejected: {e}")))?;
    drop(body);
    // Refuse from the headers, before decompressing anything, what would cost more than
    // the batch is worth: a chunk named twice, or more uncompressed bytes than one batch
    // may carry (a 200-byte frame may declare 4 MiB).
    let mut seen = HashSet::with_capacity(chunks.len());
    if let Some((id, _)) = chunks.iter().find(|(id, _)| !seen.insert(*id)) {
        return Err(ApiError::new(
            ErrorCode::BlobUploadInvalid,
            format!("chunk batch rejected: chunk {id} appears more than once"),
        ));
    }
    drop(seen);
    let raw: u64 = chunks.iter().map(|(_, c)| u64::from(c.raw_len)).sum();
    if raw > MAX_BATCH_RAW_LEN {
        return Err(ApiError::new(
            ErrorCode::SizeInvalid,
            format!(
                "chunk batch rejected: its chunks add up to {raw} uncompressed bytes, more than the {MAX_BATCH_RAW_LEN} one batch may carry; send smaller batches"
            ),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE));
    }
    // Chunks already stored are neither verified nor stored again.
    let total = chunks.len();
    let new: Vec<(ChunkId, EncodedChunk)> =
        chunks.into_iter().filter(|(id, _)| !state.store.is_known_chunk(id)).collect();
    // Verify every new chunk before storing any, so a bad batch stores nothing; one
    // decoded chunk at a time.
    let new = tokio::task::spawn_blocking(move || {
        for (id, chunk) in &new {
            chunk.decode(id)?;
        }
        Ok::<_, FrameError>(new)
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Unknown, e.to_string()))?
    .map_err(|e| match e {
        FrameError::IdMismatch { .. } | FrameError::LengthMismatch { .. } => {
            ApiError::new(ErrorCode::DigestInvalid, format!("chunk batch rejected: {e}"))
        }
        other => ApiError::new(ErrorCode::BlobUploadInvalid, format!("chunk batch rejected: {other}")),
    })?;
    let stored = state.store.store_chunks(&new).await?;
    tracing::debug!(repository = %name, stored, total, "chunk batch stored");
    Ok(axum::Json(ChunkUploadResponse { stored, present: total - stored }).into_response())
}

pub(super) async fn fetch_chunks(state: &Arc<AppState>, name: &str, req: Request) -> ApiResult<Response> {
    let query: FetchChunksRequest = read_json(req, "chunk fetch").await?;
    check_id_count(query.chunks.len())?;
    let blob = query.blob;
    if state.store.blob_size(name, &blob).await?.is_none() {
        return Err(ApiError::new(
            ErrorCode::BlobUnknown,
            format!("blob {blob} is not in repository {name}"),
        ));
    }
    let recipe = state.store.get_recipe(&blob).await?.ok_or_else(|| {
        ApiError::new(ErrorCode::Unknown, format!("blob {blob} is linked in {name} but has no recipe"))
    })?;
    // The length of each asked-for chunk, from one pass over the shared recipe: memory
    // grows with the query (at most MAX_IDS_PER_QUERY ids), not with the blob.
    let mut lens: HashMap<ChunkId, Option<u32>> = HashMap::with_capacity(query.chunks.len());
    for id in &query.chunks {
        if lens.insert(*id, None).is_some() {
            return Err(ApiError::new(
                ErrorCode::Unsupported,
                format!("chunk {id} is asked for more than once"),
            )
            .with_status(StatusCode::BAD_REQUEST));
        }
    }
    for entry in &recipe.entries {
        if let RecipeEntry::Data { id, len } = entry {
            if let Some(slot) = lens.get_mut(id) {
                *slot = Some(*len);
            }
        }
    }
    drop(recipe);
    let mut raw = 0u64;
    for id in &query.chunks {
        match lens[id] {
            None => {
                return Err(ApiError::new(
                    ErrorCode::Denied,
                    format!("chunk {id} is not part of blob {blob}"),
                ))
            }
            Some(len) => raw += u64::from(len),
        }
    }
    if raw > MAX_FETCH_RAW_LEN {
        return Err(ApiError::new(
            ErrorCode::SizeInvalid,
            format!(
                "the chunks asked for add up to {raw} bytes; ask for at most {MAX_FETCH_RAW_LEN} at once"
            ),
        ));
    }
    let wanted: Vec<(ChunkId, Option<u32>)> = query.chunks.iter().map(|id| (*id, lens[id])).collect();
    drop(lens);
    // Frames go out as stored; the receiver verifies each against its id.
    let entries = state
        .store
        .chunk_frames_sized(wanted.into_iter())
        .map_ok(|(id, chunk)| {
            let mut entry = Vec::with_capacity(ENTRY_HEADER_LEN + chunk.payload.len());
            encode_entry(&mut entry, &id, &chunk);
            Bytes::from(entry)
        })
        .inspect_err(|e| tracing::error!(error = %e, "aborting chunk fetch response"));
    let body = futures::stream::once(async { Ok(Bytes::from_static(BATCH_MAGIC)) }).chain(entries);
    let mut response = (StatusCode::OK, Body::from_stream(body)).into_response();
    header(&mut response, "content-type", media::CHUNK_BATCH);
    Ok(response)
}

pub(super) async fn commit(
    state: &Arc<AppState>,
    name: &str,
    digest: &str,
    req: Request,
) -> ApiResult<Response> {
    let digest = parse_digest(digest)?;
    let client = req.client;
    check_declared_length(&req.headers, MAX_RECIPE_LEN, "recipe")?;
    let body = read_body(req.body, MAX_RECIPE_LEN, "recipe").await?;
    let recipe = Recipe::decode(&body)
        .map_err(|e| ApiError::new(ErrorCode::BlobUploadInvalid, format!("recipe rejected: {e}")))?;
    drop(body);
    if recipe.digest != digest {
        return Err(ApiError::digest_invalid(format!("recipe is for {}, not {digest}", recipe.digest)));
    }
    if recipe.entries.is_empty() && digest != Sha256Digest::of(b"") {
        return Err(ApiError::digest_invalid(format!(
            "a recipe without entries describes the empty blob, not {digest}"
        )));
    }
    // Possession: linking a blob the registry already holds needs the caller to name
    // exactly its pieces (the chunk ids are as good as the bytes), or a recipe whose chunks
    // are all stored and reassemble to the digest. Naming the digest alone proves nothing:
    // digests are public in manifests and referrers.
    let stored = state.store.get_recipe(&digest).await?;
    let proven = stored.as_ref().is_some_and(|s| s.size == recipe.size && s.entries == recipe.entries);
    // The recipe the blob is kept by from now on: the first one stored wins.
    let held = if !proven {
        let ids = check_repetition(&recipe, state.limiter.limits().max_chunk_repeat)?;
        let recipe = Arc::new(recipe);
        verify_in_full(state, &recipe, ids, &digest, client).await?;
        if stored.is_none() {
            state.store.put_recipe(&recipe).await?;
        }
        state.store.link_blob(name, &digest, stored.as_ref().map_or(recipe.size, |s| s.size)).await?;
        stored.unwrap_or(recipe)
    } else {
        state.store.link_blob(name, &digest, recipe.size).await?;
        stored.expect("a proven recipe is stored")
    };
    tracing::info!(repository = %name, %digest, "blob committed from recipe");
    // Off the async threads: a recipe may be 64 MiB.
    let held = tokio::task::spawn_blocking(move || held.encoded_digest())
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unknown, e.to_string()))?;
    let mut response = super::blobs::blob_created(name, &digest);
    header(&mut response, RECIPE_DIGEST_HEADER, held.to_string());
    Ok(response)
}

/// Response header of a commit and of `GET`/`HEAD` of a recipe: the SHA-256 of the recipe
/// the registry holds for the blob, what a manifest's `dev.thaw.recipe` annotation names.
pub(super) const RECIPE_DIGEST_HEADER: &str = "thaw-recipe-digest";

/// Refuses, before anything is read or hashed, a recipe whose verification would cost far
/// more than any real blob's: a chunk declared with two lengths (a chunk has one), or data
/// entries declaring more than `max_repeat` times the bytes of the distinct chunks they
/// name. Verifying hashes every declared byte, and repeating a chunk costs the sender 37
/// bytes: a 75 KB recipe naming one stored 4 MiB chunk 2,048 times asks for 8 GiB of
/// SHA-256. Zero runs are not counted here (sparse disks are mostly zeros); they cost
/// hashing like data, and the verification slots bound them (`Limiter::verification`).
/// Returns the distinct chunk ids, in first-use order.
fn check_repetition(recipe: &Recipe, max_repeat: u32) -> ApiResult<Vec<ChunkId>> {
    let mut lens: HashMap<ChunkId, u32> = HashMap::new();
    let mut distinct = Vec::new();
    let (mut declared, mut distinct_bytes) = (0u64, 0u64);
    for entry in &recipe.entries {
        let RecipeEntry::Data { id, len } = *entry else { continue };
        declared += u64::from(len);
        match lens.entry(id) {
            Entry::Vacant(slot) => {
                slot.insert(len);
                distinct.push(id);
                distinct_bytes += u64::from(len);
            }
            Entry::Occupied(first) if *first.get() != len => {
                return Err(ApiError::digest_invalid(format!(
                    "the recipe says chunk {id} is {} bytes long and also {len}",
                    first.get()
                )))
            }
            Entry::Occupied(_) => {}
        }
    }
    if declared > distinct_bytes.saturating_mul(u64::from(max_repeat)) {
        return Err(ApiError::new(
            ErrorCode::BlobUploadInvalid,
            format!(
                "recipe rejected: its data entries declare {declared} bytes made of {distinct_bytes} bytes of distinct chunks, more than {max_repeat} times over (the registry's --max-chunk-repeat); push this blob with a plain OCI upload"
            ),
        ));
    }
    Ok(distinct)
}

/// Checks that every chunk of `recipe` (`ids`, its distinct ones) is stored and that they
/// reassemble to `digest`, hashing the whole blob in one of `client`'s verification slots.
async fn verify_in_full(
    state: &Arc<AppState>,
    recipe: &Arc<Recipe>,
    ids: Vec<ChunkId>,
    digest: &Sha256Digest,
    client: Option<std::net::IpAddr>,
) -> ApiResult<()> {
    let present = which_present(&state.store, &ids).await?;
    let missing: Vec<String> =
        ids.iter().zip(present).filter(|(_, p)| !p).map(|(id, _)| id.to_string()).collect();
    drop(ids);
    if !missing.is_empty() {
        return Err(ApiError::new(
            ErrorCode::BlobUnknown,
            format!("{} chunks of the recipe are not stored; upload them first", missing.len()),
        )
        .with_status(StatusCode::BAD_REQUEST)
        .with_detail(json!({ "missing": missing.iter().take(100).collect::<Vec<_>>() })));
    }
    // Held while hashing; a client that hangs up drops the handler and its slot with it.
    let _slot = state.limiter.verification(client).await?;
    let started = std::time::Instant::now();
    let actual = match ingest::digest_of_recipe(state.store.clone(), recipe.clone()).await {
        Err(StoreError::ChunkLength { id, stored, declared }) => {
            return Err(ApiError::digest_invalid(format!(
                "the recipe says chunk {id} is {declared} bytes long; it is {stored}"
            )))
        }
        other => other?,
    };
    tracing::info!(
        %digest,
        hashed_bytes = recipe.size,
        zero_bytes = recipe.zero_bytes(),
        ms = started.elapsed().as_millis() as u64,
        matches = actual == *digest,
        "verified a recipe by hashing its blob"
    );
    if actual != *digest {
        return Err(ApiError::digest_invalid(format!(
            "the recipe's chunks reassemble to {actual}, not {digest}"
        )));
    }
    Ok(())
}

/// A blob's recipe (`GET`), or only its headers (`HEAD`: what a pusher asks to learn the
/// recipe digest of a blob it did not commit itself).
pub(super) async fn recipe(
    state: &Arc<AppState>,
    name: &str,
    digest: &str,
    head: bool,
) -> ApiResult<Response> {
    let digest = parse_digest(digest)?;
    let unknown =
        || ApiError::new(ErrorCode::BlobUnknown, format!("blob {digest} is not in repository {name}"));
    state.store.blob_size(name, &digest).await?.ok_or_else(unknown)?;
    let bytes = state.store.get_recipe_bytes(&digest).await?.ok_or_else(unknown)?;
    let (len, recipe_digest) = (bytes.len(), Sha256Digest::of(&bytes));
    let mut response =
        if head { StatusCode::OK.into_response() } else { (StatusCode::OK, bytes).into_response() };
    header(&mut response, "content-type", media::RECIPE);
    header(&mut response, "content-length", len.to_string());
    header(&mut response, "docker-content-digest", digest.to_string());
    header(&mut response, RECIPE_DIGEST_HEADER, recipe_digest.to_string());
    Ok(response)
}
