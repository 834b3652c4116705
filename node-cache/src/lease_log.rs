//! The lease log (`leases.log` in the cache directory): every lease taken or renewed is
//! appended here, one JSON line `{"id": …, "lease": {…}}` written with one `write`, before
//! `ensure` or `renew` answers. The flusher then copies live leases into the index and
//! drops the log it has copied (`leases.log.old`, the log renamed aside first, so appends
//! never wait for the index); a start replays the index's leases, then `leases.log.old`,
//! then `leases.log` (a later line for an id wins; a torn last line is skipped).
//!
//! The log is not fsynced. A lease protects a snapshot that a running VM uses: once the
//! append returns, the line is in the kernel's page cache and survives a kill of this
//! process (which leaves the VMs running); a crash of the machine loses it, but also stops
//! every VM that held a lease, so nothing is left to protect. An fsync per `ensure` would
//! cost a device cache flush (docs/DECISIONS.md: several milliseconds on a busy disk).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{CacheError, Result};
use crate::index::LeaseRecord;

#[derive(Serialize, Deserialize)]
struct Line {
    id: String,
    lease: LeaseRecord,
}

/// The open log.
#[derive(Debug)]
pub(crate) struct LeaseLog {
    path: PathBuf,
    old: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// Leases appended but not yet in the cache's state ([`LeaseLog::confirm`]): the flusher
    /// copies these too, so that setting a log aside never loses a lease in flight.
    unconfirmed: HashMap<String, LeaseRecord>,
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new().create(true).append(true).open(path).map_err(|e| CacheError::io("opening", path, e))
}

/// Leases in `path`, in order; lines that do not parse (a torn last line) are skipped.
fn replay(path: &Path, out: &mut Vec<(String, LeaseRecord)>) -> Result<()> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CacheError::io("reading", path, e)),
    };
    for line in text.split(|&b| b == b'\n') {
        match serde_json::from_slice::<Line>(line) {
            Ok(l) => out.push((l.id, l.lease)),
            Err(_) if line.is_empty() => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "skipping a torn lease-log line"),
        }
    }
    Ok(())
}

impl LeaseLog {
    /// Opens the log in `dir`, answering the leases both logs hold (older first).
    pub(crate) fn open(dir: &Path) -> Result<(Self, Vec<(String, LeaseRecord)>)> {
        let path = dir.join("leases.log");
        let old = dir.join("leases.log.old");
        let mut leases = Vec::new();
        replay(&old, &mut leases)?;
        replay(&path, &mut leases)?;
        let inner = Mutex::new(Inner { file: open_append(&path)?, unconfirmed: HashMap::new() });
        Ok((Self { path, old, inner }, leases))
    }

    /// Appends one lease, in one `write`; no fsync (see the module's doc). The caller
    /// [`confirm`](Self::confirm)s it once the cache's state holds it.
    pub(crate) fn append(&self, id: &str, lease: &LeaseRecord) -> Result<()> {
        let mut line =
            serde_json::to_vec(&Line { id: id.to_owned(), lease: lease.clone() }).expect("serializes");
        line.push(b'\n');
        let mut inner = self.inner.lock().expect("lease log lock");
        inner.file.write_all(&line).map_err(|e| CacheError::io("appending to", &self.path, e))?;
        inner.unconfirmed.insert(id.to_owned(), lease.clone());
        Ok(())
    }

    /// The cache's state now holds the lease (or never will): the flusher takes it from there.
    pub(crate) fn confirm(&self, id: &str) {
        self.inner.lock().expect("lease log lock").unconfirmed.remove(id);
    }

    /// Sets the log aside as `leases.log.old` for the flusher to copy into the index, unless
    /// an earlier one is still there (a flush that failed): then appends go on to the same
    /// log. Answers `None` when nothing is logged, else the leases appended but not yet
    /// confirmed: the flusher copies those with the state's.
    pub(crate) fn rotate(&self) -> Result<Option<Vec<(String, LeaseRecord)>>> {
        let mut inner = self.inner.lock().expect("lease log lock");
        let unconfirmed = || inner.unconfirmed.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if self.old.exists() {
            return Ok(Some(unconfirmed()));
        }
        if inner.file.metadata().map_err(|e| CacheError::io("reading", &self.path, e))?.len() == 0 {
            return Ok(None);
        }
        let pending = unconfirmed();
        std::fs::rename(&self.path, &self.old).map_err(|e| CacheError::io("renaming", &self.path, e))?;
        inner.file = open_append(&self.path)?;
        Ok(Some(pending))
    }

    /// Empties both logs, once the index holds every lease they held (at start).
    pub(crate) fn reset(&self) -> Result<()> {
        let inner = self.inner.lock().expect("lease log lock");
        inner.file.set_len(0).map_err(|e| CacheError::io("truncating", &self.path, e))?;
        drop(inner);
        self.drop_old()
    }

    /// Removes the set-aside log, once the index holds what it held.
    pub(crate) fn drop_old(&self) -> Result<()> {
        match std::fs::remove_file(&self.old) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::io("removing", &self.old, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_schema::Sha256Digest;

    fn lease(expires_ms: u64) -> LeaseRecord {
        LeaseRecord { digest: Sha256Digest::of(b"a"), reference: "r/fn:v1".into(), created_ms: 1, expires_ms }
    }

    #[test]
    fn replays_both_logs_in_order_and_skips_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let (log, found) = LeaseLog::open(dir.path()).unwrap();
        assert!(found.is_empty());
        log.append("l1", &lease(5)).unwrap();
        assert_eq!(log.rotate().unwrap(), Some(vec![("l1".to_string(), lease(5))]), "in flight: copied too");
        log.confirm("l1");
        log.append("l1", &lease(9)).unwrap();
        log.append("l2", &lease(7)).unwrap();
        drop(log);
        // A kill in the middle of a write leaves at most a torn last line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("leases.log"))
            .unwrap()
            .write_all(b"{\"id\":\"l3\",\"lea")
            .unwrap();
        let (log, found) = LeaseLog::open(dir.path()).unwrap();
        assert_eq!(
            found,
            vec![("l1".to_string(), lease(5)), ("l1".to_string(), lease(9)), ("l2".to_string(), lease(7))]
        );
        // An earlier set-aside log is still there: appends go on to the same log.
        assert_eq!(log.rotate().unwrap(), Some(vec![]));
        log.reset().unwrap();
        assert_eq!(log.rotate().unwrap(), None, "nothing to set aside");
        log.append("l4", &lease(3)).unwrap();
        log.confirm("l4");
        assert_eq!(log.rotate().unwrap(), Some(vec![]), "the current log holds a line: set aside");
        log.drop_old().unwrap();
        drop(log);
        assert!(LeaseLog::open(dir.path()).unwrap().1.is_empty());
    }
}
