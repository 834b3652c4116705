//! `thaw copy`: an artifact from one registry (or repository) to another, manifest bytes
//! unchanged so its digest is kept. Between two `_thaw` registries only the chunks the
//! destination lacks travel, still compressed; otherwise blobs go through a verified
//! temporary file (or memory, when small).

use bytes::Bytes;
use serde::Serialize;
use thaw_schema::batch::BatchWriter;
use thaw_schema::media::FileRole;
use thaw_schema::{ChunkId, Sha256Digest};

use crate::error::{Error, Result};
use crate::manifest::{Descriptor, ManifestDoc};
use crate::materialize::{self, Target};
use crate::reference::Reference;
use crate::registry::Registry;
use crate::sink::TempFile;
use crate::stats::{Counter, StatsSnapshot};
use crate::thaw_api::FileCheck;
use crate::tuning::FETCH_BATCH_RAW_BYTES;
use crate::upload::{upload_blobs, LocalBlob, UploadOptions};

/// Blobs up to this size are copied through memory.
const IN_MEMORY_BLOB: u64 = 4 * 1024 * 1024;

/// What a copy did.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// Source reference.
    pub source: String,
    /// Destination reference.
    pub destination: String,
    /// The manifest digest (the same at both ends).
    pub digest: Sha256Digest,
    /// Blobs the destination lacked and got.
    pub blobs_copied: usize,
    /// Blobs the destination already had.
    pub blobs_skipped: usize,
    /// Counters of the destination client for this copy (and of the source, when both
    /// clients share one `Stats`).
    pub stats: StatsSnapshot,
}

/// Copies `source` (from `src`) to `destination` (in `dst`), tagging it with the
/// destination's tag (or the source's, or by digest when neither has one).
pub async fn copy(
    src: &Registry,
    source: &Reference,
    dst: &Registry,
    destination: &Reference,
    options: &UploadOptions,
) -> Result<CopyReport> {
    let before = dst.stats().snapshot();
    let target = destination.tag().or(source.tag()).map(str::to_owned);
    let mut counts = (0usize, 0usize);
    let digest = Box::pin(copy_manifest(
        src,
        source.repository(),
        &source.manifest_reference(),
        dst,
        destination.repository(),
        target,
        options,
        &mut counts,
        0,
    ))
    .await?;
    if let Some(d) = destination.digest() {
        if d != digest {
            return Err(Error::Usage(format!("{destination} names digest {d}, but {source} is {digest}")));
        }
    }
    Ok(CopyReport {
        source: source.to_string(),
        destination: destination.to_string(),
        digest,
        blobs_copied: counts.0,
        blobs_skipped: counts.1,
        stats: dst.stats().snapshot().since(&before),
    })
}

#[allow(clippy::too_many_arguments)]
async fn copy_manifest(
    src: &Registry,
    src_repo: &str,
    reference: &str,
    dst: &Registry,
    dst_repo: &str,
    tag: Option<String>,
    options: &UploadOptions,
    counts: &mut (usize, usize),
    depth: u32,
) -> Result<Sha256Digest> {
    if depth > 4 {
        return Err(Error::Snapshot(format!("{src_repo}@{reference}: indexes nested too deeply")));
    }
    let manifest = src.get_manifest(src_repo, reference).await?;
    let doc = ManifestDoc::parse(&manifest)?;
    if ManifestDoc::is_index(&manifest.media_type) {
        for child in &doc.manifests {
            Box::pin(copy_manifest(
                src,
                src_repo,
                &child.digest.to_string(),
                dst,
                dst_repo,
                None,
                options,
                counts,
                depth + 1,
            ))
            .await?;
        }
    } else {
        for blob in doc.config.iter().chain(&doc.layers) {
            if dst.blob_exists(dst_repo, &blob.digest).await?.is_some() {
                counts.1 += 1;
                dst.stats().add(Counter::BlobsSkipped, 1);
                continue;
            }
            copy_blob(src, src_repo, dst, dst_repo, blob, options).await?;
            counts.0 += 1;
        }
    }
    let target = tag.unwrap_or_else(|| manifest.digest.to_string());
    dst.stats().set_phase("pushing the manifest");
    let pushed = dst.put_manifest(dst_repo, &target, manifest.body.clone(), &manifest.media_type).await?;
    debug_assert_eq!(pushed, manifest.digest);
    Ok(manifest.digest)
}

async fn copy_blob(
    src: &Registry,
    src_repo: &str,
    dst: &Registry,
    dst_repo: &str,
    blob: &Descriptor,
    options: &UploadOptions,
) -> Result<()> {
    let stats = dst.stats().clone();
    if src.has_thaw().await? && dst.has_thaw().await? {
        if let Some(recipe) = src.recipe(src_repo, &blob.digest).await? {
            stats.set_phase(format!("copying chunks of {}", blob.digest));
            let ids = recipe.distinct_chunks();
            let missing = dst.missing_chunks(dst_repo, &ids).await?;
            stats.add(Counter::ChunksPresent, (ids.len() - missing.len()) as u64);
            let lens: std::collections::HashMap<ChunkId, u32> =
                recipe.entries.iter().filter_map(|e| e.chunk_id().map(|id| (*id, e.byte_len()))).collect();
            let wanted: Vec<ChunkId> = ids.into_iter().filter(|id| missing.contains(id)).collect();
            let mut start = 0;
            while start < wanted.len() {
                let mut end = start;
                let mut raw = 0u64;
                while end < wanted.len()
                    && (end == start || raw + u64::from(lens[&wanted[end]]) <= FETCH_BATCH_RAW_BYTES)
                {
                    raw += u64::from(lens[&wanted[end]]);
                    end += 1;
                }
                let chunks = src.fetch_chunks(src_repo, &blob.digest, &wanted[start..end]).await?;
                let st = stats.clone();
                let body = tokio::task::spawn_blocking(move || {
                    let mut batch = BatchWriter::new();
                    for (id, chunk) in &chunks {
                        chunk.decode(id).map_err(|e| {
                            Error::integrity(format!("chunk {id} from the source"), e.to_string())
                        })?;
                        st.add(Counter::ChunksTransferred, 1);
                        st.add(Counter::ChunkRawBytes, u64::from(chunk.raw_len));
                        st.add(Counter::ChunkCompressedBytes, chunk.payload.len() as u64);
                        batch.push(id, chunk);
                    }
                    Ok::<_, Error>((batch.count(), Bytes::from(batch.finish())))
                })
                .await
                .expect("verify task")?;
                dst.upload_chunk_batch(dst_repo, body.1, body.0).await?;
                start = end;
            }
            dst.commit_recipe(dst_repo, &recipe).await?;
            stats.add(Counter::BlobsTransferred, 1);
            return Ok(());
        }
    }
    if blob.size <= IN_MEMORY_BLOB {
        let data = src.get_blob_bytes(src_repo, &blob.digest, IN_MEMORY_BLOB as usize).await?;
        dst.upload_blob_bytes(dst_repo, &blob.digest, data).await?;
        stats.add(Counter::BlobsTransferred, 1);
        return Ok(());
    }
    let temp = TempFile::create(&std::env::temp_dir(), "thaw-copy")?;
    let target = Target {
        repository: src_repo,
        digest: blob.digest,
        size: blob.size,
        temp: temp.path(),
        what: format!("blob {} of {}/{src_repo}", blob.digest, src.host()),
        check: FileCheck::WholeFile,
    };
    stats.set_phase(format!("downloading {}", blob.digest));
    materialize::download(src, &target).await?;
    let local = LocalBlob {
        path: temp.path().to_owned(),
        role: FileRole::from_media_type(&blob.media_type),
        label: blob.digest.to_string(),
    };
    let uploaded = upload_blobs(dst, dst_repo, &[local], options, &Default::default()).await?;
    if uploaded[0].digest != blob.digest {
        return Err(Error::integrity(format!("blob {}", blob.digest), "the copied file hashes differently"));
    }
    Ok(())
}
