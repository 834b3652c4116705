//! `thaw push`: a snapshot's files become blobs (see `upload`), the info file becomes the
//! config blob, and one OCI image manifest ties them together under the tag.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use serde::Serialize;
use thaw_schema::manifest::{canonical_json, snapshot_manifest, SnapshotFile as ManifestFile};
use thaw_schema::media::{self, FileRole};
use thaw_schema::Sha256Digest;

use crate::error::{Error, Result};
use crate::reference::Reference;
use crate::registry::Registry;
use crate::snapshot::{config_blob, SnapshotFile};
use crate::stats::StatsSnapshot;
use crate::upload::{chunks_of, upload_blobs, LocalBlob, UploadOptions, UploadedBlob};

/// How to push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Chunking and compression.
    pub upload: UploadOptions,
    /// Annotations for the manifest.
    pub annotations: HashMap<String, String>,
    /// A base revision in the same registry (typically the previous revision of the
    /// function): its chunks are known to be stored, so they are neither asked about nor
    /// sent. Its recipes are fetched instead (received bytes, not sent).
    pub base: Option<Reference>,
}

/// One pushed file.
#[derive(Debug, Clone, Serialize)]
pub struct PushedFile {
    /// Layer title (file name).
    pub title: String,
    /// Role key (`memory`, `vmstate`, `disk`, `info`).
    pub role: &'static str,
    /// What happened to its blob.
    #[serde(flatten)]
    pub blob: UploadedBlob,
}

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// The reference pushed to.
    pub reference: String,
    /// The manifest digest.
    pub digest: Sha256Digest,
    /// True when the `_thaw` fast path was used.
    pub thaw: bool,
    /// The files, in layer order.
    pub files: Vec<PushedFile>,
    /// Counters for this push alone.
    pub stats: StatsSnapshot,
}

/// Pushes the snapshot `files` to `reference` and tags it (or, for a digest reference,
/// checks that the manifest has that digest).
pub async fn push(
    registry: &Registry,
    reference: &Reference,
    files: &[SnapshotFile],
    options: &PushOptions,
) -> Result<PushReport> {
    let before = registry.stats().snapshot();
    let repository = reference.repository();
    let mut files: Vec<SnapshotFile> = files.to_vec();
    files.sort_by_key(|f| f.role);
    if files.is_empty() {
        return Err(Error::Snapshot(format!("nothing to push to {reference}: no snapshot files")));
    }
    let info = files.iter().find(|f| f.role == FileRole::Info).map(|f| f.path.as_path());
    let config = Bytes::from(config_blob(info)?);
    let blobs: Vec<LocalBlob> = files
        .iter()
        .map(|f| LocalBlob { path: f.path.clone(), role: Some(f.role), label: f.title.clone() })
        .collect();
    let known = match &options.base {
        Some(base) if base.registry() != reference.registry() => {
            return Err(Error::Usage(format!("the base {base} is not in {}'s registry", reference)))
        }
        Some(base) => {
            registry.stats().set_phase(format!("reading the base {base}"));
            chunks_of(registry, base).await?
        }
        None => Default::default(),
    };
    let uploaded = upload_blobs(registry, repository, &blobs, &options.upload, &known)
        .await
        .map_err(|e| in_push(reference, e))?;
    let config_digest = Sha256Digest::of(&config);
    if registry.blob_exists(repository, &config_digest).await?.is_none() {
        registry.upload_blob_bytes(repository, &config_digest, config.clone()).await?;
    }
    let manifest_files: Vec<ManifestFile> = files
        .iter()
        .zip(&uploaded)
        .map(|(f, u)| ManifestFile {
            role: f.role,
            title: f.title.clone(),
            digest: u.digest,
            size: u.size,
            recipe: u.recipe,
        })
        .collect();
    let manifest =
        snapshot_manifest(config_digest, config.len() as u64, &manifest_files, options.annotations.clone())
            .map_err(|e| Error::Snapshot(format!("building the manifest for {reference}: {e}")))?;
    let body = Bytes::from(canonical_json(&manifest));
    let digest = Sha256Digest::of(&body);
    let target = match (reference.tag(), reference.digest()) {
        (Some(tag), _) => tag.to_owned(),
        (None, Some(d)) if d == digest => d.to_string(),
        (None, Some(d)) => {
            return Err(Error::Usage(format!(
            "{reference} names digest {d}, but this snapshot's manifest is {digest}; push to a tag instead"
        )))
        }
        (None, None) => crate::reference::DEFAULT_TAG.to_owned(),
    };
    registry.stats().set_phase("pushing the manifest");
    let pushed = registry.put_manifest(repository, &target, body, media::OCI_MANIFEST).await?;
    if let Some(d) = reference.digest() {
        if d != pushed {
            tracing::warn!(%reference, %pushed, "pushed manifest digest differs from the reference's digest");
        }
    }
    let thaw = registry.has_thaw().await?;
    let files = files
        .into_iter()
        .zip(uploaded)
        .map(|(f, blob)| PushedFile { title: f.title, role: f.role.key(), blob })
        .collect();
    Ok(PushReport {
        reference: reference.to_string(),
        digest: pushed,
        thaw,
        files,
        stats: registry.stats().snapshot().since(&before),
    })
}

fn in_push(reference: &Reference, e: Error) -> Error {
    match e {
        Error::Snapshot(m) => Error::Snapshot(format!("pushing {reference}: {m}")),
        other => other,
    }
}

/// Reads a snapshot directory (see [`crate::snapshot::snapshot_files`]) and pushes it.
pub async fn push_dir(
    registry: &Registry,
    reference: &Reference,
    dir: &Path,
    options: &PushOptions,
) -> Result<PushReport> {
    let files = crate::snapshot::snapshot_files(Some(dir), &Default::default())?;
    push(registry, reference, &files, options).await
}
