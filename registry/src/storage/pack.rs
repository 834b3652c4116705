//! Packs: many chunk frames in one object, so that storing and reading chunks costs one
//! object-store request per several MiB instead of one per chunk (docs/DECISIONS.md D6).
//!
//! A **pack** (`chunks/packs/<pack id>`) is the magic `THAWPCK\x01` followed by chunk
//! frames (docs/FORMAT.md, "Chunk frame") back to back. It is written whole, in one PUT,
//! and never changed. Its **index** (`chunks/index/<pack id>`) says which chunk sits where:
//!
//! ```text
//! magic        8 bytes  "THAWPIX\x01"
//! count        u32 LE   number of entries
//! entries      count × (chunk id 32 bytes | frame offset u64 LE | frame length u32 LE)
//! checksum     32 bytes BLAKE3 of everything before it
//! ```
//!
//! The index is written only after its pack, so an index names only chunks that are stored.
//! A pack id is `<unix milliseconds, 13 digits>-<16 random hex digits>`: ids sort by
//! creation time, which lets a replica list only the indexes written since it last looked.

use std::ops::Range;

use thaw_schema::ChunkId;

/// First bytes of every pack.
pub(crate) const PACK_MAGIC: &[u8; 8] = b"THAWPCK\x01";
/// First bytes of every pack index.
pub(crate) const INDEX_MAGIC: &[u8; 8] = b"THAWPIX\x01";
const INDEX_ENTRY_LEN: usize = 32 + 8 + 4;
/// Index entries beyond this are refused (a pack is at most a few hundred MiB).
const MAX_INDEX_ENTRIES: usize = 1 << 22;

/// Names one pack and its index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PackId(String);

impl PackId {
    /// A new id, sorting after every id made earlier (by this host's clock).
    pub(crate) fn generate() -> Self {
        let millis =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Self(format!("{millis:013}-{}", hex::encode(rand::random::<[u8; 8]>())))
    }

    /// Parses the last component of a pack or index key.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (millis, random) = s.split_once('-')?;
        let ok = millis.len() == 13
            && millis.bytes().all(|b| b.is_ascii_digit())
            && random.len() == 16
            && random.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| Self(s.to_owned()))
    }

    /// The id as it appears in keys.
    #[cfg(test)]
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The smallest id of anything created at or after `millis`.
    pub(crate) fn floor_of(millis: u64) -> String {
        format!("{millis:013}")
    }

    /// Its creation time in unix milliseconds.
    pub(crate) fn millis(&self) -> u64 {
        self.0[..13].parse().unwrap_or(0)
    }
}

impl std::fmt::Display for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where one chunk's frame sits in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) id: ChunkId,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl IndexEntry {
    #[cfg(test)]
    pub(crate) fn range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }
}

/// Encodes a pack index.
pub(crate) fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 4 + entries.len() * INDEX_ENTRY_LEN + 32);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&u32::try_from(entries.len()).expect("index entry count fits u32").to_le_bytes());
    for e in entries {
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    let sum = *blake3::hash(&out).as_bytes();
    out.extend_from_slice(&sum);
    out
}

/// Decodes a pack index, checking its magic, length and checksum.
pub(crate) fn decode_index(bytes: &[u8]) -> Result<Vec<IndexEntry>, &'static str> {
    if bytes.len() < 8 + 4 + 32 {
        return Err("shorter than an empty index");
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch");
    }
    let rest = body.strip_prefix(INDEX_MAGIC.as_slice()).ok_or("bad magic")?;
    let count = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let rest = &rest[4..];
    if count > MAX_INDEX_ENTRIES || rest.len() != count * INDEX_ENTRY_LEN {
        return Err("entry count does not match the length");
    }
    Ok(rest
        .chunks_exact(INDEX_ENTRY_LEN)
        .map(|e| IndexEntry {
            id: ChunkId::from_bytes(e[..32].try_into().expect("32 bytes")),
            offset: u64::from_le_bytes(e[32..40].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(e[40..44].try_into().expect("4 bytes")),
        })
        .collect())
}

/// Collects chunk frames into one pack body.
#[derive(Debug)]
pub(crate) struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
}

impl PackBuilder {
    pub(crate) fn new() -> Self {
        Self { buf: PACK_MAGIC.to_vec(), entries: Vec::new() }
    }

    /// Appends a frame (header and payload written separately, so no frame is copied twice).
    pub(crate) fn push(&mut self, id: ChunkId, codec: u8, raw_len: u32, payload: &[u8]) {
        let offset = self.buf.len() as u64;
        self.buf.push(codec);
        self.buf.extend_from_slice(&raw_len.to_le_bytes());
        self.buf.extend_from_slice(payload);
        let len = u32::try_from(self.buf.len() as u64 - offset).expect("frame fits u32");
        self.entries.push(IndexEntry { id, offset, len });
    }

    /// Pack body size so far.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pack body and its index entries.
    pub(crate) fn finish(self) -> (Vec<u8>, Vec<IndexEntry>) {
        (self.buf, self.entries)
    }
}

/// How to fetch a window of wanted frames: a few ranged reads, and where in them each
/// wanted frame is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowPlan<P> {
    /// Ranged reads: pack and byte range.
    pub(crate) reads: Vec<(P, Range<u64>)>,
    /// For each wanted frame, in request order: the read holding it and its range within
    /// that read's bytes.
    pub(crate) picks: Vec<(usize, Range<usize>)>,
}

/// Plans the reads for `wanted` frames (pack, range), which may come in any order and
/// repeat. Frames are grouped by pack and sorted by offset; frames of one pack at most
/// `max_gap` bytes apart share one read (the gap is read and dropped) of at most
/// `max_read` bytes, and a repeated frame is read once. So a blob assembled from a few
/// packs costs a few reads however its chunks interleave.
pub(crate) fn plan_window<P: Clone + Ord>(
    wanted: &[(P, Range<u64>)],
    max_gap: u64,
    max_read: u64,
) -> WindowPlan<P> {
    let mut order: Vec<usize> = (0..wanted.len()).collect();
    order.sort_by(|&a, &b| (&wanted[a].0, wanted[a].1.start).cmp(&(&wanted[b].0, wanted[b].1.start)));
    let mut reads: Vec<(P, Range<u64>)> = Vec::new();
    let mut picks = vec![(0usize, 0usize..0usize); wanted.len()];
    for i in order {
        let (pack, frame) = &wanted[i];
        let joins = reads.last().is_some_and(|(p, r)| {
            p == pack
                && frame.start <= r.end.saturating_add(max_gap)
                && frame.end.max(r.end) - r.start <= max_read
        });
        if joins {
            let last = reads.last_mut().expect("a read to join");
            last.1.end = last.1.end.max(frame.end);
        } else {
            reads.push((pack.clone(), frame.clone()));
        }
        let n = reads.len() - 1;
        let base = reads[n].1.start;
        picks[i] = (n, (frame.start - base) as usize..(frame.end - base) as usize);
    }
    WindowPlan { reads, picks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trip_and_every_corruption_is_refused() {
        let entries: Vec<IndexEntry> = (0..5u8)
            .map(|i| IndexEntry { id: ChunkId::of(&[i]), offset: 8 + 100 * u64::from(i), len: 100 })
            .collect();
        let bytes = encode_index(&entries);
        assert_eq!(decode_index(&bytes).unwrap(), entries);
        assert_eq!(decode_index(&encode_index(&[])).unwrap(), vec![]);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(decode_index(&b).is_err(), "flip at {i} accepted");
            assert!(decode_index(&bytes[..i]).is_err(), "truncation at {i} accepted");
        }
    }

    #[test]
    fn pack_ids_sort_by_time_and_parse() {
        let a = PackId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = PackId::generate();
        assert!(a < b);
        assert_eq!(PackId::parse(a.as_str()), Some(a.clone()));
        assert!(a.as_str() > PackId::floor_of(a.millis()).as_str());
        for bad in ["", "123-abc", "000000000000x-0123456789abcdef", "0000000000001-0123456789ABCDEF"] {
            assert_eq!(PackId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn builder_places_frames_after_the_magic() {
        let mut p = PackBuilder::new();
        p.push(ChunkId::of(b"a"), 0, 3, b"abc");
        p.push(ChunkId::of(b"b"), 0, 2, b"de");
        let (body, entries) = p.finish();
        assert_eq!(&body[..8], PACK_MAGIC);
        assert_eq!(entries[0].range(), 8..16);
        assert_eq!(entries[1].range(), 16..23);
        assert_eq!(&body[entries[1].offset as usize..][..7], b"\x00\x02\x00\x00\x00de");
    }

    #[test]
    fn windows_group_by_pack_join_neighbours_and_read_repeats_once() {
        let wanted = vec![
            ("p", 8..20),
            ("q", 8..18), // interleaved with p: still one read of q
            ("p", 20..30),
            ("q", 18..30),
            ("p", 40..50),   // gap 10: joins with max_gap 16
            ("p", 100..110), // gap 50: new read
            ("p", 8..20),    // repeat: served by the first read
            ("q", 30..1000), // would exceed max_read: new read
        ];
        let plan = plan_window(&wanted, 16, 500);
        assert_eq!(plan.reads, vec![("p", 8..50), ("p", 100..110), ("q", 8..30), ("q", 30..1000)]);
        assert_eq!(
            plan.picks,
            vec![
                (0, 0..12),
                (2, 0..10),
                (0, 12..22),
                (2, 10..22),
                (0, 32..42),
                (1, 0..10),
                (0, 0..12),
                (3, 0..970)
            ]
        );
        assert_eq!(plan_window::<&str>(&[], 16, 500), WindowPlan { reads: vec![], picks: vec![] });
    }
}
