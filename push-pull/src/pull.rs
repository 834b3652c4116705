//! `thaw pull`: every titled layer of a manifest becomes a file in the destination
//! directory. All files are first written to temporaries and checked; only then are they
//! renamed into place, so a failed pull leaves no partial or corrupt file behind.

use std::path::{Path, PathBuf};

use serde::Serialize;
use thaw_schema::Sha256Digest;

use crate::error::{Error, Result};
use crate::local::{ChunkCache, SeedIndex};
use crate::manifest::{file_layers, ManifestDoc};
use crate::materialize::{self, Target};
use crate::reference::Reference;
use crate::registry::Registry;
use crate::sink::TempFile;
use crate::stats::{Counter, StatsSnapshot};

/// Where a pull may find chunks locally.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Seed files or directories (e.g. the previous revision's snapshot).
    pub seeds: Vec<PathBuf>,
    /// A chunk cache directory, read before fetching and filled with what was fetched.
    pub cache: Option<PathBuf>,
    /// Do not use the files already in the destination directory as seeds.
    pub no_destination_seed: bool,
}

/// One pulled file.
#[derive(Debug, Clone, Serialize)]
pub struct PulledFile {
    /// File name (layer title).
    pub title: String,
    /// Role key, for thaw layers.
    pub role: Option<&'static str>,
    /// Where it was written.
    pub path: PathBuf,
    /// Its digest.
    pub digest: Sha256Digest,
    /// Its size.
    pub size: u64,
    /// True when it was put together from a recipe (`_thaw`), false for a plain download.
    pub from_recipe: bool,
}

/// What a pull did.
#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    /// The reference pulled.
    pub reference: String,
    /// The manifest digest.
    pub digest: Sha256Digest,
    /// True when the `_thaw` fast path was used.
    pub thaw: bool,
    /// The files written.
    pub files: Vec<PulledFile>,
    /// Counters for this pull alone.
    pub stats: StatsSnapshot,
}

/// Pulls `reference` into `dest` (created if needed).
pub async fn pull(
    registry: &Registry,
    reference: &Reference,
    dest: &Path,
    options: &PullOptions,
) -> Result<PullReport> {
    let before = registry.stats().snapshot();
    let stats = registry.stats().clone();
    let repository = reference.repository();
    stats.set_phase("fetching the manifest");
    let manifest = registry.get_manifest(repository, &reference.manifest_reference()).await?;
    if ManifestDoc::is_index(&manifest.media_type) {
        return Err(Error::Snapshot(format!(
            "{reference} is an index ({}); pull one of its manifests by digest",
            manifest.media_type
        )));
    }
    let doc = ManifestDoc::parse(&manifest)?;
    let layers = file_layers(&doc, &reference.to_string())?;
    if layers.is_empty() {
        return Err(Error::Snapshot(format!("{reference} has no layers with a file name to write")));
    }
    std::fs::create_dir_all(dest).map_err(|e| Error::io("creating", dest, e))?;
    let thaw = registry.has_thaw().await?;
    let mut seeds = SeedIndex::new(&options.seeds)?;
    if !options.no_destination_seed {
        seeds.add_if_exists(dest)?;
    }
    let cache = options.cache.as_ref().map(ChunkCache::new);

    let mut done: Vec<(TempFile, PulledFile)> = Vec::new();
    for layer in layers {
        let d = &layer.descriptor;
        let what = format!("file {:?} of {reference}", layer.title);
        let temp = TempFile::create(dest, &layer.title)?;
        let target =
            Target { repository, digest: d.digest, size: d.size, temp: temp.path(), what: what.clone() };
        let recipe = if thaw { registry.recipe(repository, &d.digest).await? } else { None };
        let from_recipe = recipe.is_some();
        match recipe {
            Some(recipe) => {
                let local = if seeds.is_empty() {
                    Default::default()
                } else {
                    let (params, role) = (recipe.chunker, d.role());
                    let st = stats.clone();
                    let mut s = std::mem::take(&mut seeds);
                    let (back, index) = tokio::task::spawn_blocking(move || {
                        let index = s.index(params, role, &st);
                        (s, index)
                    })
                    .await
                    .expect("seed index task");
                    seeds = back;
                    index?
                };
                stats.set_phase(format!("pulling {}", layer.title));
                materialize::from_recipe(registry, &target, recipe, local, cache.clone()).await?;
                stats.add(Counter::BlobsTransferred, 1);
            }
            None => {
                stats.set_phase(format!("downloading {}", layer.title));
                materialize::download(registry, &target).await?;
            }
        }
        let file = PulledFile {
            path: dest.join(&layer.title),
            role: d.role().map(|r| r.key()),
            title: layer.title,
            digest: d.digest,
            size: d.size,
            from_recipe,
        };
        done.push((temp, file));
    }
    stats.set_phase("renaming into place");
    let mut files = Vec::new();
    for (temp, file) in done {
        temp.persist(&file.path)?;
        files.push(file);
    }
    if let Ok(d) = std::fs::File::open(dest) {
        let _ = d.sync_all();
    }
    Ok(PullReport {
        reference: reference.to_string(),
        digest: manifest.digest,
        thaw,
        files,
        stats: registry.stats().snapshot().since(&before),
    })
}
