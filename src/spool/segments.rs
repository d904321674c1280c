//! Segment files: `{start:020}.log`, JSON lines, named by the log position of
//! their first byte.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub start: u64,
    pub len: u64,
}

pub fn path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.log"))
}

/// Segments on disk, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<Segment>> {
    let mut segs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(start) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        // A segment may be removed (cleaned up) while we list.
        let len = match entry.metadata() {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        segs.push(Segment { start, len });
    }
    segs.sort_by_key(|s| s.start);
    Ok(segs)
}

/// Lists segments and cuts a torn tail off each: anything after a segment's
/// last newline was a write interrupted by a crash (in the newest segment),
/// or lost with the page cache in a power loss before the periodic sync (in
/// an older one, whose successor then starts past its end: a gap, see
/// [`gaps`]).
pub fn recover(dir: &Path) -> std::io::Result<Vec<Segment>> {
    let mut segs = list(dir)?;
    for last in segs.iter_mut() {
        let p = path(dir, last.start);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)?;
        let keep = complete_len(&mut f, last.len)?;
        if keep != last.len {
            tracing::warn!(
                segment = %p.display(),
                torn_bytes = last.len - keep,
                "spool: removed a torn partial line left by a crash"
            );
            f.set_len(keep)?;
            f.sync_all()?;
            last.len = keep;
        }
    }
    Ok(segs)
}

/// The byte ranges no segment holds between the first and the last (lost
/// in a power loss): readers step over them. Closed segments never change,
/// so what recovery finds stays true while the spool is open.
pub fn gaps(segs: &[Segment]) -> Vec<(u64, u64)> {
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    for w in segs.windows(2) {
        let (from, to) = (w[0].start + w[0].len, w[1].start);
        if from >= to {
            continue;
        }
        // Gaps that touch (a segment cut to nothing between them) are one.
        match gaps.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => gaps.push((from, to)),
        }
    }
    gaps
}

/// Length of the file up to and including its last `\n`.
fn complete_len(f: &mut std::fs::File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let from = end.saturating_sub(buf.len() as u64);
        let n = (end - from) as usize;
        f.seek(SeekFrom::Start(from))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = memchr::memrchr(b'\n', &buf[..n]) {
            return Ok(from + i as u64 + 1);
        }
        end = from;
    }
    Ok(0)
}
