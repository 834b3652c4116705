//! The userfaultfd calls the page server makes, and the only `unsafe` of the crate.
//!
//! The descriptor comes from the VMM (Firecracker) over the handshake socket; the guest
//! memory it was registered over lives in the VMM's process, not in ours. Three ioctls
//! are made on it: `UFFDIO_COPY` (fill pages with bytes), `UFFDIO_ZEROPAGE` (fill pages
//! with zeros) and `UFFDIO_WAKE` (wake threads waiting on pages that are already there).
//!
//! # Invariants (why each `unsafe` block is sound)
//!
//! - **Our memory.** The only pointer into *this* process that the kernel dereferences is
//!   `src` of `UFFDIO_COPY`, taken from a live `&[u8]` whose length is the `len` passed:
//!   the kernel reads exactly `len` bytes from it, and the slice outlives the call.
//! - **Their memory.** `dst` addresses are addresses in the *VMM's* address space. The
//!   kernel resolves them against the userfaultfd's own `mm`, checks that they lie in a
//!   range registered on that descriptor, and fails the call (`ENOENT`, `EINVAL`) if not;
//!   it never writes through them into this process. A wrong `dst` can therefore at worst
//!   fill the wrong page *of the VM* — which is why the callers map addresses only through
//!   the validated region list (`handshake.rs`) and only copy bytes that were checked
//!   against their chunk ids.
//! - **The argument structs** are the kernel's own layouts (`linux-raw-sys`), each passed
//!   by `&mut` to an opcode built for exactly that type (`opcode::read_write::<T>` /
//!   `read::<T>`), as `rustix::ioctl::Updater` requires.
//! - **Messages** read from the descriptor are parsed from plain bytes, field by field; no
//!   pointer cast is involved.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use linux_raw_sys::general::{
    uffdio_copy, uffdio_range, uffdio_zeropage, _UFFDIO_COPY, _UFFDIO_WAKE, _UFFDIO_ZEROPAGE,
    UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE,
};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Opcode, Updater};

/// `ioctl(2)` group of userfaultfd.
const UFFDIO: u8 = 0xAA;
const COPY: Opcode = opcode::read_write::<uffdio_copy>(UFFDIO, _UFFDIO_COPY as u8);
const ZEROPAGE: Opcode = opcode::read_write::<uffdio_zeropage>(UFFDIO, _UFFDIO_ZEROPAGE as u8);
const WAKE: Opcode = opcode::read::<uffdio_range>(UFFDIO, _UFFDIO_WAKE as u8);

/// Size of one `struct uffd_msg`.
pub(crate) const MSG_LEN: usize = 32;

/// What happened to a fill call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filled {
    /// The whole range was filled (and its waiters woken).
    All,
    /// Only the first `n` bytes were filled; the caller retries the rest.
    Partly(u64),
    /// The first page of the range is already present (`EEXIST`).
    FirstPageExists,
    /// Nothing was filled because the VMM is changing its mappings (a remove event is
    /// pending, `EAGAIN`): read events, then retry.
    Busy,
}

/// A userfaultfd received from the VMM.
#[derive(Debug)]
pub(crate) struct Userfault {
    fd: OwnedFd,
}

impl AsFd for Userfault {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Userfault {
    /// Takes ownership of a received descriptor and makes reads on it non-blocking (the
    /// event loop polls it). Fails if it is not a userfaultfd: the kernel names those
    /// `anon_inode:[userfaultfd]`.
    pub(crate) fn from_received(fd: OwnedFd) -> std::io::Result<Self> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)))?;
        if link.to_string_lossy() != "anon_inode:[userfaultfd]" {
            return Err(std::io::Error::other(format!(
                "the descriptor received is {}, not a userfaultfd",
                link.display()
            )));
        }
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(Self { fd })
    }

    /// `UFFDIO_COPY`: fills `[dst, dst + src.len())` of the VM with `src` and wakes the
    /// threads waiting there. `dst` and `src.len()` are multiples of the region's page size.
    pub(crate) fn copy(&self, dst: u64, src: &[u8]) -> Result<Filled, Errno> {
        let mut arg = uffdio_copy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
        // SAFETY: see the module invariants: `src` is a live slice of `len` bytes, `dst` is
        // checked by the kernel against the descriptor's registered ranges, and `arg` is
        // the layout `COPY` is built for.
        let result = unsafe { ioctl(&self.fd, Updater::<COPY, uffdio_copy>::new(&mut arg)) };
        interpret(result, arg.copy, src.len() as u64)
    }

    /// `UFFDIO_ZEROPAGE`: fills `[dst, dst + len)` of the VM with zeros and wakes waiters.
    pub(crate) fn zero(&self, dst: u64, len: u64) -> Result<Filled, Errno> {
        let mut arg = uffdio_zeropage { range: uffdio_range { start: dst, len }, mode: 0, zeropage: 0 };
        // SAFETY: no pointer into this process is passed; `dst` is checked by the kernel;
        // `arg` is the layout `ZEROPAGE` is built for.
        let result = unsafe { ioctl(&self.fd, Updater::<ZEROPAGE, uffdio_zeropage>::new(&mut arg)) };
        interpret(result, arg.zeropage, len)
    }

    /// `UFFDIO_WAKE`: wakes threads waiting on `[dst, dst + len)` (pages already present).
    pub(crate) fn wake(&self, dst: u64, len: u64) -> Result<(), Errno> {
        let mut arg = uffdio_range { start: dst, len };
        // SAFETY: no pointer into this process is passed; `arg` is the layout `WAKE` is
        // built for.
        unsafe { ioctl(&self.fd, Updater::<WAKE, uffdio_range>::new(&mut arg)) }
    }
}

/// Maps an ioctl's result and its count field (bytes done, or `-errno`) to [`Filled`].
fn interpret(result: Result<(), Errno>, done: i64, len: u64) -> Result<Filled, Errno> {
    match result {
        Ok(()) => Ok(Filled::All),
        Err(Errno::AGAIN) if done > 0 && (done as u64) < len => Ok(Filled::Partly(done as u64)),
        Err(Errno::AGAIN) => Ok(Filled::Busy),
        Err(Errno::EXIST) => Ok(Filled::FirstPageExists),
        Err(e) => Err(e),
    }
}

/// One message read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A thread touched the page holding `address` (a VMM address).
    PageFault { address: u64 },
    /// The VMM dropped `[start, end)` (`madvise(MADV_DONTNEED)`, the balloon): those pages
    /// read as zero from now on.
    Remove { start: u64, end: u64 },
    /// An event this server does not act on (fork, remap, unmap were not asked for).
    Other(u8),
}

/// Parses one `struct uffd_msg`: `event` (u8) at 0, then the argument union at 8:
/// `pagefault { flags: u64, address: u64, .. }` or `remove { start: u64, end: u64 }`.
pub(crate) fn parse_event(msg: &[u8; MSG_LEN]) -> Event {
    let word = |at: usize| u64::from_ne_bytes(msg[at..at + 8].try_into().expect("8 bytes"));
    match u32::from(msg[0]) {
        UFFD_EVENT_PAGEFAULT => Event::PageFault { address: word(16) },
        UFFD_EVENT_REMOVE => Event::Remove { start: word(8), end: word(16) },
        other => Event::Other(other as u8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_are_the_kernels() {
        // Built here from the structs' sizes; the kernel headers' numbers must agree.
        assert_eq!(COPY, linux_raw_sys::ioctl::UFFDIO_COPY);
        assert_eq!(ZEROPAGE, linux_raw_sys::ioctl::UFFDIO_ZEROPAGE);
        assert_eq!(WAKE, linux_raw_sys::ioctl::UFFDIO_WAKE);
    }

    #[test]
    fn messages_parse() {
        let mut msg = [0u8; MSG_LEN];
        msg[0] = UFFD_EVENT_PAGEFAULT as u8;
        msg[8..16].copy_from_slice(&1u64.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x7f00_1234_5000u64.to_ne_bytes());
        assert_eq!(parse_event(&msg), Event::PageFault { address: 0x7f00_1234_5000 });
        msg[0] = UFFD_EVENT_REMOVE as u8;
        msg[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x3000u64.to_ne_bytes());
        assert_eq!(parse_event(&msg), Event::Remove { start: 0x1000, end: 0x3000 });
        msg[0] = 0x14;
        assert_eq!(parse_event(&msg), Event::Other(0x14));
    }

    #[test]
    fn results_map_to_fills() {
        assert_eq!(interpret(Ok(()), 8192, 8192), Ok(Filled::All));
        assert_eq!(interpret(Err(Errno::AGAIN), 4096, 8192), Ok(Filled::Partly(4096)));
        assert_eq!(interpret(Err(Errno::AGAIN), -11, 8192), Ok(Filled::Busy));
        assert_eq!(interpret(Err(Errno::EXIST), -17, 8192), Ok(Filled::FirstPageExists));
        assert_eq!(interpret(Err(Errno::SRCH), -3, 8192), Err(Errno::SRCH));
    }
}
