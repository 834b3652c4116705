//! Swarming on simultaneous cold pulls (docs/DECISIONS.md D19).
//!
//! A node materializing a snapshot registers it here ([`InProgress`]); its holdings then list
//! the snapshot with `cachedBytes: 0` (in progress), and its peer service answers bitmaps of
//! the chunks it has in hand and serves those chunks.
//!
//! The nodes materializing the same snapshot (the swarm: found in the holdings directory,
//! and from the bitmap requests they send) split the work by segment: each file's distinct
//! chunks, cut into runs of about [`SEGMENT_RAW_BYTES`]. Each segment has one owner among the
//! members that are materializing it, chosen by rendezvous hashing of its first chunk id over
//! their names, so every member agrees without talking. In the background of the client's
//! writes ([`SwarmSource::prefetch`]), in write order:
//!
//! - each node fetches the segments it owns from a member holding the complete snapshot if
//!   there is one, else from the registry, and keeps the frames as they came;
//! - its member workers ask the members whose bitmaps show them for the chunks it lacks
//!   (not the segment's owner when another member has them, then the member asked least,
//!   then spread by chunk id); while only the first holder has a chunk, only [`FANOUT`] members
//!   take it from there and the rest from them (a tree, so no uplink sends a segment to
//!   every member at once). What arrives is checked and held, and served on at once.
//!
//! The client's batches ([`SwarmSource`] as its `ChunkSource`) take what is held. Chunks held in memory are
//! served to peers without waiting for the in-order writer and without compressing again.
//! A chunk still missing when nothing has arrived at this node for [`STALL`], or whose
//! owner failed, comes from the registry.
//! Every peer chunk is checked against its id (twice: here and by the client).
//!
//! Rooms: [`progress`] is this node's own state of each snapshot it materializes (what is
//! written, what is held in memory, which segments it fetched); [`members`] is what it knows
//! of the other members (who owns a segment, their bitmaps, asking them for chunks);
//! [`prefetch`] runs the background workers; [`source`] is the `ChunkSource` the client's
//! materializer draws from. The peer HTTP protocol itself (paths, headers, framing) belongs
//! to `crate::peer`.
//!
//! Locks: each is held only for a map update, never across an await. Where several are
//! taken together, `Materializing::held` comes first, then `Materializing::asking` or
//! `Materializing::last_arrival`, then `SwarmSource::asking_from`.

use std::time::Duration;

mod members;
mod prefetch;
mod progress;
mod source;

pub(crate) use progress::{InProgress, Materializing};
pub(crate) use source::{RegistryFetch, SwarmSource};

/// How long chunks may stop arriving at this node (for any of its batches) before a batch
/// still waiting takes the rest of its chunks from the registry. Measured per
/// materialization, not per batch: the client asks for several batches ahead, and a later
/// one waits behind the earlier ones by design while the swarm works through the segments
/// in write order (a per-batch clock sent more copies from the registry: D19).
pub(crate) const STALL: Duration = Duration::from_secs(5);

/// How often a waiting batch looks at the members' bitmaps again (sooner when this node's
/// own frames arrive).
const POLL: Duration = Duration::from_millis(50);

/// How long a node that starts a materialization waits for its announcement (and the other
/// members') to reach the directory before the first batch: the publisher's debounce plus
/// one round trip (shorter let nodes start before they knew each other: D19).
pub(crate) const GATHER: Duration = Duration::from_millis(400);

/// How often a materialization looks for new swarm members in the directory.
pub(crate) const SWARM_REFRESH: Duration = Duration::from_millis(500);

/// Most members of one swarm this node keeps (the directory may list more).
const MAX_MEMBERS: usize = 64;

/// Uncompressed bytes of one segment, the unit the members split among themselves. Small
/// enough that 8 members get several each of a 100 MiB file (an even split), large enough
/// that one registry request per segment costs little.
const SEGMENT_RAW_BYTES: u64 = 2 << 20;

/// Registry requests for this node's own segments in flight at once, ahead of its writer.
const PREFETCH_WORKERS: usize = 2;

/// Requests to members in flight at once, each for up to a segment's worth of chunks.
/// Each node takes 7/8 of an 8-member swarm's snapshot from members, as fast as the
/// registry sends the other 1/8 to its owners: its downlink has to stay full. Fewer left the
/// downlinks half idle; more were no faster and cost CPU (measured: D19).
const MEMBER_WORKERS: usize = 5;

/// Members that take a segment from its first holder; the others take it from them.
const FANOUT: usize = 2;

/// Frames one materialization keeps in memory. Past this, the frames of chunks already
/// written are dropped (they are served from the work file), and prefetching waits for the
/// writer.
const MAX_HELD_BYTES: u64 = 256 << 20;

/// How old the last look at the members' bitmaps may be when prefetching decides whether a
/// segment is still needed from the registry.
const KNOWN_FRESH: Duration = Duration::from_millis(250);
