//! Writing files that must never appear half-done: a temporary file next to the destination
//! (removed unless it is finished), written front to back with zero blocks left as holes,
//! checked against the expected size and (unless the chunk chain proves it, D30) hashed as
//! it is written and checked against the expected digest, then renamed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use thaw_schema::chunker::is_zero;
use thaw_schema::digest::Sha256Hasher;
use thaw_schema::Sha256Digest;

use crate::error::{Error, Result};
use crate::thaw_api::FileCheck;
use crate::tuning::HOLE_BLOCK;

/// A temporary file in the destination directory, removed on drop unless persisted.
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    /// Creates an empty temporary file for `title` in `dir`.
    pub(crate) fn create(dir: &Path, title: &str) -> Result<Self> {
        for attempt in 0u32..100 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = format!(".{title}.thaw-{}-{nanos:x}{attempt}", std::process::id());
            let path = dir.join(name);
            match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
                Ok(_) => return Ok(Self { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("creating", &path, e)),
            }
        }
        Err(Error::Snapshot(format!("cannot create a temporary file in {}", dir.display())))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file to `dest`, replacing whatever is there.
    pub(crate) fn persist(mut self, dest: &Path) -> Result<()> {
        std::fs::rename(&self.path, dest).map_err(|e| Error::io("renaming into place", dest, e))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `data` at `offset`, skipping aligned all-zero blocks (the file must read as zero
/// there already: fresh, or never written).
pub(crate) fn write_sparse(file: &File, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let block = HOLE_BLOCK as u64;
    let mut pos = 0usize;
    let mut run_start: Option<usize> = None;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let end = (((abs / block) + 1) * block - offset) as usize;
        let end = end.min(data.len());
        if is_zero(&data[pos..end]) {
            if let Some(s) = run_start.take() {
                file.write_all_at(&data[s..pos], offset + s as u64)?;
            }
        } else if run_start.is_none() {
            run_start = Some(pos);
        }
        pos = end;
    }
    if let Some(s) = run_start {
        file.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

/// A file written front to back, hashed on the way unless its content is already proven
/// piece by piece (the verified chunk chain). What is written is flushed to disk in the
/// background as it goes ([`EarlyFlush`]), so that the final sync has little left to do.
pub(crate) struct FileSink {
    file: File,
    path: PathBuf,
    offset: u64,
    hasher: Option<Sha256Hasher>,
    flush: EarlyFlush,
}

/// Starts a `fdatasync` on another thread each time [`FLUSH_EVERY`] more bytes were written
/// and the previous one has ended. Without it the kernel keeps a restore's pages dirty (the
/// background threshold is a share of RAM) and the final `fsync` waits for all of them;
/// with it, writing to disk overlaps fetching and decoding the rest of the file.
#[derive(Default)]
struct EarlyFlush {
    written_since: u64,
    running: Option<std::thread::JoinHandle<()>>,
}

/// Bytes written between two background flushes.
const FLUSH_EVERY: u64 = 16 * 1024 * 1024;

impl EarlyFlush {
    fn wrote(&mut self, file: &File, len: u64) {
        self.written_since += len;
        if self.written_since < FLUSH_EVERY || self.running.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        // A failed clone or sync only loses the head start: the final sync reports errors.
        if let Ok(f) = file.try_clone() {
            self.written_since = 0;
            self.running = Some(std::thread::spawn(move || drop(f.sync_data())));
        }
    }

    fn wait(&mut self) {
        if let Some(t) = self.running.take() {
            let _ = t.join();
        }
    }
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl FileSink {
    /// Opens the (empty) file at `path` for writing; `check` says whether [`Self::finish`]
    /// hashes the whole file.
    pub(crate) fn open(path: &Path, check: FileCheck) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("opening", path, e))?;
        let hasher = (check == FileCheck::WholeFile).then(Sha256Hasher::new);
        Ok(Self { file, path: path.to_owned(), offset: 0, hasher, flush: EarlyFlush::default() })
    }

    /// Bytes written (or skipped as zeros) so far.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// The file, for reading back what was written.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Appends bytes.
    pub(crate) fn append(&mut self, data: &[u8]) -> Result<()> {
        write_sparse(&self.file, self.offset, data).map_err(|e| Error::io("writing", &self.path, e))?;
        self.flush.wrote(&self.file, data.len() as u64);
        if let Some(h) = &mut self.hasher {
            h.update(data);
        }
        self.offset += data.len() as u64;
        Ok(())
    }

    /// Appends `len` zero bytes as a hole.
    pub(crate) fn append_zeros(&mut self, len: u64) {
        if let Some(h) = &mut self.hasher {
            let mut left = len;
            while left > 0 {
                let n = left.min(ZEROS.len() as u64) as usize;
                h.update(&ZEROS[..n]);
                left -= n as u64;
            }
        }
        self.offset += len;
    }

    /// Starts over (the source restarted from byte 0).
    pub(crate) fn reset(&mut self) -> Result<()> {
        self.file.set_len(0).map_err(|e| Error::io("truncating", &self.path, e))?;
        self.offset = 0;
        self.hasher = self.hasher.as_ref().map(|_| Sha256Hasher::new());
        Ok(())
    }

    /// Checks size and (when hashing) digest, sets the length (trailing holes) and syncs.
    pub(crate) fn finish(mut self, size: u64, digest: &Sha256Digest, what: &str) -> Result<()> {
        self.flush.wait();
        if self.offset != size {
            return Err(Error::integrity(what, format!("{} bytes received, {size} expected", self.offset)));
        }
        if let Some(hasher) = self.hasher {
            let actual = hasher.finish();
            if actual != *digest {
                return Err(Error::integrity(what, format!("the file hashes to {actual}, not {digest}")));
            }
        }
        self.file.set_len(size).map_err(|e| Error::io("sizing", &self.path, e))?;
        self.file.sync_all().map_err(|e| Error::io("syncing", &self.path, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn holes_are_left_and_content_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = TempFile::create(dir.path(), "f").unwrap();
        let mut data = vec![0u8; 1024 * 1024];
        data[5000] = 1; // inside the second block, which is written
        data[700_000..700_010].copy_from_slice(b"0123456789");
        let mut sink = FileSink::open(tmp.path(), FileCheck::WholeFile).unwrap();
        // Unaligned pieces.
        sink.append(&data[..3000]).unwrap();
        sink.append(&data[3000..600_001]).unwrap();
        sink.append_zeros(0);
        sink.append(&data[600_001..]).unwrap();
        sink.append_zeros(4 * 1024 * 1024);
        let mut whole = data.clone();
        whole.resize(data.len() + 4 * 1024 * 1024, 0);
        sink.finish(whole.len() as u64, &Sha256Digest::of(&whole), "f").unwrap();
        assert_eq!(std::fs::read(tmp.path()).unwrap(), whole);
        let allocated = std::fs::metadata(tmp.path()).unwrap().blocks() * 512;
        assert!(allocated < 64 * 1024, "{allocated} bytes allocated for 2 non-zero blocks");
        let dest = dir.path().join("f");
        tmp.persist(&dest).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_wrong_digest_or_size_fails_and_the_temp_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let tmp = TempFile::create(dir.path(), "f").unwrap();
            let mut sink = FileSink::open(tmp.path(), FileCheck::WholeFile).unwrap();
            sink.append(b"abc").unwrap();
            assert!(sink.finish(3, &Sha256Digest::of(b"abd"), "f").is_err());
            let mut sink = FileSink::open(tmp.path(), FileCheck::WholeFile).unwrap();
            sink.append(b"ab").unwrap();
            assert!(sink.finish(3, &Sha256Digest::of(b"ab"), "f").is_err());
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_chain_checked_sink_checks_the_size_but_does_not_hash() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = TempFile::create(dir.path(), "f").unwrap();
        let mut sink = FileSink::open(tmp.path(), FileCheck::Chain).unwrap();
        sink.append(b"abc").unwrap();
        sink.append_zeros(5);
        // The content was proven chunk by chunk; the digest is not what is checked here.
        sink.finish(8, &Sha256Digest::of(b"anything"), "f").unwrap();
        assert_eq!(std::fs::read(tmp.path()).unwrap(), b"abc\0\0\0\0\0");
        let mut sink = FileSink::open(tmp.path(), FileCheck::Chain).unwrap();
        sink.append(b"abc").unwrap();
        assert!(sink.finish(4, &Sha256Digest::of(b"abc"), "f").is_err());
    }
}
