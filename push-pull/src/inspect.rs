//! `thaw inspect`: what an artifact holds, file by file, and how well it deduplicates.

use std::collections::HashSet;

use serde::Serialize;
use thaw_schema::{ChunkId, ChunkerParams, Recipe, RecipeEntry, Sha256Digest};

use crate::error::Result;
use crate::manifest::{Descriptor, ManifestDoc};
use crate::reference::Reference;
use crate::registry::Registry;

/// The chunk structure of one blob, from its recipe.
#[derive(Debug, Clone, Serialize)]
pub struct RecipeSummary {
    /// How it was cut.
    pub chunker: ChunkerParams,
    /// Recipe entries (data and zero).
    pub chunks: usize,
    /// Distinct data chunks.
    pub distinct_chunks: usize,
    /// Zero entries.
    pub zero_chunks: usize,
    /// Bytes in zero entries (holes on disk, never stored or sent).
    pub zero_bytes: u64,
    /// Bytes of the distinct data chunks (what storing this blob alone takes, uncompressed).
    pub unique_bytes: u64,
}

impl RecipeSummary {
    fn of(recipe: &Recipe) -> Self {
        let mut seen = HashSet::new();
        let mut unique_bytes = 0;
        for e in &recipe.entries {
            if let RecipeEntry::Data { len, id } = e {
                if seen.insert(*id) {
                    unique_bytes += u64::from(*len);
                }
            }
        }
        Self {
            chunker: recipe.chunker,
            chunks: recipe.entries.len(),
            distinct_chunks: seen.len(),
            zero_chunks: recipe.entries.iter().filter(|e| e.chunk_id().is_none()).count(),
            zero_bytes: recipe.zero_bytes(),
            unique_bytes,
        }
    }
}

/// One layer (or, for an index, one child manifest).
#[derive(Debug, Clone, Serialize)]
pub struct InspectedFile {
    /// File name (title annotation), when there is one.
    pub title: Option<String>,
    /// Media type.
    pub media_type: String,
    /// Role key, for thaw layers.
    pub role: Option<&'static str>,
    /// Digest.
    pub digest: Sha256Digest,
    /// Size.
    pub size: u64,
    /// Chunk structure, when the registry has a recipe (`_thaw`).
    pub recipe: Option<RecipeSummary>,
}

/// What `inspect` found.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// The reference inspected.
    pub reference: String,
    /// Manifest digest.
    pub digest: Sha256Digest,
    /// Manifest media type.
    pub media_type: String,
    /// `artifactType`.
    pub artifact_type: Option<String>,
    /// The config descriptor.
    pub config: Option<Descriptor>,
    /// Layers, in order.
    pub files: Vec<InspectedFile>,
    /// Sum of the layer sizes.
    pub total_bytes: u64,
    /// Bytes in zero chunks over all layers with recipes.
    pub zero_bytes: u64,
    /// Bytes of the distinct data chunks over all layers with recipes (shared chunks once).
    pub unique_bytes: u64,
    /// Logical bytes of the layers with recipes divided by their unique bytes: what zero
    /// chunks and repeated chunks save, within this artifact.
    pub dedup_ratio: Option<f64>,
}

/// Inspects the manifest at `reference` and, with `_thaw`, the recipe of every layer.
pub async fn inspect(registry: &Registry, reference: &Reference) -> Result<InspectReport> {
    let repository = reference.repository();
    let manifest = registry.get_manifest(repository, &reference.manifest_reference()).await?;
    let doc = ManifestDoc::parse(&manifest)?;
    let thaw = registry.has_thaw().await?;
    let mut files = Vec::new();
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let (mut zero_bytes, mut unique_bytes, mut chunked_bytes) = (0u64, 0u64, 0u64);
    let descriptors = if ManifestDoc::is_index(&manifest.media_type) { &doc.manifests } else { &doc.layers };
    for d in descriptors {
        let recipe = if thaw && !ManifestDoc::is_index(&manifest.media_type) {
            registry.recipe(repository, &d.digest).await?
        } else {
            None
        };
        if let Some(r) = &recipe {
            chunked_bytes += r.size;
            zero_bytes += r.zero_bytes();
            for e in &r.entries {
                if let RecipeEntry::Data { len, id } = e {
                    if seen.insert(*id) {
                        unique_bytes += u64::from(*len);
                    }
                }
            }
        }
        files.push(InspectedFile {
            title: d.title().map(str::to_owned),
            media_type: d.media_type.clone(),
            role: d.role().map(|r| r.key()),
            digest: d.digest,
            size: d.size,
            recipe: recipe.as_ref().map(RecipeSummary::of),
        });
    }
    let dedup_ratio = (unique_bytes > 0).then(|| chunked_bytes as f64 / unique_bytes as f64);
    Ok(InspectReport {
        reference: reference.to_string(),
        digest: manifest.digest,
        media_type: manifest.media_type,
        artifact_type: doc.artifact_type.clone(),
        config: doc.config.clone(),
        total_bytes: files.iter().map(|f| f.size).sum(),
        files,
        zero_bytes,
        unique_bytes,
        dedup_ratio,
    })
}
