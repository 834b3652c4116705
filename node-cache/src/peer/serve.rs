//! The peer chunk service: `POST /v1/peer/chunks` on the peer listener (docs/API.md,
//! "Peer API"). The body is the binary chunk id list (`application/vnd.thaw.chunk-ids.v1`,
//! docs/FORMAT.md); the answer is a chunk batch (`application/vnd.thaw.chunks.v1`, the
//! framing of the registry's `_thaw/chunks/fetch`) holding, in request order, the asked
//! chunks this node has in complete snapshots. Chunks it lacks are left out: the caller
//! fetches them elsewhere. Every chunk is read from its cached file, checked against its id
//! (a damaged file is never served; finding one starts a scrub, which drops the damaged
//! snapshot) every time, and compressed once: recently encoded chunks are kept in memory
//! for the next peer asking (`FrameCache`).
//!
//! Every request must carry `Authorization: Bearer <cluster token>`; without it the answer
//! is 401 and nothing is read. Uploads are bounded in total and per peer address, and to one
//! at a time while this node runs an `ensure` of its own, so serving peers never starves its
//! own restores: a request waits up to a second for a slot, then is answered 503 and the
//! peer goes elsewhere.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path as UrlPath;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use thaw_schema::batch::{encode_entry, BATCH_MAGIC};
use thaw_schema::dto::decode_chunk_id_query;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::{media, ChunkId};

use super::{BITMAP_MEDIA_TYPE, COMPLETE_HEADER, COUNT_HEADER, ENDPOINT_HEADER, NODE_HEADER, SNAPSHOTS_PATH};
use super::{CHUNKS_PATH, MAX_ANSWER_RAW_BYTES, MAX_IDS_PER_REQUEST, MAX_REQUEST_BODY};
use crate::cache::{Cache, ChunkPlace};
use crate::error::{CacheError, Result};

/// Longest a request waits for an upload slot before it is answered 503.
const QUEUE_WAIT: Duration = Duration::from_millis(1000);

/// zstd level for chunks sent to peers: 1, not the registry's 3. Serving compresses every
/// chunk for every request, and with one node serving 8 (`benches/p2p.rs`) level 1 halved
/// both the registry fallback and the time to the last node (docs/DECISIONS.md D12).
const ZSTD_LEVEL: i32 = 1;

/// The peer router over a cache. Serve it with connect info
/// (`into_make_service_with_connect_info::<SocketAddr>()`): per-peer limits go by address.
pub fn app(cache: Arc<Cache>) -> Router {
    Router::new()
        .route(CHUNKS_PATH, post(chunks))
        .route(&format!("{SNAPSHOTS_PATH}/{{snapshot}}/blobs/{{blob}}/bitmap"), get(bitmap))
        .fallback(fallback)
        .method_not_allowed_fallback(fallback)
        .with_state(cache)
}

/// Checks the bearer token; anything else is refused before the request is looked at.
fn authorize(cache: &Cache, headers: &HeaderMap) -> Result<()> {
    let options = &cache.config().peer;
    let Some(token) = &options.token else {
        if options.insecure {
            return Ok(());
        }
        return Err(CacheError::Unauthorized("this node serves no peers without a cluster token".into()));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if token.matches(presented) {
        Ok(())
    } else {
        cache.peers.refused.fetch_add(1, Ordering::Relaxed);
        Err(CacheError::Unauthorized("missing or wrong cluster token (Authorization: Bearer <token>)".into()))
    }
}

async fn fallback(State(cache): State<Arc<Cache>>, headers: HeaderMap) -> Result<Response> {
    authorize(&cache, &headers)?;
    Err(CacheError::NotFound(format!(
        "the peer service has only POST {CHUNKS_PATH} and GET {SNAPSHOTS_PATH}/<snapshot>/blobs/<blob>/bitmap; \
         see docs/API.md"
    )))
}

/// Which chunks of `blob` (a file of `snapshot`) this node has written: a bitmap while it
/// materializes the snapshot, "complete" once it holds it, 404 otherwise. The asking node
/// (`Thaw-Node`, `Thaw-Peer-Endpoint`) joins this node's swarm for the snapshot.
async fn bitmap(
    State(cache): State<Arc<Cache>>,
    UrlPath((snapshot, blob)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    authorize(&cache, &headers)?;
    let parse = |what: &str, s: &str| {
        s.parse::<thaw_schema::Sha256Digest>()
            .map_err(|e| CacheError::BadRequest(format!("the {what} {s:?} is not a sha256 digest: {e}")))
    };
    let (snapshot, blob) = (parse("snapshot", &snapshot)?, parse("blob", &blob)?);
    if let Some(m) = cache.swarm.get(&snapshot) {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let (Some(node), Some(endpoint)) = (header(NODE_HEADER), header(ENDPOINT_HEADER)) {
            let valid = thaw_schema::holdings::validate_node_name(node).is_ok()
                && endpoint.len() <= 262
                && endpoint.parse::<SocketAddr>().is_ok();
            if valid && node != cache.config().node_name {
                m.add_member(node, endpoint);
            }
        }
        let Some((bits, count)) = m.bitmap(&blob) else {
            return Err(CacheError::NotFound(format!("{blob} is not a file of {snapshot}")));
        };
        return Ok((
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, BITMAP_MEDIA_TYPE.to_owned()),
                (header::HeaderName::from_static(COUNT_HEADER), count.to_string()),
            ],
            Body::from(bits),
        )
            .into_response());
    }
    if cache.holds_blob(&snapshot, &blob) {
        return Ok((
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, BITMAP_MEDIA_TYPE.to_owned()),
                (header::HeaderName::from_static(COMPLETE_HEADER), "1".to_owned()),
            ],
            Body::empty(),
        )
            .into_response());
    }
    Err(CacheError::NotFound(format!("this node neither holds nor materializes {snapshot} with file {blob}")))
}

async fn chunks(
    State(cache): State<Arc<Cache>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<Response> {
    authorize(&cache, request.headers())?;
    let body = axum::body::to_bytes(request.into_body(), MAX_REQUEST_BODY).await.map_err(|_| {
        CacheError::BadRequest(format!(
            "the request body is unreadable or longer than {MAX_REQUEST_BODY} bytes \
             (at most {MAX_IDS_PER_REQUEST} chunk ids)"
        ))
    })?;
    let ids = decode_chunk_id_query(&body).map_err(|e| CacheError::BadRequest(e.to_string()))?;
    if ids.len() > MAX_IDS_PER_REQUEST {
        return Err(CacheError::BadRequest(format!(
            "{} chunk ids in one request; at most {MAX_IDS_PER_REQUEST} are allowed",
            ids.len()
        )));
    }
    let busy = |what: &str| {
        cache.peers.busy.fetch_add(1, Ordering::Relaxed);
        CacheError::Busy(format!("{what}; fetch these chunks elsewhere"))
    };
    let slot = cache.peer_upload_slot(peer.ip(), QUEUE_WAIT).await;
    let _slot = slot.ok_or_else(|| busy("at the upload limits"))?;
    // While this node restores a snapshot itself, it serves one peer request at a time.
    let in_progress = cache.config().peer.max_uploads.max(1) - cache.uploads.available_permits();
    // (Not while it swarms: then serving the other members is how its own restore goes fast.)
    if cache.restoring() && in_progress > 1 && cache.swarm.is_empty() {
        return Err(busy("this node is restoring a snapshot"));
    }
    let files = cache.chunk_files(&ids)?;
    let served = cache.clone();
    let (body, count, corrupt) = tokio::task::spawn_blocking(move || build_answer(&served, &ids, &files))
        .await
        .map_err(|source| CacheError::Task { what: "peer answer", source })?;
    if corrupt > 0 && !cache.peers.scrubbing.swap(true, Ordering::SeqCst) {
        // A damaged cached file: find and drop the snapshots it belongs to.
        let c = cache.clone();
        tokio::spawn(async move {
            match c.scrub().await {
                Ok(r) => tracing::warn!(corrupt = r.corrupt.len(), "scrubbed after a damaged chunk"),
                Err(e) => tracing::warn!(error = %e, "scrub after a damaged chunk failed"),
            }
            c.peers.scrubbing.store(false, Ordering::SeqCst);
        });
    }
    cache.peers.served_chunks.fetch_add(count, Ordering::Relaxed);
    cache.peers.served_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    tracing::debug!(%peer, asked = body.len(), sent = count, "served chunks to a peer");
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, media::CHUNK_BATCH)], Body::from(body)).into_response())
}

/// Reads, checks and encodes the chunks this node holds, in request order. Answers the
/// body, the chunks in it, and how many failed their check.
fn build_answer(cache: &Cache, ids: &[ChunkId], files: &[Option<ChunkPlace>]) -> (Vec<u8>, u64, u64) {
    let mut out = BATCH_MAGIC.to_vec();
    let mut open: HashMap<PathBuf, Option<File>> = HashMap::new();
    let (mut raw, mut count, mut corrupt) = (0u64, 0u64, 0u64);
    for (id, place) in ids.iter().zip(files) {
        let Some(ChunkPlace { path, offset, len, in_progress, frame }) = place else { continue };
        if raw + u64::from(*len) > MAX_ANSWER_RAW_BYTES {
            break;
        }
        if let Some(frame) = frame {
            // Held by a materialization in progress, checked on arrival: passed on as it came.
            encode_entry(&mut out, id, frame);
            raw += u64::from(*len);
            count += 1;
            continue;
        }
        let file = open.entry(path.clone()).or_insert_with(|| File::open(path).ok());
        let Some(file) = file else { continue };
        let mut data = vec![0u8; *len as usize];
        if file.read_exact_at(&mut data, *offset).is_err() {
            continue;
        }
        if ChunkId::of(&data) != *id {
            if *in_progress {
                continue; // not written yet: the asker gets it elsewhere or later
            }
            cache.peers.served_corrupt.fetch_add(1, Ordering::Relaxed);
            corrupt += 1;
            tracing::warn!(chunk = %id, path = %path.display(), offset, "a cached chunk failed its check; not serving it");
            continue;
        }
        // Read and checked every time (cheap next to compressing); compressed once.
        let known = cache.peers.frames.lock().expect("frame cache lock").get(id);
        let chunk = match known {
            Some(c) => c,
            None => {
                let c = Arc::new(EncodedChunk::compress(&data, ZSTD_LEVEL));
                cache.peers.frames.lock().expect("frame cache lock").put(*id, c.clone());
                c
            }
        };
        encode_entry(&mut out, id, &chunk);
        raw += u64::from(*len);
        count += 1;
    }
    (out, count, corrupt)
}
