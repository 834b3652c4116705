//! GC across replicas (docs/DECISIONS.md D26): two `Store`s over one storage stand for two
//! registry replicas. A commit on one replica while the other sweeps is either refused
//! (503, retried) or keeps its blob readable; two GC runs never overlap; a run whose lock
//! renewals fail stops before deleting more; stores that ignore conditional writes refuse
//! GC beside a serving replica. Filesystem storage (object_store's LocalFileSystem, which
//! honours `PutMode::Create` through hard links).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use thaw_registry::{Fault, Faults, Faulty, GcOptions, Op, Rule, Store};
use thaw_schema::frame::EncodedChunk;
use thaw_schema::recipe::RecipeBuilder;
use thaw_schema::{ChunkId, ChunkerParams, Recipe, Sha256Digest};

const REPO: &str = "fence/app";

/// A blob of three random 40 KiB chunks, with its chunks and recipe.
fn blob(seed: u64) -> (Vec<u8>, Vec<(ChunkId, EncodedChunk)>, Recipe) {
    let mut data = Vec::new();
    let mut chunks = Vec::new();
    let mut builder = RecipeBuilder::new(ChunkerParams::fixed(40_960));
    for i in 0..3 {
        let piece = Rng::new(seed * 10 + i).bytes(40_960);
        let id = ChunkId::of(&piece);
        builder.push_data(40_960, id);
        chunks.push((id, EncodedChunk::compress(&piece, 1)));
        data.extend_from_slice(&piece);
    }
    let recipe = builder.finish(Sha256Digest::of(&data));
    (data, chunks, recipe)
}

/// What a registry does to commit a blob whose chunks its index already knows (dedup):
/// recipe, then link.
async fn commit(store: &Store, recipe: &Recipe) -> Result<(), thaw_registry::StoreError> {
    store.put_recipe(recipe).await?;
    store.link_blob(REPO, &recipe.digest, recipe.size).await
}

async fn read_blob(store: &Arc<Store>, recipe: &Recipe) -> Result<Vec<u8>, thaw_registry::StoreError> {
    let ids: Vec<ChunkId> = recipe.distinct_chunks();
    let parts: Vec<Bytes> = store.read_chunks(ids).try_collect().await?;
    Ok(parts.concat())
}

fn local(dir: &std::path::Path) -> Arc<dyn ObjectStore> {
    Arc::new(LocalFileSystem::new_with_prefix(dir).expect("local store"))
}

/// Stores blob `seed` through `store`, links it, then unlinks it: garbage for a run with
/// no grace period, whose chunks every replica's index still knows.
async fn stored_then_unlinked(store: &Arc<Store>, seed: u64) -> (Vec<u8>, Recipe) {
    let (data, chunks, recipe) = blob(seed);
    store.store_chunks(&chunks).await.expect("store chunks");
    commit(store, &recipe).await.expect("first commit");
    assert!(store.unlink_blob(REPO, &recipe.digest).await.expect("unlink"));
    (data, recipe)
}

fn no_grace() -> GcOptions {
    GcOptions { grace: Duration::ZERO, ..Default::default() }
}

async fn wait_stalled(faults: &Faults) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while faults.stalled() == 0 {
        assert!(Instant::now() < deadline, "GC never reached its first delete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_on_another_replica_during_a_sweep_never_leaves_an_unreadable_blob() {
    let dir = tempfile::tempdir().expect("temp dir");
    let objects = local(dir.path());
    let replica_b = Arc::new(Store::new(objects.clone()));
    let (data, recipe) = stored_then_unlinked(&replica_b, 1).await;
    // A blob that stays linked, so the run has live content too.
    let (kept_data, kept_chunks, kept_recipe) = blob(2);
    replica_b.store_chunks(&kept_chunks).await.unwrap();
    commit(&replica_b, &kept_recipe).await.unwrap();

    // Replica A's GC stops at its first pack delete: marked, published, not yet deleted.
    let faults = Faults::new(1);
    faults.add(Rule::on(Op::Delete, Fault::Stall).under("chunks/").nth(1));
    let replica_a = Arc::new(Store::new(Arc::new(Faulty::new(objects.clone(), faults.clone()))));
    let gc = tokio::spawn({
        let a = replica_a.clone();
        async move { a.collect_garbage(&no_grace(), None, None).await }
    });
    while faults.stalled() == 0 {
        if gc.is_finished() {
            panic!("GC finished before its first delete: {:?}", gc.await.expect("gc task"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Replica B, whose index still knows the chunks, commits the same blob again (dedup).
    let first = commit(&replica_b, &recipe).await;
    faults.release_stalls();
    let report = gc.await.expect("gc task").expect("gc run");
    println!("{report}\nreplica B's commit during the sweep: {first:?}");
    let fresh = Arc::new(Store::new(objects.clone()));
    match first {
        Ok(()) => assert_eq!(
            read_blob(&fresh, &recipe).await.expect("a blob acknowledged during a sweep must stay readable"),
            data
        ),
        Err(e) => {
            assert!(e.to_string().contains("garbage-collected"), "refused with a retryable GC error: {e}");
            // The client retries: chunks are stored anew (B's index no longer knows them).
            let (_, chunks, _) = blob(1);
            replica_b.store_chunks(&chunks).await.expect("re-store chunks");
            commit(&replica_b, &recipe).await.expect("retried commit after the sweep");
            assert_eq!(read_blob(&fresh, &recipe).await.expect("retried blob readable"), data);
        }
    }
    assert_eq!(read_blob(&fresh, &kept_recipe).await.unwrap(), kept_data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gc_runs_never_overlap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let objects = local(dir.path());
    let writer = Arc::new(Store::new(objects.clone()));
    stored_then_unlinked(&writer, 3).await;
    let faults = Faults::new(1);
    faults.add(Rule::on(Op::Delete, Fault::Stall).under("chunks/").nth(1));
    let first = Arc::new(Store::new(Arc::new(Faulty::new(objects.clone(), faults.clone()))));
    let gc = tokio::spawn({
        let first = first.clone();
        async move { first.collect_garbage(&no_grace(), None, None).await }
    });
    wait_stalled(&faults).await;
    // A second run (another replica, or `thaw-registry gc`) while the first one sweeps.
    let second = Arc::new(Store::new(objects.clone()));
    let started = Instant::now();
    let outcome = second.collect_garbage(&no_grace(), None, None).await;
    let waited = started.elapsed();
    faults.release_stalls();
    gc.await.expect("gc task").expect("first run");
    let err = outcome.expect_err("a second GC run must not run while the first holds the lock");
    assert!(err.to_string().contains("GC lock"), "{err}");
    println!("second run refused after {waited:?}: {err}");
    // Once the first run released the lock, the next run goes ahead at once.
    let started = Instant::now();
    second.collect_garbage(&no_grace(), None, None).await.expect("run after release");
    assert!(started.elapsed() < Duration::from_secs(10), "a released lock is taken at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_whose_lock_renewals_fail_stops_before_deleting_more() {
    let dir = tempfile::tempdir().expect("temp dir");
    let objects = local(dir.path());
    let writer = Arc::new(Store::new(objects.clone()));
    let (_, recipe) = stored_then_unlinked(&writer, 4).await;
    let faults = Faults::new(1);
    faults.add(Rule::on(Op::Delete, Fault::Stall).under("chunks/").nth(1));
    let gc_store = Arc::new(Store::new(Arc::new(Faulty::new(objects.clone(), faults.clone()))));
    let gc = tokio::spawn({
        let s = gc_store.clone();
        async move { s.collect_garbage(&no_grace(), None, None).await }
    });
    wait_stalled(&faults).await;
    // The store stops accepting the lock's renewals (a partition, a stuck process): past
    // half the lock's TTL the run must not delete anything more.
    faults.add(Rule::on(Op::Put, Fault::Fail).under("gc/lock"));
    tokio::time::sleep(Duration::from_secs(16)).await;
    faults.release_stalls();
    let err = gc.await.expect("gc task").expect_err("the run must stop");
    assert!(err.to_string().contains("not renewed"), "{err}");
    let recipe_key = ObjPath::from(format!("recipes/sha256/{}", recipe.digest.hex()));
    assert!(objects.head(&recipe_key).await.is_ok(), "the recipe must not be deleted after renewals failed");
}

/// A run that dies between publishing its sweep record and deleting leaves packs it doomed
/// in the store, and one of them holds a chunk its second mark found live (a blob committed
/// again, by dedup, while the run marked). The next lock holder closes the dead run's
/// record. Replicas that applied the record while it was open, and those that apply it
/// closed, must read that blob again: before, they kept the pack forgotten for good and the
/// read failed ("referenced chunk is not stored").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pack_left_by_a_run_that_died_is_read_again_once_its_record_is_closed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let objects = local(dir.path());
    let replica_b = Arc::new(Store::new(objects.clone()));
    let (data, recipe) = stored_then_unlinked(&replica_b, 5).await;

    // Replica A's run stops before publishing its record (`publish`), then, once let go,
    // before copying the live chunks out of the doomed pack (`rescue`): there it dies.
    let publish = Faults::new(1);
    publish.add(Rule::on(Op::Put, Fault::Stall).under("gc/sweeps/").nth(1));
    let rescue = Faults::new(2);
    rescue.add(Rule::on(Op::Get, Fault::Stall).under("chunks/packs/").nth(1));
    let inner: Arc<dyn ObjectStore> = Arc::new(Faulty::new(objects.clone(), rescue.clone()));
    let replica_a = Arc::new(Store::new(Arc::new(Faulty::new(inner, publish.clone()))));
    let gc = tokio::spawn({
        let a = replica_a.clone();
        async move { a.collect_garbage(&no_grace(), None, None).await }
    });
    wait_stalled(&publish).await;
    // Marked dead by A's first mark, committed again on B before the record appears.
    commit(&replica_b, &recipe).await.expect("a commit before the record is published");
    publish.release_stalls();
    wait_stalled(&rescue).await;
    // A dies: its task is gone and its lock is no longer renewed.
    publish.add(Rule::on(Op::Put, Fault::Fail).under("gc/lock"));
    gc.abort();

    // B applies the open record with its next commit; the blob still reads (the pack is there).
    let (_, other_chunks, other) = blob(6);
    replica_b.store_chunks(&other_chunks).await.unwrap();
    commit(&replica_b, &other).await.expect("an unrelated commit");
    assert_eq!(read_blob(&replica_b, &recipe).await.expect("read while the dead run's record is open"), data);

    // The next run takes the dead holder's lock after its TTL and closes the record; the
    // blob is live, its pack stays.
    let next = Arc::new(Store::new(objects.clone()));
    next.collect_garbage(&no_grace(), None, None).await.expect("the next run");
    // B learns the record is closed with its next commit; a replica new to the store
    // applies it closed.
    let (_, third_chunks, third) = blob(7);
    replica_b.store_chunks(&third_chunks).await.unwrap();
    commit(&replica_b, &third).await.expect("a commit after the record closed");
    let newcomer = Arc::new(Store::new(objects.clone()));
    commit(&newcomer, &third).await.expect("the newcomer's first commit applies the closed record");
    for (who, store) in [("replica B", &replica_b), ("a new replica", &newcomer)] {
        let read = read_blob(store, &recipe).await;
        assert_eq!(read.unwrap_or_else(|e| panic!("{who}: the blob the dead run left must read: {e}")), data);
    }
}

/// What Garage 2.5 does with conditional writes: ignores them.
#[derive(Debug)]
struct IgnoresConditions(Arc<dyn ObjectStore>);

impl std::fmt::Display for IgnoresConditions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IgnoresConditions")
    }
}

#[async_trait]
impl ObjectStore for IgnoresConditions {
    async fn put_opts(
        &self,
        l: &ObjPath,
        p: PutPayload,
        mut o: PutOptions,
    ) -> object_store::Result<PutResult> {
        o.mode = PutMode::Overwrite;
        self.0.put_opts(l, p, o).await
    }
    async fn put_multipart_opts(
        &self,
        l: &ObjPath,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.0.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &ObjPath, o: GetOptions) -> object_store::Result<GetResult> {
        self.0.get_opts(l, o).await
    }
    async fn delete(&self, l: &ObjPath) -> object_store::Result<()> {
        self.0.delete(l).await
    }
    fn list(&self, p: Option<&ObjPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&ObjPath>) -> object_store::Result<ListResult> {
        self.0.list_with_delimiter(p).await
    }
    async fn copy(&self, f: &ObjPath, t: &ObjPath) -> object_store::Result<()> {
        self.0.copy(f, t).await
    }
    async fn copy_if_not_exists(&self, f: &ObjPath, t: &ObjPath) -> object_store::Result<()> {
        self.0.copy(f, t).await
    }
}

#[tokio::test]
async fn the_probe_finds_what_the_filesystem_honours() {
    let dir = tempfile::tempdir().expect("temp dir");
    let found = Store::new(local(dir.path())).probe_conditional_writes().await.expect("probe");
    assert!(found.create, "LocalFileSystem honours PutMode::Create (hard link): {found:?}");
    assert!(!found.update, "LocalFileSystem does not implement PutMode::Update: {found:?}");
    let ignoring = Store::new(Arc::new(IgnoresConditions(local(dir.path()))));
    let found = ignoring.probe_conditional_writes().await.expect("probe");
    assert!(!found.create && !found.update, "{found:?}");
    assert!(list_files(dir.path()).keys().all(|p| !p.starts_with("gc/probe")), "the probe cleans up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_conditional_writes_gc_refuses_beside_a_serving_replica() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("registry.log");
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let serving = BinRegistry::start(&storage, &log).await;
    let store = Arc::new(Store::new(Arc::new(IgnoresConditions(local(&storage)))));
    let err = store.collect_garbage(&no_grace(), None, None).await.expect_err("must refuse");
    assert!(err.to_string().contains("ignores conditional writes"), "{err}");
    drop(serving);
}
