//! `thaw pull`: every titled layer of a manifest becomes a file in the destination
//! directory. All files are first written to temporaries and checked; only then are they
//! renamed into place, so a failed pull leaves no partial or corrupt file behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use thaw_schema::{ChunkId, Recipe, Sha256Digest};

use crate::error::{Error, Result};
use crate::local::{ChunkCache, Location, SeedIndex};
use crate::manifest::{file_layers, ManifestDoc};
use crate::materialize::{self, Target};
use crate::reference::Reference;
use crate::registry::Registry;
use crate::sink::TempFile;
use crate::stats::{Counter, StatsSnapshot};
use crate::thaw_api::{FileCheck, LayerRecipe};

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
    /// True when its recipe was the one the manifest names, so the file was proven chunk
    /// by chunk and not hashed whole ([`crate::FileCheck::Chain`]).
    pub verified_by_chain: bool,
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

/// One file of a pull: where it is written, what the report says of it, and its recipe
/// with the chunks held locally (until its write starts), or `None` for a plain download.
struct Job {
    temp: TempFile,
    file: PulledFile,
    source: Option<(Recipe, Arc<HashMap<ChunkId, Location>>)>,
    check: FileCheck,
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

    // Each file's recipe and local chunks first; then every file is written at once (the
    // memory file's chunks are decoded and written while the disk's are, on all cores).
    let recipes = if thaw {
        registry.layer_recipes(repository, layers.iter().map(|l| &l.descriptor)).await?
    } else {
        vec![None; layers.len()]
    };
    let mut jobs: Vec<Job> = Vec::new();
    for (layer, recipe) in layers.into_iter().zip(recipes) {
        let d = &layer.descriptor;
        let temp = TempFile::create(dest, &layer.title)?;
        let check = recipe.as_ref().map_or(FileCheck::WholeFile, |r| r.check);
        let source = match recipe {
            Some(LayerRecipe { recipe, .. }) => {
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
                Some((recipe, local))
            }
            None => None,
        };
        let file = PulledFile {
            path: dest.join(&layer.title),
            role: d.role().map(|r| r.key()),
            digest: d.digest,
            size: d.size,
            from_recipe: source.is_some(),
            verified_by_chain: check == FileCheck::Chain,
            title: layer.title,
        };
        jobs.push(Job { temp, file, source, check });
    }
    stats.set_phase(format!("pulling {} files", jobs.len()));
    let writes = jobs.iter_mut().map(|job| {
        let cache = cache.clone();
        let stats = stats.clone();
        async move {
            let target = Target {
                repository,
                digest: job.file.digest,
                size: job.file.size,
                temp: job.temp.path(),
                what: format!("file {:?} of {reference}", job.file.title),
                check: job.check,
            };
            match job.source.take() {
                Some((recipe, local)) => {
                    materialize::from_recipe(registry, &target, recipe, local, cache).await?;
                    stats.add(Counter::BlobsTransferred, 1);
                }
                None => materialize::download(registry, &target).await?,
            }
            Ok::<(), Error>(())
        }
    });
    futures::future::try_join_all(writes).await?;
    let done: Vec<(TempFile, PulledFile)> = jobs.into_iter().map(|j| (j.temp, j.file)).collect();
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
