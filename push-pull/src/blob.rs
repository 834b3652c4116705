//! Writing single blobs for callers that keep their own chunk store (the node cache): from
//! a recipe, with chunks the caller already holds on local disk copied instead of fetched,
//! or by a plain download. Every chunk is checked against its id, and the whole file against
//! its digest unless the recipe is the one the manifest names ([`FileCheck::Chain`]), before
//! this returns `Ok`; the caller renames it into place.
//! A caller may also plug in a second chunk source tried before the registry (the node
//! cache's peers, [`ChunkSource`]); whatever it does not deliver, or delivers wrong, is
//! fetched from the registry chunk by chunk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use thaw_schema::{ChunkId, Sha256Digest};

use crate::error::{Error, Result};
use crate::local::Location;
use crate::materialize::{self, Target};
use crate::registry::Registry;
use crate::thaw_api::{FileCheck, LayerRecipe};

/// Where the caller holds one chunk's uncompressed bytes.
#[derive(Debug, Clone)]
pub struct LocalChunk {
    /// The file holding it.
    pub path: Arc<PathBuf>,
    /// Byte offset of the chunk in the file.
    pub offset: u64,
    /// Its length.
    pub len: u32,
}

/// A source of chunks tried before the registry: the node cache's peers.
///
/// `fetch` is asked for one batch of chunks of `blob` (ids with their uncompressed lengths)
/// and answers the uncompressed bytes of those it could get, in any order; it never fails (a
/// source that cannot help answers nothing). The source checks every chunk against its id
/// (`EncodedChunk::decode`) and the writer checks again: a chunk whose bytes do not hash to
/// its id, or have another length, is dropped and fetched from the registry instead.
pub trait ChunkSource: Send + Sync {
    /// Fetches what it can of `ids`.
    fn fetch<'a>(
        &'a self,
        blob: Sha256Digest,
        ids: &'a [(ChunkId, u32)],
    ) -> BoxFuture<'a, Vec<(ChunkId, Vec<u8>)>>;

    /// Uncompressed bytes of the batches the writer asks this source for, asked when each
    /// file starts. The writer keeps the same bytes in flight whatever the size (more
    /// batches of smaller ones) and writes a batch only once it is whole: a source whose
    /// chunks arrive spread over the file (a swarm) answers smaller batches, so that the
    /// writer starts on the first chunks while later ones are still coming.
    fn batch_raw_bytes(&self) -> u64 {
        crate::tuning::FETCH_BATCH_RAW_BYTES
    }
}

/// One blob to write.
#[derive(Debug, Clone, Copy)]
pub struct BlobTarget<'a> {
    /// The repository it is readable in.
    pub repository: &'a str,
    /// Its digest (sha256 of the whole file).
    pub digest: Sha256Digest,
    /// Its size.
    pub size: u64,
    /// The file to write (created or truncated); the caller owns and renames it.
    pub path: &'a Path,
}

/// Creates (or truncates) the target file and describes it for the materializer.
fn prepare<'a>(target: BlobTarget<'a>, what: &str, check: FileCheck) -> Result<Target<'a>> {
    create_empty(target.path)?;
    Ok(Target {
        repository: target.repository,
        digest: target.digest,
        size: target.size,
        temp: target.path,
        what: what.to_owned(),
        check,
    })
}

fn create_empty(path: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map(drop)
        .map_err(|e| Error::io("creating", path, e))
}

/// Writes the blob described by `recipe` to `target.path`: chunks in `local` are copied
/// from there (each checked against its id), zero chunks are left as holes, the rest are
/// fetched through the `_thaw` extension. `what` names the file in errors. Counters of
/// the registry's [`crate::Stats`] say how many bytes came from where.
pub async fn write_from_recipe(
    registry: &Registry,
    target: BlobTarget<'_>,
    recipe: LayerRecipe,
    local: HashMap<ChunkId, LocalChunk>,
    what: &str,
) -> Result<()> {
    write_from_recipe_with(registry, target, recipe, local, None, what).await
}

/// [`write_from_recipe`], asking `peers` for each batch of chunks before the registry. The
/// registry's [`crate::Stats`] count only what the registry sent; the source counts its own.
pub async fn write_from_recipe_with(
    registry: &Registry,
    target: BlobTarget<'_>,
    recipe: LayerRecipe,
    local: HashMap<ChunkId, LocalChunk>,
    peers: Option<Arc<dyn ChunkSource>>,
    what: &str,
) -> Result<()> {
    let local: HashMap<ChunkId, Location> = local
        .into_iter()
        .map(|(id, c)| (id, Location { path: c.path, offset: c.offset, len: c.len }))
        .collect();
    let t = prepare(target, what, recipe.check)?;
    materialize::from_recipe_with(registry, &t, recipe.recipe, Arc::new(local), None, peers).await
}

/// Downloads the blob whole with plain `GET`s (a registry without `_thaw`, or a blob
/// without a recipe), with zero blocks left as holes, and checks its digest.
pub async fn download(registry: &Registry, target: BlobTarget<'_>, what: &str) -> Result<()> {
    let t = prepare(target, what, FileCheck::WholeFile)?;
    materialize::download(registry, &t).await
}
