//! Getting local files into a repository as blobs. With `_thaw`: cut and hash every file on
//! all cores, ask which chunks the registry lacks, compress and send only those in batches,
//! then commit each file by its recipe. Without it: the standard upload protocol, streamed
//! from disk. Either way a blob the repository already has is skipped (`HEAD` first).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use thaw_schema::batch::BatchWriter;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::media::FileRole;
use thaw_schema::{ChunkId, ChunkerParams, ErrorCode, Sha256Digest};

use crate::error::{Error, RegistryCode, Result};
use crate::local::OpenFiles;
use crate::registry::{sha256_of_file, Registry};
use crate::scan::{scan_file, Scan};
use crate::stats::{Counter, Stats};
use crate::tuning::{
    chunker_for, cpu_workers, TRANSFER_CONCURRENCY, UPLOAD_BATCH_BYTES, UPLOAD_BATCH_RAW_BYTES, ZSTD_LEVEL,
};

/// How files are cut and compressed on the way up.
#[derive(Debug, Clone, Copy)]
pub struct UploadOptions {
    /// zstd level.
    pub zstd_level: i32,
    /// One chunker for every file, instead of the per-role choice in `tuning`.
    pub chunker: Option<ChunkerParams>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self { zstd_level: ZSTD_LEVEL, chunker: None }
    }
}

/// A local file to make into a blob.
#[derive(Debug, Clone)]
pub(crate) struct LocalBlob {
    pub(crate) path: PathBuf,
    pub(crate) role: Option<FileRole>,
    /// Name for messages.
    pub(crate) label: String,
}

/// What happened to one blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UploadedBlob {
    /// Its digest.
    pub digest: Sha256Digest,
    /// Its size.
    pub size: u64,
    /// Chunks in its recipe (0 on the plain path).
    pub chunks: usize,
    /// Of those, zero chunks.
    pub zero_chunks: usize,
    /// True when the repository already had it and nothing was sent.
    pub skipped: bool,
    /// The digest of its recipe's encoding, when the registry keeps the blob by exactly the
    /// recipe cut here: what the layer's `dev.thaw.recipe` annotation names. `None` on the
    /// plain path, or when the registry already kept the blob by another recipe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipe: Option<Sha256Digest>,
}

/// Uploads `blobs` into `repository`, in order; returns one entry per blob. `known` are
/// chunks known to be stored already (those of a base revision): they are neither asked
/// about nor sent.
pub(crate) async fn upload_blobs(
    registry: &Registry,
    repository: &str,
    blobs: &[LocalBlob],
    options: &UploadOptions,
    known: &HashSet<ChunkId>,
) -> Result<Vec<UploadedBlob>> {
    if registry.has_thaw().await? {
        upload_thaw(registry, repository, blobs, options, known).await
    } else {
        upload_plain(registry, repository, blobs).await
    }
}

async fn upload_plain(
    registry: &Registry,
    repository: &str,
    blobs: &[LocalBlob],
) -> Result<Vec<UploadedBlob>> {
    let stats = registry.stats().clone();
    let mut out = Vec::new();
    for blob in blobs {
        stats.set_phase(format!("hashing {}", blob.label));
        let path = blob.path.clone();
        let (digest, size) =
            tokio::task::spawn_blocking(move || sha256_of_file(&path)).await.expect("hash task")?;
        let skipped = registry.blob_exists(repository, &digest).await?.is_some();
        if skipped {
            stats.add(Counter::BlobsSkipped, 1);
        } else {
            stats.set_phase(format!("uploading {}", blob.label));
            stats.add(Counter::WorkTotal, size);
            registry.upload_blob_file(repository, &digest, blob.path.clone(), size).await?;
            stats.add(Counter::WorkDone, size);
            stats.add(Counter::BlobsTransferred, 1);
        }
        out.push(UploadedBlob { digest, size, chunks: 0, zero_chunks: 0, skipped, recipe: None });
    }
    Ok(out)
}

async fn upload_thaw(
    registry: &Registry,
    repository: &str,
    blobs: &[LocalBlob],
    options: &UploadOptions,
    known: &HashSet<ChunkId>,
) -> Result<Vec<UploadedBlob>> {
    let stats = registry.stats().clone();
    let mut scans: Vec<Scan> = Vec::new();
    let mut versions: Vec<FileVersion> = Vec::new();
    for blob in blobs {
        let params = options.chunker.unwrap_or_else(|| chunker_for(blob.role));
        let size = std::fs::metadata(&blob.path).map_err(|e| Error::io("reading", &blob.path, e))?.len();
        stats.set_phase(format!("hashing {}", blob.label));
        stats.add(Counter::WorkTotal, size);
        let (path, st) = (blob.path.clone(), stats.clone());
        let before = FileVersion::of(&blob.path)?;
        let scan = tokio::task::spawn_blocking(move || scan_file(&path, params, true, &st))
            .await
            .expect("scan task")?;
        scans.push(scan);
        versions.push(before);
    }
    let mut skipped = Vec::new();
    for scan in &scans {
        let digest = scan.sha256.expect("scanned with SHA-256");
        skipped.push(registry.blob_exists(repository, &digest).await?.is_some());
    }
    // Every distinct chunk of the blobs to send, where to read it.
    let mut sources: HashMap<ChunkId, ChunkSource> = HashMap::new();
    let mut order: Vec<ChunkId> = Vec::new();
    for ((blob, scan), skip) in blobs.iter().zip(&scans).zip(&skipped) {
        if *skip {
            stats.add(Counter::BlobsSkipped, 1);
            continue;
        }
        let path = Arc::new(blob.path.clone());
        stats.add(Counter::ChunksTotal, scan.chunks.len() as u64);
        for c in &scan.chunks {
            let Some(id) = c.id else {
                stats.add(Counter::ChunksZero, 1);
                continue;
            };
            sources.entry(id).or_insert_with(|| {
                order.push(id);
                ChunkSource { id, path: path.clone(), offset: c.offset, len: c.len }
            });
        }
    }
    let unknown: Vec<ChunkId> = order.iter().filter(|id| !known.contains(id)).copied().collect();
    stats.add(Counter::ChunksPresent, (order.len() - unknown.len()) as u64);
    send_missing(registry, repository, &unknown, &sources, options.zstd_level).await?;
    for (blob, before) in blobs.iter().zip(&versions) {
        if FileVersion::of(&blob.path)? != *before {
            return Err(Error::integrity(
                blob.path.display().to_string(),
                "the file changed while it was being pushed; push again once it is final".to_string(),
            ));
        }
    }
    let mut out = Vec::new();
    for ((blob, scan), skip) in blobs.iter().zip(&scans).zip(skipped) {
        let recipe = scan.recipe();
        let held = if skip {
            registry.held_recipe_digest(repository, &recipe.digest).await?
        } else {
            stats.set_phase(format!("committing {}", blob.label));
            let held = match registry.commit_recipe(repository, &recipe).await {
                Err(Error::Registry { code: Some(RegistryCode::Spec(ErrorCode::BlobUnknown)), .. })
                    if !known.is_empty() =>
                {
                    // A chunk of the base went away (its manifest was deleted and collected):
                    // ask about this blob's chunks after all, send what is missing, commit again.
                    tracing::warn!(blob = %blob.label, "base revision chunks are gone; checking every chunk");
                    let ids: Vec<ChunkId> =
                        recipe.distinct_chunks().into_iter().filter(|id| known.contains(id)).collect();
                    send_missing(registry, repository, &ids, &sources, options.zstd_level).await?;
                    registry.commit_recipe(repository, &recipe).await?
                }
                other => other?,
            };
            stats.add(Counter::BlobsTransferred, 1);
            held
        };
        let cut_here = recipe.encoded_digest();
        if held.is_some_and(|h| h != cut_here) {
            tracing::info!(
                blob = %blob.label,
                "the registry keeps this blob by a recipe of its own; its layer gets no recipe annotation, so pulls verify the whole file"
            );
        }
        out.push(UploadedBlob {
            digest: recipe.digest,
            size: scan.size,
            chunks: scan.chunks.len(),
            zero_chunks: scan.chunks.iter().filter(|c| c.id.is_none()).count(),
            skipped: skip,
            recipe: held.filter(|h| *h == cut_here),
        });
    }
    Ok(out)
}

/// Asks which of `ids` the registry lacks and sends those.
async fn send_missing(
    registry: &Registry,
    repository: &str,
    ids: &[ChunkId],
    sources: &HashMap<ChunkId, ChunkSource>,
    level: i32,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let stats = registry.stats();
    stats.set_phase("asking which chunks are missing");
    let missing = registry.missing_chunks(repository, ids).await?;
    stats.add(Counter::ChunksPresent, (ids.len() - missing.len()) as u64);
    let to_send: Vec<ChunkSource> =
        ids.iter().filter(|id| missing.contains(id)).map(|id| sources[id].clone()).collect();
    stats.add(Counter::WorkTotal, to_send.iter().map(|s| u64::from(s.len)).sum());
    stats.set_phase(format!("uploading {} chunks", to_send.len()));
    send_chunks(registry, repository, to_send, level).await
}

/// The distinct data chunks of every layer of `reference`'s manifest that has a recipe:
/// chunks the registry keeps as long as that manifest exists.
pub(crate) async fn chunks_of(registry: &Registry, reference: &crate::Reference) -> Result<HashSet<ChunkId>> {
    let repository = reference.repository();
    let manifest = registry.get_manifest(repository, &reference.manifest_reference()).await?;
    let doc = crate::manifest::ManifestDoc::parse(&manifest)?;
    let mut ids = HashSet::new();
    if registry.has_thaw().await? {
        for layer in &doc.layers {
            if let Some(recipe) = registry.recipe(repository, &layer.digest).await? {
                ids.extend(recipe.entries.iter().filter_map(|e| e.chunk_id().copied()));
            }
        }
    }
    Ok(ids)
}

/// Size and modification time of a file: what tells that it was written to during a push.
#[derive(Debug, PartialEq, Eq)]
struct FileVersion {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileVersion {
    fn of(path: &std::path::Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io("reading", path, e))?;
        Ok(Self { len: meta.len(), modified: meta.modified().ok() })
    }
}

/// A chunk to send, and where its bytes are.
#[derive(Debug, Clone)]
pub(crate) struct ChunkSource {
    pub(crate) id: ChunkId,
    pub(crate) path: Arc<PathBuf>,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// Reads and compresses `chunks` on all cores and uploads them in batches, a few
/// batches in flight. Memory stays bounded: the workers block while batches wait.
pub(crate) async fn send_chunks(
    registry: &Registry,
    repository: &str,
    chunks: Vec<ChunkSource>,
    level: i32,
) -> Result<()> {
    let stats = registry.stats().clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Bytes, usize)>(2);
    let producer = tokio::task::spawn_blocking(move || compress_batches(&chunks, level, &stats, &tx));
    let uploads = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|(body, count)| registry.upload_chunk_batch(repository, body, count))
        .buffer_unordered(TRANSFER_CONCURRENCY)
        .try_for_each(|_| async { Ok(()) })
        .await;
    let produced = producer.await.expect("compression task");
    uploads?;
    produced
}

/// A compress worker hands its results over once they hold this many uncompressed bytes.
const COMPRESS_HANDOFF_BYTES: usize = 1024 * 1024;

pub(crate) fn compress_batches(
    chunks: &[ChunkSource],
    level: i32,
    stats: &Stats,
    tx: &tokio::sync::mpsc::Sender<(Bytes, usize)>,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let workers = cpu_workers();
    // Workers hand results over about 1 MiB at a time: one hand-off per chunk cost a fifth
    // of the CPU in wake-ups (D20). A worker stops at its first error.
    let (done_tx, done_rx) = mpsc::sync_channel::<Vec<Result<(ChunkId, EncodedChunk)>>>(workers * 2);
    std::thread::scope(|s| {
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let (next, stop) = (&next, &stop);
            s.spawn(move || {
                let mut files = OpenFiles::default();
                let mut results = Vec::new();
                let mut results_bytes = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let Some(c) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    let result =
                        read_chunk(c, &mut files).map(|data| (c.id, EncodedChunk::compress(&data, level)));
                    let failed = result.is_err();
                    results.push(result);
                    results_bytes += c.len as usize;
                    if failed || results_bytes >= COMPRESS_HANDOFF_BYTES {
                        results_bytes = 0;
                        if done_tx.send(std::mem::take(&mut results)).is_err() || failed {
                            return;
                        }
                    }
                }
                if !results.is_empty() {
                    let _ = done_tx.send(results);
                }
            });
        }
        drop(done_tx);
        let result = (|| {
            let mut batch = BatchWriter::new();
            for item in done_rx.iter().flatten() {
                let (id, chunk) = item?;
                stats.add(Counter::ChunksTransferred, 1);
                stats.add(Counter::ChunkRawBytes, u64::from(chunk.raw_len));
                stats.add(Counter::ChunkCompressedBytes, chunk.payload.len() as u64);
                stats.add(Counter::WorkDone, u64::from(chunk.raw_len));
                batch.push(&id, &chunk);
                if batch.len() >= UPLOAD_BATCH_BYTES || batch.raw_len() >= UPLOAD_BATCH_RAW_BYTES {
                    let full = std::mem::take(&mut batch);
                    let count = full.count();
                    if tx.blocking_send((Bytes::from(full.finish()), count)).is_err() {
                        return Ok(()); // the uploader stopped; its error is the one to report
                    }
                }
            }
            if !batch.is_empty() {
                let count = batch.count();
                let _ = tx.blocking_send((Bytes::from(batch.finish()), count));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        drop(done_rx);
        result
    })
}

fn read_chunk(c: &ChunkSource, files: &mut OpenFiles) -> Result<Vec<u8>> {
    let file = files.get(&c.path)?;
    let mut data = vec![0u8; c.len as usize];
    file.read_exact_at(&mut data, c.offset).map_err(|e| Error::io("reading", c.path.as_path(), e))?;
    // Not hashed again here: the registry checks every chunk against its id before storing
    // it, and `unchanged_since_scan` catches a file written to during the push. Hashing
    // twice cost 5% of a push's CPU (D20).
    Ok(data)
}
