//! A sink's view of the spool: batches of whole event lines from its cursor.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::segments;
use super::{Cursor, Spool, SpoolError};

/// Whole event lines (each ending in `\n`) and the position just past them.
pub struct Batch {
    pub lines: Vec<Bytes>,
    pub end: u64,
}

impl Batch {
    pub fn bytes(&self) -> usize {
        self.lines.iter().map(|l| l.len()).sum()
    }
}

pub struct Reader {
    spool: Arc<Spool>,
    sink: String,
    position: u64,
    /// Where the last commit left the cursor (see [`Reader::rewind`]).
    committed: u64,
    sink_offset: Option<u64>,
    end: watch::Receiver<u64>,
}

impl Reader {
    pub(super) fn new(
        spool: Arc<Spool>,
        sink: String,
        position: u64,
        sink_offset: Option<u64>,
        end: watch::Receiver<u64>,
    ) -> Reader {
        Reader {
            spool,
            sink,
            position,
            committed: position,
            sink_offset,
            end,
        }
    }

    /// Reads again from the last commit: what was delivered after it did not
    /// become durable at the sink (a failed sync).
    pub fn rewind(&mut self) {
        self.position = self.committed;
    }

    pub fn position(&self) -> u64 {
        self.position
    }

    /// The sink's own offset saved with the cursor (file sinks).
    pub fn sink_offset(&self) -> Option<u64> {
        self.sink_offset
    }

    /// Events written but not yet delivered by this sink.
    pub fn lag_bytes(&self) -> u64 {
        self.spool.end().saturating_sub(self.position)
    }

    /// Waits until there are events past the cursor.
    pub async fn wait_data(&mut self) -> Result<(), SpoolError> {
        loop {
            if *self.end.borrow_and_update() > self.position {
                return Ok(());
            }
            if self.end.changed().await.is_err() {
                return Err(SpoolError::Closed);
            }
        }
    }

    /// Whatever is available now, without waiting (empty when caught up).
    pub async fn try_batch(
        &mut self,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Batch, SpoolError> {
        self.read(max_events, max_bytes).await
    }

    async fn read(&mut self, max_events: usize, max_bytes: usize) -> Result<Batch, SpoolError> {
        let dir = self.spool.dir().to_path_buf();
        let from = self.position;
        // Only what the writer has published: a failed write's bytes are in
        // the file until it cuts them back, and must never be delivered.
        let limit = self.spool.end();
        // Over a gap that recovery found (lost in a power loss).
        let from = self
            .spool
            .gaps
            .iter()
            .find(|(start, end)| (*start..*end).contains(&from))
            .map_or(from, |(_, end)| *end);
        let (from, lines) = tokio::task::spawn_blocking(move || {
            read_lines(&dir, from, limit, max_events, max_bytes)
        })
        .await
        .expect("spool read does not panic")?;
        if from != self.position {
            tracing::error!(
                sink = %self.sink,
                lost_bytes = from - self.position,
                "sink skipped events missing from the spool (dropped when full, or lost in a power loss)"
            );
        }
        let end = from + lines.iter().map(|l| l.len() as u64).sum::<u64>();
        self.position = end;
        Ok(Batch { lines, end })
    }

    /// Commits delivery up to `batch_end`, with the sink's own offset. On
    /// the blocking pool: the cursor file is synced twice (file and
    /// directory), which a slow disk makes long, and sinks share the
    /// one-thread main runtime with the accept loop.
    pub async fn commit(
        &mut self,
        batch_end: u64,
        sink_offset: Option<u64>,
    ) -> Result<(), SpoolError> {
        let (spool, sink) = (self.spool.clone(), self.sink.clone());
        let cursor = Cursor {
            position: batch_end,
            sink_offset,
        };
        tokio::task::spawn_blocking(move || spool.commit(&sink, cursor))
            .await
            .unwrap_or_else(|e| Err(SpoolError::Io(std::io::Error::other(e))))?;
        self.committed = batch_end;
        self.sink_offset = sink_offset;
        Ok(())
    }
}

/// The most read from a segment at once (a batch may span several reads).
const READ_CHUNK: usize = 256 * 1024;

/// Reads whole lines from `from`, up to `limit` (the published end of the
/// log). Returns the position actually read from (later than `from` if those
/// segments were dropped) and the lines. A segment removed between listing
/// and opening (by cleanup or `drop_oldest`) means listing again.
fn read_lines(
    dir: &std::path::Path,
    from: u64,
    limit: u64,
    max_events: usize,
    max_bytes: usize,
) -> Result<(u64, Vec<Bytes>), SpoolError> {
    let mut attempts = 0;
    loop {
        match read_lines_once(dir, from, limit, max_events, max_bytes) {
            Err(SpoolError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound && attempts < 8 => {
                attempts += 1;
            }
            other => return other,
        }
    }
}

fn read_lines_once(
    dir: &std::path::Path,
    mut from: u64,
    limit: u64,
    max_events: usize,
    max_bytes: usize,
) -> Result<(u64, Vec<Bytes>), SpoolError> {
    let mut segs = segments::list(dir)?;
    for seg in &mut segs {
        seg.len = seg.len.min(limit.saturating_sub(seg.start));
    }
    let Some(first) = segs.first() else {
        return Ok((from, Vec::new()));
    };
    if from < first.start {
        from = first.start;
    }
    let mut lines = Vec::new();
    let mut taken = 0usize;
    let mut pos = from;
    let start_pos = pos;
    for seg in segs.iter().filter(|s| s.start + s.len > start_pos) {
        // The listing may be a moment old (a roll since, or a segment whose
        // length was read before its last append): stop at any gap rather
        // than compute a position outside the segment.
        let Some(offset) = pos.checked_sub(seg.start).filter(|o| *o <= seg.len) else {
            break;
        };
        let mut f = std::fs::File::open(segments::path(dir, seg.start))?;
        f.seek(SeekFrom::Start(offset))?;
        let left = (seg.len - offset) as usize;
        let mut want = left
            .min(max_bytes.saturating_sub(taken).max(1 << 16))
            .min(READ_CHUNK);
        // Read into spare capacity: no zeroing, and chunks small enough for
        // the allocator to reuse rather than map fresh pages each time. A
        // line longer than the chunk doubles it until the line fits.
        let buf = loop {
            let mut buf = Vec::with_capacity(want);
            (&mut f).take(want as u64).read_to_end(&mut buf)?;
            if want >= left || memchr::memchr(b'\n', &buf).is_some() {
                break Bytes::from(buf);
            }
            want = (want * 2).min(left);
            f.seek(SeekFrom::Start(offset))?;
        };
        let mut at = 0;
        while let Some(i) = memchr::memchr(b'\n', &buf[at..]) {
            let line = buf.slice(at..at + i + 1);
            at += i + 1;
            taken += line.len();
            lines.push(line);
            if lines.len() >= max_events || taken >= max_bytes {
                return Ok((from, lines));
            }
        }
        pos += at as u64;
        if pos < seg.start + seg.len {
            // The rest of this segment did not fit, or a line is still being written.
            break;
        }
    }
    Ok((from, lines))
}
