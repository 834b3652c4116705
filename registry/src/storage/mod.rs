//! The registry's storage: content-addressed chunks (in packs), recipes and manifests,
//! plus per-repository links, on any `object_store` backend (filesystem by default, S3).
//!
//! Everything lives in the object store; what this process keeps in memory (the chunk
//! index) is a cache rebuilt from it, so several registries can serve one bucket.

mod cache;
mod chunks;
pub(crate) mod durable;
#[cfg(feature = "faults")]
pub(crate) mod faults;
mod fence;
pub(crate) mod gc;
mod heal;
mod index;
pub(crate) mod keys;
pub(crate) mod metrics;
mod nodes;
mod pack;

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use thaw_schema::{Recipe, Sha256Digest};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed or is unreachable.
    #[error("storage backend error: {0}")]
    Backend(#[source] object_store::Error),
    /// Stored bytes are not what they should be.
    #[error("corrupt stored object {key}: {why}")]
    Corrupt {
        /// The object's key.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// A stored chunk has another length than the recipe naming it declares: a lying
    /// recipe when it is being committed, corruption when it was committed before.
    #[error("chunk {id} is {stored} bytes long, the recipe says {declared}")]
    ChunkLength {
        /// The chunk.
        id: thaw_schema::ChunkId,
        /// Its stored (true) length.
        stored: u32,
        /// The length the recipe declares.
        declared: u32,
    },
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        Self::Backend(e)
    }
}

type Result<T> = std::result::Result<T, StoreError>;

pub use chunks::{ChunkWriter, DEFAULT_PACK_TARGET};
pub use fence::ConditionalWrites;
pub use gc::{GcOptions, GcReport, DEFAULT_GRACE, DEFAULT_REWRITE_BELOW};
pub use heal::ScrubReport;

/// Typed access to the registry's objects.
pub struct Store {
    objects: Arc<dyn ObjectStore>,
    /// Where each known chunk is stored (see `index`).
    index: RwLock<index::ChunkIndex>,
    /// Serializes index refreshes, and remembers how far they got.
    refresh: tokio::sync::Mutex<chunks::RefreshState>,
    /// Chunk writers close a pack once it holds this many bytes.
    pack_target: usize,
    /// Recently used decoded recipes (immutable: never stale).
    recipes: cache::Cache<Sha256Digest, Recipe>,
    /// The GC sweeps this process has applied to its index; commits check it after writing
    /// (docs/DECISIONS.md D26, `storage::fence`).
    fence: tokio::sync::Mutex<fence::Fence>,
    /// What the conditional-write probe found (run once, on first need).
    conditional: tokio::sync::OnceCell<fence::ConditionalWrites>,
}

/// Bytes of encoded recipes kept decoded in memory (a 2 GiB memory file in 4 KiB pages has
/// a recipe of ~8 MiB).
const RECIPE_CACHE_BYTES: usize = 64 << 20;

fn corrupt(key: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { key: key.to_string(), why: why.to_string() }
}

impl Store {
    /// Wraps an object store.
    pub fn new(objects: Arc<dyn ObjectStore>) -> Self {
        Self {
            objects,
            index: RwLock::new(index::ChunkIndex::default()),
            refresh: tokio::sync::Mutex::new(chunks::RefreshState::default()),
            pack_target: DEFAULT_PACK_TARGET,
            recipes: cache::Cache::new(RECIPE_CACHE_BYTES),
            fence: tokio::sync::Mutex::new(fence::Fence::default()),
            conditional: tokio::sync::OnceCell::new(),
        }
    }

    /// The same store closing packs at `bytes` instead of [`DEFAULT_PACK_TARGET`] (tests use
    /// tiny packs to exercise reads across many packs).
    pub fn with_pack_target(mut self, bytes: usize) -> Self {
        self.pack_target = bytes.max(1);
        self
    }

    async fn get_opt(&self, key: &Path) -> Result<Option<Bytes>> {
        match self.objects.get(key).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn exists(&self, key: &Path) -> Result<bool> {
        match self.objects.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn put(&self, key: &Path, bytes: impl Into<Bytes>) -> Result<()> {
        self.objects.put(key, PutPayload::from(bytes.into())).await?;
        Ok(())
    }

    /// Writes content-addressed bytes unless present. Repeating the write is harmless, so
    /// backends that ignore `If-None-Match` stay correct. Returns true when newly written.
    async fn put_content(&self, key: &Path, bytes: impl Into<Bytes>) -> Result<bool> {
        let bytes: Bytes = bytes.into();
        let bytes_for_retry = bytes.clone();
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.objects.put_opts(key, PutPayload::from(bytes), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            // Without conditional puts, overwriting identical content-addressed bytes is harmless.
            Err(object_store::Error::NotImplemented) => self.put(key, bytes_for_retry).await.map(|()| true),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes `key`; false when it was not there. S3 answers a DELETE of a missing key
    /// with success, so presence is asked first (deletes are rare; a race between two
    /// deletes of one key may report both as having deleted it).
    async fn delete(&self, key: &Path) -> Result<bool> {
        if !self.exists(key).await? {
            return Ok(false);
        }
        match self.objects.delete(key).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn list_keys(&self, prefix: &Path) -> Result<Vec<Path>> {
        Ok(self.objects.list(Some(prefix)).map_ok(|m| m.location).try_collect().await?)
    }

    // ---- recipes ----

    /// Stores a blob's recipe (content-addressed by the blob digest; a present one is kept).
    /// Refused with a retryable error when GC deleted or is deleting one of its chunks
    /// since the caller stored or found them (docs/DECISIONS.md D26): the sweeps are checked
    /// *after* the write, so a GC that publishes a sweep later sees this recipe in its
    /// second mark, and one that published earlier is seen here.
    pub async fn put_recipe(&self, recipe: &Recipe) -> Result<()> {
        let ids = recipe.distinct_chunks();
        if self.which_present(&ids).await?.contains(&false) {
            return Err(gc::collected(
                "a chunk of this blob is not stored (garbage-collected or corrupt); upload it again",
            ));
        }
        let bytes = recipe.encode();
        let len = bytes.len();
        self.put_content(&keys::recipe(&recipe.digest), bytes).await?;
        let fence = self.sync_sweeps().await?;
        if fence.doomed_recipe(&recipe.digest) {
            return Err(gc::collected("this blob is being garbage-collected; push it again shortly"));
        }
        drop(fence);
        if self.which_present(&ids).await?.contains(&false) {
            return Err(gc::collected("a chunk of this blob was garbage-collected during the upload"));
        }
        self.recipes.insert(recipe.digest, Arc::new(recipe.clone()), len);
        Ok(())
    }

    /// The raw recipe bytes of a blob.
    pub async fn get_recipe_bytes(&self, digest: &Sha256Digest) -> Result<Option<Bytes>> {
        self.get_opt(&keys::recipe(digest)).await
    }

    /// A blob's decoded recipe (from memory when it was used recently), shared: a request
    /// never copies a recipe, whose size grows with the blob's.
    pub async fn get_recipe(&self, digest: &Sha256Digest) -> Result<Option<Arc<Recipe>>> {
        if let Some(recipe) = self.recipes.get(digest) {
            return Ok(Some(recipe));
        }
        let key = keys::recipe(digest);
        let Some(bytes) = self.get_opt(&key).await? else { return Ok(None) };
        let recipe = Recipe::decode(&bytes).map_err(|e| corrupt(&key, e))?;
        if recipe.digest != *digest {
            return Err(corrupt(&key, "recipe describes another blob"));
        }
        let recipe = Arc::new(recipe);
        self.recipes.insert(*digest, recipe.clone(), bytes.len());
        Ok(Some(recipe))
    }

    /// True when a recipe for the digest is stored *and every chunk it names is stored*:
    /// a blob whose chunks were found corrupt (and dropped, `storage::heal`) or swept counts
    /// as absent, so pushing it again stores its chunks anew.
    pub async fn has_recipe(&self, digest: &Sha256Digest) -> Result<bool> {
        let Some(recipe) = self.get_recipe(digest).await? else { return Ok(false) };
        Ok(!self.which_present(&recipe.distinct_chunks()).await?.contains(&false))
    }

    // ---- blob links ----

    /// Makes a blob readable in `repo`. Refused with a retryable error when GC is deleting
    /// or deleted its recipe (docs/DECISIONS.md D17).
    /// The link is written first and the sweeps checked after (docs/DECISIONS.md D26): a GC
    /// publishing later sees the link in its second mark; one published earlier is seen
    /// here, and the link is taken back.
    pub async fn link_blob(&self, repo: &str, digest: &Sha256Digest, size: u64) -> Result<()> {
        let link = keys::blob_link(repo, digest);
        self.put(&link, size.to_string()).await?;
        let collected = async {
            let fence = self.sync_sweeps().await?;
            Ok(fence.doomed_recipe(digest)
                || (fence.swept_any() && !self.exists(&keys::recipe(digest)).await?))
        };
        self.keep_link_unless(&link, collected.await, "this blob was garbage-collected; upload it again")
            .await
    }

    /// After a commit wrote `link`: keeps it when the sweep check found nothing collected;
    /// otherwise, or when the check itself failed, takes the link back (a commit answered
    /// with an error must leave nothing visible) and answers the error.
    async fn keep_link_unless(&self, link: &Path, collected: Result<bool>, why: &str) -> Result<()> {
        let error = match collected {
            Ok(false) => return Ok(()),
            Ok(true) => gc::collected(why),
            Err(e) => e,
        };
        // A few tries: the store that just failed the check may fail this delete too.
        for _ in 0..3 {
            match self.objects.delete(link).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => return Err(error),
                Err(e) => tracing::warn!(%link, error = %e, "taking back a failed commit's link"),
            }
        }
        tracing::error!(%link, "a failed commit's link could not be taken back");
        Err(error)
    }

    /// The size of a blob readable in `repo`, or `None`.
    pub async fn blob_size(&self, repo: &str, digest: &Sha256Digest) -> Result<Option<u64>> {
        let key = keys::blob_link(repo, digest);
        match self.get_opt(&key).await? {
            None => Ok(None),
            Some(b) => {
                let text = std::str::from_utf8(&b).map_err(|e| corrupt(&key, e))?;
                text.trim().parse().map(Some).map_err(|e| corrupt(&key, e))
            }
        }
    }

    /// Removes a blob from `repo`. Returns false when it was not there.
    pub async fn unlink_blob(&self, repo: &str, digest: &Sha256Digest) -> Result<bool> {
        self.delete(&keys::blob_link(repo, digest)).await
    }

    // ---- manifests ----

    /// Stores manifest bytes (content-addressed).
    pub async fn put_manifest(&self, digest: &Sha256Digest, body: Bytes) -> Result<()> {
        self.put_content(&keys::manifest(digest), body).await?;
        Ok(())
    }

    /// Manifest bytes by digest, checked against the digest.
    pub async fn get_manifest(&self, digest: &Sha256Digest) -> Result<Option<Bytes>> {
        let key = keys::manifest(digest);
        let Some(body) = self.get_opt(&key).await? else { return Ok(None) };
        if Sha256Digest::of(&body) != *digest {
            return Err(corrupt(&key, "content does not match its digest"));
        }
        Ok(Some(body))
    }

    /// Makes a manifest readable in `repo`, remembering its media type.
    /// Refused with a retryable error when GC is deleting or deleted the manifest bytes.
    pub async fn link_manifest(&self, repo: &str, digest: &Sha256Digest, media_type: &str) -> Result<()> {
        let link = keys::manifest_link(repo, digest);
        self.put(&link, media_type.to_owned()).await?;
        let collected = async {
            let fence = self.sync_sweeps().await?;
            Ok(fence.doomed_manifest(digest)
                || (fence.swept_any() && !self.exists(&keys::manifest(digest)).await?))
        };
        self.keep_link_unless(&link, collected.await, "this manifest was garbage-collected; push it again")
            .await
    }

    /// The media type of a manifest readable in `repo`, or `None`.
    pub async fn manifest_media_type(&self, repo: &str, digest: &Sha256Digest) -> Result<Option<String>> {
        let key = keys::manifest_link(repo, digest);
        Ok(self.get_opt(&key).await?.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Removes a manifest from `repo`.
    pub async fn unlink_manifest(&self, repo: &str, digest: &Sha256Digest) -> Result<bool> {
        self.delete(&keys::manifest_link(repo, digest)).await
    }

    // ---- tags ----

    /// Points `tag` at a manifest.
    pub async fn set_tag(&self, repo: &str, tag: &str, digest: &Sha256Digest) -> Result<()> {
        self.put(&keys::tag(repo, tag), digest.to_string()).await
    }

    /// The manifest a tag points at.
    pub async fn get_tag(&self, repo: &str, tag: &str) -> Result<Option<Sha256Digest>> {
        let key = keys::tag(repo, tag);
        match self.get_opt(&key).await? {
            None => Ok(None),
            Some(b) => {
                let text = std::str::from_utf8(&b).map_err(|e| corrupt(&key, e))?;
                text.trim().parse().map(Some).map_err(|e| corrupt(&key, e))
            }
        }
    }

    /// Deletes a tag.
    pub async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        self.delete(&keys::tag(repo, tag)).await
    }

    /// All tags of `repo`, sorted lexically.
    pub async fn list_tags(&self, repo: &str) -> Result<Vec<String>> {
        let dir = keys::tags_dir(repo);
        let mut tags: Vec<String> =
            self.list_keys(&dir).await?.into_iter().filter_map(|k| k.filename().map(str::to_owned)).collect();
        tags.sort();
        Ok(tags)
    }

    // ---- referrers ----

    /// Records that `manifest` refers to `subject`.
    pub async fn put_referrer(
        &self,
        repo: &str,
        subject: &Sha256Digest,
        manifest: &Sha256Digest,
        descriptor: &serde_json::Value,
    ) -> Result<()> {
        let body = serde_json::to_vec(descriptor).expect("JSON value serializes");
        self.put(&keys::referrer(repo, subject, manifest), body).await
    }

    /// Descriptors of the manifests that refer to `subject`.
    pub async fn list_referrers(&self, repo: &str, subject: &Sha256Digest) -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        for key in self.list_keys(&keys::referrers_dir(repo, subject)).await? {
            if let Some(bytes) = self.get_opt(&key).await? {
                out.push(serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e))?);
            }
        }
        Ok(out)
    }

    /// Forgets a referrer.
    pub async fn delete_referrer(
        &self,
        repo: &str,
        subject: &Sha256Digest,
        manifest: &Sha256Digest,
    ) -> Result<()> {
        self.delete(&keys::referrer(repo, subject, manifest)).await.map(drop)
    }

    // ---- repositories ----

    /// True when anything (blob, manifest, tag) was ever linked into `repo`.
    pub async fn repository_exists(&self, repo: &str) -> Result<bool> {
        let mut listing = self.objects.list(Some(&keys::repository_root(repo)));
        Ok(listing.try_next().await?.is_some())
    }

    /// Every repository name, sorted.
    pub async fn list_repositories(&self) -> Result<Vec<String>> {
        let keys = self.list_keys(&Path::from(keys::REPOSITORIES)).await?;
        let mut names: Vec<String> = keys.iter().filter_map(keys::repository_of).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}
