//! Lazy restore: guest memory served by page fault (`ensure` with `"memory": "uffd"`).
//!
//! A lazy `ensure` answers as soon as the vmstate, info and disk files are ready, with a
//! Unix socket in place of the memory file. Firecracker, told to load the snapshot with
//! `mem_backend: {"backend_type": "Uffd", "backend_path": SOCKET}`, connects there and
//! hands over its guest memory's userfaultfd (`handshake.rs`); every page it touches is
//! then filled by this process (`server.rs`) from the chunks of the memory file
//! (`fill.rs`): from cached snapshots holding them, else from the registry, ahead of a
//! background fill that completes the memory file, after which the snapshot is recorded
//! like any other and the next `ensure` is an ordinary hit. Units of one fault are cut by
//! `layout.rs`; the ioctls, and the only `unsafe` of the crate, are in `uffd.rs`. The first
//! restore of a snapshot records which chunks its VMs touch first (`working_set.rs`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thaw_schema::{Recipe, Sha256Digest};
use tokio::sync::watch;

pub(crate) mod fill;
mod handshake;
mod layout;
mod server;
mod service_time;
mod uffd;
pub(crate) mod working_set;

pub(crate) use fill::MemoryFill;

/// The file name of a lease's page-server socket.
pub(crate) const SOCKET_NAME: &str = "memory.sock";
/// Memory recipes kept for serving cached snapshots lazily without asking the registry.
const RECIPES_KEPT: usize = 64;

/// A lazy restore whose memory file is still being filled.
#[derive(Debug)]
pub(crate) struct Restoring {
    pub(crate) fill: Arc<MemoryFill>,
    /// The directory holding its other files: `work/…` until it is recorded, then
    /// `snapshots/…`. Read-locked while files are copied from it, write-locked to move it.
    pub(crate) dir: tokio::sync::RwLock<PathBuf>,
    /// Titles of its files by role key (`memory` left out).
    pub(crate) files: Vec<(String, String)>,
}

/// Counters of the page servers, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct LazyMetrics {
    pub(crate) faults: AtomicU64,
    copies: AtomicU64,
    zero_fills: AtomicU64,
    bytes_copied: AtomicU64,
    units: AtomicU64,
    unit_micros: AtomicU64,
    pub(crate) fetch_failures: AtomicU64,
    pub(crate) local_bytes: AtomicU64,
    pub(crate) peer_bytes: AtomicU64,
    pub(crate) registry_bytes: AtomicU64,
    restores: AtomicU64,
    completed: AtomicU64,
    service: service_time::ServiceTimes,
}

impl LazyMetrics {
    fn count_fill(&self, copy: bool, bytes: u64) {
        if copy {
            self.copies.fetch_add(1, Ordering::Relaxed);
            self.bytes_copied.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.zero_fills.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record_unit(&self, took: Duration, zero: bool) {
        self.units.fetch_add(1, Ordering::Relaxed);
        self.unit_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.service.record(took, zero);
    }
}

/// The lazy restores in progress and the page servers running, per cache.
#[derive(Debug, Default)]
pub(crate) struct LazyRestores {
    restoring: Mutex<HashMap<Sha256Digest, Arc<Restoring>>>,
    /// A stop switch per lease with a page server.
    servers: Mutex<HashMap<String, watch::Sender<bool>>>,
    recipes: Mutex<HashMap<Sha256Digest, Arc<Recipe>>>,
    pub(crate) metrics: Arc<LazyMetrics>,
    /// Snapshots whose working set this process published or tried to (once each).
    pub(crate) working_sets_tried: Mutex<std::collections::HashSet<Sha256Digest>>,
    pub(crate) working_sets: working_set::WorkingSetMetrics,
}

impl LazyRestores {
    /// The lazy restore of `digest` in progress, if any.
    pub(crate) fn restoring(&self, digest: &Sha256Digest) -> Option<Arc<Restoring>> {
        self.restoring.lock().expect("lazy lock").get(digest).cloned()
    }

    pub(crate) fn insert(&self, digest: Sha256Digest, r: Arc<Restoring>) {
        self.metrics.restores.fetch_add(1, Ordering::Relaxed);
        self.restoring.lock().expect("lazy lock").insert(digest, r);
    }

    pub(crate) fn finished(&self, digest: &Sha256Digest, recorded: bool) {
        if recorded {
            self.metrics.completed.fetch_add(1, Ordering::Relaxed);
        }
        self.restoring.lock().expect("lazy lock").remove(digest);
    }

    /// A memory recipe seen before (by blob digest).
    pub(crate) fn recipe(&self, blob: &Sha256Digest) -> Option<Arc<Recipe>> {
        self.recipes.lock().expect("recipes lock").get(blob).cloned()
    }

    pub(crate) fn keep_recipe(&self, recipe: Arc<Recipe>) {
        let mut recipes = self.recipes.lock().expect("recipes lock");
        if recipes.len() >= RECIPES_KEPT {
            recipes.clear();
        }
        recipes.insert(recipe.digest, recipe);
    }

    /// Starts the page server of lease `lease` on `socket`, serving `fill`.
    pub(crate) fn serve(&self, lease: &str, socket: PathBuf, fill: Arc<MemoryFill>) -> std::io::Result<()> {
        let listener = server::bind(&socket)?;
        let (stop, stopped) = watch::channel(false);
        self.servers.lock().expect("servers lock").insert(lease.to_owned(), stop);
        tokio::spawn(server::serve_socket(listener, socket, fill, self.metrics.clone(), stopped));
        Ok(())
    }

    /// Stops the page server of a lease that ended (its VM is gone).
    pub(crate) fn lease_ended(&self, lease: &str) {
        if let Some(stop) = self.servers.lock().expect("servers lock").remove(lease) {
            let _ = stop.send(true);
        }
    }

    /// The page servers' counters in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let m = &self.metrics;
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        counter("thaw_lazy_restores_total", "Lazy restores started.", &m.restores);
        counter(
            "thaw_lazy_restores_completed_total",
            "Lazy restores whose memory file was completed and recorded.",
            &m.completed,
        );
        counter("thaw_lazy_faults_total", "Page faults read from VMs' userfaultfds.", &m.faults);
        counter(
            "thaw_lazy_units_served_total",
            "Fill units served (each one copy or zero fill per region).",
            &m.units,
        );
        counter(
            "thaw_lazy_unit_service_microseconds_total",
            "Time from a unit's first fault until it was filled.",
            &m.unit_micros,
        );
        counter("thaw_lazy_copies_total", "UFFDIO_COPY calls that filled pages.", &m.copies);
        counter("thaw_lazy_zero_fills_total", "UFFDIO_ZEROPAGE calls that filled pages.", &m.zero_fills);
        counter("thaw_lazy_copied_bytes_total", "Bytes filled by UFFDIO_COPY.", &m.bytes_copied);
        counter(
            "thaw_lazy_fetch_failures_total",
            "Chunk fetches for memory being served that failed (retried), by faults or the background fill.",
            &m.fetch_failures,
        );
        out.push_str("# HELP thaw_lazy_bytes_total Memory bytes of lazy restores, verified, by source.\n");
        out.push_str("# TYPE thaw_lazy_bytes_total counter\n");
        for (source, v) in
            [("local", &m.local_bytes), ("peers", &m.peer_bytes), ("registry", &m.registry_bytes)]
        {
            let _ =
                writeln!(out, "thaw_lazy_bytes_total{{source=\"{source}\"}} {}", v.load(Ordering::Relaxed));
        }
        m.service.render(&mut out);
        out
    }
}
