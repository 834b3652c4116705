//! The filesystem backend made durable: `object_store`'s `LocalFileSystem` writes a staging
//! file and renames it into place without any fsync, so after a power loss a pack index
//! can survive while the pack it points at is empty or truncated. [`SyncedFs`] wraps it
//! and, before a write returns, fsyncs the file and then its directory (the rename), so a
//! pack is on disk before its index is written and an index before any recipe that needs
//! it (docs/DECISIONS.md D6 ordering). Deletes fsync the directory too: GC deletes a pack's
//! index before its body, and a power loss must not bring back an index whose pack is gone.
//!
//! The syncs run on the blocking pool, like the writes themselves.

use std::path::PathBuf;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};

/// `LocalFileSystem` with fsync after every write and delete (see the module docs).
#[derive(Debug)]
pub(crate) struct SyncedFs {
    inner: LocalFileSystem,
    root: PathBuf,
}

impl std::fmt::Display for SyncedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyncedFs({})", self.root.display())
    }
}

fn sync_error(path: &std::path::Path, e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "SyncedFs",
        source: format!("fsync {}: {e}", path.display()).into(),
    }
}

impl SyncedFs {
    /// Opens `root` (which must exist) as a durable object store.
    pub(crate) fn new(root: &std::path::Path) -> Result<Self> {
        let root = std::fs::canonicalize(root)
            .map_err(|e| object_store::Error::Generic { store: "SyncedFs", source: Box::new(e) })?;
        Ok(Self { inner: LocalFileSystem::new_with_prefix(&root)?, root })
    }

    fn file_of(&self, location: &Path) -> Result<PathBuf> {
        self.inner.path_to_filesystem(location)
    }

    /// fsyncs `file` (when given) and then the directory holding it, off the async threads.
    async fn sync(file: Option<PathBuf>, dir: PathBuf) -> Result<()> {
        tokio::task::spawn_blocking(move || {
            if let Some(file) = &file {
                std::fs::File::open(file).and_then(|f| f.sync_all()).map_err(|e| sync_error(file, e))?;
            }
            std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| sync_error(&dir, e))
        })
        .await
        .map_err(|e| object_store::Error::Generic { store: "SyncedFs", source: Box::new(e) })?
    }

    async fn sync_written(&self, location: &Path) -> Result<()> {
        let file = self.file_of(location)?;
        let dir = file.parent().map(ToOwned::to_owned).unwrap_or_else(|| self.root.clone());
        Self::sync(Some(file), dir).await
    }
}

#[async_trait]
impl ObjectStore for SyncedFs {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let result = self.inner.put_opts(location, payload, opts).await?;
        self.sync_written(location).await?;
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        // The registry writes every object with one PUT; a multipart upload would complete
        // without fsync, so it is refused rather than silently not durable.
        let _ = (location, opts);
        Err(object_store::Error::NotImplemented)
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_range(&self, location: &Path, range: std::ops::Range<u64>) -> Result<bytes::Bytes> {
        self.inner.get_range(location, range).await
    }

    async fn head(&self, location: &Path) -> Result<ObjectMeta> {
        self.inner.head(location).await
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        self.inner.delete(location).await?;
        let file = self.file_of(location)?;
        if let Some(dir) = file.parent().filter(|d| d.exists()) {
            Self::sync(None, dir.to_owned()).await?;
        }
        Ok(())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy(from, to).await?;
        self.sync_written(to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy_if_not_exists(from, to).await?;
        self.sync_written(to).await
    }
}
