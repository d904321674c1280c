//! Writing the spool. The log (active segment, position, rolling) sits
//! behind one mutex held only for a `write` into the page cache, so an append
//! costs one syscall on the caller's thread and no thread hop; that is what
//! survives `kill -9`. Syncing to disk is separate:
//! - `fsync = "interval"`: a syncer thread `fdatasync`s a handle of its own
//!   every interval, without holding the lock;
//! - `fsync = "always"`: appends go through a group-commit thread that writes
//!   a batch, syncs it, then acknowledges every event in it.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::segments::{self, Segment};
use super::{unix_ms, Append, SpoolError, SpoolStats};
use crate::config::{Fsync, SpoolPolicy};
use crate::limits::state::Note;

/// Notes held for the state keeper at most; past this it has stopped
/// draining them (it runs once a second), and following ends.
const MAX_NOTES: usize = 1 << 22;

pub(super) const MAX_BATCH_EVENTS: usize = 1024;

pub struct Log {
    dir: PathBuf,
    policy: SpoolPolicy,
    state: Mutex<State>,
    end_tx: watch::Sender<u64>,
    stats: Arc<SpoolStats>,
    pub closed: AtomicBool,
    /// `State::cut_pending`, readable without the lock.
    cut_pending: AtomicBool,
    /// Tests: every sync fails, as a full or broken disk makes it.
    #[cfg(test)]
    pub fail_syncs: AtomicBool,
    /// Tests: every write puts half its bytes in the file, then fails.
    #[cfg(test)]
    pub fail_writes: AtomicBool,
    /// Tests: every cut back (`set_len`) fails.
    #[cfg(test)]
    pub fail_cuts: AtomicBool,
    /// Tests: held, the group-commit thread stops before its next write, as
    /// a stalled disk stops it.
    #[cfg(test)]
    pub hold: Mutex<()>,
    /// Tests: batches the group-commit thread has taken off its queue.
    #[cfg(test)]
    pub taken: std::sync::atomic::AtomicUsize,
}

struct State {
    file: Arc<File>,
    seg_start: u64,
    seg_len: u64,
    dirty: bool,
    /// A failed write or sync left bytes past `seg_len` that cutting back
    /// failed to remove. Nothing is written until a cut succeeds: appended
    /// after them, lines would sit at file offsets other than their log
    /// positions, and a restart would read the leftover glued to the next.
    cut_pending: bool,
    /// `fsync = "interval"`: segments closed by a roll, and whether the
    /// directory gained an entry, still to sync. The syncer does it, off
    /// the lock: a worker that rolls never waits for the disk.
    rolled: Vec<Arc<File>>,
    dir_dirty: bool,
    /// The ledger notes of the lines written since the state keeper last
    /// took them, while it follows (see [`Log::take_notes`]).
    notes: Vec<Note>,
    following: bool,
}

impl Log {
    pub fn open(
        dir: PathBuf,
        policy: SpoolPolicy,
        segs: &[Segment],
        end_tx: watch::Sender<u64>,
        stats: Arc<SpoolStats>,
    ) -> std::io::Result<Log> {
        let (seg_start, seg_len) = segs.last().map(|s| (s.start, s.len)).unwrap_or((0, 0));
        let file = Arc::new(open_segment(&dir, seg_start)?);
        sync_dir(&dir);
        Ok(Log {
            dir,
            policy,
            state: Mutex::new(State {
                file,
                seg_start,
                seg_len,
                dirty: false,
                cut_pending: false,
                rolled: Vec::new(),
                dir_dirty: false,
                notes: Vec::new(),
                following: false,
            }),
            end_tx,
            stats,
            closed: AtomicBool::new(false),
            cut_pending: AtomicBool::new(false),
            #[cfg(test)]
            fail_syncs: AtomicBool::new(false),
            #[cfg(test)]
            fail_writes: AtomicBool::new(false),
            #[cfg(test)]
            fail_cuts: AtomicBool::new(false),
            #[cfg(test)]
            hold: Mutex::new(()),
            #[cfg(test)]
            taken: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Appends whole lines; returns the log position after them. A failed
    /// write is cut back so the log stays line-aligned.
    /// The `notes` of the lines are moved to the keeper's list once written
    /// (left in place otherwise).
    pub fn write(&self, buf: &[u8], events: u64, notes: &mut Vec<Note>) -> Result<u64, SpoolError> {
        let s = self.state.lock().unwrap();
        self.write_locked(s, buf, events, notes)
    }

    /// From now on, keep the notes of written lines for [`Log::take_notes`].
    pub fn follow(&self) {
        self.state.lock().unwrap().following = true;
    }

    /// The end of the log and the notes of every line written since the
    /// last call (so they cover exactly the log up to that end); `None` once
    /// following has stopped because nobody took them.
    pub fn take_notes(&self) -> Option<(u64, Vec<Note>)> {
        let mut s = self.state.lock().unwrap();
        let end = s.seg_start + s.seg_len;
        s.following.then(|| (end, std::mem::take(&mut s.notes)))
    }

    /// Like [`Log::write`], but `None` rather than waiting when another
    /// thread is writing (a worker thread must not sleep on the lock: every
    /// connection it serves would wait).
    pub fn try_write(
        &self,
        buf: &[u8],
        events: u64,
        notes: &mut Vec<Note>,
    ) -> Option<Result<u64, SpoolError>> {
        let s = match self.state.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::WouldBlock) => return None,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        Some(self.write_locked(s, buf, events, notes))
    }

    fn write_locked<'a>(
        &'a self,
        mut s: std::sync::MutexGuard<'a, State>,
        buf: &[u8],
        events: u64,
        notes: &mut Vec<Note>,
    ) -> Result<u64, SpoolError> {
        if s.cut_pending {
            if let Err(e) = self.cut_back(&mut s) {
                self.mark_failed();
                tracing::error!(error = %e, events, "spool write refused: a failed write is not cut back yet");
                return Err(e.into());
            }
        }
        if let Err(e) = self.write_data(&s.file, buf) {
            let _ = self.cut_back(&mut s);
            self.mark_failed();
            tracing::error!(error = %e, events, "spool write failed");
            return Err(e.into());
        }
        // "always": on disk before anything can see it (the ack, readers,
        // the state keeper's notes). A failed sync cuts the lines back as a
        // failed write does; syncing again later would not do, since Linux
        // marks the pages clean after a failed `fdatasync`.
        let always = self.policy.fsync == Fsync::Always;
        if always {
            // Synced without the lock: the state keeper takes it (from the
            // main runtime) to read the notes. Only the group-commit thread
            // writes under "always", so nothing moves meanwhile.
            let file = s.file.clone();
            drop(s);
            let synced = self.sync_data(&file);
            s = self.state.lock().unwrap();
            if let Err(e) = synced {
                let _ = self.cut_back(&mut s);
                self.mark_failed();
                tracing::error!(error = %e, events, "spool sync failed");
                return Err(e.into());
            }
        }
        s.seg_len += buf.len() as u64;
        s.dirty = !always;
        if s.following && !notes.is_empty() {
            if s.notes.len() + notes.len() > MAX_NOTES {
                tracing::error!(
                    "budget state keeper stopped taking its notes; snapshots stop until a restart (which replays the spool)"
                );
                s.following = false;
                s.notes = Vec::new();
            } else {
                s.notes.append(notes);
            }
        }
        let end = s.seg_start + s.seg_len;
        self.stats.failed_at_ms.store(0, Ordering::Relaxed);
        self.stats
            .appended_events
            .fetch_add(events, Ordering::Relaxed);
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.end_tx.send_replace(end);
        if s.seg_len >= self.policy.segment_bytes {
            if let Err(e) = self.roll(&mut s) {
                tracing::error!(error = %e, "spool: cannot start a new segment");
            }
        }
        Ok(end)
    }

    /// Counts events whose write failed.
    pub fn count_lost(&self, events: u64) {
        self.stats.lost_events.inc_by(events);
    }

    /// Syncs what was written so far (no lock held during the sync):
    /// segments closed since the last sync, the active one, the directory.
    /// The first error is returned (each is logged).
    pub fn sync(&self) -> std::io::Result<()> {
        let (rolled, file, dir_dirty) = {
            let mut s = self.state.lock().unwrap();
            if !s.dirty && s.rolled.is_empty() && !s.dir_dirty {
                return Ok(());
            }
            let file = std::mem::take(&mut s.dirty).then(|| s.file.clone());
            (
                std::mem::take(&mut s.rolled),
                file,
                std::mem::take(&mut s.dir_dirty),
            )
        };
        let mut first = None;
        for f in rolled.iter().chain(file.as_ref()) {
            if let Err(e) = self.sync_data(f) {
                tracing::error!(error = %e, "spool: fsync failed");
                first.get_or_insert(e);
            }
        }
        if dir_dirty {
            sync_dir(&self.dir);
        }
        first.map_or(Ok(()), Err)
    }

    fn write_data(&self, mut f: &File, buf: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_writes.load(Ordering::Relaxed) {
            f.write_all(&buf[..buf.len() / 2])?;
            return Err(std::io::Error::other("injected write failure"));
        }
        f.write_all(buf)
    }

    /// Cuts the active segment back to the published end; remembered as
    /// pending when it fails (see `State::cut_pending`).
    fn cut_back(&self, s: &mut State) -> std::io::Result<()> {
        let r = self.set_len(&s.file, s.seg_len);
        if let Err(e) = &r {
            tracing::error!(error = %e, "spool: cannot cut back a failed write; appends wait for the cut");
        }
        s.cut_pending = r.is_err();
        self.cut_pending.store(s.cut_pending, Ordering::Relaxed);
        r
    }

    /// Whether no failed write's bytes are left to cut off; if some are,
    /// tries the cut again first.
    pub fn cut_done(&self) -> bool {
        if !self.cut_pending.load(Ordering::Relaxed) {
            return true;
        }
        let mut s = self.state.lock().unwrap();
        !s.cut_pending || self.cut_back(&mut s).is_ok()
    }

    fn set_len(&self, f: &File, len: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_cuts.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("injected truncate failure"));
        }
        f.set_len(len)
    }

    fn sync_data(&self, f: &File) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_syncs.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("injected sync failure"));
        }
        f.sync_data()
    }

    /// Whether the disk takes a write again, after a failed one: a block
    /// written to a file of its own (never a segment: readers would see
    /// it), then removed. Filesystems refuse a write that finds no free
    /// block at `write` time (ext4 and XFS reserve on write, tmpfs has no
    /// other time), so a full disk shows without a sync; under `fsync =
    /// "always"`, where a failed sync fails writes, the block is synced
    /// too. Blocking: run off the workers.
    pub fn probe(&self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_writes.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("injected write failure"));
        }
        let path = self.dir.join("probe");
        let written = (|| {
            let mut f = File::create(&path)?;
            f.write_all(&[0u8; 4096])?;
            if self.policy.fsync == Fsync::Always {
                self.sync_data(&f)?;
            }
            Ok(())
        })();
        let _ = std::fs::remove_file(&path);
        written
    }

    /// Marks the spool failed now: calls are refused for a moment (see
    /// `FAILED_HOLD_MS`), as after a failed write.
    fn mark_failed(&self) {
        self.stats
            .failed_at_ms
            .store(unix_ms().max(1), Ordering::Relaxed);
    }

    fn roll(&self, s: &mut State) -> std::io::Result<()> {
        let start = s.seg_start + s.seg_len;
        // Under "always" every line of the old segment is already synced
        // (`write_locked` syncs before publishing); only the new directory
        // entry needs it, and the group-commit thread may wait for the disk.
        let file = Arc::new(open_segment(&self.dir, start)?);
        match self.policy.fsync {
            Fsync::Always => sync_dir(&self.dir),
            Fsync::Interval(_) => {
                s.rolled.push(s.file.clone());
                s.dir_dirty = true;
            }
            Fsync::Never => {}
        }
        s.file = file;
        s.seg_start = start;
        s.seg_len = 0;
        s.dirty = false;
        Ok(())
    }
}

/// `fsync = "interval"`: syncs every `every` until the log is closed.
pub fn run_syncer(log: Arc<Log>, every: Duration) {
    let every = every.max(Duration::from_millis(1));
    while !log.closed.load(Ordering::Relaxed) {
        std::thread::sleep(every);
        // Logged; a periodic sync's failure fails no call (README, Durability).
        let _ = log.sync();
    }
}

/// `fsync = "always"`: group commit. Takes queued events in batches, writes
/// each batch with one `write`, syncs, then acknowledges.
pub fn run_group_commit(log: Arc<Log>, mut rx: mpsc::Receiver<Append>) {
    let mut batch = Vec::with_capacity(MAX_BATCH_EVENTS);
    let mut buf = Vec::with_capacity(256 * 1024);
    loop {
        if rx.blocking_recv_many(&mut batch, MAX_BATCH_EVENTS) == 0 {
            break;
        }
        #[cfg(test)]
        log.taken.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        let _held = log.hold.lock().unwrap();
        let closing = batch.iter().any(|a| a.ack.is_none() && a.line.is_empty());
        buf.clear();
        let mut ends = Vec::with_capacity(batch.len());
        let mut notes = Vec::new();
        let base = *log.end_tx.borrow();
        for a in batch.iter_mut() {
            buf.extend_from_slice(&a.line);
            ends.push(base + buf.len() as u64);
            notes.extend(a.note.take());
        }
        let n = batch.iter().filter(|a| !a.line.is_empty()).count() as u64;
        // Written and synced before anything sees it (see `write_locked`):
        // a failed sync loses the batch as a failed write does (counted,
        // acknowledged as failed, calls refused for a moment).
        let result = log.write(&buf, n, &mut notes).map(|_| ());
        if result.is_err() {
            log.count_lost(n);
        }
        for (a, end) in batch.drain(..).zip(ends) {
            if let Some(ack) = a.ack {
                let _ = ack.send(match &result {
                    Ok(()) => Ok(end),
                    Err(e) => Err(SpoolError::Io(std::io::Error::other(e.to_string()))),
                });
            }
        }
        if closing {
            // Appends queued behind the close marker are never written.
            rx.close();
            while let Ok(a) = rx.try_recv() {
                if !a.line.is_empty() {
                    log.count_lost(1);
                }
            }
            break;
        }
    }
}

fn open_segment(dir: &std::path::Path, start: u64) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(segments::path(dir, start))
}

/// Makes new directory entries (segment files) durable.
fn sync_dir(dir: &std::path::Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
