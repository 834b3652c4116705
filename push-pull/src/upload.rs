//! Getting local files into a repository as blobs. With `_thaw`: cut and hash every file on
//! all cores, ask which chunks the registry lacks, compress and send only those in batches,
//! then commit each file by its recipe. Without it: the standard upload protocol, streamed
//! from disk. Either way a blob the repository already has is skipped (`HEAD` first).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use thaw_schema::batch::BatchWriter;
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

/// Reads and compresses `chunks` on all cores into chunk batches, sent to `tx` as they fill.
///
/// Each worker takes the next chunk, reads it into its one reused buffer and compresses it
/// straight into a batch of its own, which it sends once full: no allocation or copy per
/// chunk, and no hand-off but the finished batch. A worker's batch closes at its share of
/// the batch bounds, so the bytes waiting in batches are what one shared batch held. A
/// worker stops at its first error, and the others at their next chunk.
pub(crate) fn compress_batches(
    chunks: &[ChunkSource],
    level: i32,
    stats: &Stats,
    tx: &tokio::sync::mpsc::Sender<(Bytes, usize)>,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let workers = cpu_workers();
    let body_limit = UPLOAD_BATCH_BYTES.div_ceil(workers);
    let raw_limit = UPLOAD_BATCH_RAW_BYTES.div_ceil(workers as u64);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (next, stop) = (&next, &stop);
                s.spawn(move || {
                    let result =
                        compress_worker(chunks, next, stop, level, (body_limit, raw_limit), stats, tx);
                    if result.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        let mut first_error = Ok(());
        for h in handles {
            let r = h.join().expect("compress worker");
            if first_error.is_ok() {
                first_error = r;
            }
        }
        first_error
    })
}

/// One worker of [`compress_batches`]; `limits` are its batch's body and raw bytes.
fn compress_worker(
    chunks: &[ChunkSource],
    next: &AtomicUsize,
    stop: &AtomicBool,
    level: i32,
    (body_limit, raw_limit): (usize, u64),
    stats: &Stats,
    tx: &tokio::sync::mpsc::Sender<(Bytes, usize)>,
) -> Result<()> {
    let mut files = OpenFiles::default();
    let mut data = Vec::new();
    // Room for the bound and one more chunk (at most 4 MiB + header), so the batch is never moved.
    let capacity = body_limit + thaw_schema::MAX_CHUNK_LEN as usize + 4096;
    let mut batch = BatchWriter::with_capacity(capacity);
    let send = |batch: BatchWriter| {
        let count = batch.count();
        tx.blocking_send((Bytes::from(batch.finish()), count)).is_ok()
    };
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
        read_chunk(c, &mut files, &mut data)?;
        let payload = batch.push_compressing(&c.id, &data, level);
        stats.add(Counter::ChunksTransferred, 1);
        stats.add(Counter::ChunkRawBytes, u64::from(c.len));
        stats.add(Counter::ChunkCompressedBytes, payload as u64);
        stats.add(Counter::WorkDone, u64::from(c.len));
        if batch.len() >= body_limit || batch.raw_len() >= raw_limit {
            let full = std::mem::replace(&mut batch, BatchWriter::with_capacity(capacity));
            if !send(full) {
                stop.store(true, Ordering::Relaxed);
                return Ok(()); // the uploader stopped; its error is the one to report
            }
        }
    }
    // After another worker's error there is nothing more to send.
    if !batch.is_empty() && !stop.load(Ordering::Relaxed) {
        send(batch);
    }
    Ok(())
}

/// Reads chunk `c` into `data` (resized to it).
fn read_chunk(c: &ChunkSource, files: &mut OpenFiles, data: &mut Vec<u8>) -> Result<()> {
    let file = files.get(&c.path)?;
    data.resize(c.len as usize, 0);
    file.read_exact_at(data, c.offset).map_err(|e| Error::io("reading", c.path.as_path(), e))?;
    // Not hashed again here: the registry checks every chunk against its id before storing
    // it, and `unchanged_since_scan` catches a file written to during the push. Hashing
    // twice cost 5% of a push's CPU (D20).
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_schema::batch::parse_batch;

    #[test]
    fn compressed_batches_hold_every_chunk_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Chunks that zstd shrinks and chunks it does not (stored raw), and a short last one.
        let mut data = Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..40usize {
            let chunk: Vec<u8> = if i % 3 == 0 {
                (0..65536)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            } else {
                format!("chunk {i} ").into_bytes().into_iter().cycle().take(65536).collect()
            };
            data.extend_from_slice(&chunk);
        }
        data.extend_from_slice(b"tail");
        std::fs::write(&path, &data).unwrap();
        let path = Arc::new(path);
        let sources: Vec<ChunkSource> = data
            .chunks(65536)
            .enumerate()
            .map(|(i, c)| ChunkSource {
                id: ChunkId::of(c),
                path: path.clone(),
                offset: i as u64 * 65536,
                len: c.len() as u32,
            })
            .collect();
        let stats = Stats::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let drain = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            while let Some(b) = rx.blocking_recv() {
                bodies.push(b);
            }
            bodies
        });
        compress_batches(&sources, 1, &stats, &tx).unwrap();
        drop(tx);
        let mut seen = HashMap::new();
        for (body, count) in drain.join().unwrap() {
            let parsed = parse_batch(&body).unwrap();
            assert_eq!(parsed.len(), count);
            for (id, chunk) in parsed {
                let bytes = chunk.decode(&id).unwrap();
                assert!(seen.insert(id, bytes.len()).is_none(), "chunk {id} sent twice");
            }
        }
        assert_eq!(seen.len(), sources.len());
        let s = stats.snapshot();
        assert_eq!(s.chunks_transferred, sources.len() as u64);
        assert_eq!(s.chunk_raw_bytes_transferred, data.len() as u64);
        assert!(s.chunk_compressed_bytes_transferred < data.len() as u64);

        // A chunk that cannot be read is an error, not a short upload.
        let mut gone = sources.clone();
        gone[7].offset = data.len() as u64;
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        assert!(compress_batches(&gone, 1, &Stats::new(), &tx).is_err());
        drop(tx);
        while rx.try_recv().is_ok() {}
    }
}
