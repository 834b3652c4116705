//! Turning bytes into stored chunks plus a recipe, and back.
//!
//! Chunking, hashing and compression are CPU work: they run on a blocking thread, which
//! hands compressed chunks to the async side through a bounded channel, so memory stays
//! bounded by the channel depth whatever the blob size.

use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use thaw_schema::chunker::ChunkerParams;
use thaw_schema::digest::Sha256Hasher;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::recipe::{RecipeBuilder, RecipeEntry};
use thaw_schema::{ChunkId, Recipe, Sha256Digest, MAX_CHUNK_LEN};

use crate::storage::{Store, StoreError};

/// Why ingesting a blob failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IngestError {
    /// Reading the spooled bytes failed.
    #[error("reading upload data: {0}")]
    Io(#[from] std::io::Error),
    /// Storing chunks failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many chunk writes run at once while ingesting one blob.
const PUT_CONCURRENCY: usize = 8;

/// Chunks, compresses and stores everything `reader` yields; returns the recipe (whose
/// digest is the SHA-256 of what was read). Nothing is linked here: the caller decides,
/// after checking the digest, whether the blob becomes visible.
pub(crate) async fn ingest<R: Read + Send + 'static>(
    store: Arc<Store>,
    reader: R,
    chunker: ChunkerParams,
    zstd_level: i32,
) -> Result<Recipe, IngestError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(ChunkId, EncodedChunk)>(PUT_CONCURRENCY * 2);
    let known = store.clone();
    let producer = tokio::task::spawn_blocking(move || -> std::io::Result<Recipe> {
        let mut hasher = Sha256Hasher::new();
        let mut recipe = RecipeBuilder::new(chunker);
        let chunks =
            chunker.chunks(BufReader::with_capacity(1 << 20, reader)).map_err(std::io::Error::other)?;
        for chunk in chunks {
            let chunk = chunk?;
            hasher.update(&chunk.data);
            let len = chunk.data.len() as u32;
            if chunk.is_zero() {
                recipe.push_zero(len);
                continue;
            }
            let id = ChunkId::of(&chunk.data);
            recipe.push_data(len, id);
            if known.is_known_chunk(&id) {
                continue;
            }
            let encoded = EncodedChunk::compress(&chunk.data, zstd_level);
            if tx.blocking_send((id, encoded)).is_err() {
                // The writer side failed; its error is what the caller sees.
                break;
            }
        }
        Ok(recipe.finish(hasher.finish()))
    });
    let writes = futures::stream::poll_fn(|cx| rx.poll_recv(cx))
        .map(|(id, chunk)| {
            let store = store.clone();
            async move { store.put_chunk(&id, &chunk).await }
        })
        .buffer_unordered(PUT_CONCURRENCY)
        .try_for_each(|_| async { Ok(()) });
    let write_result = writes.await;
    let recipe = producer.await.map_err(std::io::Error::other)??;
    write_result?;
    Ok(recipe)
}

/// Ingests a spooled upload file.
pub(crate) async fn ingest_file(
    store: Arc<Store>,
    path: PathBuf,
    chunker: ChunkerParams,
    zstd_level: i32,
) -> Result<Recipe, IngestError> {
    let file = tokio::task::spawn_blocking(move || std::fs::File::open(path))
        .await
        .map_err(std::io::Error::other)??;
    ingest(store, file, chunker, zstd_level).await
}

/// Zeros for holes: a static slice, so reading a sparse blob allocates nothing for them.
static ZEROS: [u8; MAX_CHUNK_LEN as usize] = [0; MAX_CHUNK_LEN as usize];

/// How many chunk reads run ahead of the client while streaming a blob.
const READ_AHEAD: usize = 8;

/// Streams bytes `[start, end)` of a blob from its recipe, reading and verifying each chunk.
pub(crate) fn read_range(
    store: Arc<Store>,
    recipe: Arc<Recipe>,
    start: u64,
    end: u64,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send {
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    for (index, entry) in recipe.entries.iter().enumerate() {
        let len = u64::from(entry.byte_len());
        let (entry_start, entry_end) = (offset, offset + len);
        offset = entry_end;
        if entry_end <= start {
            continue;
        }
        if entry_start >= end {
            break;
        }
        let from = start.saturating_sub(entry_start) as usize;
        let to = (end.min(entry_end) - entry_start) as usize;
        pieces.push((index, from, to));
    }
    futures::stream::iter(pieces)
        .map(move |(index, from, to)| {
            let store = store.clone();
            let entry = recipe.entries[index];
            async move {
                match entry {
                    RecipeEntry::Zero { .. } => Ok(Bytes::from_static(&ZEROS[from..to])),
                    RecipeEntry::Data { id, .. } => {
                        Ok(Bytes::from(store.read_chunk(&id).await?).slice(from..to))
                    }
                }
            }
        })
        .buffered(READ_AHEAD)
}

/// Reassembles a whole blob from its recipe and returns its SHA-256, hashing off the async
/// threads. Used to check a recipe committed through `_thaw` before linking it.
pub(crate) async fn digest_of_recipe(
    store: Arc<Store>,
    recipe: Arc<Recipe>,
) -> Result<Sha256Digest, StoreError> {
    let size = recipe.size;
    let mut pieces = read_range(store, recipe, 0, size);
    let mut hasher = Sha256Hasher::new();
    while let Some(piece) = pieces.try_next().await? {
        hasher = tokio::task::spawn_blocking(move || {
            hasher.update(&piece);
            hasher
        })
        .await
        .map_err(|e| StoreError::Corrupt { key: "-".into(), why: e.to_string() })?;
    }
    Ok(hasher.finish())
}
