//! A stand-in for Firecracker's side of a lazy restore (no Firecracker or KVM here). It does
//! what Firecracker's `guest_memory_from_uffd` and `send_uffd_handshake` do on
//! `PUT /snapshot/load` with `mem_backend: {"backend_type": "Uffd", "backend_path": SOCKET}`
//! (Firecracker's docs/snapshotting/handling-page-faults-on-snapshot-resume.md):
//!
//! 1. map the guest memory anonymously, one mapping per region;
//! 2. create a userfaultfd (close-on-exec, non-blocking, asking for remove events) and
//!    register every region on it for missing-page faults;
//! 3. connect to SOCKET and send, in one `sendmsg`, the JSON array of regions
//!    (`base_host_virt_addr`, `size`, `offset`, `page_size`, `page_size_kib`) with the
//!    descriptor as `SCM_RIGHTS`; keep the socket open (Firecracker leaks it on purpose)
//!    and keep its own copy of the descriptor.
//!
//! Touching a page then blocks the touching thread until the handler fills it, exactly as
//! a vCPU blocks. [`FirecrackerStandIn::touch`] plays a VM's vCPUs: several threads touch
//! pages (a recorded trace, `fault_trace.rs`), each page compared with the memory file, each
//! fault timed.
//!
//! Shared, unchanged, by the lazy-restore tests (`tests/lazy.rs`) and the benchmark runner
//! (`integration/src/bin/bench/lazy.rs` includes this file with `#[path]`).
//!
//! # Safety
//!
//! The mappings are created here and live as long as the stand-in; every pointer read goes
//! through [`FirecrackerStandIn::read_page`], which checks the offset against the regions.
//! Reads of a registered page block in the kernel until it is filled, then read what the
//! handler put there: plain memory reads of memory this process owns.
#![allow(unsafe_code, unreachable_pub, dead_code)]

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use linux_raw_sys::general::{
    uffdio_api, uffdio_range, uffdio_register, _UFFDIO_API, _UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_MISSING,
    UFFD_API, UFFD_FEATURE_EVENT_REMOVE,
};
use rustix::ioctl::{ioctl, opcode, Opcode, Updater};
use rustix::mm::{MapFlags, ProtFlags, UserfaultfdFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

pub const PAGE: usize = 4096;
const API: Opcode = opcode::read_write::<uffdio_api>(0xAA, _UFFDIO_API as u8);
const REGISTER: Opcode = opcode::read_write::<uffdio_register>(0xAA, _UFFDIO_REGISTER as u8);

/// One region: `len` bytes mapped at `base`, holding memory-file bytes from `offset`.
struct Mapped {
    base: usize,
    len: usize,
    offset: usize,
}

/// A VM's guest memory, handed to a page-fault handler as Firecracker hands it.
pub struct FirecrackerStandIn {
    regions: Vec<Mapped>,
    _uffd: OwnedFd,
    socket: Option<UnixStream>,
}

impl FirecrackerStandIn {
    /// "Loads the snapshot": guest memory of `memory_size` bytes in regions cut at
    /// `splits` (file offsets, page-aligned), handed to the handler listening on `socket`.
    pub fn load(socket: &Path, memory_size: usize, splits: &[usize]) -> std::io::Result<Self> {
        let mut bounds = vec![0];
        bounds.extend_from_slice(splits);
        bounds.push(memory_size);
        // SAFETY: creating the descriptor has no memory effects by itself.
        let uffd =
            unsafe { rustix::mm::userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK)? };
        let mut api =
            uffdio_api { api: UFFD_API.into(), features: UFFD_FEATURE_EVENT_REMOVE.into(), ioctls: 0 };
        // SAFETY: `api` is the struct the UFFDIO_API opcode is built for.
        unsafe { ioctl(&uffd, Updater::<API, uffdio_api>::new(&mut api))? };
        let mut regions = Vec::new();
        for w in bounds.windows(2) {
            let len = w[1] - w[0];
            let base = map_anonymous(len)?;
            let mut reg = uffdio_register {
                range: uffdio_range { start: base as u64, len: len as u64 },
                mode: UFFDIO_REGISTER_MODE_MISSING.into(),
                ioctls: 0,
            };
            // SAFETY: `reg` is the struct UFFDIO_REGISTER is built for; the range is ours.
            unsafe { ioctl(&uffd, Updater::<REGISTER, uffdio_register>::new(&mut reg))? };
            regions.push(Mapped { base, len, offset: w[0] });
        }
        let message = serde_json::to_string(
            &regions
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "base_host_virt_addr": r.base as u64,
                        "size": r.len,
                        "offset": r.offset as u64,
                        "page_size": PAGE,
                        "page_size_kib": PAGE,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .expect("serializes");
        let stream = UnixStream::connect(socket)?;
        let fds = [uffd.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        let sent = rustix::net::sendmsg(
            &stream,
            &[IoSlice::new(message.as_bytes())],
            &mut control,
            SendFlags::empty(),
        )?;
        assert_eq!(sent, message.len(), "the handshake went out in one message");
        Ok(Self { regions, _uffd: uffd, socket: Some(stream) })
    }

    /// The page at memory-file offset `offset` (page-aligned), as the guest sees it.
    /// Blocks until the handler has filled it.
    pub fn read_page(&self, offset: usize) -> [u8; PAGE] {
        assert_eq!(offset % PAGE, 0);
        let at = self.address(offset);
        let mut out = [0u8; PAGE];
        // SAFETY: `address` found the page inside a mapping this stand-in owns.
        unsafe {
            std::ptr::copy_nonoverlapping(at as *const u8, out.as_mut_ptr(), PAGE);
        }
        out
    }

    /// The address of memory-file offset `offset` in this process.
    fn address(&self, offset: usize) -> usize {
        let r = self
            .regions
            .iter()
            .find(|r| offset >= r.offset && offset < r.offset + r.len)
            .expect("offset inside guest memory");
        r.base + offset - r.offset
    }

    /// Touches the pages at `offsets` (memory-file offsets, page-aligned) from `threads`
    /// threads at once, as a VM's vCPUs would (thread `t` takes every `threads`-th page,
    /// in order), compares each page with `source` (the memory file's bytes) and times
    /// every touch that faulted: whether a page is present is read from
    /// `/proc/self/pagemap` just before it is touched, and a touch of a page that was not
    /// is a fault, timed until the read returned (the handler filled it). Fails if the
    /// touches are not all done within `deadline` (the threads are then left blocked).
    pub fn touch(
        self: &Arc<Self>,
        source: &Arc<Vec<u8>>,
        offsets: &[usize],
        threads: usize,
        deadline: Duration,
    ) -> Result<Touched, String> {
        let started = Instant::now();
        let (done, finished) = mpsc::channel();
        let offsets = Arc::new(offsets.to_vec());
        for t in 0..threads {
            let (vm, source, offsets, done) = (self.clone(), source.clone(), offsets.clone(), done.clone());
            std::thread::spawn(move || {
                let pagemap = std::fs::File::open("/proc/self/pagemap");
                let mut out = Touched::default();
                for &offset in offsets.iter().skip(t).step_by(threads) {
                    let present = pagemap.as_ref().ok().and_then(|f| {
                        let mut entry = [0u8; 8];
                        let at = (vm.address(offset) / PAGE * 8) as u64;
                        f.read_exact_at(&mut entry, at).ok().map(|()| u64::from_ne_bytes(entry) >> 63 == 1)
                    });
                    let before = Instant::now();
                    let page = vm.read_page(offset);
                    let took = before.elapsed();
                    if present == Some(false) {
                        out.fault_nanos.push(took.as_nanos() as u64);
                    }
                    if page[..] != source[offset..offset + PAGE] {
                        out.wrong.push(offset);
                    }
                }
                let _ = done.send(out);
            });
        }
        let until = started + deadline;
        let mut all = Touched::default();
        for _ in 0..threads {
            let left = until.saturating_duration_since(Instant::now());
            let part = finished
                .recv_timeout(left)
                .map_err(|_| format!("{} pages were not all served within {deadline:?}", offsets.len()))?;
            all.wrong.extend(part.wrong);
            all.fault_nanos.extend(part.fault_nanos);
        }
        all.took = started.elapsed();
        Ok(all)
    }

    /// Drops `pages` pages at `offset` as the balloon does (`madvise(MADV_DONTNEED)`): the
    /// handler gets a remove event, and the guest must read zeros there afterwards.
    pub fn balloon_remove(&self, offset: usize, pages: usize) {
        let r = self
            .regions
            .iter()
            .find(|r| offset >= r.offset && offset + pages * PAGE <= r.offset + r.len)
            .unwrap();
        // SAFETY: the range lies inside a mapping this stand-in owns.
        unsafe {
            rustix::mm::madvise(
                (r.base + offset - r.offset) as *mut std::ffi::c_void,
                pages * PAGE,
                rustix::mm::Advice::LinuxDontNeed,
            )
            .unwrap();
        }
    }

    /// The VM exits: its end of the socket closes.
    pub fn exit(&mut self) {
        self.socket = None;
    }
}

/// What [`FirecrackerStandIn::touch`] found.
#[derive(Debug, Default)]
pub struct Touched {
    /// Offsets of the pages whose bytes differed from the memory file.
    pub wrong: Vec<usize>,
    /// How long each touch that faulted blocked, nanoseconds.
    pub fault_nanos: Vec<u64>,
    /// From the first touch until every thread was done.
    pub took: Duration,
}

/// A fresh private anonymous mapping of `len` bytes, readable and writable, as guest memory
/// is; its address. The caller unmaps it.
fn map_anonymous(len: usize) -> std::io::Result<usize> {
    // SAFETY: a new mapping at an address the kernel picks; nothing else refers to it.
    let base = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )?
    };
    Ok(base as usize)
}

/// This machine's floor for a fault with no handler at all: how long each first write to a
/// page of fresh anonymous memory takes (one minor fault, the kernel zeroing a 4 KiB page),
/// over `pages` pages, nanoseconds. What a VM pays per page when its memory needs no bytes
/// from anywhere; the benchmark reports it beside the page server's figures.
pub fn minor_fault_nanos(pages: usize) -> std::io::Result<Vec<u64>> {
    let len = pages * PAGE;
    let base = map_anonymous(len)?;
    let mut nanos = Vec::with_capacity(pages);
    for p in 0..pages {
        let started = std::time::Instant::now();
        // SAFETY: inside the mapping made above, which is readable and writable.
        unsafe { std::ptr::write_volatile((base + p * PAGE) as *mut u8, 1) };
        nanos.push(started.elapsed().as_nanos() as u64);
    }
    // SAFETY: unmapping what was mapped above; no reference into it remains.
    unsafe { rustix::mm::munmap(base as *mut std::ffi::c_void, len)? };
    Ok(nanos)
}

impl Drop for FirecrackerStandIn {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: unmapping what `load` mapped; no reference into it outlives `self`.
            let _ = unsafe { rustix::mm::munmap(r.base as *mut std::ffi::c_void, r.len) };
        }
    }
}
