//! Reading a fault trace of the snapshot corpus: the pages of a memory file a restored guest
//! touched while it served one request, in first-touch order, as
//! `integration/corpus/make-corpus.sh` records them beside each snapshot
//! (`CORPUS/<function>/<revision>.trace`; the format is specified in
//! `integration/corpus/fault_trace.py` and `integration/corpus/README.md`).
//!
//! Shared by the lazy-restore tests (`tests/lazy.rs`) and the benchmark runner
//! (`integration/src/bin/bench/`, included with `#[path]`), which replay it through the
//! Firecracker stand-in.
#![allow(unreachable_pub, dead_code)]

use std::path::{Path, PathBuf};

/// The first line of every trace file.
pub const MAGIC: &str = "# thaw-fault-trace v1";

/// One recorded trace.
#[derive(Debug, Clone)]
pub struct FaultTrace {
    /// Page size of the page indexes, bytes.
    pub page_size: u64,
    /// Size of the memory file the trace was recorded on.
    pub memory_size: u64,
    /// Page indexes in first-touch order, each once.
    pub pages: Vec<u64>,
    /// Milliseconds from resume until the guest answered.
    pub resume_to_answer_ms: Option<f64>,
}

impl FaultTrace {
    /// The trace recorded beside the snapshot directory `snapshot` (`<dir>.trace`).
    pub fn path_of(snapshot: &Path) -> PathBuf {
        let mut p = snapshot.as_os_str().to_owned();
        p.push(".trace");
        PathBuf::from(p)
    }

    /// Reads and checks a trace file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a trace: the magic line, `key=value` lines, then `PAGE MS` lines.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("not a fault trace (the first line must be `{MAGIC}`)"));
        }
        let (mut page_size, mut memory_size, mut declared, mut answer_ms) = (None, None, None, None);
        let mut pages = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (n, line) in lines.enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let number = |v: &str| v.parse::<u64>().map_err(|_| format!("line {}: bad number {v:?}", n + 2));
            if let Some((key, value)) = line.split_once('=') {
                match key {
                    "page_size" => page_size = Some(number(value)?),
                    "memory_size" => memory_size = Some(number(value)?),
                    "pages" => declared = Some(number(value)?),
                    "resume_to_answer_ms" => answer_ms = value.parse::<f64>().ok(),
                    _ => {}
                }
                continue;
            }
            let page = number(line.split_whitespace().next().unwrap_or(""))?;
            if !seen.insert(page) {
                return Err(format!("line {}: page {page} listed twice", n + 2));
            }
            pages.push(page);
        }
        let page_size = page_size.ok_or("no page_size")?;
        let memory_size = memory_size.ok_or("no memory_size")?;
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(format!("page_size {page_size} is not a power of two"));
        }
        if let Some(p) = pages.iter().find(|p| (**p + 1) * page_size > memory_size) {
            return Err(format!("page {p} lies past the memory file's {memory_size} bytes"));
        }
        if declared.is_some_and(|d| d != pages.len() as u64) {
            return Err(format!("declares {} pages but lists {}", declared.unwrap_or(0), pages.len()));
        }
        Ok(Self { page_size, memory_size, pages, resume_to_answer_ms: answer_ms })
    }

    /// The byte offsets of the traced pages, in order.
    pub fn offsets(&self) -> Vec<usize> {
        self.pages.iter().map(|p| (p * self.page_size) as usize).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_trace_and_refuses_bad_ones() {
        let text = format!("{MAGIC}\n# comment\npage_size=4096\nmemory_size=40960\npages=3\nmethod=x=y\n7 0.0\n2 1.5\n9 3.0\n");
        let t = FaultTrace::parse(&text).unwrap();
        assert_eq!(t.pages, [7, 2, 9]);
        assert_eq!(t.offsets(), [7 * 4096, 2 * 4096, 9 * 4096]);
        assert!(FaultTrace::parse("page_size=4096\n").is_err(), "no magic");
        assert!(FaultTrace::parse(&format!("{MAGIC}\npage_size=4096\nmemory_size=4096\n1 0\n")).is_err());
        assert!(
            FaultTrace::parse(&format!("{MAGIC}\npage_size=4096\nmemory_size=40960\n1 0\n1 0\n")).is_err()
        );
        assert_eq!(FaultTrace::path_of(Path::new("/c/fn-json/v1")), Path::new("/c/fn-json/v1.trace"));
    }
}
