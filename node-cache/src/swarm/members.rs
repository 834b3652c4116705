//! The other members of a swarm: who owns each segment (rendezvous hashing), what each has
//! (their bitmaps, looked at together and shared by the batches in flight), and asking one
//! of them for chunks.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thaw_schema::frame::EncodedChunk;
use thaw_schema::{ChunkId, Sha256Digest};

use super::progress::WorkFile;
use super::source::SwarmSource;
use crate::peer::fetch::{ask_bitmap, Bitmap, BitmapAsker, Peer};

/// The rendezvous score of `name` for the segment starting with `first`.
pub(super) fn score(first: &ChunkId, name: &str) -> ChunkId {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(first.as_bytes());
    ChunkId::of(&key)
}

/// The owner of the segment starting with `first` among `me` and `others`: the highest
/// BLAKE3 of name and chunk id (rendezvous hashing, so every member agrees).
fn owner<'a>(first: &ChunkId, me: &'a str, others: impl Iterator<Item = &'a str>) -> &'a str {
    let mut best = (score(first, me), me);
    for name in others {
        let s = score(first, name);
        if s > best.0 {
            best = (s, name);
        }
    }
    best.1
}

/// A member's bitmap of one blob, as last fetched.
#[derive(Clone)]
pub(super) enum Bits {
    Complete,
    Some(Vec<u8>),
}

impl Bits {
    pub(super) fn has(&self, i: usize) -> bool {
        match self {
            Self::Complete => true,
            Self::Some(b) => b.get(i / 8).is_some_and(|byte| byte & (1 << (i % 8)) != 0),
        }
    }
}

/// The members' bitmaps of one blob, from one look.
pub(super) struct Look {
    pub(super) at: Instant,
    /// Healthy members (name, endpoint) and what each has (`None`: nothing known).
    pub(super) members: Vec<(String, String, Option<Bits>)>,
}

impl Look {
    /// Whether a member that is materializing the snapshot too has chunk `i`.
    pub(super) fn swarm_has(&self, i: usize) -> bool {
        self.members.iter().any(|(_, _, b)| matches!(b, Some(b @ Bits::Some(_)) if b.has(i)))
    }

    /// A member holding the complete snapshot: name and endpoint.
    pub(super) fn complete_holder(&self) -> Option<(&str, &str)> {
        self.members
            .iter()
            .find_map(|(n, e, b)| matches!(b, Some(Bits::Complete)).then_some((n.as_str(), e.as_str())))
    }
}

impl SwarmSource {
    /// A member's bitmap of `blob`; `None` when it failed (it is then marked bad) or does not
    /// know the snapshot.
    async fn bitmap(&self, endpoint: &str, blob: &Sha256Digest) -> Option<Bits> {
        let asker = BitmapAsker { node: &self.me, endpoint: self.my_endpoint.as_deref() };
        match ask_bitmap(&self.http, &self.options, asker, endpoint, &self.snapshot, blob).await {
            Ok(Bitmap::Complete) => Some(Bits::Complete),
            Ok(Bitmap::Partial(bits)) => Some(Bits::Some(bits)),
            Ok(Bitmap::Unknown) => None,
            Err((why, detail)) => {
                self.book.failed(endpoint, why, &detail, self.options.penalty);
                None
            }
        }
    }

    fn members(&self) -> BTreeMap<String, String> {
        self.materializing.members.lock().expect("members lock").clone()
    }

    /// Looks at every healthy member's bitmap of `blob` now.
    async fn look(&self, blob: &Sha256Digest) -> Arc<Look> {
        let healthy: Vec<(String, String)> =
            self.members().into_iter().filter(|(_, e)| !self.book.is_bad(e)).collect();
        let bits = futures::future::join_all(healthy.iter().map(|(_, e)| self.bitmap(e, blob))).await;
        let look = Arc::new(Look {
            at: Instant::now(),
            members: healthy.into_iter().zip(bits).map(|((n, e), b)| (n, e, b)).collect(),
        });
        let complete = look.members.iter().filter(|(_, _, b)| matches!(b, Some(Bits::Complete)));
        self.complete.lock().expect("complete lock").extend(complete.map(|(n, _, _)| n.clone()));
        self.looks.lock().expect("looks lock").insert(*blob, look.clone());
        look
    }

    /// The last look at `blob`'s bitmaps, if it is at most `max_age` old, else a new one.
    /// The batches in flight share looks, so the members get a few bitmap requests per
    /// [`POLL`], not one per batch.
    pub(super) async fn recent_look(&self, blob: &Sha256Digest, max_age: Duration) -> Arc<Look> {
        let last = self.looks.lock().expect("looks lock").get(blob).cloned();
        match last {
            Some(l) if l.at.elapsed() <= max_age => l,
            _ => self.look(blob).await,
        }
    }

    /// The members that own segments: those materializing the snapshot too.
    pub(super) fn owners(&self) -> BTreeMap<String, String> {
        let complete = self.complete.lock().expect("complete lock").clone();
        self.members().into_iter().filter(|(n, _)| !complete.contains(n)).collect()
    }

    /// Whether this node fetches segment `segment` of `file` (from a complete holder or the
    /// registry): it owns it among the owners, or its owner is marked bad.
    pub(super) fn mine(&self, file: &WorkFile, segment: usize, members: &BTreeMap<String, String>) -> bool {
        let the_owner = self.segment_owner(file, segment, members);
        the_owner == self.me || self.book.is_bad(&members[the_owner])
    }

    /// The owner of `segment` of `file` among this node and `owners`.
    pub(super) fn segment_owner<'a>(
        &'a self,
        file: &WorkFile,
        segment: usize,
        owners: &'a BTreeMap<String, String>,
    ) -> &'a str {
        let first = &file.chunks[file.segments[segment].start].0;
        owner(first, &self.me, owners.keys().map(String::as_str))
    }

    /// Asks the member `peer` for `want`, keeping the frames as sent; counts what arrives
    /// in the peer metrics. `None` when it failed (the peer is then marked bad).
    pub(super) async fn ask_member(
        &self,
        peer: &Peer,
        want: &[(ChunkId, u32)],
    ) -> Option<Vec<(ChunkId, Vec<u8>, EncodedChunk)>> {
        let asked_at = Instant::now();
        let answer = crate::peer::fetch::ask_frames(&self.http, &self.options, peer, want).await;
        tracing::debug!(
            node = %self.me,
            from = %peer.node,
            asked = want.len(),
            got = answer.as_ref().map_or(0, |c| c.len()),
            ms = asked_at.elapsed().as_millis() as u64,
            "member ask"
        );
        match answer {
            Ok(chunks) => {
                let bytes: u64 = chunks.iter().map(|(_, d, _)| d.len() as u64).sum();
                self.book.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.book.fetched_chunks.fetch_add(chunks.len() as u64, Ordering::Relaxed);
                Some(chunks)
            }
            Err((why, detail)) => {
                let detail = format!("swarm member {}: {detail}", peer.node);
                self.book.failed(&peer.endpoint, why, &detail, self.options.penalty);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn every_member_agrees_on_the_owner_and_owners_spread() {
        let names = ["node-a", "node-b", "node-c", "node-d"];
        let mut owned: HashMap<&str, usize> = HashMap::new();
        for n in 0..400u32 {
            let first = ChunkId::of(&n.to_le_bytes());
            let seen: Vec<&str> =
                names.iter().map(|me| owner(&first, me, names.iter().copied().filter(|o| o != me))).collect();
            assert!(seen.windows(2).all(|w| w[0] == w[1]), "members disagree: {seen:?}");
            *owned.entry(seen[0]).or_default() += 1;
        }
        assert_eq!(owned.len(), 4, "{owned:?}");
        assert!(owned.values().all(|n| *n > 50), "owners spread unevenly: {owned:?}");
    }
}
