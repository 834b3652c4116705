//! One storage conformance suite, run against every backend the registry supports: the
//! in-memory store, the local filesystem and S3 (a real MinIO on loopback).
//!
//! It checks what the registry relies on, through `thaw_registry::Store` where the
//! registry's semantics live, and through the raw `ObjectStore` where they come from the
//! backend: conditional writes (put-if-absent, `If-None-Match: *`; replace-if-unchanged,
//! `If-Match`), including racing writers of one key, get, ranged get, listing (including listing from an offset, which index refreshes use),
//! delete, and concurrent writers of the same content, including writers that share
//! nothing but the bucket (separate `Store`s: separate registry replicas).

mod common;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as Key;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use thaw_registry::{Counted, StorageMetrics, Store, StoreError};
use thaw_schema::chunker::ChunkerParams;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::recipe::RecipeBuilder;
use thaw_schema::{ChunkId, Sha256Digest};

use common::minio::{unique_prefix, Minio};
use common::Rng;

/// One backend under test; `objects` may be shared by several `Store`s, as one bucket is
/// by several replicas.
struct Backend {
    objects: Arc<dyn ObjectStore>,
    /// Whether the backend offers `PutMode::Update` (replace-if-unchanged).
    conditional_update: Support,
    _dir: Option<tempfile::TempDir>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Support {
    Present,
    Absent,
}

impl Backend {
    fn memory() -> Self {
        Self { objects: Arc::new(InMemory::new()), conditional_update: Support::Present, _dir: None }
    }

    fn filesystem() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let objects = LocalFileSystem::new_with_prefix(dir.path()).expect("filesystem store");
        Self { objects: Arc::new(objects), conditional_update: Support::Absent, _dir: Some(dir) }
    }

    fn s3() -> Self {
        let objects = PrefixStore::new(Minio::shared().client(), unique_prefix("conformance"));
        Self { objects: Arc::new(objects), conditional_update: Support::Present, _dir: None }
    }

    /// A store (one "replica") over this backend.
    fn store(&self) -> Arc<Store> {
        Arc::new(Store::new(self.objects.clone()))
    }

    /// A store that closes a pack every `bytes`, so reads cross many packs.
    fn store_with_packs_of(&self, bytes: usize) -> Arc<Store> {
        Arc::new(Store::new(self.objects.clone()).with_pack_target(bytes))
    }
}

fn chunks(seed: u64, n: usize) -> Vec<(ChunkId, EncodedChunk, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            // Half compressible, half random, of varied sizes.
            let len = 1000 + rng.below(60_000) as usize;
            let data = if i % 2 == 0 { vec![b'a' + (i % 26) as u8; len] } else { rng.bytes(len) };
            let id = ChunkId::of(&data);
            (id, EncodedChunk::compress(&data, 3), data)
        })
        .collect()
}

fn pairs(c: &[(ChunkId, EncodedChunk, Vec<u8>)]) -> Vec<(ChunkId, EncodedChunk)> {
    c.iter().map(|(id, e, _)| (*id, e.clone())).collect()
}

// ---------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------

/// Storing chunks that are stored is a no-op (same store) or harmless (another store that
/// has not seen them: a second copy, both readable).
async fn chunks_are_put_if_absent(b: Backend) {
    let set = chunks(1, 24);
    let store = b.store();
    assert_eq!(
        store.which_present(&set.iter().map(|c| c.0).collect::<Vec<_>>()).await.unwrap(),
        vec![false; 24]
    );
    assert_eq!(store.store_chunks(&pairs(&set)).await.unwrap(), 24, "all new the first time");
    assert_eq!(store.store_chunks(&pairs(&set)).await.unwrap(), 0, "nothing new the second time");
    // A replica that has not refreshed stores them again: allowed, and harmless.
    let other = b.store();
    other.store_chunks(&pairs(&set)).await.unwrap();
    for s in [&store, &other, &b.store()] {
        for (id, _, data) in &set {
            assert!(s.has_chunk(id).await.unwrap());
            assert_eq!(s.read_chunk(id).await.unwrap().as_ref(), data.as_slice());
        }
    }
}

/// Content-addressed objects (recipes, manifests) written twice are intact, and a second
/// create of identical content is refused as existing. (The registry also stays correct
/// on S3 servers that ignore `If-None-Match`: it repeats such writes with the same bytes.)
async fn content_writes_can_repeat(b: Backend) {
    let store = b.store();
    let body = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let digest = Sha256Digest::of(&body);
    store.put_manifest(&digest, body.clone()).await.unwrap();
    store.put_manifest(&digest, body.clone()).await.unwrap();
    assert_eq!(store.get_manifest(&digest).await.unwrap(), Some(body.clone()));

    let mut recipe = RecipeBuilder::new(ChunkerParams::fixed(4096));
    recipe.push_zero(4096);
    let recipe = recipe.finish(Sha256Digest::of(&[0u8; 4096]));
    store.put_recipe(&recipe).await.unwrap();
    store.put_recipe(&recipe).await.unwrap();
    assert_eq!(store.get_recipe(&recipe.digest).await.unwrap().as_deref(), Some(&recipe));
    assert!(store.has_recipe(&recipe.digest).await.unwrap());

    let key = Key::from("raw/put-if-absent");
    let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
    b.objects.put_opts(&key, PutPayload::from_static(b"same"), create()).await.unwrap();
    match b.objects.put_opts(&key, PutPayload::from_static(b"same"), create()).await {
        Err(object_store::Error::AlreadyExists { .. }) => {}
        other => panic!("second create of identical content: {other:?}"),
    }
    assert_eq!(b.objects.get(&key).await.unwrap().bytes().await.unwrap().as_ref(), b"same");
}

/// Put-if-absent (`PutMode::Create`, `If-None-Match: *` on S3): a create of a present key
/// is refused and changes nothing, even with other bytes; of many writers racing to create
/// one key exactly one wins and its bytes are what is stored.
async fn create_is_put_if_absent(b: Backend) {
    let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
    let key = Key::from("cond/create");
    b.objects.put_opts(&key, PutPayload::from_static(b"first"), create()).await.unwrap();
    match b.objects.put_opts(&key, PutPayload::from_static(b"second"), create()).await {
        Err(object_store::Error::AlreadyExists { .. }) => {}
        other => panic!("create of a present key with other bytes: {other:?}"),
    }
    assert_eq!(b.objects.get(&key).await.unwrap().bytes().await.unwrap().as_ref(), b"first");

    for round in 0..3 {
        let key = Key::from(format!("cond/race-{round}"));
        let writers: Vec<_> = (0..8u8)
            .map(|w| {
                let (objects, key) = (b.objects.clone(), key.clone());
                tokio::spawn(async move {
                    let body = Bytes::from(vec![w; 1000 + usize::from(w)]);
                    (w, objects.put_opts(&key, PutPayload::from(body), create()).await)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in writers {
            match t.await.expect("writer task") {
                (w, Ok(_)) => winners.push(w),
                (_, Err(object_store::Error::AlreadyExists { .. })) => {}
                (w, Err(e)) => panic!("racing create by writer {w}: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one create wins, got {winners:?}");
        let w = winners[0];
        let stored = b.objects.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(
            stored.as_ref(),
            vec![w; 1000 + usize::from(w)].as_slice(),
            "round {round}: the winner's bytes"
        );
    }
}

/// Replace-if-unchanged (`PutMode::Update`, `If-Match: <etag>` on S3), where the backend
/// offers it (the filesystem does not, and says so): an update naming the current version
/// succeeds, one naming a replaced version or an absent key is refused and changes nothing,
/// and of writers racing from one version exactly one wins.
async fn update_is_compare_and_swap(b: Backend) {
    use object_store::UpdateVersion;
    let update = |v: &object_store::PutResult| PutOptions {
        mode: PutMode::Update(UpdateVersion { e_tag: v.e_tag.clone(), version: v.version.clone() }),
        ..Default::default()
    };
    let key = Key::from("cond/update");
    let v1 = b.objects.put(&key, PutPayload::from_static(b"v1")).await.unwrap();
    let v2 = match b.objects.put_opts(&key, PutPayload::from_static(b"v2"), update(&v1)).await {
        Err(object_store::Error::NotImplemented) if b.conditional_update == Support::Absent => return,
        other => other.expect("update naming the current version"),
    };
    assert_eq!(b.objects.get(&key).await.unwrap().bytes().await.unwrap().as_ref(), b"v2");
    match b.objects.put_opts(&key, PutPayload::from_static(b"stale"), update(&v1)).await {
        Err(object_store::Error::Precondition { .. }) => {}
        other => panic!("update naming a replaced version: {other:?}"),
    }
    assert_eq!(b.objects.get(&key).await.unwrap().bytes().await.unwrap().as_ref(), b"v2");
    match b.objects.put_opts(&Key::from("cond/absent"), PutPayload::from_static(b"x"), update(&v2)).await {
        Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => {}
        other => panic!("update of an absent key: {other:?}"),
    }
    assert!(matches!(
        b.objects.head(&Key::from("cond/absent")).await,
        Err(object_store::Error::NotFound { .. })
    ));

    let writers: Vec<_> = (0..6u8)
        .map(|w| {
            let (objects, key, opts) = (b.objects.clone(), key.clone(), update(&v2));
            tokio::spawn(
                async move { (w, objects.put_opts(&key, PutPayload::from(vec![w; 64]), opts).await) },
            )
        })
        .collect();
    let mut winners = Vec::new();
    for t in writers {
        match t.await.expect("writer task") {
            (w, Ok(_)) => winners.push(w),
            (_, Err(object_store::Error::Precondition { .. })) => {}
            (w, Err(e)) => panic!("racing update by writer {w}: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one update from one version wins, got {winners:?}");
    let stored = b.objects.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(stored.as_ref(), [winners[0]; 64].as_slice());
}

/// Whole and ranged gets, absent keys, and verification of what comes back.
async fn gets_and_ranges(b: Backend) {
    let key = Key::from("raw/ranges");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    b.objects.put(&key, PutPayload::from(data.clone())).await.unwrap();
    assert_eq!(b.objects.get(&key).await.unwrap().bytes().await.unwrap().as_ref(), data.as_slice());
    for r in [0..1, 0..100_000, 99_999..100_000, 4096..70_000, 12_345..12_346] {
        let got = b.objects.get_range(&key, r.start as u64..r.end as u64).await.unwrap();
        assert_eq!(got.as_ref(), &data[r.clone()], "range {r:?}");
    }
    assert_eq!(b.objects.head(&key).await.unwrap().size, 100_000);
    assert!(matches!(
        b.objects.get(&Key::from("raw/absent")).await,
        Err(object_store::Error::NotFound { .. })
    ));
    assert!(matches!(
        b.objects.head(&Key::from("raw/absent")).await,
        Err(object_store::Error::NotFound { .. })
    ));

    // Through the store: chunks spread over many small packs, read in any order, with
    // repeats, come back verified and in request order.
    let set = chunks(2, 40);
    let store = b.store_with_packs_of(64 << 10);
    store.store_chunks(&pairs(&set)).await.unwrap();
    let mut order: Vec<usize> = (0..40).rev().collect();
    order.extend([3, 3, 17, 0, 39, 17]);
    let ids: Vec<ChunkId> = order.iter().map(|&i| set[i].0).collect();
    for reader in [store.clone(), b.store()] {
        let got: Vec<Bytes> = reader.read_chunks(ids.clone()).try_collect().await.unwrap();
        assert_eq!(got.len(), order.len());
        for (g, &i) in got.iter().zip(&order) {
            assert_eq!(g.as_ref(), set[i].2.as_slice(), "chunk {i}");
        }
        let frames: Vec<(ChunkId, EncodedChunk)> =
            reader.chunk_frames(ids.clone()).try_collect().await.unwrap();
        for ((id, frame), &i) in frames.iter().zip(&order) {
            assert_eq!((id, frame), (&set[i].0, &set[i].1));
        }
    }
    let stranger = ChunkId::of(b"never stored");
    assert_eq!(store.get_chunk(&stranger).await.unwrap(), None);
    assert!(!store.has_chunk(&stranger).await.unwrap());
    let err = store.read_chunks(vec![set[0].0, stranger]).try_collect::<Vec<_>>().await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "reading an absent chunk: {err}");

    // A manifest whose stored bytes were changed is refused, not served.
    let body = Bytes::from_static(b"manifest body");
    let digest = Sha256Digest::of(&body);
    store.put_manifest(&digest, body).await.unwrap();
    let manifest_key = Key::from(format!("manifests/sha256/{}", digest.hex()));
    b.objects.put(&manifest_key, PutPayload::from_static(b"tampered")).await.unwrap();
    assert!(matches!(store.get_manifest(&digest).await, Err(StoreError::Corrupt { .. })));
}

/// Listings: by prefix, by delimiter, from an offset (what index refreshes use), and the
/// store's sorted tag and repository lists.
async fn listings(b: Backend) {
    for k in ["l/a/1", "l/a/2", "l/b/1", "l/c", "m/x"] {
        b.objects.put(&Key::from(k), PutPayload::from_static(b"x")).await.unwrap();
    }
    let mut all: Vec<String> =
        b.objects.list(Some(&Key::from("l"))).map_ok(|m| m.location.to_string()).try_collect().await.unwrap();
    all.sort();
    assert_eq!(all, ["l/a/1", "l/a/2", "l/b/1", "l/c"]);
    let top = b.objects.list_with_delimiter(Some(&Key::from("l"))).await.unwrap();
    let mut dirs: Vec<String> = top.common_prefixes.iter().map(ToString::to_string).collect();
    dirs.sort();
    assert_eq!(dirs, ["l/a", "l/b"]);
    assert_eq!(top.objects.iter().map(|m| m.location.to_string()).collect::<Vec<_>>(), ["l/c"]);
    let mut after: Vec<String> = b
        .objects
        .list_with_offset(Some(&Key::from("l")), &Key::from("l/a/1"))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    after.sort();
    assert_eq!(after, ["l/a/2", "l/b/1", "l/c"], "list_with_offset returns keys after the offset only");

    let store = b.store();
    let d = Sha256Digest::of(b"m");
    for tag in ["v2", "latest", "v10", "v1"] {
        store.set_tag("lib/app", tag, &d).await.unwrap();
    }
    store.link_blob("lib/other", &d, 1).await.unwrap();
    assert_eq!(store.list_tags("lib/app").await.unwrap(), ["latest", "v1", "v10", "v2"]);
    assert_eq!(store.list_repositories().await.unwrap(), ["lib/app", "lib/other"]);
    assert!(store.repository_exists("lib/app").await.unwrap());
    assert!(!store.repository_exists("lib/none").await.unwrap());
    assert!(store.list_tags("lib/none").await.unwrap().is_empty());
}

/// Deletes report whether something was there, whatever the backend answers for absent
/// keys (S3 answers 204 either way).
async fn deletes(b: Backend) {
    let store = b.store();
    let d = Sha256Digest::of(b"blob");
    store.link_blob("r", &d, 4).await.unwrap();
    assert_eq!(store.blob_size("r", &d).await.unwrap(), Some(4));
    assert!(store.unlink_blob("r", &d).await.unwrap());
    assert!(!store.unlink_blob("r", &d).await.unwrap(), "second delete finds nothing");
    assert_eq!(store.blob_size("r", &d).await.unwrap(), None);
    store.set_tag("r", "t", &d).await.unwrap();
    assert!(store.delete_tag("r", "t").await.unwrap());
    assert!(!store.delete_tag("r", "t").await.unwrap());
    store.link_manifest("r", &d, "application/x").await.unwrap();
    assert!(store.unlink_manifest("r", &d).await.unwrap());
    assert!(!store.unlink_manifest("r", &d).await.unwrap());
    assert_eq!(store.manifest_media_type("r", &d).await.unwrap(), None);
}

/// Many writers of the same content at once, through one store and through separate stores
/// (replicas): every write succeeds, and every reader, including a cold one, finds every
/// chunk intact.
async fn concurrent_writers_of_the_same_content(b: Backend) {
    let set = Arc::new(chunks(3, 64));
    let shared = b.store_with_packs_of(256 << 10);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = if w % 2 == 0 { shared.clone() } else { b.store_with_packs_of(256 << 10) };
        let set = set.clone();
        tasks.push(tokio::spawn(async move {
            // Each writer in its own order, so packs interleave differently.
            let mut mine = pairs(&set);
            mine.rotate_left(w * 8);
            store.store_chunks(&mine).await.unwrap();
            let body = Bytes::from_static(b"the same manifest");
            store.put_manifest(&Sha256Digest::of(&body), body).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    let cold = b.store();
    let ids: Vec<ChunkId> = set.iter().map(|c| c.0).collect();
    assert_eq!(cold.which_present(&ids).await.unwrap(), vec![true; ids.len()]);
    let got: Vec<Bytes> = cold.read_chunks(ids).try_collect().await.unwrap();
    for (g, (_, _, data)) in got.iter().zip(set.iter()) {
        assert_eq!(g.as_ref(), data.as_slice());
    }
    let body = Bytes::from_static(b"the same manifest");
    assert_eq!(cold.get_manifest(&Sha256Digest::of(&body)).await.unwrap(), Some(body));
}

/// A replica learns of chunks another replica stored when it asks about them, and only
/// then: nothing is claimed before it is stored. Questions the index can answer cost no
/// request; a refresh costs one LIST plus one GET per pack index not seen before.
async fn replicas_see_each_others_chunks(b: Backend) {
    let a = b.store();
    let metrics = StorageMetrics::new();
    let r = Arc::new(Store::new(Arc::new(Counted::new(b.objects.clone(), metrics.clone()))));
    let set = chunks(4, 10);
    let ids: Vec<ChunkId> = set.iter().map(|c| c.0).collect();
    assert_eq!(r.which_present(&ids).await.unwrap(), vec![false; 10], "nothing stored yet");
    a.store_chunks(&pairs(&set[..5])).await.unwrap();
    assert!(!r.is_known_chunk(&ids[0]), "no I/O, no knowledge");
    let before = metrics.snapshot();
    let mut want = vec![true; 5];
    want.extend([false; 5]);
    assert_eq!(r.which_present(&ids).await.unwrap(), want);
    let cost = metrics.snapshot().since(&before);
    assert_eq!((cost.lists, cost.gets, cost.requests()), (1, 1, 2), "one LIST, one pack index GET");

    let before = metrics.snapshot();
    assert_eq!(r.which_present(&ids[..5]).await.unwrap(), vec![true; 5]);
    let stale = Instant::now() - std::time::Duration::from_secs(3600);
    r.refresh_index(stale).await.unwrap();
    assert_eq!(metrics.snapshot().since(&before).requests(), 0, "known ids and a stale refresh cost nothing");

    a.store_chunks(&pairs(&set[5..])).await.unwrap();
    assert_eq!(r.which_present(&ids).await.unwrap(), vec![true; 10]);
    let got: Vec<Bytes> = r.read_chunks(ids).try_collect().await.unwrap();
    for (g, (_, _, data)) in got.iter().zip(&set) {
        assert_eq!(g.as_ref(), data.as_slice());
    }
}

// ---------------------------------------------------------------------------
// Every backend
// ---------------------------------------------------------------------------

macro_rules! suite {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn chunks_are_put_if_absent() {
                super::chunks_are_put_if_absent(Backend::$backend()).await
            }
            #[tokio::test]
            async fn content_writes_can_repeat() {
                super::content_writes_can_repeat(Backend::$backend()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn create_is_put_if_absent() {
                super::create_is_put_if_absent(Backend::$backend()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn update_is_compare_and_swap() {
                super::update_is_compare_and_swap(Backend::$backend()).await
            }
            #[tokio::test]
            async fn gets_and_ranges() {
                super::gets_and_ranges(Backend::$backend()).await
            }
            #[tokio::test]
            async fn listings() {
                super::listings(Backend::$backend()).await
            }
            #[tokio::test]
            async fn deletes() {
                super::deletes(Backend::$backend()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_writers_of_the_same_content() {
                super::concurrent_writers_of_the_same_content(Backend::$backend()).await
            }
            #[tokio::test]
            async fn replicas_see_each_others_chunks() {
                super::replicas_see_each_others_chunks(Backend::$backend()).await
            }
        }
    };
}

suite!(memory);
suite!(filesystem);
suite!(s3);
