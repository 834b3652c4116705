//! A lying registry (raw HTTP over a TcpListener, so every byte is under the test's
//! control) must make pull or push fail with a clear error, and never leave a partial or
//! corrupt file at the destination: the file already there stays as it was, and no
//! temporary file is left behind.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use thaw_client::{Error, PullOptions, PushOptions, Reference};
use thaw_schema::batch::BatchWriter;
use thaw_schema::dto::FetchChunksRequest;
use thaw_schema::frame::EncodedChunk;
use thaw_schema::manifest::{snapshot_manifest, SnapshotFile};
use thaw_schema::media::FileRole;
use thaw_schema::recipe::RecipeBuilder;
use thaw_schema::{ChunkId, ChunkerParams, Sha256Digest};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lie {
    /// Docker-Content-Digest of the manifest is another digest.
    ManifestDigestHeader,
    /// The blob has one byte changed.
    BlobWrongContent,
    /// Content-Length says the whole blob, the connection closes halfway.
    BlobTruncated,
    /// A fetched chunk's bytes are not those of its id.
    ChunkMismatch,
    /// Content-Length says the whole batch, the connection closes halfway.
    BatchTruncated,
    /// An honest Content-Length, but the batch ends inside an entry.
    BatchCut,
    /// The blob upload's 201 names another digest.
    UploadDigest,
    /// The memory blob's recipe is swapped for one that names the blob but lists the chunks
    /// of other content (all of them served, all of them matching their ids).
    RecipeSwapped,
    /// The manifest's `dev.thaw.recipe` annotation names another recipe than the one the
    /// (honest) registry keeps the blob by.
    AnnotationNamesOther,
}

struct Fake {
    lie: Lie,
    thaw: bool,
    manifest: Vec<u8>,
    blobs: HashMap<Sha256Digest, Vec<u8>>,
    recipes: HashMap<Sha256Digest, Vec<u8>>,
    /// What `RecipeSwapped` serves for the memory blob.
    swapped_recipe: Vec<u8>,
    chunks: HashMap<ChunkId, Vec<u8>>,
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Content-Length to declare, when it is a lie.
    declared: Option<usize>,
}

fn ok(body: Vec<u8>) -> Response {
    Response { status: 200, headers: Vec::new(), body, declared: None }
}

fn status(status: u16) -> Response {
    Response { status, headers: Vec::new(), body: Vec::new(), declared: None }
}

impl Fake {
    fn answer(&self, method: &str, path: &str, body: &[u8]) -> Response {
        let path = path.split('?').next().unwrap();
        if path == "/v2/_oci/ext/discover" {
            if !self.thaw {
                return status(404);
            }
            return ok(
                br#"{"extensions":[{"name":"_thaw","url":"x","description":"x","endpoints":[]}]}"#.to_vec()
            );
        }
        if path == "/v2/fn/x/manifests/v1" && method == "GET" {
            let mut digest = Sha256Digest::of(&self.manifest);
            if self.lie == Lie::ManifestDigestHeader {
                digest = Sha256Digest::of(b"something else");
            }
            let mut r = ok(self.manifest.clone());
            r.headers.push(("docker-content-digest", digest.to_string()));
            r.headers.push(("content-type", thaw_schema::media::OCI_MANIFEST.to_owned()));
            return r;
        }
        if let Some(rest) = path.strip_prefix("/v2/fn/x/_thaw/blobs/") {
            let digest: Sha256Digest = rest.trim_end_matches("/recipe").parse().unwrap();
            if self.lie == Lie::RecipeSwapped && self.recipes.contains_key(&digest) {
                return ok(self.swapped_recipe.clone());
            }
            return self.recipes.get(&digest).map_or_else(|| status(404), |r| ok(r.clone()));
        }
        if path == "/v2/fn/x/_thaw/chunks/fetch" {
            let req: FetchChunksRequest = serde_json::from_slice(body).unwrap();
            let mut batch = BatchWriter::new();
            for (i, id) in req.chunks.iter().enumerate() {
                let mut data = self.chunks[id].clone();
                if self.lie == Lie::ChunkMismatch && i == 0 {
                    data[0] ^= 0xff;
                }
                batch.push(id, &EncodedChunk::compress(&data, 3));
            }
            let body = batch.finish();
            return match self.lie {
                Lie::BatchTruncated => Response {
                    declared: Some(body.len()),
                    body: body[..body.len() / 2].to_vec(),
                    ..ok(vec![])
                },
                Lie::BatchCut => ok(body[..body.len() - 7].to_vec()),
                _ => ok(body),
            };
        }
        if let Some(rest) = path.strip_prefix("/v2/fn/x/blobs/") {
            if rest.starts_with("uploads") {
                return match method {
                    "POST" => Response {
                        status: 202,
                        headers: vec![("location", "/v2/fn/x/blobs/uploads/1".into())],
                        body: vec![],
                        declared: None,
                    },
                    "PUT" => {
                        let lie = if self.lie == Lie::UploadDigest {
                            Sha256Digest::of(b"other")
                        } else {
                            Sha256Digest::of(body)
                        };
                        Response {
                            status: 201,
                            headers: vec![("docker-content-digest", lie.to_string())],
                            body: vec![],
                            declared: None,
                        }
                    }
                    _ => status(405),
                };
            }
            let digest: Sha256Digest = rest.parse().unwrap();
            let Some(blob) = self.blobs.get(&digest) else { return status(404) };
            if method == "HEAD" {
                return Response { declared: Some(blob.len()), ..ok(vec![]) };
            }
            let mut blob = blob.clone();
            return match self.lie {
                Lie::BlobWrongContent => {
                    let n = blob.len() / 2;
                    blob[n] ^= 1;
                    ok(blob)
                }
                Lie::BlobTruncated => Response {
                    declared: Some(blob.len()),
                    body: blob[..blob.len() / 2].to_vec(),
                    ..ok(vec![])
                },
                _ => ok(blob),
            };
        }
        if path.starts_with("/v2/fn/x/manifests/") && method == "PUT" {
            return Response {
                status: 201,
                headers: vec![("docker-content-digest", Sha256Digest::of(body).to_string())],
                body: vec![],
                declared: None,
            };
        }
        status(404)
    }
}

/// Starts the fake registry; returns `host:port`.
async fn start(fake: Fake) -> String {
    let fake = Arc::new(fake);
    serve_raw(Arc::new(move |r: &RawRequest| {
        let a = fake.answer(&r.method, &r.path, &r.body);
        RawResponse { status: a.status, headers: a.headers, body: a.body, declared: a.declared }
    }))
    .await
}

/// The encoded recipe of `content` (fixed 64 KiB chunks), its header naming `blob`; its
/// chunks go into `chunks`.
fn recipe_of(content: &[u8], blob: Sha256Digest, chunks: &mut HashMap<ChunkId, Vec<u8>>) -> Vec<u8> {
    let params = ChunkerParams::fixed(64 * 1024);
    let mut builder = RecipeBuilder::new(params);
    for c in params.chunks(content).unwrap() {
        let c = c.unwrap();
        if c.is_zero() {
            builder.push_zero(c.data.len() as u32);
        } else {
            let id = ChunkId::of(&c.data);
            builder.push_data(c.data.len() as u32, id);
            chunks.insert(id, c.data);
        }
    }
    builder.finish(blob).encode()
}

/// An honest artifact: one memory file, with its recipe and chunks, the manifest naming
/// the recipe (`dev.thaw.recipe`) as `thaw push` writes it.
fn artifact(lie: Lie, thaw: bool) -> (Fake, Vec<u8>) {
    let mut memory = memory_image(160, 5); // 640 KiB
    memory[..4].copy_from_slice(b"MEM!");
    let config = b"{}".to_vec();
    let digest = Sha256Digest::of(&memory);
    let mut chunks = HashMap::new();
    let recipe = recipe_of(&memory, digest, &mut chunks);
    // Other content of the same size, its recipe forged to name the memory blob.
    let mut other = memory_image(160, 6);
    other[..4].copy_from_slice(b"OTH!");
    let swapped_recipe = recipe_of(&other, digest, &mut chunks);
    let named = if lie == Lie::AnnotationNamesOther { &swapped_recipe } else { &recipe };
    let file = SnapshotFile {
        role: FileRole::Memory,
        title: "memory".into(),
        digest,
        size: memory.len() as u64,
        recipe: Some(Sha256Digest::of(named)),
    };
    let manifest = serde_json::to_vec(
        &snapshot_manifest(Sha256Digest::of(&config), 2, &[file], HashMap::new()).unwrap(),
    )
    .unwrap();
    let fake = Fake {
        lie,
        thaw,
        manifest,
        blobs: HashMap::from([(digest, memory.clone()), (Sha256Digest::of(&config), config)]),
        recipes: HashMap::from([(digest, recipe)]),
        swapped_recipe,
        chunks,
    };
    (fake, memory)
}

async fn pull_must_fail(lie: Lie, thaw: bool, expect: &str) -> Error {
    let (fake, _) = artifact(lie, thaw);
    let host = start(fake).await;
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("memory"), b"the previous, good file").unwrap();
    let reference = Reference::parse(&format!("{host}/fn/x:v1")).unwrap();
    let client = client_for(&reference);
    let err = thaw_client::pull(&client, &reference, &dest, &PullOptions::default()).await.unwrap_err();
    let text = err.to_string();
    eprintln!("{lie:?}: {text}");
    assert!(text.contains(expect), "{lie:?}: {text}");
    assert!(text.contains("fn/x"), "{lie:?}: the error names the reference: {text}");
    assert_eq!(entries(&dest), ["memory"], "{lie:?}: nothing but the old file in the destination");
    assert_eq!(std::fs::read(dest.join("memory")).unwrap(), b"the previous, good file", "{lie:?}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_registry_is_honest_when_not_lying() {
    for thaw in [false, true] {
        let (fake, memory) = artifact(Lie::UploadDigest, thaw); // only pushes are affected
        let host = start(fake).await;
        let work = tempfile::tempdir().unwrap();
        let reference = Reference::parse(&format!("{host}/fn/x:v1")).unwrap();
        let client = client_for(&reference);
        let report =
            thaw_client::pull(&client, &reference, work.path(), &PullOptions::default()).await.unwrap();
        assert_eq!(report.files[0].from_recipe, thaw);
        assert_eq!(report.files[0].verified_by_chain, thaw, "the manifest names the recipe served");
        assert!(std::fs::read(work.path().join("memory")).unwrap() == memory);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_with_a_wrong_digest_is_refused() {
    let err = pull_must_fail(Lie::ManifestDigestHeader, true, "the body hashes to").await;
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_with_wrong_content_is_refused() {
    let err = pull_must_fail(Lie::BlobWrongContent, false, "hashes to").await;
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
    assert!(err.hint().unwrap().contains("nothing was written"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_blob_is_refused_after_retries() {
    let err = pull_must_fail(Lie::BlobTruncated, false, "broke off").await;
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_does_not_match_its_id_is_refused() {
    let err = pull_must_fail(Lie::ChunkMismatch, true, "does not match its id").await;
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipe_swapped_under_a_manifest_is_refused() {
    // Every chunk matches its id, so only the recipe's digest (it is not the one the
    // manifest names) and then the whole file's SHA-256 can tell.
    let err = pull_must_fail(Lie::RecipeSwapped, true, "hashes to").await;
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_naming_another_recipe_gets_the_whole_file_checked() {
    let (fake, memory) = artifact(Lie::AnnotationNamesOther, true);
    let host = start(fake).await;
    let work = tempfile::tempdir().unwrap();
    let reference = Reference::parse(&format!("{host}/fn/x:v1")).unwrap();
    let client = client_for(&reference);
    let report = thaw_client::pull(&client, &reference, work.path(), &PullOptions::default()).await.unwrap();
    assert!(report.files[0].from_recipe);
    assert!(!report.files[0].verified_by_chain, "the recipe served is not the one the manifest names");
    assert!(std::fs::read(work.path().join("memory")).unwrap() == memory);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_chunk_batches_are_refused() {
    let err = pull_must_fail(Lie::BatchTruncated, true, "cut short").await;
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
    let err = pull_must_fail(Lie::BatchCut, true, "truncated").await;
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_stores_another_digest_fails_the_push() {
    let (fake, mut memory) = artifact(Lie::UploadDigest, false);
    let host = start(fake).await;
    let work = tempfile::tempdir().unwrap();
    memory[0] = b'N'; // a blob the fake registry does not have
    std::fs::write(work.path().join("memory"), &memory).unwrap();
    let reference = Reference::parse(&format!("{host}/fn/x:v2")).unwrap();
    let client = client_for(&reference);
    let err =
        thaw_client::push_dir(&client, &reference, work.path(), &PushOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
    assert!(err.to_string().contains("the registry stored"), "{err}");
}
