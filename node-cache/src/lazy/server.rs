//! The page server: one Unix socket per lease, one fault loop per VM that connects.
//!
//! The loop reads userfaultfd events and never waits on a fetch itself: a fault on a unit
//! nobody asked for yet starts a task that gets the unit's bytes (local, or fetched ahead of
//! the background fill) and fills the whole unit with one `UFFDIO_COPY` (`UFFDIO_ZEROPAGE`
//! for a zero unit), waking every thread waiting in it. Faults on other units are served
//! meanwhile; further faults on a unit in progress just wait for its copy.
//!
//! Remove events (the balloon's `MADV_DONTNEED`) mark pages that must read as zero from
//! then on: a later fault there gets a zero page, never the file's bytes, and a unit copy
//! skips them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use tokio::sync::{watch, Semaphore};

use super::fill::MemoryFill;
use super::handshake::{self, Region};
use super::layout::Layout;
use super::uffd::{parse_event, watch, Event, Filled, OwnsUserfault, Userfault, MSG_LEN};
use super::LazyMetrics;

/// How long a VMM that connected may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once on one lease's socket (one VM is the rule; a retried load
/// may briefly make two): a local client cannot tie up more than this many threads and
/// event loops.
const MAX_CONNECTIONS: usize = 4;
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

impl OwnsUserfault for Vm {
    fn userfault(&self) -> &Userfault {
        &self.uffd
    }
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
    mut stop: watch::Receiver<bool>,
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
    let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
    let events = watch(vm.clone()).map_err(|e| e.to_string())?;
    let mut msgs = [0u8; MSG_LEN * 64];
    let mut ignored = [0u8; 256];
    let result = loop {
        tokio::select! {
            ready = events.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => break Err(e.to_string()),
                };
                match guard.try_io(|fd| rustix::io::read(&fd.get_ref().0.uffd, &mut msgs).map_err(std::io::Error::from)) {
                    Ok(Ok(n)) => {
                        let read_at = Instant::now();
                        for msg in msgs[..n].chunks_exact(MSG_LEN) {
                            on_event(&vm, parse_event(msg.try_into().expect("MSG_LEN bytes")), read_at);
                        }
                    }
                    Ok(Err(e)) => break Err(format!("reading userfaultfd events: {e}")),
                    Err(_would_block) => {}
                }
            }
            ready = stream.readable() => {
                if ready.is_err() {
                    break Ok(());
                }
                match stream.try_read(&mut ignored) {
                    // End of file: the VMM exited.
                    Ok(0) => break Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break Ok(()),
                }
            }
            _ = stop.changed() => break Ok(()),
        }
    };
    vm.gone.store(true, Ordering::SeqCst);
    tracing::info!("a VM disconnected");
    result
}

/// `read_at`: when the event was read, where a fault's service time starts.
fn on_event(vm: &Arc<Vm>, event: Event, read_at: Instant) {
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
                    let vm = vm.clone();
                    tokio::spawn(async move { serve_unit(vm, unit, read_at).await });
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

/// Gets unit `u`'s bytes, retrying failed fetches until they succeed or the VM is gone,
/// and fills it in every region it maps to; its service time counts from `started`, when
/// its first fault was read.
async fn serve_unit(vm: Arc<Vm>, u: usize, started: Instant) {
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
    vm.metrics.record_unit(started.elapsed(), bytes.is_none());
}

/// Fills `[dst, dst + len)` with `data` (zeros when `None`), leaving out removed pages.
/// Answers whether everything asked was filled.
async fn fill_range(vm: &Vm, dst: u64, data: Option<&[u8]>, len: u64) -> bool {
    let page = vm.page();
    // Runs of pages that were not removed, as (start, end) offsets from `dst`.
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
        all &= fill_run(vm, dst + start, data.map(|d| &d[start as usize..end as usize]), end - start).await;
    }
    all
}

async fn fill_run(vm: &Vm, dst: u64, data: Option<&[u8]>, len: u64) -> bool {
    let page = vm.page();
    if data.is_none() && page > 4096 {
        // Huge pages have no UFFDIO_ZEROPAGE: their zeros are copied, a page at a time (a
        // zero run may be long; one page of zeros is all the memory it takes).
        let zeros = vec![0u8; page as usize];
        let mut all = true;
        let mut at = 0;
        while at < len {
            all &= fill_exact(vm, dst + at, Some(&zeros), page).await;
            at += page;
        }
        return all;
    }
    fill_exact(vm, dst, data, len).await
}

/// Fills `[dst, dst + len)` with `data` (`UFFDIO_ZEROPAGE` when `None`), resuming after
/// partial copies and pages already present, waiting out pending remove events.
async fn fill_exact(vm: &Vm, dst: u64, data: Option<&[u8]>, len: u64) -> bool {
    let page = vm.page();
    let mut done = 0u64;
    let mut busy_tries = 0u32;
    while done < len {
        let result = match data {
            Some(d) => vm.uffd.copy(dst + done, &d[done as usize..]),
            None => vm.uffd.zero(dst + done, len - done),
        };
        match result {
            Ok(Filled::All) => {
                vm.metrics.count_fill(data.is_some(), len - done);
                done = len;
            }
            Ok(Filled::Partly(n)) => {
                vm.metrics.count_fill(data.is_some(), n);
                done += n;
            }
            Ok(Filled::FirstPageExists) => {
                let _ = vm.uffd.wake(dst + done, page);
                done += page;
            }
            Ok(Filled::Busy) => {
                // A remove event is pending: the event loop reads it, then this succeeds.
                busy_tries += 1;
                if busy_tries > 100_000 || vm.gone.load(Ordering::SeqCst) {
                    return false;
                }
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
            Err(Errno::SRCH) => {
                vm.gone.store(true, Ordering::SeqCst);
                return false;
            }
            Err(e) => {
                tracing::warn!(dst, len, error = %e, "page server: a fill failed");
                return false;
            }
        }
    }
    true
}
