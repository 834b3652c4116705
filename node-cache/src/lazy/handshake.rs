//! Firecracker's side of a lazy restore, as its documentation and its VMM code define it
//! (docs/snapshotting/handling-page-faults-on-snapshot-resume.md): on `PUT /snapshot/load`
//! with `mem_backend: {"backend_type": "Uffd", "backend_path": SOCKET}`, Firecracker maps
//! guest memory anonymously, registers it on a new userfaultfd, connects to SOCKET and
//! sends, in one `sendmsg`, the descriptor as `SCM_RIGHTS` with a JSON array of
//! `GuestRegionUffdMapping`s:
//!
//! ```json
//! [{"base_host_virt_addr": 139637976727552, "size": 134217728, "offset": 0,
//!   "page_size": 4096, "page_size_kib": 4096}]
//! ```
//!
//! `offset` is where the region's bytes start in the memory file; `page_size` is in bytes
//! (4096, or 2 MiB with huge pages). Older releases sent only `page_size_kib` (in KiB);
//! current ones send both, with the same value in bytes, and `page_size_kib` deprecated —
//! so `page_size` wins when present. Nothing else is sent on the socket, and Firecracker
//! keeps it open for its life: end-of-file means the VM is gone.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use serde::Deserialize;

/// The longest handshake message accepted (a region is ~110 bytes of JSON).
const MAX_MESSAGE: usize = 64 * 1024;
/// The most regions accepted (x86 guests have one or two, below and above the PCI hole).
pub(crate) const MAX_REGIONS: usize = 64;
/// Page sizes Firecracker uses: normal pages, and 2 MiB huge pages.
const PAGE_SIZES: [u64; 2] = [4096, 2 * 1024 * 1024];

/// One region as Firecracker sends it (`GuestRegionUffdMapping`).
#[derive(Debug, Clone, Deserialize)]
struct WireRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    page_size_kib: Option<u64>,
}

/// A validated guest memory region: VMM addresses `[base, base + size)` hold bytes
/// `[offset, offset + size)` of the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    pub(crate) base: u64,
    pub(crate) size: u64,
    pub(crate) offset: u64,
}

/// What the VMM sent.
#[derive(Debug)]
pub(crate) struct Handshake {
    pub(crate) regions: Vec<Region>,
    pub(crate) page_size: u64,
    pub(crate) uffd: OwnedFd,
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("reading the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM closed the socket before sending its regions")]
    Closed,
    #[error("no userfaultfd came with the regions")]
    NoDescriptor,
    #[error("malformed region list: {0}")]
    Malformed(String),
    #[error("invalid regions: {0}")]
    Invalid(String),
}

/// Reads the handshake from a connected socket, waiting at most `timeout` for it (a VMM
/// that connects and never sends must not hold a thread), and validates the regions
/// against a memory file of `file_size` bytes.
pub(crate) fn receive(
    stream: &UnixStream,
    timeout: Duration,
    file_size: u64,
) -> Result<Handshake, HandshakeError> {
    stream.set_read_timeout(Some(timeout))?;
    let mut message = Vec::new();
    let mut uffd: Option<OwnedFd> = None;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                for fd in fds {
                    // The first descriptor is the userfaultfd; any other is closed.
                    uffd.get_or_insert(fd);
                }
            }
        }
        if got.bytes == 0 {
            return Err(HandshakeError::Closed);
        }
        message.extend_from_slice(&buf[..got.bytes]);
        if message.len() > MAX_MESSAGE {
            return Err(HandshakeError::Malformed(format!("longer than {MAX_MESSAGE} bytes")));
        }
        match serde_json::from_slice::<Vec<WireRegion>>(&message) {
            Ok(wire) => {
                let uffd = uffd.ok_or(HandshakeError::NoDescriptor)?;
                let (regions, page_size) = validate(&wire, file_size)?;
                return Ok(Handshake { regions, page_size, uffd });
            }
            // One sendmsg carries it all, but a stream socket may split it: read on.
            Err(e) if e.is_eof() => continue,
            Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
        }
    }
}

/// Checks the regions: one page size for all (4 KiB or 2 MiB), every field page-aligned,
/// no region past the end of the memory file (rounded up to a page), no two regions over
/// the same VMM addresses.
fn validate(wire: &[WireRegion], file_size: u64) -> Result<(Vec<Region>, u64), HandshakeError> {
    let invalid = |why: String| Err(HandshakeError::Invalid(why));
    if wire.is_empty() || wire.len() > MAX_REGIONS {
        return invalid(format!("{} regions (1 to {MAX_REGIONS} accepted)", wire.len()));
    }
    let page_of = |r: &WireRegion| r.page_size.or(r.page_size_kib.map(|k| k.saturating_mul(1024)));
    let Some(page) = page_of(&wire[0]) else {
        return invalid("no page size".into());
    };
    if !PAGE_SIZES.contains(&page) {
        return invalid(format!("page size {page} (4096 or 2097152 accepted)"));
    }
    let limit = file_size.div_ceil(page) * page;
    let mut regions = Vec::with_capacity(wire.len());
    for r in wire {
        if page_of(r) != Some(page) {
            return invalid("regions of different page sizes".into());
        }
        let aligned = [r.base_host_virt_addr, r.size, r.offset].iter().all(|v| v % page == 0);
        if !aligned || r.size == 0 {
            return invalid(format!("region {r:?} is empty or not aligned to {page}-byte pages"));
        }
        let file_end = r.offset.checked_add(r.size);
        let host_end = r.base_host_virt_addr.checked_add(r.size);
        if file_end.is_none_or(|end| end > limit) || host_end.is_none() {
            return invalid(format!("region {r:?} reaches past the {file_size}-byte memory file"));
        }
        regions.push(Region { base: r.base_host_virt_addr, size: r.size, offset: r.offset });
    }
    let mut by_base = regions.clone();
    by_base.sort_by_key(|r| r.base);
    if by_base.windows(2).any(|w| w[0].base + w[0].size > w[1].base) {
        return invalid("regions overlap".into());
    }
    Ok((regions, page))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(json: &str) -> Vec<WireRegion> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn current_and_older_firecracker_messages_are_understood() {
        let current = wire(
            r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096},
                {"base_host_virt_addr":65536,"size":4096,"offset":8192,"page_size":4096,"page_size_kib":4096}]"#,
        );
        let (regions, page) = validate(&current, 12288).unwrap();
        assert_eq!(page, 4096);
        assert_eq!(regions[1], Region { base: 65536, size: 4096, offset: 8192 });
        let older = wire(r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4}]"#);
        assert_eq!(validate(&older, 8192).unwrap().1, 4096);
    }

    #[test]
    fn bad_regions_are_refused() {
        let cases = [
            (r#"[]"#, 4096),
            (r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#, 8192),
            (r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":1000}]"#, 8192),
            (r#"[{"base_host_virt_addr":4097,"size":8192,"offset":0,"page_size":4096}]"#, 8192),
            (r#"[{"base_host_virt_addr":4096,"size":0,"offset":0,"page_size":4096}]"#, 8192),
            (r#"[{"base_host_virt_addr":4096,"size":8192,"offset":4096,"page_size":4096}]"#, 8192),
            (
                r#"[{"base_host_virt_addr":4096,"size":8192,"offset":18446744073709547520,"page_size":4096}]"#,
                8192,
            ),
            (
                r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},
                    {"base_host_virt_addr":8192,"size":4096,"offset":0,"page_size":4096}]"#,
                8192,
            ),
            (
                r#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096},
                    {"base_host_virt_addr":2097152,"size":2097152,"offset":0,"page_size":2097152}]"#,
                1 << 22,
            ),
        ];
        for (json, size) in cases {
            assert!(validate(&wire(json), size).is_err(), "accepted {json}");
        }
    }
}
