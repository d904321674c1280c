//! The spool's single writer: a dedicated thread that takes queued events in
//! batches, writes each batch with one `write`, syncs per the fsync policy,
//! and only then acknowledges the batch (group commit).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::segments::{self, Segment};
use super::{Append, SpoolError, SpoolStats};
use crate::config::{Fsync, SpoolPolicy};

const MAX_BATCH_EVENTS: usize = 1024;

pub struct Writer {
    dir: PathBuf,
    policy: SpoolPolicy,
    file: File,
    seg_start: u64,
    seg_len: u64,
    end_tx: watch::Sender<u64>,
    dirty: bool,
    last_sync: Instant,
    stats: Arc<SpoolStats>,
}

impl Writer {
    pub fn new(
        dir: PathBuf,
        policy: SpoolPolicy,
        segs: Vec<Segment>,
        end_tx: watch::Sender<u64>,
        stats: Arc<SpoolStats>,
    ) -> std::io::Result<Writer> {
        let (seg_start, seg_len) = match segs.last() {
            Some(s) => (s.start, s.len),
            None => (0, 0),
        };
        let file = open_segment(&dir, seg_start)?;
        Ok(Writer {
            dir,
            policy,
            file,
            seg_start,
            seg_len,
            end_tx,
            dirty: false,
            last_sync: Instant::now(),
            stats,
        })
    }

    pub fn run(mut self, mut rx: mpsc::Receiver<Append>, rt: tokio::runtime::Handle) {
        let tick = match self.policy.fsync {
            Fsync::Interval(d) => d.max(Duration::from_millis(1)),
            _ => Duration::from_secs(3600),
        };
        let mut batch = Vec::with_capacity(MAX_BATCH_EVENTS);
        let mut buf = Vec::with_capacity(256 * 1024);
        loop {
            let got = rt.block_on(async {
                tokio::time::timeout(tick, rx.recv_many(&mut batch, MAX_BATCH_EVENTS)).await
            });
            match got {
                Err(_elapsed) => {
                    self.sync_if_due(true);
                    continue;
                }
                Ok(0) => break,
                Ok(_) => {}
            }
            let closing = batch.iter().any(|a| a.line.is_empty() && a.ack.is_none());
            self.write_batch(&mut batch, &mut buf);
            if closing {
                break;
            }
        }
        if let Err(e) = self.file.sync_data() {
            tracing::error!(error = %e, "spool: final sync failed");
        }
    }

    fn write_batch(&mut self, batch: &mut Vec<Append>, buf: &mut Vec<u8>) {
        buf.clear();
        let mut ends = Vec::with_capacity(batch.len());
        for a in batch.iter() {
            buf.extend_from_slice(&a.line);
            ends.push(self.seg_start + self.seg_len + buf.len() as u64);
        }
        let mut result = self.file.write_all(buf);
        if result.is_ok() && self.policy.fsync == Fsync::Always {
            result = self.file.sync_data();
            self.last_sync = Instant::now();
        }
        match result {
            Ok(()) => {
                self.stats.failed_at_ms.store(0, Ordering::Relaxed);
                self.seg_len += buf.len() as u64;
                self.dirty = self.policy.fsync != Fsync::Always;
                let n = batch.iter().filter(|a| !a.line.is_empty()).count();
                self.stats
                    .appended_events
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.end_tx.send_replace(self.seg_start + self.seg_len);
                for (a, end) in batch.drain(..).zip(ends) {
                    if let Some(ack) = a.ack {
                        let _ = ack.send(Ok(end));
                    }
                }
                self.sync_if_due(false);
                if self.seg_len >= self.policy.segment_bytes {
                    if let Err(e) = self.roll() {
                        tracing::error!(error = %e, "spool: cannot start a new segment");
                    }
                }
            }
            Err(e) => {
                // Cut anything partially written so the log stays line-aligned.
                let _ = self.file.set_len(self.seg_len);
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .failed_at_ms
                    .store(super::unix_ms().max(1), Ordering::Relaxed);
                tracing::error!(error = %e, events = batch.len(), "spool write failed");
                for a in batch.drain(..) {
                    if let Some(ack) = a.ack {
                        let _ = ack.send(Err(SpoolError::Io(std::io::Error::new(
                            e.kind(),
                            e.to_string(),
                        ))));
                    }
                }
            }
        }
    }

    fn sync_if_due(&mut self, force: bool) {
        let Fsync::Interval(every) = self.policy.fsync else {
            return;
        };
        if self.dirty && (force || self.last_sync.elapsed() >= every) {
            if let Err(e) = self.file.sync_data() {
                tracing::error!(error = %e, "spool: fsync failed");
            }
            self.dirty = false;
            self.last_sync = Instant::now();
        }
    }

    fn roll(&mut self) -> std::io::Result<()> {
        if self.policy.fsync != Fsync::Never {
            self.file.sync_data()?;
        }
        let start = self.seg_start + self.seg_len;
        self.file = open_segment(&self.dir, start)?;
        self.seg_start = start;
        self.seg_len = 0;
        self.dirty = false;
        Ok(())
    }
}

fn open_segment(dir: &std::path::Path, start: u64) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(segments::path(dir, start))?;
    // Make the new file's directory entry durable too.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(f)
}
