//! Writing one blob into a temporary file: from its recipe (chunks from seeds, the cache and
//! `_thaw/chunks/fetch`, zero chunks as holes) or by a plain streamed download. Either way
//! the file is checked before the caller may rename it into place: every chunk against its
//! id, and the whole file against its SHA-256 unless the manifest names the recipe itself
//! ([`FileCheck::Chain`]).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::StatusCode;
use thaw_schema::{ChunkId, Recipe, RecipeEntry, Sha256Digest};

use crate::blob::ChunkSource;
use crate::error::{Error, Result};
use crate::local::{ChunkCache, Location, OpenFiles};
use crate::registry::{is_retryable, Registry};
use crate::sink::FileSink;
use crate::stats::{Counter, Stats};
use crate::thaw_api::FileCheck;
use crate::tuning::{FETCH_BATCH_RAW_BYTES, TRANSFER_CONCURRENCY};

/// Where one blob comes from and goes to.
pub(crate) struct Target<'a> {
    pub(crate) repository: &'a str,
    pub(crate) digest: Sha256Digest,
    pub(crate) size: u64,
    pub(crate) temp: &'a Path,
    /// For messages: `file "memory" of host/repo:tag`.
    pub(crate) what: String,
    /// Whether the whole file is hashed once written (a download always is).
    pub(crate) check: FileCheck,
}

/// Writes the blob from its recipe. `local` maps chunk ids to seed locations.
pub(crate) async fn from_recipe(
    registry: &Registry,
    target: &Target<'_>,
    recipe: Recipe,
    local: Arc<HashMap<ChunkId, Location>>,
    cache: Option<ChunkCache>,
) -> Result<()> {
    from_recipe_with(registry, target, recipe, local, cache, None).await
}

/// [`from_recipe`] with a second chunk source asked for each batch before the registry;
/// chunks it does not deliver, or delivers wrong, come from the registry.
pub(crate) async fn from_recipe_with(
    registry: &Registry,
    target: &Target<'_>,
    recipe: Recipe,
    local: Arc<HashMap<ChunkId, Location>>,
    cache: Option<ChunkCache>,
    peers: Option<Arc<dyn ChunkSource>>,
) -> Result<()> {
    if recipe.size != target.size {
        return Err(Error::integrity(
            &target.what,
            format!("the recipe describes {} bytes, the manifest {}", recipe.size, target.size),
        ));
    }
    let stats = registry.stats().clone();
    stats.add(Counter::ChunksTotal, recipe.entries.len() as u64);
    stats.add(Counter::ChunksZero, recipe.entries.iter().filter(|e| e.chunk_id().is_none()).count() as u64);
    stats.add(Counter::WorkTotal, recipe.size);
    let lens: HashMap<ChunkId, u32> =
        recipe.entries.iter().filter_map(|e| e.chunk_id().map(|id| (*id, e.byte_len()))).collect();
    let cached: HashSet<ChunkId> = match &cache {
        Some(c) => lens.keys().filter(|id| !local.contains_key(id) && c.contains(id)).copied().collect(),
        None => HashSet::new(),
    };
    let remote: Vec<ChunkId> = recipe
        .distinct_chunks()
        .into_iter()
        .filter(|id| !local.contains_key(id) && !cached.contains(id))
        .collect();
    // Batches as the peer source wants them (never larger than the registry's), with as
    // many bytes in flight as registry-sized batches would have.
    let batch_raw_bytes = peers
        .as_ref()
        .map_or(FETCH_BATCH_RAW_BYTES, |p| p.batch_raw_bytes().clamp(1 << 20, FETCH_BATCH_RAW_BYTES));
    let concurrency = TRANSFER_CONCURRENCY * (FETCH_BATCH_RAW_BYTES / batch_raw_bytes) as usize;
    let mut batches: Vec<Vec<(ChunkId, u32)>> = Vec::new();
    let mut raw = 0u64;
    for id in remote {
        let len = lens[&id];
        if batches.is_empty() || raw + u64::from(len) > batch_raw_bytes {
            batches.push(Vec::new());
            raw = 0;
        }
        raw += u64::from(len);
        batches.last_mut().expect("a batch").push((id, len));
    }

    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<(ChunkId, Vec<u8>)>>(2);
    let blob = target.digest;
    let fetch_cache = cache.clone();
    let fetches = async move {
        let decoded = futures::stream::iter(batches)
            .map(|wanted| {
                let cache = fetch_cache.clone();
                let stats = stats.clone();
                let what = target.what.clone();
                let peers = peers.clone();
                async move {
                    let from_peers = match &peers {
                        Some(p) => {
                            let got = p.fetch(blob, &wanted).await;
                            let wanted = wanted.clone();
                            tokio::task::spawn_blocking(move || recheck(got, &wanted))
                                .await
                                .expect("check task")
                        }
                        None => HashMap::new(),
                    };
                    let rest: Vec<ChunkId> =
                        wanted.iter().map(|(id, _)| *id).filter(|id| !from_peers.contains_key(id)).collect();
                    let mut out = if rest.is_empty() {
                        Vec::new()
                    } else {
                        let chunks = registry.fetch_chunks(target.repository, &blob, &rest).await?;
                        tokio::task::spawn_blocking(move || {
                            decode_batch(chunks, cache.as_ref(), &stats, &what)
                        })
                        .await
                        .expect("decode task")?
                    };
                    out.extend(from_peers);
                    Ok::<_, Error>(out)
                }
            })
            .buffered(concurrency);
        futures::pin_mut!(decoded);
        while let Some(batch) = decoded.try_next().await? {
            if tx.send(batch).await.is_err() {
                break; // the writer stopped; its error is the one to report
            }
        }
        Ok::<(), Error>(())
    };
    let (path, what, stats) = (target.temp.to_owned(), target.what.clone(), registry.stats().clone());
    let check = target.check;
    let writer = tokio::task::spawn_blocking(move || {
        write_recipe(&recipe, &path, check, &local, cache.as_ref(), cached, rx, &stats, &what)
    });
    let (fetched, written) = tokio::join!(fetches, writer);
    fetched?;
    written.expect("writer task")
}

/// The chunks a [`ChunkSource`] delivered that are among those asked for, have the
/// length asked for and hash to their id; the others are dropped (the registry sends them).
fn recheck(got: Vec<(ChunkId, Vec<u8>)>, wanted: &[(ChunkId, u32)]) -> HashMap<ChunkId, Vec<u8>> {
    let lens: HashMap<ChunkId, u32> = wanted.iter().copied().collect();
    let mut out = HashMap::with_capacity(got.len());
    for (id, data) in got {
        let fits = lens.get(&id).is_some_and(|len| data.len() == *len as usize);
        if fits && ChunkId::of(&data) == id {
            out.insert(id, data);
        } else {
            tracing::warn!(chunk = %id, "a peer chunk failed its check; fetching it from the registry");
        }
    }
    out
}

fn decode_batch(
    chunks: Vec<(ChunkId, thaw_schema::frame::EncodedChunk)>,
    cache: Option<&ChunkCache>,
    stats: &Stats,
    what: &str,
) -> Result<Vec<(ChunkId, Vec<u8>)>> {
    let mut out = Vec::with_capacity(chunks.len());
    for (id, chunk) in chunks {
        let data = chunk
            .decode(&id)
            .map_err(|e| Error::integrity(format!("{what}: chunk {id} from the registry"), e.to_string()))?;
        stats.add(Counter::ChunksTransferred, 1);
        stats.add(Counter::ChunkRawBytes, data.len() as u64);
        stats.add(Counter::ChunkCompressedBytes, chunk.payload.len() as u64);
        if let Some(c) = cache {
            if let Err(e) = c.put(&id, &chunk) {
                tracing::warn!(error = %e, "could not store a chunk in the cache");
            }
        }
        out.push((id, data));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn write_recipe(
    recipe: &Recipe,
    path: &Path,
    check: FileCheck,
    local: &HashMap<ChunkId, Location>,
    cache: Option<&ChunkCache>,
    cached: HashSet<ChunkId>,
    mut rx: tokio::sync::mpsc::Receiver<Vec<(ChunkId, Vec<u8>)>>,
    stats: &Stats,
    what: &str,
) -> Result<()> {
    let mut sink = FileSink::open(path, check)?;
    let mut written: HashMap<ChunkId, u64> = HashMap::new();
    let mut pending: HashMap<ChunkId, Vec<u8>> = HashMap::new();
    let mut files = OpenFiles::default();
    for entry in &recipe.entries {
        let (len, id) = match entry {
            RecipeEntry::Zero { len } => {
                sink.append_zeros(u64::from(*len));
                stats.add(Counter::WorkDone, u64::from(*len));
                continue;
            }
            RecipeEntry::Data { len, id } => (*len, *id),
        };
        let data = if let Some(&at) = written.get(&id) {
            let mut buf = vec![0u8; len as usize];
            sink.file().read_exact_at(&mut buf, at).map_err(|e| Error::io("reading back", path, e))?;
            buf
        } else if let Some(loc) = local.get(&id) {
            stats.add(Counter::ChunksLocal, 1);
            stats.add(Counter::BytesLocal, u64::from(len));
            loc.read(&id, &mut files)?
        } else if cached.contains(&id) {
            let data = cache.expect("cached ids come from a cache").read(&id)?;
            stats.add(Counter::ChunksLocal, 1);
            stats.add(Counter::BytesLocal, u64::from(len));
            data
        } else {
            loop {
                if let Some(d) = pending.remove(&id) {
                    break d;
                }
                match rx.blocking_recv() {
                    Some(batch) => pending.extend(batch),
                    None => return Err(Error::integrity(what, format!("chunk {id} never arrived"))),
                }
            }
        };
        if data.len() != len as usize {
            return Err(Error::integrity(
                what,
                format!("chunk {id} has {} bytes, the recipe says {len}", data.len()),
            ));
        }
        written.insert(id, sink.offset());
        sink.append(&data)?;
        stats.add(Counter::WorkDone, u64::from(len));
    }
    sink.finish(recipe.size, &recipe.digest, what)
}

enum Piece {
    Data(Bytes),
    Restart,
}

/// Downloads the blob with plain `GET`s, resuming with a Range request when the answer
/// breaks off, and writes it with holes for zero blocks.
pub(crate) async fn download(registry: &Registry, target: &Target<'_>) -> Result<()> {
    let stats = registry.stats().clone();
    stats.add(Counter::WorkTotal, target.size);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(16);
    let (path, what, size, digest) =
        (target.temp.to_path_buf(), target.what.clone(), target.size, target.digest);
    let st = stats.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut sink = FileSink::open(&path, FileCheck::WholeFile)?;
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Piece::Data(b) => {
                    sink.append(&b)?;
                    st.add(Counter::WorkDone, b.len() as u64);
                }
                Piece::Restart => sink.reset()?,
            }
        }
        sink.finish(size, &digest, &what)
    });
    let fetched = fetch_pieces(registry, target, &tx).await;
    drop(tx);
    let written = writer.await.expect("writer task");
    fetched?;
    written?;
    stats.add(Counter::BlobsTransferred, 1);
    Ok(())
}

async fn fetch_pieces(
    registry: &Registry,
    target: &Target<'_>,
    tx: &tokio::sync::mpsc::Sender<Piece>,
) -> Result<()> {
    let policy = registry.transport.retry();
    let mut received = 0u64;
    let mut retries = 0u32;
    let op = format!("GET blob {}/{}@{}", registry.host(), target.repository, target.digest);
    'request: loop {
        let mut resp = match registry.blob_response(target.repository, &target.digest, received).await {
            Ok(r) => r,
            Err(e) if is_retryable(&e) && retries + 1 < policy.attempts => {
                retries += 1;
                tokio::time::sleep(policy.base_delay * (1 << retries.min(10))).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if received > 0 && resp.status() == StatusCode::OK {
            // The registry ignored the Range: start over.
            received = 0;
            if tx.send(Piece::Restart).await.is_err() {
                return Ok(()); // the writer stopped; its error is the one to report
            }
        }
        loop {
            match registry.transport.next_piece(&op, &mut resp).await {
                Ok(Some(b)) => {
                    received += b.len() as u64;
                    if received > target.size {
                        return Err(Error::integrity(
                            &target.what,
                            format!(
                                "the registry sent more than the {} bytes the manifest declares",
                                target.size
                            ),
                        ));
                    }
                    if tx.send(Piece::Data(b)).await.is_err() {
                        return Ok(()); // the writer stopped; its error is the one to report
                    }
                }
                Ok(None) if received < target.size => {
                    return Err(Error::integrity(
                        &target.what,
                        format!("the download ended after {received} of {} bytes", target.size),
                    ));
                }
                Ok(None) => return Ok(()),
                Err(Error::Transport { source, .. }) => {
                    if retries + 1 >= policy.attempts {
                        return Err(Error::integrity(
                            &target.what,
                            format!(
                                "the download broke off after {received} of {} bytes, {} times ({source})",
                                target.size,
                                retries + 1
                            ),
                        ));
                    }
                    retries += 1;
                    tokio::time::sleep(policy.base_delay * (1 << retries.min(10))).await;
                    continue 'request;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
