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
    }
}
