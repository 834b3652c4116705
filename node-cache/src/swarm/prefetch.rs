//! The background of a materialization: workers that fetch, ahead of the client's writer
//! and in its order, the segments this node owns (from a complete holder or the registry)
//! and, from the other members, the chunks it lacks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt as _;
use thaw_schema::{ChunkId, Sha256Digest};

use super::members::{score, Bits};
use super::progress::{Held, Materializing, SegmentState};
use super::source::SwarmSource;
use super::{FANOUT, KNOWN_FRESH, MEMBER_WORKERS, POLL, PREFETCH_WORKERS, SEGMENT_RAW_BYTES};
use crate::peer::fetch::Peer;

impl SwarmSource {
    /// Fetches `segments` of `blob` (already claimed) from the registry in one request, and
    /// holds their frames once each is checked against its id. On any failure the segments
    /// are marked failed: the client fetches those chunks itself, and reports what goes wrong.
    pub(super) async fn fetch_segments(&self, blob: Sha256Digest, segments: Vec<usize>) {
        let m = &self.materializing;
        let file = &m.files[&blob];
        let ids: Vec<ChunkId> = {
            let held = m.held.lock().expect("held lock");
            segments
                .iter()
                .flat_map(|s| file.chunks[file.segments[*s].clone()].iter().map(|(id, _, _)| *id))
                .filter(|id| !held.frames.contains_key(id) && !m.local.contains(id))
                .collect()
        };
        if ids.is_empty() {
            m.set_state(&blob, &segments, SegmentState::Done);
            return;
        }
        // From a member holding the complete snapshot, when there is one: the registry sends
        // nothing then, and that member sends each segment once, to its owner.
        let look = self.recent_look(&blob, KNOWN_FRESH).await;
        let ids = match look.complete_holder() {
            Some((name, endpoint)) => {
                let peer = Peer { node: name.to_owned(), endpoint: endpoint.to_owned(), same_snapshot: true };
                let want: Vec<(ChunkId, u32)> =
                    ids.iter().map(|id| (*id, file.chunks[file.index[id]].2)).collect();
                match self.ask_member(&peer, &want).await {
                    Some(chunks) => {
                        let arrived: HashSet<ChunkId> = chunks.iter().map(|(id, _, _)| *id).collect();
                        m.hold_ready(
                            chunks.into_iter().map(|(id, data, frame)| (id, Arc::new(frame), Some(data))),
                            true,
                        );
                        ids.into_iter().filter(|id| !arrived.contains(id)).collect()
                    }
                    None => ids,
                }
            }
            None => ids,
        };
        if ids.is_empty() {
            m.set_state(&blob, &segments, SegmentState::Done);
            return;
        }
        let checked = match self.registry.fetch_chunks(&self.repository, &blob, &ids).await {
            Ok(frames) => tokio::task::spawn_blocking(move || {
                frames
                    .into_iter()
                    .map(|(id, frame)| match frame.decode(&id) {
                        Ok(data) => Ok((id, Arc::new(frame), Some(data))),
                        Err(e) => Err((id, e)),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .expect("check task")
            .map_err(|(id, e)| format!("chunk {id}: {e}")),
            Err(e) => Err(e.to_string()),
        };
        match checked {
            Ok(frames) => {
                m.hold_ready(frames, false);
                m.set_state(&blob, &segments, SegmentState::Done);
            }
            Err(e) => {
                tracing::debug!(error = %e, "swarm segments from the registry failed; the client fetches them");
                m.set_state(&blob, &segments, SegmentState::Failed);
            }
        }
    }

    /// Fetches, ahead of the client and in the order it writes: the segments this node owns
    /// (from a complete holder or the registry; segments some member already has are left
    /// to the swarm), and, from the members, the chunks it lacks. Runs until cancelled (when
    /// the materialization ends).
    pub(crate) async fn prefetch(&self) -> std::convert::Infallible {
        let worker = || async {
            loop {
                let changed = self.materializing.changed.notified();
                match self.next_own_segment().await {
                    Some((blob, segment)) => {
                        let t = Instant::now();
                        self.fetch_segments(blob, vec![segment]).await;
                        tracing::debug!(node = %self.me, segment, ms = t.elapsed().as_millis() as u64, "prefetched own segment");
                    }
                    None => {
                        let _ = tokio::time::timeout(POLL * 4, changed).await;
                    }
                }
            }
        };
        let member_worker = || async {
            loop {
                if !self.ask_members_once().await {
                    tokio::time::sleep(POLL).await;
                }
            }
        };
        let workers = (0..PREFETCH_WORKERS).map(|_| worker().boxed());
        let members = (0..MEMBER_WORKERS).map(|_| member_worker().boxed());
        futures::future::join_all(workers.chain(members)).await;
        unreachable!("prefetch workers never return")
    }

    /// Claims the first segment, in write order, that this node owns, has not fetched, and
    /// no member has; `None` when there is none now (or the held frames are at their limit).
    async fn next_own_segment(&self) -> Option<(Sha256Digest, usize)> {
        let m = &self.materializing;
        if !m.held_fits() {
            return None;
        }
        let members = self.owners();
        for blob in &m.order {
            let file = &m.files[blob];
            let pending: Vec<usize> = (0..file.segments.len())
                .filter(|s| m.state(blob, *s) == SegmentState::Pending && self.mine(file, *s, &members))
                .collect();
            if pending.is_empty() {
                continue;
            }
            let look = if self.materializing.members.lock().expect("members lock").is_empty() {
                None
            } else {
                Some(self.recent_look(blob, KNOWN_FRESH).await)
            };
            for s in pending {
                // A member that joined late may already have it: then it comes from there.
                let everywhere =
                    look.as_ref().is_some_and(|l| file.segments[s].clone().all(|i| l.swarm_has(i)));
                if !everywhere && m.claim(blob, s) {
                    return Some((*blob, s));
                }
            }
        }
        None
    }

    /// One step of a member worker: asks one member for the earliest chunks, in write
    /// order, that this node lacks and that member has (up to a segment's worth), and holds
    /// what arrives, checked. Answers whether anything arrived.
    pub(super) async fn ask_members_once(&self) -> bool {
        let m = &self.materializing;
        if !m.held_fits() || m.members.lock().expect("members lock").is_empty() {
            return false;
        }
        for blob in &m.order {
            let file = &m.files[blob];
            let lacking = |held: &Held, asking: &HashSet<ChunkId>, written: u64, i: usize| {
                let (id, offset, len) = &file.chunks[i];
                !held.frames.contains_key(id)
                    && !m.local.contains(id)
                    && !asking.contains(id)
                    && offset + u64::from(*len) > written
            };
            let any_lacking = {
                let written = Materializing::written(file);
                let held = m.held.lock().expect("held lock");
                let asking = m.asking.lock().expect("asking lock");
                (0..file.chunks.len()).any(|i| lacking(&held, &asking, written, i))
            };
            if !any_lacking {
                continue;
            }
            let look = self.recent_look(blob, POLL).await;
            let owners = self.owners();
            let written = Materializing::written(file);
            let mut pick: Option<(usize, Vec<(ChunkId, u32)>)> = None;
            {
                let held = m.held.lock().expect("held lock");
                let mut asking = m.asking.lock().expect("asking lock");
                let mut raw = 0u64;
                let mut may_ask_first: HashMap<usize, bool> = HashMap::new();
                let mut owner_of: HashMap<usize, String> = HashMap::new();
                let busy_with = self.asking_from.lock().expect("asking lock").clone();
                for (i, (id, _, len)) in file.chunks.iter().enumerate() {
                    if !lacking(&held, &asking, written, i) {
                        continue;
                    }
                    // Not from a complete holder: it sends each segment to its owner only.
                    let mut holders: Vec<usize> = (0..look.members.len())
                        .filter(|k| matches!(&look.members[*k].2, Some(b @ Bits::Some(_)) if b.has(i)))
                        .collect();
                    // Fan out as a tree: while only the segment's first holder (its owner)
                    // has a chunk, only the FANOUT next-ranked members take it from there;
                    // the rest take it from them, so no member's uplink carries a segment to
                    // every other member at once.
                    if holders.len() == 1 {
                        let segment = file.segment_of[i];
                        let may = *may_ask_first.entry(segment).or_insert_with(|| {
                            let first = &file.chunks[file.segments[segment].start].0;
                            let mine = score(first, &self.me);
                            let above =
                                look.members.iter().filter(|(n, _, _)| score(first, n) > mine).count();
                            // The owner is above everyone: ranks 1..=FANOUT may ask it.
                            above <= FANOUT
                        });
                        if !may {
                            holders.clear();
                        }
                    }
                    // Of the holders: not the segment's owner when another has it (its
                    // uplink is the one everyone starts from), then the one this node asks
                    // least right now, then spread by chunk id.
                    let segment = file.segment_of[i];
                    let the_owner = owner_of
                        .entry(segment)
                        .or_insert_with(|| self.segment_owner(file, segment, &owners).to_owned());
                    let spread = usize::from(id.as_bytes()[0]);
                    let Some(holder) = holders.iter().copied().min_by_key(|k| {
                        let (name, endpoint, _) = &look.members[*k];
                        let busy = busy_with.get(endpoint.as_str()).copied().unwrap_or(0);
                        (name == the_owner, busy, (spread + k) % holders.len())
                    }) else {
                        continue;
                    };
                    match &mut pick {
                        None => pick = Some((holder, vec![(*id, *len)])),
                        Some((h, want)) if *h == holder => {
                            if raw + u64::from(*len) > SEGMENT_RAW_BYTES {
                                break;
                            }
                            want.push((*id, *len));
                        }
                        Some(_) => continue,
                    }
                    raw += u64::from(*len);
                }
                if let Some((_, want)) = &pick {
                    asking.extend(want.iter().map(|(id, _)| *id));
                }
            }
            let Some((k, want)) = pick else { continue };
            let (name, endpoint, _) = &look.members[k];
            *self.asking_from.lock().expect("asking lock").entry(endpoint.clone()).or_default() += 1;
            let peer = Peer { node: name.clone(), endpoint: endpoint.clone(), same_snapshot: false };
            let mut got_any = false;
            if let Some(chunks) = self.ask_member(&peer, &want).await {
                got_any = !chunks.is_empty();
                m.hold(chunks.into_iter().map(|(id, _, frame)| (id, Arc::new(frame))), true);
            }
            let mut asking = m.asking.lock().expect("asking lock");
            for (id, _) in &want {
                asking.remove(id);
            }
            if let Some(n) = self.asking_from.lock().expect("asking lock").get_mut(endpoint) {
                *n -= 1;
            }
            // Nothing (a busy member answers 503, as nothing): wait before asking again.
            return got_any;
        }
        false
    }
}
