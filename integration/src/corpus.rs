//! Reading a snapshot corpus made by `integration/corpus/make-corpus.sh`.
//!
//! Layout: `CORPUS/<function>/<revision>/{memory,vmstate,disk.ext4,info.json}`. Directories
//! whose name starts with a dot (`.logs`, `.work`) are not snapshots.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One snapshot: a function revision and its files.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Function name, e.g. `fn-json`.
    pub function: String,
    /// Revision, e.g. `v1`.
    pub revision: String,
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The parsed `info.json` (`Null` when the file is missing or unreadable).
    pub info: serde_json::Value,
}

impl Snapshot {
    /// Path of one of the snapshot's files.
    pub fn file(&self, media: Media) -> PathBuf {
        self.dir.join(media.file_name())
    }

    /// `function/revision`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.function, self.revision)
    }
}

/// The kinds of snapshot file a chunking choice is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Media {
    /// The guest memory file.
    Memory,
    /// The ext4 disk image.
    Disk,
    /// The device-state file.
    Vmstate,
}

impl Media {
    /// File name inside a snapshot directory.
    pub const fn file_name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Disk => "disk.ext4",
            Self::Vmstate => "vmstate",
        }
    }
}

impl fmt::Display for Media {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Memory => "memory",
            Self::Disk => "disk",
            Self::Vmstate => "vmstate",
        })
    }
}

/// Every snapshot under `dir`, sorted by function then revision.
pub fn load(dir: &Path) -> io::Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    for function in sorted_dirs(dir)? {
        for revision in sorted_dirs(&function)? {
            if !revision.join(Media::Memory.file_name()).is_file() {
                continue;
            }
            let info = fs::read(revision.join("info.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(serde_json::Value::Null);
            out.push(Snapshot {
                function: file_name(&function),
                revision: file_name(&revision),
                dir: revision,
                info,
            });
        }
    }
    if out.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no snapshots under {} (expected FUNCTION/REVISION/memory; build one with \
                 integration/corpus/make-corpus.sh)",
                dir.display()
            ),
        ));
    }
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn sorted_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))? {
        let entry = entry?;
        // `Path::is_dir` follows symbolic links, so a corpus can be assembled from links.
        if entry.path().is_dir() && !entry.file_name().to_string_lossy().starts_with('.') {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_snapshots_in_order_and_skips_other_dirs() {
        let dir = tempfile::tempdir().unwrap();
        for (f, r) in [("fn-b", "v1"), ("fn-a", "v2"), ("fn-a", "v1")] {
            let d = dir.path().join(f).join(r);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("memory"), b"m").unwrap();
        }
        fs::write(dir.path().join("fn-a/v1/info.json"), br#"{"kernel": "6.1"}"#).unwrap();
        fs::create_dir_all(dir.path().join(".logs/x")).unwrap();
        fs::create_dir_all(dir.path().join("fn-c/unfinished")).unwrap();
        let snaps = load(dir.path()).unwrap();
        let labels: Vec<_> = snaps.iter().map(Snapshot::label).collect();
        assert_eq!(labels, ["fn-a/v1", "fn-a/v2", "fn-b/v1"]);
        assert_eq!(snaps[0].info["kernel"], "6.1");
        assert!(snaps[1].info.is_null());
        assert_eq!(snaps[2].file(Media::Disk), dir.path().join("fn-b/v1/disk.ext4"));

        let empty = tempfile::tempdir().unwrap();
        assert_eq!(load(empty.path()).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
