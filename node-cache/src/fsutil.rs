//! Filesystem helpers: allocated-size accounting, sparse copies, durable renames, hashing.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::Path;

use thaw_schema::digest::Sha256Hasher;
use thaw_schema::Sha256Digest;

use crate::error::{CacheError, Result};

/// Block size for hole detection in copies: the page and ext4 block size.
const BLOCK: usize = 4096;

/// Bytes of disk allocated to a file or, recursively, a directory's files.
pub(crate) fn allocated_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| allocated_bytes(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}

/// Modification time in nanoseconds since the epoch.
pub(crate) fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// Copies `from` to the new file `to`, leaving aligned all-zero blocks as holes, and syncs it.
/// Returns the bytes allocated to the copy.
pub(crate) fn sparse_copy(from: &Path, to: &Path) -> Result<u64> {
    let mut src = File::open(from).map_err(|e| CacheError::io("opening", from, e))?;
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| CacheError::io("creating", to, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut src, &mut buf).map_err(|e| CacheError::io("reading", from, e))?;
        if n == 0 {
            break;
        }
        for (i, block) in buf[..n].chunks(BLOCK).enumerate() {
            if block.iter().any(|&b| b != 0) {
                dst.write_all_at(block, offset + (i * BLOCK) as u64)
                    .map_err(|e| CacheError::io("writing", to, e))?;
            }
        }
        offset += n as u64;
    }
    dst.set_len(offset).map_err(|e| CacheError::io("sizing", to, e))?;
    dst.sync_all().map_err(|e| CacheError::io("syncing", to, e))?;
    Ok(allocated_bytes(to))
}

/// How a private copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyKind {
    /// Shared extents (FICLONE): no data moved.
    Reflink,
    /// The data regions copied in the kernel (`copy_file_range`), holes skipped.
    Kernel,
    /// Read and written block by block, zero blocks left as holes.
    Userspace,
}

/// A private copy of `from` at the new file `to`, as cheap as the filesystem allows: a
/// reflink where it has them (XFS, btrfs), else the data regions only, copied in the
/// kernel, else a sparse copy through user space. Not synced: a lease's copy is scratch
/// space for one VM, and the cached original stays the verified source. Returns the bytes
/// allocated to the copy and how it was made.
pub(crate) fn private_copy(from: &Path, to: &Path) -> Result<(u64, CopyKind)> {
    let src = File::open(from).map_err(|e| CacheError::io("opening", from, e))?;
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| CacheError::io("creating", to, e))?;
    if rustix::fs::ioctl_ficlone(&dst, &src).is_ok() {
        return Ok((allocated_bytes(to), CopyKind::Reflink));
    }
    let len = src.metadata().map_err(|e| CacheError::io("reading", from, e))?.len();
    match copy_data_regions(&src, &dst, len) {
        Ok(()) => {
            dst.set_len(len).map_err(|e| CacheError::io("sizing", to, e))?;
            Ok((allocated_bytes(to), CopyKind::Kernel))
        }
        Err(e) => {
            tracing::debug!(error = %e, "kernel copy refused; copying through user space");
            drop(dst);
            std::fs::remove_file(to).map_err(|e| CacheError::io("removing", to, e))?;
            Ok((sparse_copy(from, to)?, CopyKind::Userspace))
        }
    }
}

/// Copies every data region of `src` (between holes) to the same offsets of `dst`.
fn copy_data_regions(src: &File, dst: &File, len: u64) -> std::io::Result<()> {
    use rustix::fs::{copy_file_range, seek, SeekFrom};
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // only a hole is left
            Err(e) => return Err(e.into()),
        };
        let hole = seek(src, SeekFrom::Hole(data))?.min(len);
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX).min(1 << 30);
            let n = copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "copy_file_range copied nothing",
                ));
            }
        }
        pos = hole;
    }
    Ok(())
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The sha256 and length of a file.
pub(crate) fn sha256_file(path: &Path) -> Result<(Sha256Digest, u64)> {
    let mut f = File::open(path).map_err(|e| CacheError::io("opening", path, e))?;
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(|e| CacheError::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hasher.finish(), len))
}

/// Makes a directory entry change durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| CacheError::io("syncing", dir, e))
}

/// Removes a file or directory tree; a missing one is fine.
pub(crate) fn remove_all(path: &Path) {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "could not remove");
    }
}

/// A fresh random name part.
pub(crate) fn nonce() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a");
        let mut data = vec![0u8; 8 << 20];
        data[5] = 1;
        data[(3 << 20) + 77] = 9;
        data.truncate((8 << 20) - 100); // a length that is not a block multiple
        std::fs::write(&from, &data).unwrap();
        let to = dir.path().join("b");
        let allocated = sparse_copy(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), data);
        assert!(allocated <= 64 * 1024, "{allocated} bytes allocated for 2 non-zero blocks");
        assert_eq!(sha256_file(&to).unwrap(), (Sha256Digest::of(&data), data.len() as u64));
        assert!(sparse_copy(&from, &to).is_err(), "never overwrites");

        // The private copy: same bytes, holes kept, whichever way this filesystem allows.
        let sparse_source = dir.path().join("c");
        std::fs::rename(&to, &sparse_source).unwrap();
        let copy = dir.path().join("d");
        let (allocated, kind) = private_copy(&sparse_source, &copy).unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), data, "{kind:?}");
        assert!(allocated <= 64 * 1024, "{kind:?}: {allocated} bytes allocated for 2 non-zero blocks");
        assert!(private_copy(&sparse_source, &copy).is_err(), "never overwrites");
    }
}
