//! Peer-to-peer chunk exchange between node caches (docs/API.md, "Peer API").
//!
//! Every node cache can serve the chunks of its complete snapshots to the other nodes of the
//! cluster ([`serve`], on its own listener, `--peer-listen`), and fetch the chunks it lacks
//! from them before the registry ([`fetch`]). Peers authenticate with a cluster token; a
//! node without it gets nothing. Bytes from a peer are never trusted: every chunk is checked
//! against its id, and a peer that errs, stalls or lies is avoided for a while
//! ([`PeerBook`]), its chunks fetched from the registry instead.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thaw_schema::frame::EncodedChunk;
use thaw_schema::ChunkId;

pub(crate) mod fetch;
pub mod serve;

/// The path of the peer chunk service.
pub const CHUNKS_PATH: &str = "/v1/peer/chunks";

/// The path prefix of the bitmap service: `GET {SNAPSHOTS_PATH}/<snapshot>/blobs/<blob>/bitmap`
/// (both `sha256:<hex>`), which chunks of the blob's recipe this node has written.
pub const SNAPSHOTS_PATH: &str = "/v1/peer/snapshots";

/// The media type of a bitmap answer: bit `i` (of byte `i / 8`, least significant first) is
/// set when the `i`-th distinct data chunk of the recipe (first-occurrence order) is written.
pub const BITMAP_MEDIA_TYPE: &str = "application/vnd.thaw.chunk-bitmap.v1";

/// Request header: the asking node's name (it joins the swarm of the snapshot).
pub const NODE_HEADER: &str = "thaw-node";

/// Request header: the asking node's peer endpoint (`host:port`).
pub const ENDPOINT_HEADER: &str = "thaw-peer-endpoint";

/// Answer header on a bitmap of a complete snapshot (the body is then empty: every chunk).
pub const COMPLETE_HEADER: &str = "thaw-snapshot-complete";

/// Answer header: how many chunks the bitmap covers.
pub const COUNT_HEADER: &str = "thaw-chunk-count";

/// The bitmap path of `blob` in `snapshot`.
pub fn bitmap_path(snapshot: &thaw_schema::Sha256Digest, blob: &thaw_schema::Sha256Digest) -> String {
    format!("{SNAPSHOTS_PATH}/{snapshot}/blobs/{blob}/bitmap")
}

/// Most chunk ids one peer request may name.
pub const MAX_IDS_PER_REQUEST: usize = 4096;

/// Largest peer request body: the binary id list of [`MAX_IDS_PER_REQUEST`] ids.
pub const MAX_REQUEST_BODY: usize = 8 + 32 * MAX_IDS_PER_REQUEST;

/// A peer answer stops adding chunks before their uncompressed bytes pass this; the chunks
/// left out are fetched elsewhere. It is what the client asks for at most at once, so a
/// well-behaved request is answered whole, and bounds the memory of one answer (answers are
/// built whole, not streamed: at most `max_uploads` of them at once).
pub const MAX_ANSWER_RAW_BYTES: u64 = thaw_client::tuning::FETCH_BATCH_RAW_BYTES;

/// The cluster token: the one this node presents, and every one it accepts (more than one
/// while a token is rotated). Its `Debug` does not show them.
#[derive(Clone)]
pub struct PeerToken {
    present: String,
    accept: Vec<ChunkId>,
}

impl std::fmt::Debug for PeerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerToken({} accepted, ..)", self.accept.len())
    }
}

fn check_token(t: &str) -> Result<(), String> {
    if t.len() < 16 {
        return Err("a peer token must be at least 16 characters".into());
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a peer token must be printable ASCII without spaces".into());
    }
    Ok(())
}

impl PeerToken {
    /// One token; surrounding whitespace (a trailing newline) is not part of it.
    pub fn new(token: &str) -> Result<Self, String> {
        let t = token.trim();
        check_token(t)?;
        Ok(Self { present: t.to_owned(), accept: vec![ChunkId::of(t.as_bytes())] })
    }

    /// Tokens one per line (blank lines and `#` comments skipped): the first is presented to
    /// peers, every one is accepted from them. To rotate: add the new token as a second line
    /// on every node, then move it first, then remove the old one.
    pub fn from_lines(text: &str) -> Result<Self, String> {
        let lines: Vec<&str> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        let Some(first) = lines.first() else {
            return Err("no token in it".into());
        };
        for l in &lines {
            check_token(l)?;
        }
        Ok(Self {
            present: (*first).to_owned(),
            accept: lines.iter().map(|l| ChunkId::of(l.as_bytes())).collect(),
        })
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.present
    }

    /// Whether `presented` is one of the accepted tokens, in time independent of where it
    /// differs (tokens are compared as BLAKE3 digests, every byte of every one, so neither
    /// content nor length leaks).
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        let p = ChunkId::of(presented);
        let mut hit = 0u8;
        for a in &self.accept {
            let diff = a.as_bytes().iter().zip(p.as_bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
            hit |= u8::from(diff == 0);
        }
        hit == 1
    }
}

/// How this node takes part in P2P.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// The cluster token: presented to peers, and required from them.
    pub token: Option<PeerToken>,
    /// Serve and fetch without a token (`--peer-insecure`): only for trusted test networks.
    pub insecure: bool,
    /// Longest a peer may stay quiet (before its answer starts, or between two pieces of
    /// it) before it counts as failed; a whole answer may take 4 times this.
    pub timeout: Duration,
    /// How long a failed peer is avoided.
    pub penalty: Duration,
    /// Peer requests served at once, in total.
    pub max_uploads: usize,
    /// Peer requests served at once to one peer (by IP address).
    pub max_uploads_per_peer: usize,
    /// Speak HTTPS to peers, trusting the CAs in this PEM file (`--peer-tls-ca`). Every
    /// node of a cluster must then serve its peer port with TLS.
    pub tls_ca: Option<std::path::PathBuf>,
    /// The client certificate and key (PEM) presented to peers that require one.
    pub tls_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Default for PeerOptions {
    fn default() -> Self {
        Self {
            token: None,
            insecure: false,
            timeout: Duration::from_secs(5),
            penalty: Duration::from_secs(60),
            max_uploads: 8,
            max_uploads_per_peer: 3,
            tls_ca: None,
            tls_identity: None,
        }
    }
}

impl PeerOptions {
    /// Whether this node fetches from peers: it has a token, or runs insecure.
    pub fn enabled(&self) -> bool {
        self.token.is_some() || self.insecure
    }
}

/// Why a peer counted as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A connection or HTTP error, or an unexpected status.
    Error,
    /// No full answer within the timeout.
    Timeout,
    /// A malformed answer, or a chunk that is not what was asked for.
    Corrupt,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Corrupt => "corrupt",
        }
    }
}

/// What this node knows about its peers (which ones to avoid, until when) and the P2P
/// counters, both directions.
#[derive(Debug, Default)]
pub(crate) struct PeerBook {
    bad_until: Mutex<HashMap<String, Instant>>,
    failures: [AtomicU64; 3],
    pub(crate) fetched_bytes: AtomicU64,
    pub(crate) fetched_chunks: AtomicU64,
    pub(crate) served_chunks: AtomicU64,
    pub(crate) served_bytes: AtomicU64,
    pub(crate) served_corrupt: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) busy: AtomicU64,
    /// A scrub started by the peer service is running.
    pub(crate) scrubbing: std::sync::atomic::AtomicBool,
    /// Chunks recently encoded for peers.
    pub(crate) frames: Mutex<FrameCache>,
}

/// Bytes of encoded chunks the peer service keeps in memory.
pub const FRAME_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Chunks recently encoded for peers, so a chunk several peers ask for is read, checked and
/// compressed once. Oldest first out, bounded by [`FRAME_CACHE_BYTES`]. Only chunks that
/// passed their check enter it.
#[derive(Debug, Default)]
pub(crate) struct FrameCache {
    map: HashMap<ChunkId, Arc<EncodedChunk>>,
    order: VecDeque<ChunkId>,
    bytes: usize,
}

impl FrameCache {
    pub(crate) fn get(&self, id: &ChunkId) -> Option<Arc<EncodedChunk>> {
        self.map.get(id).cloned()
    }

    pub(crate) fn put(&mut self, id: ChunkId, chunk: Arc<EncodedChunk>) {
        if chunk.payload.len() > FRAME_CACHE_BYTES || self.map.contains_key(&id) {
            return;
        }
        self.bytes += chunk.payload.len();
        self.map.insert(id, chunk);
        self.order.push_back(id);
        while self.bytes > FRAME_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(c) = self.map.remove(&old) {
                self.bytes -= c.payload.len();
            }
        }
    }
}

impl PeerBook {
    /// Whether `endpoint` failed recently.
    pub(crate) fn is_bad(&self, endpoint: &str) -> bool {
        let mut bad = self.bad_until.lock().expect("peer book lock");
        match bad.get(endpoint) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                bad.remove(endpoint);
                false
            }
            None => false,
        }
    }

    /// Records a failure of `endpoint` and avoids it for `penalty`.
    pub(crate) fn failed(&self, endpoint: &str, why: Failure, detail: &str, penalty: Duration) {
        self.failures[why as usize].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            peer = endpoint,
            reason = why.label(),
            detail,
            avoid_for = ?penalty,
            "peer failed; fetching its chunks from the registry"
        );
        self.bad_until.lock().expect("peer book lock").insert(endpoint.to_owned(), Instant::now() + penalty);
    }

    /// The P2P metrics, in the text exposition format.
    pub(crate) fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP thaw_cache_peer_failures_total peer fetches that failed, by reason\n\
             # TYPE thaw_cache_peer_failures_total counter"
        );
        for f in [Failure::Error, Failure::Timeout, Failure::Corrupt] {
            let _ = writeln!(
                out,
                "thaw_cache_peer_failures_total{{reason=\"{}\"}} {}",
                f.label(),
                get(&self.failures[f as usize])
            );
        }
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "thaw_cache_peer_fetched_chunks_total",
            "chunks fetched from peers and verified",
            get(&self.fetched_chunks),
        );
        counter(
            "thaw_cache_peer_fetched_bytes_total",
            "uncompressed bytes of chunks fetched from peers",
            get(&self.fetched_bytes),
        );
        counter("thaw_cache_peer_served_chunks_total", "chunks served to peers", get(&self.served_chunks));
        counter(
            "thaw_cache_peer_served_bytes_total",
            "encoded bytes of chunks served to peers",
            get(&self.served_bytes),
        );
        counter(
            "thaw_cache_peer_served_corrupt_total",
            "cached chunks that failed their check when a peer asked for them (not sent)",
            get(&self.served_corrupt),
        );
        counter(
            "thaw_cache_peer_refused_total",
            "peer requests refused for a missing or wrong token",
            get(&self.refused),
        );
        counter(
            "thaw_cache_peer_busy_total",
            "peer requests turned away at the upload limits",
            get(&self.busy),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves() {
        let t = PeerToken::new("  s3cret-cluster-token\n").unwrap();
        assert!(t.matches(b"s3cret-cluster-token"));
        assert!(!t.matches(b"s3cret-cluster-tokeN"));
        assert!(!t.matches(b"s3cret-cluster-token "));
        assert!(!t.matches(b""));
        assert!(PeerToken::new("short").is_err());
        assert!(PeerToken::new("has a space in the middle").is_err());
        assert_eq!(format!("{t:?}"), "PeerToken(1 accepted, ..)");
    }

    #[test]
    fn a_token_file_may_hold_several_while_rotating() {
        let t = PeerToken::from_lines("# rotating\nnew-token-0123456789\n\nold-token-0123456789\n").unwrap();
        assert_eq!(t.as_str(), "new-token-0123456789");
        assert!(t.matches(b"new-token-0123456789") && t.matches(b"old-token-0123456789"));
        assert!(!t.matches(b"other-token-0123456789"));
        assert!(PeerToken::from_lines("# nothing\n").is_err());
        assert!(PeerToken::from_lines("good-token-0123456789\nshort\n").is_err());
    }

    #[test]
    fn the_frame_cache_keeps_the_newest_within_its_bound() {
        let mut cache = FrameCache::default();
        let chunk = |n: u8| Arc::new(EncodedChunk::compress(&vec![n; 4 << 20], 1));
        let big = |_: u8| {
            let mut noise = vec![0u8; 4 << 20];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut noise);
            Arc::new(EncodedChunk::compress(&noise, 1))
        };
        let ids: Vec<ChunkId> = (0..20u8).map(|n| ChunkId::of(&[n])).collect();
        cache.put(ids[0], chunk(0));
        assert!(cache.get(&ids[0]).is_some());
        for (i, id) in ids.iter().enumerate().skip(1) {
            cache.put(*id, big(i as u8));
        }
        assert!(cache.bytes <= FRAME_CACHE_BYTES);
        assert!(cache.get(&ids[0]).is_none() && cache.get(&ids[1]).is_none(), "the oldest went first");
        assert!(cache.get(&ids[19]).is_some());
        assert_eq!(cache.map.len(), cache.order.len());
    }

    #[test]
    fn failed_peers_are_avoided_for_the_penalty() {
        let book = PeerBook::default();
        assert!(!book.is_bad("a:1"));
        book.failed("a:1", Failure::Corrupt, "test", Duration::from_secs(60));
        book.failed("b:1", Failure::Timeout, "test", Duration::ZERO);
        assert!(book.is_bad("a:1"));
        assert!(!book.is_bad("b:1"), "an expired penalty is forgotten");
        let text = book.render();
        assert!(text.contains("thaw_cache_peer_failures_total{reason=\"corrupt\"} 1\n"), "{text}");
        assert!(text.contains("thaw_cache_peer_failures_total{reason=\"timeout\"} 1\n"), "{text}");
    }
}
