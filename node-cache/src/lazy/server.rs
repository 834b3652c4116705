//! The page server: one Unix socket per lease, one fault loop per VM that connects.
//!
//! The loop reads userfaultfd events and never waits on a fetch itself: a fault on a unit
//! nobody asked for yet starts a task that gets the unit's bytes (local, or fetched ahead of
//! the background fill) and fills the whole unit with one `UFFDIO_COPY` (`UFFDIO_ZEROPAGE`
//! for a zero unit), waking every thread waiting in it. Faults on other units are served
//! meanwhile; further faults on a unit in progress just wait for its copy. A unit of a
//! complete memory file (a cached snapshot) is served by the loop itself, with no task:
//! the faulting page first (one page's `pread` and `UFFDIO_COPY` wake the thread), then,
//! once the events read with it are handled, the rest of the unit ([`serve_fault_now`]).
//!
//! Remove events (the balloon's `MADV_DONTNEED`) mark pages that must read as zero from
//! then on: a later fault there gets a zero page, never the file's bytes, and a unit copy
//! skips them.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::io::Read as _;
use std::os::unix::net::UnixStream;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use tokio::sync::{watch, Semaphore};

use super::fill::MemoryFill;
use super::handshake::{self, Region};
use super::layout::Layout;
use super::uffd::{parse_event, Event, Filled, Userfault, MSG_LEN};
use super::LazyMetrics;

/// How long a VMM that connected may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once on one lease's socket (one VM is the rule; a retried load
/// may briefly make two): a local client cannot tie up more than this many threads and
/// event loops.
const MAX_CONNECTIONS: usize = 4;
/// How often a VM's fault loop, waiting for events, checks whether its lease ended.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// Longest pause between two tries to fetch a unit that failed.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

const UNTOUCHED: u8 = 0;
const IN_PROGRESS: u8 = 1;
const FILLED: u8 = 2;

/// Serves the VMs that connect to `socket` from `fill` until `stop` turns true; then
/// removes the socket. Each VM's loop ends when it closes its end (it exited).
pub(crate) async fn serve_socket(
    listener: tokio::net::UnixListener,
    socket: PathBuf,
    fill: Arc<MemoryFill>,
    metrics: Arc<LazyMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(slot) = connections.clone().try_acquire_owned() else {
                        tracing::warn!("page server: {MAX_CONNECTIONS} VMs already connected to one lease's socket; refusing another");
                        continue;
                    };
                    let (fill, metrics, stop) = (fill.clone(), metrics.clone(), stop.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve_vm(stream, fill, metrics, stop).await {
                            tracing::warn!(error = %e, "page server: a VM's connection failed");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "page server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&socket);
}

/// Binds the lease's socket (a path of at most 107 bytes, the kernel's limit).
pub(crate) fn bind(socket: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if socket.as_os_str().len() > 107 {
        return Err(std::io::Error::other(format!(
            "{} is longer than a Unix socket path may be (107 bytes): use a shorter --cache-dir",
            socket.display()
        )));
    }
    tokio::net::UnixListener::bind(socket)
}

/// One VM: its userfaultfd, regions and the state of its units.
struct Vm {
    uffd: Userfault,
    regions: Vec<Region>,
    layout: Arc<Layout>,
    fill: Arc<MemoryFill>,
    units: Vec<AtomicU8>,
    /// Page addresses the VMM removed since they were last filled.
    removed: Mutex<HashSet<u64>>,
    /// The VM is gone: tasks stop retrying.
    gone: AtomicBool,
    metrics: Arc<LazyMetrics>,
}

impl Vm {
    fn page(&self) -> u64 {
        self.layout.page()
    }

    /// The file offset behind a VMM page address.
    fn file_offset(&self, address: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| address >= r.base && address - r.base < r.size)
            .map(|r| r.offset + (address - r.base))
    }
}

async fn serve_vm(
    stream: tokio::net::UnixStream,
    fill: Arc<MemoryFill>,
    metrics: Arc<LazyMetrics>,
    stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let stream = stream.into_std().map_err(|e| e.to_string())?;
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let size = fill.blob().1;
    let (stream, shake) = tokio::task::spawn_blocking(move || {
        let shake = handshake::receive(&stream, HANDSHAKE_TIMEOUT, size);
        (stream, shake)
    })
    .await
    .map_err(|e| format!("handshake task: {e}"))?;
    let shake = shake.map_err(|e| e.to_string())?;
    let uffd = Userfault::from_received(shake.uffd).map_err(|e| e.to_string())?;
    let layout = fill.layout(shake.page_size);
    tracing::info!(
        regions = shake.regions.len(),
        page = shake.page_size,
        units = layout.units(),
        "a VM connected"
    );
    let vm = Arc::new(Vm {
        uffd,
        regions: shake.regions,
        units: (0..layout.units()).map(|_| AtomicU8::new(UNTOUCHED)).collect(),
        layout,
        fill,
        removed: Mutex::default(),
        gone: AtomicBool::new(false),
        metrics,
    });
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let looping = vm.clone();
    let result = tokio::task::spawn_blocking(move || fault_loop(&looping, &stream, &stop))
        .await
        .unwrap_or_else(|e| Err(format!("fault loop: {e}")));
    vm.gone.store(true, Ordering::SeqCst);
    tracing::info!("a VM disconnected");
    result
}

/// The VM's fault loop, on a thread of its own: `poll`s its userfaultfd and its end of the
/// handshake socket, and handles events as they come, until the VMM closes the socket (it
/// exited) or the lease ends (`stop`, checked every [`STOP_CHECK`]). A thread rather than
/// a task: a fault wakes this very thread, with no reactor or task scheduling between the
/// kernel and the copy while the vCPU waits. Units that need fetching are tasks (on the
/// runtime this blocking thread belongs to).
fn fault_loop(vm: &Arc<Vm>, stream: &UnixStream, stop: &watch::Receiver<bool>) -> Result<(), String> {
    let mut msgs = [0u8; MSG_LEN * 64];
    let mut ignored = [0u8; 256];
    // Bytes read for units the loop serves itself, reused from fault to fault, and the
    // units whose faulting page it filled, to complete once the events read are handled.
    let mut unit_buf = Vec::new();
    let mut unfinished = VecDeque::new();
    let timeout = Timespec { tv_sec: 0, tv_nsec: STOP_CHECK.as_nanos() as i64 };
    while !*stop.borrow() {
        let mut fds = [PollFd::new(&vm.uffd, PollFlags::IN), PollFd::new(stream, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(format!("waiting for userfaultfd events: {e}")),
        }
        let (faults, vmm) = (fds[0].revents(), fds[1].revents());
        if !vmm.is_empty() {
            match (&mut &*stream).read(&mut ignored) {
                // End of file: the VMM exited.
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Ok(()),
            }
        }
        if faults.is_empty() {
            continue;
        }
        match rustix::io::read(&vm.uffd, &mut msgs) {
            Ok(n) => on_events(vm, &msgs[..n], &mut unit_buf, &mut unfinished),
            Err(Errno::AGAIN) => {}
            Err(e) => return Err(format!("reading userfaultfd events: {e}")),
        }
        // Units are completed one at a time, and faults that arrived meanwhile go first:
        // their threads are stopped, a unit's other pages are only likely to be touched next.
        while let Some(rest) = unfinished.pop_front() {
            finish_unit(vm, rest, &mut unit_buf);
            // An error here is met again by the read above.
            if let Ok(n) = rustix::io::read(&vm.uffd, &mut msgs) {
                on_events(vm, &msgs[..n], &mut unit_buf, &mut unfinished);
            }
        }
    }
    Ok(())
}

/// Handles the events of `msgs`, just read.
fn on_events(vm: &Arc<Vm>, msgs: &[u8], unit_buf: &mut Vec<u8>, unfinished: &mut VecDeque<UnitRest>) {
    let read_at = Instant::now();
    for msg in msgs.chunks_exact(MSG_LEN) {
        on_event(vm, parse_event(msg.try_into().expect("MSG_LEN bytes")), read_at, unit_buf, unfinished);
    }
}

/// `read_at`: when the event was read, where a fault's service time starts. `unit_buf`:
/// the loop's buffer for units it serves itself; `unfinished`: those units whose faulting
/// page is filled and whose other pages the loop fills next.
fn on_event(
    vm: &Arc<Vm>,
    event: Event,
    read_at: Instant,
    unit_buf: &mut Vec<u8>,
    unfinished: &mut VecDeque<UnitRest>,
) {
    let page = vm.page();
    match event {
        Event::PageFault { address } => {
            vm.metrics.faults.fetch_add(1, Ordering::Relaxed);
            let at = address & !(page - 1);
            if vm.removed.lock().expect("removed lock").contains(&at) {
                let vm = vm.clone();
                tokio::spawn(async move {
                    if fill_range(&vm, at, None, page).await {
                        vm.removed.lock().expect("removed lock").remove(&at);
                    }
                });
                return;
            }
            let Some(unit) = vm.file_offset(at).and_then(|o| vm.layout.unit_at(o)) else {
                tracing::warn!(address, "a fault outside every region; ignored");
                return;
            };
            match vm.units[unit].compare_exchange(UNTOUCHED, IN_PROGRESS, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    vm.fill.record_unit(&vm.layout, unit);
                    match serve_fault_now(vm, unit, at, read_at, unit_buf) {
                        Now::Done => {}
                        Now::Rest(rest) => unfinished.push_back(rest),
                        Now::No => {
                            let vm = vm.clone();
                            tokio::spawn(async move { serve_unit(vm, unit, Some(read_at)).await });
                        }
                    }
                }
                // Already there: a message that raced its copy. Wake to be sure.
                Err(FILLED) => {
                    let _ = vm.uffd.wake(at, page);
                }
                Err(_) => {}
            }
        }
        Event::Remove { start, end } => {
            let mut removed = vm.removed.lock().expect("removed lock");
            for region in &vm.regions {
                let from = start.max(region.base);
                let to = end.min(region.base + region.size);
                let mut p = from.div_ceil(page) * page;
                while p + page <= to {
                    removed.insert(p);
                    p += page;
                }
            }
        }
        Event::Other(kind) => tracing::debug!(kind, "userfaultfd event ignored"),
    }
}

/// A unit of a complete memory file whose faulting page the loop filled (waking the
/// thread that touched it) and whose other pages it fills once the events read with it
/// are handled.
struct UnitRest {
    unit: usize,
    /// The file offset of the page already filled.
    filled: u64,
    region: usize,
}

/// How a fault was taken by the loop itself.
enum Now {
    /// Not at hand: a task serves the unit.
    No,
    /// The whole unit is filled.
    Done,
    /// The faulting page is filled; the rest follows ([`finish_unit`]).
    Rest(UnitRest),
}

/// Serves the fault at page address `at`, in unit `u`, on the fault loop when its bytes
/// are at hand without waiting: a unit of a complete memory file lying in one region, in a
/// VM that removed no pages (a removed page must stay zero, which [`fill_range`] handles).
/// A data unit's faulting page is filled first, on its own, so the thread that touched it
/// resumes after one page's `pread` and copy rather than the whole chunk's; its service
/// time ends there. A zero unit is one `UFFDIO_ZEROPAGE`.
fn serve_fault_now(vm: &Vm, u: usize, at: u64, started: Instant, buf: &mut Vec<u8>) -> Now {
    let page = vm.page();
    if !vm.fill.is_complete() || !vm.removed.lock().expect("removed lock").is_empty() {
        return Now::No;
    }
    let range = vm.layout.unit_range(u);
    // The one region the unit maps to, whole (Firecracker's regions map disjoint parts).
    let mut mapping = vm
        .regions
        .iter()
        .enumerate()
        .filter(|(_, r)| range.start < r.offset + r.size && r.offset < range.end);
    let (Some((ri, region)), None) = (mapping.next(), mapping.next()) else {
        return Now::No;
    };
    if range.start < region.offset || range.end > region.offset + region.size || at < region.base {
        return Now::No;
    }
    if vm.layout.is_zero(u) {
        // Huge pages have no UFFDIO_ZEROPAGE (`fill_run` copies their zeros).
        if page > 4096 || !fill_now(vm, region, range.start..range.end, None) {
            return Now::No;
        }
        vm.units[u].store(FILLED, Ordering::Release);
        vm.metrics.record_unit(started.elapsed(), true);
        return Now::Done;
    }
    let filled = region.offset + (at - region.base);
    if !fill_now(vm, region, filled..filled + page, Some(buf)) {
        return Now::No;
    }
    vm.metrics.record_unit(started.elapsed(), false);
    Now::Rest(UnitRest { unit: u, filled, region: ri })
}

/// Fills the pages of a unit taken by [`serve_fault_now`] other than the one it filled.
/// Whatever cannot be filled here a task fills: when the VMM is changing its mappings, or
/// removed pages since (a remove event read with the fault: those pages must stay zero,
/// which the task's [`fill_range`] leaves them).
fn finish_unit(vm: &Arc<Vm>, rest: UnitRest, buf: &mut Vec<u8>) {
    let range = vm.layout.unit_range(rest.unit);
    let region = &vm.regions[rest.region];
    let after = rest.filled + vm.page();
    let done = vm.removed.lock().expect("removed lock").is_empty()
        && fill_now(vm, region, range.start..rest.filled, Some(buf))
        && fill_now(vm, region, after..range.end, Some(buf));
    if done {
        vm.units[rest.unit].store(FILLED, Ordering::Release);
    } else {
        let vm = vm.clone();
        tokio::spawn(async move { serve_unit(vm, rest.unit, None).await });
    }
}

/// Fills the file range `file` of a complete memory file into `region` from the file
/// (`buf` is reused for its bytes), or with zeros when `buf` is `None`. Answers `false` if
/// it could not fill it all now: a read failed, the VMM is changing its mappings or it is
/// gone. Pages already present are skipped.
fn fill_now(vm: &Vm, region: &Region, file: std::ops::Range<u64>, buf: Option<&mut Vec<u8>>) -> bool {
    if file.is_empty() {
        return true;
    }
    let (len, dst) = (file.end - file.start, region.base + (file.start - region.offset));
    let data = match buf {
        Some(buf) => {
            buf.resize(len as usize, 0);
            match vm.fill.read_complete(file.start, buf) {
                Some(Ok(())) => Some(&buf[..]),
                Some(Err(e)) => {
                    tracing::warn!(offset = file.start, error = %e, "page server: reading a cached memory file failed");
                    return false;
                }
                None => return false,
            }
        }
        None => None,
    };
    let mut done = 0u64;
    while done < len {
        match fill_step(vm, dst, data, len, done) {
            Step::Advanced(to) => done = to,
            // A remove event is pending, or the VM is gone: the task path deals with both.
            Step::Busy | Step::Failed(_) => return false,
        }
    }
    true
}

/// What one fill call did.
enum Step {
    /// This many bytes of the range are filled now.
    Advanced(u64),
    /// Nothing: a remove event is pending (read events, then retry).
    Busy,
    Failed(Errno),
}

/// One `UFFDIO_COPY` of `data` (`UFFDIO_ZEROPAGE` when `None`) of what is left of
/// `[dst, dst + len)` after its first `done` bytes, counted in the metrics; a first page
/// already present is skipped, its waiters woken.
fn fill_step(vm: &Vm, dst: u64, data: Option<&[u8]>, len: u64, done: u64) -> Step {
    let result = match data {
        Some(d) => vm.uffd.copy(dst + done, &d[done as usize..]),
        None => vm.uffd.zero(dst + done, len - done),
    };
    match result {
        Ok(Filled::All) => {
            vm.metrics.count_fill(data.is_some(), len - done);
            Step::Advanced(len)
        }
        Ok(Filled::Partly(n)) => {
            vm.metrics.count_fill(data.is_some(), n);
            Step::Advanced(done + n)
        }
        Ok(Filled::FirstPageExists) => {
            let _ = vm.uffd.wake(dst + done, vm.page());
            Step::Advanced(done + vm.page())
        }
        Ok(Filled::Busy) => Step::Busy,
        Err(e) => Step::Failed(e),
    }
}

/// Gets unit `u`'s bytes, retrying failed fetches until they succeed or the VM is gone,
/// and fills it in every region it maps to; its service time counts from `started`, when
/// its first fault was read (`None`: counted already, by the fault loop).
async fn serve_unit(vm: Arc<Vm>, u: usize, started: Option<Instant>) {
    let mut pause = Duration::from_millis(50);
    let bytes = loop {
        match vm.fill.unit_bytes(&vm.layout, u).await {
            Ok(b) => break b,
            Err(e) => {
                tracing::error!(unit = u, error = %e, "page server: no source could deliver a unit a VM waits for; retrying");
                if vm.gone.load(Ordering::SeqCst) {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
        }
    };
    let range = vm.layout.unit_range(u);
    for region in &vm.regions {
        let from = range.start.max(region.offset);
        let to = range.end.min(region.offset + region.size);
        if from >= to {
            continue;
        }
        let dst = region.base + (from - region.offset);
        let data = bytes.as_ref().map(|b| &b[(from - range.start) as usize..(to - range.start) as usize]);
        fill_range(&vm, dst, data, to - from).await;
    }
    vm.units[u].store(FILLED, Ordering::Release);
    if let Some(started) = started {
        vm.metrics.record_unit(started.elapsed(), bytes.is_none());
    }
}

/// Fills `[dst, dst + len)` with `data` (zeros when `None`), leaving out removed pages.
/// Answers whether everything asked was filled. A remove event pending in the kernel stops
/// a copy (`EAGAIN`); once the fault loop has read it the runs are worked out again, so a
/// page removed meanwhile stays zero rather than getting the bytes.
async fn fill_range(vm: &Vm, dst: u64, data: Option<&[u8]>, len: u64) -> bool {
    let page = vm.page();
    let mut busy_tries = 0u32;
    'runs: loop {
        // Runs of pages that were not removed, as (start, end) offsets from `dst`. Pages
        // filled by an earlier pass are skipped by the kernel (`EEXIST`).
        let runs: Vec<(u64, u64)> = {
            let removed = vm.removed.lock().expect("removed lock");
            if removed.is_empty() || data.is_none() {
                vec![(0, len)]
            } else {
                let mut runs: Vec<(u64, u64)> = Vec::new();
                let mut at = 0;
                while at < len {
                    if !removed.contains(&(dst + at)) {
                        match runs.last_mut() {
                            Some(last) if last.1 == at => last.1 = at + page,
                            _ => runs.push((at, at + page)),
                        }
                    }
                    at += page;
                }
                runs
            }
        };
        let mut all = true;
        for (start, end) in runs {
            let part = data.map(|d| &d[start as usize..end as usize]);
            match fill_run(vm, dst + start, part, end - start) {
                Fill::Done(ok) => all &= ok,
                Fill::Busy => {
                    busy_tries += 1;
                    if busy_tries > 100_000 || vm.gone.load(Ordering::SeqCst) {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_micros(50)).await;
                    continue 'runs;
                }
            }
        }
        return all;
    }
}

/// How a run's fill ended.
enum Fill {
    /// Whether all of it was filled.
    Done(bool),
    /// A remove event is pending: nothing more was filled.
    Busy,
}

fn fill_run(vm: &Vm, dst: u64, data: Option<&[u8]>, len: u64) -> Fill {
    let page = vm.page();
    if data.is_none() && page > 4096 {
        // Huge pages have no UFFDIO_ZEROPAGE: their zeros are copied, a page at a time (a
        // zero run may be long; one page of zeros is all the memory it takes).
        let zeros = vec![0u8; page as usize];
        let mut all = true;
        let mut at = 0;
        while at < len {
            match fill_exact(vm, dst + at, Some(&zeros), page) {
                Fill::Done(ok) => all &= ok,
                Fill::Busy => return Fill::Busy,
            }
            at += page;
        }
        return Fill::Done(all);
    }
    fill_exact(vm, dst, data, len)
}

/// Fills `[dst, dst + len)` with `data` (`UFFDIO_ZEROPAGE` when `None`), resuming after
/// partial copies and pages already present; stops at a pending remove event.
fn fill_exact(vm: &Vm, dst: u64, data: Option<&[u8]>, len: u64) -> Fill {
    let mut done = 0u64;
    while done < len {
        match fill_step(vm, dst, data, len, done) {
            Step::Advanced(to) => done = to,
            Step::Busy => return Fill::Busy,
            Step::Failed(Errno::SRCH) => {
                vm.gone.store(true, Ordering::SeqCst);
                return Fill::Done(false);
            }
            Step::Failed(e) => {
                tracing::warn!(dst, len, error = %e, "page server: a fill failed");
                return Fill::Done(false);
            }
        }
    }
    Fill::Done(true)
}
