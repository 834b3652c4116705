//! Counting what the registry asks of its object store: a wrapper that implements
//! `ObjectStore` over another one and counts requests and bytes by kind.
//!
//! The counts are what an S3 bill and S3 latency are made of, so request efficiency is
//! measured here (the `s3_requests` benchmark, docs/DECISIONS.md). One call of the trait is
//! one HTTP request to S3, except that a listing counts one request per started page of
//! 1000 keys (S3's page size) and retries inside `object_store` are not seen.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result, UploadPart,
};

/// Live counters of object-store traffic.
#[derive(Debug, Default)]
pub struct StorageMetrics {
    gets: AtomicU64,
    heads: AtomicU64,
    puts: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
    copies: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// A snapshot of [`StorageMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageCounts {
    /// GET requests (whole objects and ranges).
    pub gets: u64,
    /// HEAD requests.
    pub heads: u64,
    /// PUT requests, multipart parts and multipart create/complete/abort included.
    pub puts: u64,
    /// LIST requests (one per started page of 1000 keys).
    pub lists: u64,
    /// DELETE requests.
    pub deletes: u64,
    /// COPY requests.
    pub copies: u64,
    /// Bytes received in GET bodies.
    pub bytes_read: u64,
    /// Bytes sent in PUT bodies.
    pub bytes_written: u64,
}

impl StorageCounts {
    /// All requests of any kind.
    pub fn requests(&self) -> u64 {
        self.gets + self.heads + self.puts + self.lists + self.deletes + self.copies
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &StorageCounts) -> StorageCounts {
        StorageCounts {
            gets: self.gets - earlier.gets,
            heads: self.heads - earlier.heads,
            puts: self.puts - earlier.puts,
            lists: self.lists - earlier.lists,
            deletes: self.deletes - earlier.deletes,
            copies: self.copies - earlier.copies,
            bytes_read: self.bytes_read - earlier.bytes_read,
            bytes_written: self.bytes_written - earlier.bytes_written,
        }
    }
}

impl StorageMetrics {
    /// Fresh counters at zero.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counts so far.
    pub fn snapshot(&self) -> StorageCounts {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StorageCounts {
            gets: r(&self.gets),
            heads: r(&self.heads),
            puts: r(&self.puts),
            lists: r(&self.lists),
            deletes: r(&self.deletes),
            copies: r(&self.copies),
            bytes_read: r(&self.bytes_read),
            bytes_written: r(&self.bytes_written),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

static PROCESS: LazyLock<Arc<StorageMetrics>> = LazyLock::new(StorageMetrics::new);

/// The counters of every object store this process's registries opened (through
/// `open_objects`): what `thaw-registry` asks of its storage.
pub fn process_storage_metrics() -> Arc<StorageMetrics> {
    PROCESS.clone()
}

/// An object store that counts the requests made through it.
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn ObjectStore>,
    metrics: Arc<StorageMetrics>,
}

impl Counted {
    /// Counts what goes through to `inner` into `metrics`.
    pub fn new(inner: Arc<dyn ObjectStore>, metrics: Arc<StorageMetrics>) -> Self {
        Self { inner, metrics }
    }

    fn counted_list(
        &self,
        stream: BoxStream<'static, Result<ObjectMeta>>,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let metrics = self.metrics.clone();
        StorageMetrics::add(&metrics.lists, 1);
        let mut seen = 0u64;
        stream
            .inspect(move |item| {
                if item.is_ok() {
                    seen += 1;
                    if seen % 1000 == 1 && seen > 1 {
                        StorageMetrics::add(&metrics.lists, 1);
                    }
                }
            })
            .boxed()
    }
}

impl std::fmt::Display for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counted({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Counted {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        StorageMetrics::add(&self.metrics.puts, 1);
        StorageMetrics::add(&self.metrics.bytes_written, payload.content_length() as u64);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        StorageMetrics::add(&self.metrics.puts, 1);
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(CountedUpload { inner, metrics: self.metrics.clone() }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        StorageMetrics::add(if head { &self.metrics.heads } else { &self.metrics.gets }, 1);
        let result = self.inner.get_opts(location, options).await?;
        if !head {
            StorageMetrics::add(&self.metrics.bytes_read, result.range.end - result.range.start);
        }
        Ok(result)
    }

    async fn get_range(&self, location: &Path, range: Range<u64>) -> Result<Bytes> {
        StorageMetrics::add(&self.metrics.gets, 1);
        let bytes = self.inner.get_range(location, range).await?;
        StorageMetrics::add(&self.metrics.bytes_read, bytes.len() as u64);
        Ok(bytes)
    }

    async fn head(&self, location: &Path) -> Result<ObjectMeta> {
        StorageMetrics::add(&self.metrics.heads, 1);
        self.inner.head(location).await
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        StorageMetrics::add(&self.metrics.deletes, 1);
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.counted_list(self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.counted_list(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        StorageMetrics::add(&self.metrics.lists, 1);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        StorageMetrics::add(&self.metrics.copies, 1);
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        StorageMetrics::add(&self.metrics.copies, 1);
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[derive(Debug)]
struct CountedUpload {
    inner: Box<dyn MultipartUpload>,
    metrics: Arc<StorageMetrics>,
}

#[async_trait]
impl MultipartUpload for CountedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        StorageMetrics::add(&self.metrics.puts, 1);
        StorageMetrics::add(&self.metrics.bytes_written, data.content_length() as u64);
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        StorageMetrics::add(&self.metrics.puts, 1);
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        StorageMetrics::add(&self.metrics.deletes, 1);
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn counts_requests_and_bytes() {
        let metrics = StorageMetrics::new();
        let store = Counted::new(Arc::new(InMemory::new()), metrics.clone());
        let key = Path::from("a/b");
        store.put(&key, PutPayload::from_static(b"hello world")).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap().bytes().await.unwrap().as_ref(), b"hello world");
        assert_eq!(store.get_range(&key, 0..5).await.unwrap().as_ref(), b"hello");
        store.head(&key).await.unwrap();
        let listed: Vec<_> = store.list(None).collect().await;
        assert_eq!(listed.len(), 1);
        store.delete(&key).await.unwrap();
        let c = metrics.snapshot();
        assert_eq!((c.puts, c.gets, c.heads, c.lists, c.deletes), (1, 2, 1, 1, 1));
        assert_eq!((c.bytes_written, c.bytes_read), (11, 16));
        assert_eq!(c.requests(), 6);
        assert_eq!(c.since(&c), StorageCounts::default());
    }
}
