//! A one-line progress display on stderr, drawn from the client's counters while a long
//! transfer runs (only when stderr is a terminal).

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thaw_client::Stats;

/// A running display; stops (and clears its line) on drop.
pub(crate) struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing `stats` unless `quiet` or stderr is not a terminal.
    pub(crate) fn start(stats: Arc<Stats>, quiet: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if quiet || !std::io::stderr().is_terminal() {
            return Self { stop, thread: None };
        }
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let line = render(&stats, started.elapsed());
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[K{line}");
                let _ = err.flush();
            }
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn render(stats: &Stats, elapsed: Duration) -> String {
    let s = stats.snapshot();
    let (done, total) = stats.work();
    let pct = if total > 0 { (done as f64 / total as f64 * 100.0).min(100.0) } else { 0.0 };
    let secs = elapsed.as_secs_f64().max(0.001);
    let wire = s.bytes_sent + s.bytes_received;
    let mut line = format!(
        "{} {:>3.0}%  {} / {}  wire {} ({}/s)",
        stats.phase(),
        pct,
        human_bytes(done),
        human_bytes(total),
        human_bytes(wire),
        human_bytes((wire as f64 / secs) as u64)
    );
    if s.chunks_present > 0 {
        line.push_str(&format!("  {} chunks already there", s.chunks_present));
    }
    if s.chunks_local > 0 {
        line.push_str(&format!("  {} chunks local", s.chunks_local));
    }
    line.chars().take(160).collect()
}

/// `1.5 MiB`-style sizes.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
