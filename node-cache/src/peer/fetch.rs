//! Fetching chunks from peers while materializing: a [`ChunkSource`] over the peers that hold
//! the snapshot being materialized (or another snapshot of its repository), found in the
//! registry's node directory.
//!
//! Each batch goes to the next healthy peer in turn, so batches spread over the peers; what
//! that peer lacks is asked of one more, and whatever is still missing comes from the
//! registry. A peer that errs, stalls past the timeout, or sends anything that is not the
//! chunk asked for is marked bad in the [`PeerBook`] and skipped until its penalty ends; its
//! whole answer is dropped.
//!
//! The asking side of the peer protocol lives here whole: chunk requests ([`ask`],
//! [`ask_frames`], used by the swarm's member workers too) and bitmap requests
//! ([`ask_bitmap`], used by the swarm's looks).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use thaw_client::blob::ChunkSource;
use thaw_client::Reference;
use thaw_schema::batch::{parse_batch, ENTRY_HEADER_LEN};
use thaw_schema::dto::encode_chunk_id_query;
use thaw_schema::frame::{EncodedChunk, MAX_PAYLOAD_LEN};
use thaw_schema::holdings::NodeDirectory;
use thaw_schema::{media, ChunkId, Sha256Digest};

use super::{
    bitmap_path, Failure, PeerBook, PeerOptions, CHUNKS_PATH, COMPLETE_HEADER, ENDPOINT_HEADER, NODE_HEADER,
};

/// Peers asked for one batch before the rest goes to the registry.
const PEERS_PER_BATCH: usize = 2;

/// A peer worth asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    /// Its node name.
    pub(crate) node: String,
    /// `host:port` of its peer service.
    pub(crate) endpoint: String,
    /// It holds the very snapshot (not only another one of the repository).
    pub(crate) same_snapshot: bool,
}

/// The peers in `directory` that may hold chunks of `digest` in `repository` on `registry`:
/// those holding that snapshot first, then those holding another snapshot of the repository.
/// This node (`me`), nodes without a peer endpoint, and peers marked bad are left out.
pub(crate) fn candidates(
    directory: &NodeDirectory,
    me: &str,
    my_endpoint: Option<&str>,
    registry: &str,
    repository: &str,
    digest: &Sha256Digest,
) -> Vec<Peer> {
    let mut out: Vec<Peer> = Vec::new();
    for node in &directory.nodes {
        let Some(endpoint) = &node.peer_endpoint else { continue };
        if node.node == me || Some(endpoint.as_str()) == my_endpoint {
            continue;
        }
        let same_snapshot =
            node.snapshots.iter().any(|s| s.digest == *digest && s.cached_bytes == s.size_bytes);
        // In-progress announcements hold nothing to count on: the swarm asks those nodes.
        let same_repository = node.snapshots.iter().any(|s| {
            !s.is_in_progress()
                && Reference::parse(&s.reference)
                    .is_ok_and(|r| r.registry() == registry && r.repository() == repository)
        });
        if same_snapshot || same_repository {
            out.push(Peer { node: node.node.clone(), endpoint: endpoint.clone(), same_snapshot });
        }
    }
    out.sort_by_key(|p| !p.same_snapshot);
    out
}

/// The peers of one materialization, and the bytes they delivered.
pub(crate) struct PeerSource {
    peers: Vec<Peer>,
    http: reqwest::Client,
    options: PeerOptions,
    book: Arc<PeerBook>,
    next: AtomicUsize,
    delivered: AtomicU64,
}

impl PeerSource {
    pub(crate) fn new(
        peers: Vec<Peer>,
        http: reqwest::Client,
        options: PeerOptions,
        book: Arc<PeerBook>,
    ) -> Self {
        Self { peers, http, options, book, next: AtomicUsize::new(0), delivered: AtomicU64::new(0) }
    }

    /// Uncompressed bytes delivered (and verified) since the last call.
    pub(crate) fn take_delivered(&self) -> u64 {
        self.delivered.swap(0, Ordering::Relaxed)
    }

    /// The peers to ask for the next batch, in order: the next healthy one in turn, then
    /// the following ones.
    fn pick(&self) -> Vec<&Peer> {
        let healthy: Vec<&Peer> = self.peers.iter().filter(|p| !self.book.is_bad(&p.endpoint)).collect();
        if healthy.is_empty() {
            return healthy;
        }
        // Turn only among the peers holding the snapshot, when there are any.
        let holders = healthy.iter().filter(|p| p.same_snapshot).count();
        let ring = if holders > 0 { holders } else { healthy.len() };
        let start = self.next.fetch_add(1, Ordering::Relaxed) % ring;
        (0..healthy.len()).map(|i| healthy[(start + i) % healthy.len()]).take(PEERS_PER_BATCH).collect()
    }

    pub(crate) async fn fetch_batch(&self, ids: &[(ChunkId, u32)]) -> Vec<(ChunkId, Vec<u8>)> {
        let mut got: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        let mut rest: Vec<(ChunkId, u32)> = ids.to_vec();
        for peer in self.pick() {
            match ask(&self.http, &self.options, peer, &rest).await {
                Ok(chunks) => {
                    let have: HashSet<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
                    let bytes: u64 = chunks.iter().map(|(_, d)| d.len() as u64).sum();
                    self.delivered.fetch_add(bytes, Ordering::Relaxed);
                    self.book.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
                    self.book.fetched_chunks.fetch_add(chunks.len() as u64, Ordering::Relaxed);
                    got.extend(chunks);
                    rest.retain(|(id, _)| !have.contains(id));
                }
                Err((why, detail)) => {
                    let detail = format!("node {}: {detail}", peer.node);
                    self.book.failed(&peer.endpoint, why, &detail, self.options.penalty);
                }
            }
            if rest.is_empty() {
                break;
            }
        }
        got
    }
}

/// How many times the peer timeout one answer may take in all, however steadily it comes.
const ANSWER_DEADLINE_FACTOR: u32 = 4;

/// Asks one peer for `ids`; answers the chunks it sent, decoded and checked.
pub(crate) async fn ask(
    http: &reqwest::Client,
    options: &PeerOptions,
    peer: &Peer,
    ids: &[(ChunkId, u32)],
) -> Result<Vec<(ChunkId, Vec<u8>)>, (Failure, String)> {
    let chunks = ask_frames(http, options, peer, ids).await?;
    Ok(chunks.into_iter().map(|(id, data, _)| (id, data)).collect())
}

/// [`ask`], keeping each chunk's frame as the peer sent it (the swarm serves it on as is).
pub(crate) async fn ask_frames(
    http: &reqwest::Client,
    options: &PeerOptions,
    peer: &Peer,
    ids: &[(ChunkId, u32)],
) -> Result<Vec<(ChunkId, Vec<u8>, EncodedChunk)>, (Failure, String)> {
    let scheme = if options.tls_ca.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}{CHUNKS_PATH}", peer.endpoint);
    let query: Vec<ChunkId> = ids.iter().map(|(id, _)| *id).collect();
    let mut req = http
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, media::CHUNK_IDS)
        .body(encode_chunk_id_query(&query));
    if let Some(t) = &options.token {
        req = req.bearer_auth(t.as_str());
    }
    let classify = |e: reqwest::Error| {
        if e.is_timeout() {
            (Failure::Timeout, e.to_string())
        } else {
            (Failure::Error, e.to_string())
        }
    };
    // A peer fails when it goes quiet for `options.timeout` (no answer, or no bytes of it),
    // or takes longer than ANSWER_DEADLINE_FACTOR times that in all. Not when a whole
    // answer takes longer than `options.timeout`: a member sending steadily on an uplink
    // shared by many askers is slow, not stalled, and dropping it makes the swarm fetch
    // its segments from the registry again (D19).
    let deadline = tokio::time::Instant::now() + options.timeout * ANSWER_DEADLINE_FACTOR;
    let quiet = |what: &str| (Failure::Timeout, format!("{what} within {} ms", options.timeout.as_millis()));
    let idle = || std::cmp::min(tokio::time::Instant::now() + options.timeout, deadline);
    let mut resp = tokio::time::timeout_at(idle(), req.send())
        .await
        .map_err(|_| quiet("no answer"))?
        .map_err(classify)?;
    match resp.status().as_u16() {
        200 => {}
        // Busy: not a failure, just not now.
        503 | 429 => return Ok(Vec::new()),
        s => return Err((Failure::Error, format!("answered HTTP {s}"))),
    }
    let limit: usize = 8 + ids
        .iter()
        .map(|(_, len)| ENTRY_HEADER_LEN + (*len as usize + 1024).min(MAX_PAYLOAD_LEN as usize))
        .sum::<usize>();
    let mut body = Vec::new();
    while let Some(piece) = tokio::time::timeout_at(idle(), resp.chunk())
        .await
        .map_err(|_| quiet("no more of the answer"))?
        .map_err(classify)?
    {
        body.extend_from_slice(&piece);
        if body.len() > limit {
            return Err((Failure::Corrupt, format!("answer longer than the {limit} bytes asked for")));
        }
    }
    let wanted: HashMap<ChunkId, u32> = ids.iter().copied().collect();
    tokio::task::spawn_blocking(move || {
        let chunks = parse_batch(&body).map_err(|e| (Failure::Corrupt, e.to_string()))?;
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(chunks.len());
        for (id, chunk) in chunks {
            if !wanted.contains_key(&id) || !seen.insert(id) {
                return Err((Failure::Corrupt, format!("sent chunk {id}, which was not asked for")));
            }
            if chunk.raw_len != wanted[&id] {
                return Err((Failure::Corrupt, format!("sent chunk {id} with the wrong length")));
            }
            let data = chunk.decode(&id).map_err(|e| (Failure::Corrupt, format!("chunk {id}: {e}")))?;
            out.push((id, data, chunk));
        }
        Ok(out)
    })
    .await
    .map_err(|e| (Failure::Error, format!("decode task: {e}")))?
}

/// A peer's answer to a bitmap request (docs/API.md, "Peer API").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Bitmap {
    /// It holds the snapshot complete.
    Complete,
    /// It is materializing the snapshot: bit `i` (byte `i / 8`, least significant first) is
    /// set when it has the `i`-th distinct data chunk of the blob.
    Partial(Vec<u8>),
    /// It neither materializes nor holds the snapshot (404).
    Unknown,
}

/// Who asks for a bitmap: the peer adds the asker to its swarm for the snapshot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BitmapAsker<'a> {
    /// This node's name.
    pub(crate) node: &'a str,
    /// Where peers reach this node, if it serves peers.
    pub(crate) endpoint: Option<&'a str>,
}

/// Asks the peer at `endpoint` for its bitmap of `blob` in `snapshot`, within the peer
/// timeout.
pub(crate) async fn ask_bitmap(
    http: &reqwest::Client,
    options: &PeerOptions,
    asker: BitmapAsker<'_>,
    endpoint: &str,
    snapshot: &Sha256Digest,
    blob: &Sha256Digest,
) -> Result<Bitmap, (Failure, String)> {
    let scheme = if options.tls_ca.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{endpoint}{}", bitmap_path(snapshot, blob));
    let mut req = http.get(&url).timeout(options.timeout).header(NODE_HEADER, asker.node);
    if let Some(e) = asker.endpoint {
        req = req.header(ENDPOINT_HEADER, e);
    }
    if let Some(t) = &options.token {
        req = req.bearer_auth(t.as_str());
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Err((Failure::Timeout, format!("bitmap: {e}"))),
        Err(e) => return Err((Failure::Error, format!("bitmap: {e}"))),
    };
    match resp.status().as_u16() {
        200 => {}
        // Not (or no longer) materializing it, and not holding it: nothing to get there.
        404 => return Ok(Bitmap::Unknown),
        s => return Err((Failure::Error, format!("bitmap answered HTTP {s}"))),
    }
    if resp.headers().contains_key(COMPLETE_HEADER) {
        return Ok(Bitmap::Complete);
    }
    match resp.bytes().await {
        Ok(b) => Ok(Bitmap::Partial(b.to_vec())),
        Err(e) => Err((Failure::Error, format!("bitmap body: {e}"))),
    }
}

impl ChunkSource for PeerSource {
    fn fetch<'a>(
        &'a self,
        _blob: Sha256Digest,
        ids: &'a [(ChunkId, u32)],
    ) -> BoxFuture<'a, Vec<(ChunkId, Vec<u8>)>> {
        Box::pin(self.fetch_batch(ids))
    }
}

/// Longest the node directory may take to answer before a materialization goes without peers.
pub(crate) const DIRECTORY_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_schema::holdings::{HeldSnapshot, NodeHoldings};

    fn node(name: &str, endpoint: Option<&str>, held: &[(&str, Sha256Digest)]) -> NodeHoldings {
        NodeHoldings {
            node: name.into(),
            peer_endpoint: endpoint.map(str::to_owned),
            capacity_bytes: 1,
            used_bytes: 1,
            snapshots: held
                .iter()
                .map(|(r, d)| HeldSnapshot {
                    reference: (*r).into(),
                    digest: *d,
                    size_bytes: 5,
                    cached_bytes: 5,
                })
                .collect(),
        }
    }

    #[test]
    fn holders_of_the_snapshot_come_first_then_the_repository() {
        let (v1, v2, other) = (Sha256Digest::of(b"v1"), Sha256Digest::of(b"v2"), Sha256Digest::of(b"o"));
        let directory = NodeDirectory {
            nodes: vec![
                node("a", Some("10.0.0.1:7701"), &[("reg:5000/fn/hello:v2", v2)]),
                node("b", Some("10.0.0.2:7701"), &[("reg:5000/fn/hello:v1", v1)]),
                node("c", None, &[("reg:5000/fn/hello:v1", v1)]),
                node("d", Some("10.0.0.4:7701"), &[("reg:5000/fn/other:v1", other)]),
                node("me", Some("10.0.0.9:7701"), &[("reg:5000/fn/hello:v1", v1)]),
            ],
        };
        let found = candidates(&directory, "me", Some("10.0.0.9:7701"), "reg:5000", "fn/hello", &v1);
        let names: Vec<&str> = found.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert!(found[0].same_snapshot && !found[1].same_snapshot);
    }
}
