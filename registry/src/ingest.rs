//! Turning bytes into stored chunks plus a recipe, and back.
//!
//! Chunking, hashing and compression are CPU work: they run on a blocking thread, which
//! hands compressed chunks to the async side through a bounded channel, so memory stays
//! bounded by the channel depth whatever the blob size.

use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use thaw_schema::chunker::ChunkerParams;
use thaw_schema::digest::Sha256Hasher;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::recipe::{RecipeBuilder, RecipeEntry};
use thaw_schema::{ChunkId, ErrorCode, Recipe, Sha256Digest, MAX_CHUNK_LEN};

use crate::error::ApiError;
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

impl IngestError {
    /// The answer to the client: a storage failure keeps its meaning (503 `UNAVAILABLE`
    /// when the backend is unreachable, so clients retry), a spool failure is 500 `UNKNOWN`.
    pub(crate) fn into_api(self, what: &str) -> ApiError {
        match self {
            Self::Store(e) => ApiError::from(e),
            Self::Io(e) => ApiError::new(ErrorCode::Unknown, format!("{what}: {e}")),
        }
    }
}

/// Chunks handed from the chunking thread to the writer ahead of it.
const CHANNEL_DEPTH: usize = 16;

/// Chunks, compresses and stores everything `reader` yields; returns the recipe (whose
/// digest is the SHA-256 of what was read). Nothing is linked here: the caller decides,
/// after checking the digest, whether the blob becomes visible. New chunks go into packs
/// (`ChunkWriter`); the chunk index is refreshed first, so chunks another replica stored
/// are not stored again.
pub(crate) async fn ingest<R: Read + Send + 'static>(
    store: Arc<Store>,
    reader: R,
    chunker: ChunkerParams,
    zstd_level: i32,
) -> Result<Recipe, IngestError> {
    store.refresh_index(std::time::Instant::now()).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(ChunkId, EncodedChunk)>(CHANNEL_DEPTH);
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
    let mut writer = store.chunk_writer();
    let mut write_result = Ok(());
    while let Some((id, chunk)) = rx.recv().await {
        if let Err(e) = writer.add(id, &chunk).await {
            write_result = Err(e);
            break;
        }
    }
    drop(rx);
    let recipe = producer.await.map_err(std::io::Error::other)??;
    write_result?;
    writer.finish().await?;
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

/// The entries of a recipe that overlap bytes `[start, end)` of its blob, each with the
/// part of it that lies inside, taken lazily from the shared recipe (a reader of a huge
/// blob copies nothing of its recipe).
#[derive(Clone)]
struct Pieces {
    recipe: Arc<Recipe>,
    /// Next entry to look at, and the blob offset where it starts.
    index: usize,
    offset: u64,
    start: u64,
    end: u64,
}

impl Iterator for Pieces {
    /// The entry, and the `[from, to)` of it to use.
    type Item = (RecipeEntry, usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(entry) = self.recipe.entries.get(self.index) {
            let (entry_start, entry_end) = (self.offset, self.offset + u64::from(entry.byte_len()));
            self.index += 1;
            self.offset = entry_end;
            if entry_end <= self.start {
                continue;
            }
            if entry_start >= self.end {
                self.index = self.recipe.entries.len();
                return None;
            }
            let from = self.start.saturating_sub(entry_start) as usize;
            let to = (self.end.min(entry_end) - entry_start) as usize;
            return Some((*entry, from, to));
        }
        None
    }
}

/// Streams bytes `[start, end)` of a blob from its recipe, reading (neighbouring chunks
/// together) and verifying each chunk; zero entries cost nothing. Memory is bounded by the
/// chunk reader's windows, whatever the blob's size or how often a chunk repeats.
pub(crate) fn read_range(
    store: Arc<Store>,
    recipe: Arc<Recipe>,
    start: u64,
    end: u64,
) -> BoxStream<'static, Result<Bytes, StoreError>> {
    let pieces = Pieces { recipe, index: 0, offset: 0, start, end };
    let wanted = pieces.clone().filter_map(|(entry, _, _)| match entry {
        RecipeEntry::Data { id, len } => Some((id, Some(len))),
        RecipeEntry::Zero { .. } => None,
    });
    let chunks = store.read_chunks_sized(wanted);
    futures::stream::unfold((Some(pieces), chunks), |(pieces, mut chunks)| async move {
        let mut pieces = pieces?;
        let (entry, from, to) = pieces.next()?;
        let piece = match entry {
            RecipeEntry::Zero { .. } => Ok(Bytes::from_static(&ZEROS[from..to])),
            RecipeEntry::Data { id, .. } => match chunks.try_next().await {
                Ok(Some(data)) if data.len() == entry.byte_len() as usize => Ok(data.slice(from..to)),
                Ok(Some(data)) => Err(StoreError::Corrupt {
                    key: format!("chunk {id}"),
                    why: format!("{} bytes where the recipe says {}", data.len(), entry.byte_len()),
                }),
                Ok(None) => Err(StoreError::Corrupt {
                    key: format!("chunk {id}"),
                    why: "chunk reader ended early".into(),
                }),
                Err(e) => Err(e),
            },
        };
        // After an error the stream ends: the response is cut short, never padded.
        let next = if piece.is_ok() { Some(pieces) } else { None };
        Some((piece, (next, chunks)))
    })
    .boxed()
}

/// Hashing is batched: pieces are handed to a blocking thread this many bytes at a time.
const HASH_BATCH_BYTES: usize = 16 << 20;

/// Reassembles a whole blob from its recipe and returns its SHA-256, hashing off the async
/// threads. Used to check a recipe committed through `_thaw` before linking it. Streams:
/// memory stays within the chunk reader's windows plus one hashing batch (of shared,
/// reference-counted pieces), and each distinct chunk of a window is read and decoded once,
/// so a recipe naming one chunk thousands of times costs hashing, not memory.
pub(crate) async fn digest_of_recipe(
    store: Arc<Store>,
    recipe: Arc<Recipe>,
) -> Result<Sha256Digest, StoreError> {
    let size = recipe.size;
    let mut pieces = read_range(store, recipe, 0, size);
    let mut hasher = Sha256Hasher::new();
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_bytes = 0usize;
    loop {
        let piece = pieces.try_next().await?;
        let done = piece.is_none();
        if let Some(piece) = piece {
            batch_bytes += piece.len();
            batch.push(piece);
        }
        if batch_bytes >= HASH_BATCH_BYTES || (done && !batch.is_empty()) {
            let work = std::mem::take(&mut batch);
            batch_bytes = 0;
            hasher = tokio::task::spawn_blocking(move || {
                for piece in &work {
                    hasher.update(piece);
                }
                hasher
            })
            .await
            .map_err(|e| StoreError::Corrupt { key: "-".into(), why: e.to_string() })?;
        }
        if done {
            return Ok(hasher.finish());
        }
    }
}
