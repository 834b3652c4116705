//! The `_thaw` extension calls (docs/API.md): missing-chunk queries, chunk batch upload and
//! fetch, recipe commit and read. Everything that comes back is checked before use.

use std::collections::HashSet;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use thaw_schema::batch::parse_batch;
use thaw_schema::dto::{
    decode_missing_answer, encode_chunk_id_query, ChunkUploadResponse, FetchChunksRequest,
    MissingChunksRequest, MissingChunksResponse, MAX_IDS_PER_QUERY,
};
use thaw_schema::frame::EncodedChunk;
use thaw_schema::{media, ChunkId, ErrorCode, Recipe, Sha256Digest};

use crate::error::{Error, RegistryCode, Result};
use crate::manifest::Descriptor;
use crate::registry::Registry;
use crate::transport::{Body, Request, Scope};

/// Largest recipe accepted (the registry's limit too).
const MAX_RECIPE_LEN: usize = 64 * 1024 * 1024;
/// Largest chunk batch answer accepted (the registry's batch limit).
const MAX_BATCH_LEN: usize = 64 * 1024 * 1024;

/// How a file written from a recipe is checked once written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCheck {
    /// Every chunk is checked against its id, and the recipe against the manifest's
    /// `dev.thaw.recipe` annotation: the whole file is not hashed again (docs/FORMAT.md,
    /// "The verified chunk chain").
    Chain,
    /// Every chunk is checked against its id, and the whole file against its SHA-256.
    WholeFile,
}

/// A layer's recipe, with how the file written from it is checked.
#[derive(Debug, Clone)]
pub struct LayerRecipe {
    /// The recipe, checked to describe the layer's blob.
    pub recipe: Recipe,
    /// Chain, when the manifest names this exact recipe.
    pub check: FileCheck,
}

fn recipe_digest_header(headers: &reqwest::header::HeaderMap) -> Option<Sha256Digest> {
    headers.get("thaw-recipe-digest")?.to_str().ok()?.parse().ok()
}

impl Registry {
    /// Of `ids`, those the registry does not store. Asked in queries of at most 100,000 ids,
    /// in the binary form (32 bytes per id, docs/FORMAT.md) unless the registry refuses it
    /// as a registry without it does (415, or 400 `UNSUPPORTED` from parsing it as JSON);
    /// then in the JSON form (67 bytes per id) for the rest of the call.
    pub(crate) async fn missing_chunks(&self, repository: &str, ids: &[ChunkId]) -> Result<HashSet<ChunkId>> {
        let op = format!("asking {}/{repository} which chunks it lacks", self.host());
        let mut missing = HashSet::new();
        let mut binary = true;
        for part in ids.chunks(MAX_IDS_PER_QUERY) {
            if binary {
                match self.missing_chunks_binary(&op, repository, part).await {
                    Ok(found) => {
                        missing.extend(found);
                        continue;
                    }
                    Err(Error::Registry { status, code, .. })
                        if status == 415
                            || (status == 400
                                && matches!(
                                    code,
                                    None | Some(RegistryCode::Spec(ErrorCode::Unsupported))
                                )) =>
                    {
                        tracing::debug!(
                            host = self.host(),
                            status,
                            "binary missing-chunks query refused; using JSON"
                        );
                        binary = false;
                    }
                    Err(e) => return Err(e),
                }
            }
            missing.extend(self.missing_chunks_json(&op, repository, part).await?);
        }
        Ok(missing)
    }

    fn missing_chunks_request(&self, repository: &str, content_type: &str, body: Vec<u8>) -> Request {
        Request::new(
            Method::POST,
            self.transport.url(&format!("/v2/{repository}/_thaw/chunks/missing")),
            Scope::Push(repository.to_owned()),
        )
        .header("content-type", content_type)
        .body(Body::Bytes(Bytes::from(body)))
        .idempotent(true)
    }

    async fn missing_chunks_binary(
        &self,
        op: &str,
        repository: &str,
        part: &[ChunkId],
    ) -> Result<Vec<ChunkId>> {
        let req = self.missing_chunks_request(repository, media::CHUNK_IDS, encode_chunk_id_query(part));
        // The longest answer: a bitmap of 100,000 ids, 12.5 KB.
        let (headers, answer) = self.transport.fetch_all(op, &req, &[200], 64 * 1024).await?;
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        if content_type.split(';').next().unwrap_or("").trim() != media::MISSING_CHUNKS {
            return Err(Error::protocol(
                op,
                format!("answer of type {content_type:?}, not {}", media::MISSING_CHUNKS),
            ));
        }
        let flags =
            decode_missing_answer(&answer, part.len()).map_err(|e| Error::protocol(op, e.to_string()))?;
        Ok(part.iter().zip(flags).filter(|(_, m)| *m).map(|(id, _)| *id).collect())
    }

    async fn missing_chunks_json(
        &self,
        op: &str,
        repository: &str,
        part: &[ChunkId],
    ) -> Result<Vec<ChunkId>> {
        let body = serde_json::to_vec(&MissingChunksRequest { chunks: part.to_vec() }).expect("serializes");
        let req = self.missing_chunks_request(repository, "application/json", body);
        let (_, answer) = self.transport.fetch_all(op, &req, &[200], 16 * 1024 * 1024).await?;
        let answer: MissingChunksResponse = serde_json::from_slice(&answer)
            .map_err(|e| Error::protocol(op, format!("malformed answer: {e}")))?;
        let asked: HashSet<&ChunkId> = part.iter().collect();
        if let Some(stranger) = answer.missing.iter().find(|id| !asked.contains(id)) {
            return Err(Error::protocol(
                op,
                format!("the answer names chunk {stranger}, which was not asked about"),
            ));
        }
        Ok(answer.missing)
    }

    /// Uploads one chunk batch body (`count` chunks). Repeating it is harmless.
    pub(crate) async fn upload_chunk_batch(
        &self,
        repository: &str,
        body: Bytes,
        count: usize,
    ) -> Result<ChunkUploadResponse> {
        let op = format!("uploading {count} chunks to {}/{repository}", self.host());
        let req = Request::new(
            Method::POST,
            self.transport.url(&format!("/v2/{repository}/_thaw/chunks")),
            Scope::Push(repository.to_owned()),
        )
        .header("content-type", media::CHUNK_BATCH)
        .body(Body::Bytes(body))
        .idempotent(true);
        let (_, answer) = self.transport.fetch_all(&op, &req, &[200], 64 * 1024).await?;
        let answer: ChunkUploadResponse = serde_json::from_slice(&answer)
            .map_err(|e| Error::protocol(&op, format!("malformed answer: {e}")))?;
        if answer.stored + answer.present != count {
            return Err(Error::protocol(
                &op,
                format!(
                    "the registry accounted for {} chunks, {count} were sent",
                    answer.stored + answer.present
                ),
            ));
        }
        Ok(answer)
    }

    /// Commits a blob from its recipe: the registry checks every chunk and the whole digest.
    /// Commits a blob by its recipe; answers the digest of the recipe the registry keeps the
    /// blob by (its own, when it held the blob already), if the registry says.
    pub(crate) async fn commit_recipe(
        &self,
        repository: &str,
        recipe: &Recipe,
    ) -> Result<Option<Sha256Digest>> {
        let digest = recipe.digest;
        let op = format!("committing blob {digest} to {}/{repository}", self.host());
        let req = Request::new(
            Method::PUT,
            self.transport.url(&format!("/v2/{repository}/_thaw/blobs/{digest}")),
            Scope::Push(repository.to_owned()),
        )
        .header("content-type", media::RECIPE)
        .body(Body::Bytes(Bytes::from(recipe.encode())));
        let resp = self.transport.send(&op, &req).await?;
        let resp = self.transport.expect(&op, resp, &[201]).await?;
        Ok(recipe_digest_header(resp.headers()))
    }

    /// The digest of the recipe the registry keeps a blob of `repository` by (`HEAD` of the
    /// recipe); `None` when it has none or does not say.
    pub(crate) async fn held_recipe_digest(
        &self,
        repository: &str,
        digest: &Sha256Digest,
    ) -> Result<Option<Sha256Digest>> {
        let op = format!("HEAD recipe of {}/{repository}@{digest}", self.host());
        let req = Request::new(
            Method::HEAD,
            self.transport.url(&format!("/v2/{repository}/_thaw/blobs/{digest}/recipe")),
            Scope::Pull(repository.to_owned()),
        );
        let resp = self.transport.send(&op, &req).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.transport.expect(&op, resp, &[200]).await?;
        Ok(recipe_digest_header(resp.headers()))
    }

    /// The recipe of a blob readable in `repository`, checked to be the blob's; `None` when
    /// the registry has no recipe for it.
    pub async fn recipe(&self, repository: &str, digest: &Sha256Digest) -> Result<Option<Recipe>> {
        Ok(self.fetch_recipe(repository, digest).await?.map(|(recipe, _)| recipe))
    }

    /// The recipe of a manifest layer, and how a file written from it must be checked: by
    /// the chain when the layer's `dev.thaw.recipe` annotation names exactly the recipe
    /// received (its SHA-256), else by hashing the whole file. `None` when the registry has
    /// no recipe for the blob.
    pub async fn layer_recipe(&self, repository: &str, layer: &Descriptor) -> Result<Option<LayerRecipe>> {
        let Some((recipe, received)) = self.fetch_recipe(repository, &layer.digest).await? else {
            return Ok(None);
        };
        let check = match layer.recipe_digest() {
            Some(named) if named == received => FileCheck::Chain,
            Some(named) => {
                tracing::warn!(
                    layer = %layer.digest, %named, %received,
                    "the registry keeps this blob by another recipe than the manifest names; verifying the whole file"
                );
                FileCheck::WholeFile
            }
            None => FileCheck::WholeFile,
        };
        Ok(Some(LayerRecipe { recipe, check }))
    }

    /// [`Self::layer_recipe`] of each layer, asked all at once.
    pub async fn layer_recipes<'a>(
        &self,
        repository: &str,
        layers: impl IntoIterator<Item = &'a Descriptor>,
    ) -> Result<Vec<Option<LayerRecipe>>> {
        futures::future::try_join_all(layers.into_iter().map(|layer| self.layer_recipe(repository, layer)))
            .await
    }

    /// The recipe of a blob, checked to be the blob's, with the SHA-256 of its encoding as
    /// received.
    async fn fetch_recipe(
        &self,
        repository: &str,
        digest: &Sha256Digest,
    ) -> Result<Option<(Recipe, Sha256Digest)>> {
        let op = format!("GET recipe of {}/{repository}@{digest}", self.host());
        let req = Request::new(
            Method::GET,
            self.transport.url(&format!("/v2/{repository}/_thaw/blobs/{digest}/recipe")),
            Scope::Pull(repository.to_owned()),
        );
        let body = match self.transport.fetch_all(&op, &req, &[200], MAX_RECIPE_LEN).await {
            Ok((_, body)) => body,
            Err(Error::Registry { status, .. }) if status == StatusCode::NOT_FOUND.as_u16() => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let recipe = Recipe::decode(&body)
            .map_err(|e| Error::integrity(format!("recipe of {digest}"), e.to_string()))?;
        if recipe.digest != *digest {
            return Err(Error::integrity(
                format!("recipe of {digest}"),
                format!("the registry sent the recipe of {}", recipe.digest),
            ));
        }
        Ok(Some((recipe, Sha256Digest::of(&body))))
    }

    /// Fetches chunks of `blob`, in order. The answer is checked to hold exactly the chunks
    /// asked for, in order; their content is checked by the caller (`EncodedChunk::decode`).
    /// Public for the node cache, which keeps the frames to serve its peers.
    pub async fn fetch_chunks(
        &self,
        repository: &str,
        blob: &Sha256Digest,
        ids: &[ChunkId],
    ) -> Result<Vec<(ChunkId, EncodedChunk)>> {
        let op = format!("fetching {} chunks of {}/{repository}@{blob}", ids.len(), self.host());
        let body = serde_json::to_vec(&FetchChunksRequest { blob: *blob, chunks: ids.to_vec() })
            .expect("serializes");
        let req = Request::new(
            Method::POST,
            self.transport.url(&format!("/v2/{repository}/_thaw/chunks/fetch")),
            Scope::Pull(repository.to_owned()),
        )
        .header("content-type", "application/json")
        .body(Body::Bytes(Bytes::from(body)))
        .idempotent(true);
        let (_, answer) = self.transport.fetch_all(&op, &req, &[200], MAX_BATCH_LEN).await?;
        let chunks = parse_batch(&answer)
            .map_err(|e| Error::integrity(&op, format!("{e} (the answer may be truncated)")))?;
        if chunks.len() != ids.len() {
            return Err(Error::integrity(
                &op,
                format!("{} chunks asked for, {} received", ids.len(), chunks.len()),
            ));
        }
        if let Some(((got, _), want)) = chunks.iter().zip(ids).find(|((got, _), want)| got != *want) {
            return Err(Error::integrity(&op, format!("chunk {got} received where {want} was asked for")));
        }
        Ok(chunks)
    }
}
