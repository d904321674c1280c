//! The spool: a durable, append-only, segmented event log under
//! `data_dir/spool`, with one cursor per sink.
//!
//! Positions are byte offsets into the logical log; a segment file is named by
//! the position of its first byte. One writer thread appends batches (group
//! commit) and acknowledges each event once it is in the file (the OS page
//! cache survives `kill -9`) and, with `fsync = "always"`, on disk. Sinks read
//! from their cursor and commit it after delivery; a segment is removed once
//! every sink has passed it. The undelivered bytes are bounded by `max_bytes`.

mod batch;
mod cursor;
mod reader;
mod segments;
mod writer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::config::{Fsync, SpoolPolicy, WhenFull};
use crate::limits::state::Note;

pub use cursor::Cursor;
pub use reader::{Batch, Reader};

/// Events queued for the writer thread at most; appenders wait beyond it.
const QUEUE: usize = 8192;

/// Appends waiting for room in a full group-commit queue past which new
/// calls are refused (`fsync = "always"` on a disk that cannot keep up):
/// the calls already admitted still finish and append, so the waiting
/// appends stay within this plus the calls in flight.
const WAITING_MAX: usize = QUEUE;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool is full ({used} of {max} bytes undelivered)")]
    Full { used: u64, max: u64 },
    #[error("spool is closed")]
    Closed,
    #[error("spool is not writable: the last write failed")]
    Unwritable,
    #[error("spool is behind: {0} events wait for room in the write queue")]
    Behind(usize),
    #[error("{0} is in use by another tollgate process (give each its own data_dir)")]
    InUse(PathBuf),
}

impl SpoolError {
    pub fn kind(&self) -> &'static str {
        match self {
            SpoolError::Io(_) => "spool_io",
            SpoolError::Full { .. } => "spool_full",
            SpoolError::Closed => "spool_closed",
            SpoolError::Unwritable => "spool_unwritable",
            SpoolError::Behind(_) => "spool_behind",
            SpoolError::InUse(_) => "spool_in_use",
        }
    }
}

/// When a queued line is written (`fsync = "interval"` and `"never"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// With the other lines of this scheduler pass (one `write` for all).
    Batch,
    /// Now, taking along whatever this thread has pending.
    Now,
}

struct Append {
    line: Vec<u8>,
    note: Option<Note>,
    ack: Option<oneshot::Sender<Result<u64, SpoolError>>>,
}

/// An append waiting on the spool's runtime for room in the full
/// group-commit queue, counted in `Spool::waiting` until it is queued or
/// gone. Gone unqueued (the queue closed, or the runtime shut down first),
/// its event is counted lost.
struct Waiting {
    append: Option<Append>,
    log: Arc<writer::Log>,
    count: Arc<AtomicUsize>,
}

impl Waiting {
    fn new(append: Append, log: Arc<writer::Log>, count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting {
            append: Some(append),
            log,
            count,
        }
    }

    async fn send(mut self, tx: mpsc::Sender<Append>) {
        if let Ok(permit) = tx.reserve().await {
            permit.send(self.append.take().expect("sent once"));
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        if self.append.as_ref().is_some_and(|a| !a.line.is_empty()) {
            tracing::error!("spool: an event waiting for the write queue was lost at shutdown");
            self.log.count_lost(1);
        }
    }
}

/// Counters the spool exposes to `/metrics`.
#[derive(Default)]
pub struct SpoolStats {
    pub appended_events: AtomicU64,
    /// `write` calls into the log (fewer than events when batched).
    pub writes: AtomicU64,
    pub dropped_bytes: AtomicU64,
    /// Unix millis of the last failed write, 0 once a write succeeds.
    pub failed_at_ms: AtomicU64,
    /// Events whose write failed (exported as `tollgate_events_lost_total`).
    pub lost_events: prometheus_client::metrics::counter::Counter,
}

/// After a failed write, new calls are refused this long; then the spool
/// probes whether the disk takes a write (see [`Spool::write_failing`]).
const FAILED_HOLD_MS: u64 = 1000;

/// ENOLCK and EOPNOTSUPP: the filesystem has no locks to take.
fn locks_unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported || matches!(e.raw_os_error(), Some(37 | 95))
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file,
/// synced, renamed over it, and the directory synced (so that after a power
/// loss the rename is not older than what was deleted on its strength).
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct Spool {
    dir: PathBuf,
    policy: SpoolPolicy,
    log: Arc<writer::Log>,
    /// The group-commit queue (`fsync = "always"` only).
    tx: Option<mpsc::Sender<Append>>,
    /// Per-thread batching (`fsync = "interval"` and `"never"`).
    batcher: Option<Arc<batch::Batcher>>,
    /// Where a queue-full `fsync = "always"` append finishes sending.
    rt: tokio::runtime::Handle,
    /// Appends waiting there (see [`WAITING_MAX`]).
    waiting: Arc<AtomicUsize>,
    /// End of the written log (next append position).
    end: watch::Receiver<u64>,
    /// Start of the oldest segment still on disk.
    start: AtomicU64,
    /// Byte ranges between segments that recovery found missing.
    gaps: Vec<(u64, u64)>,
    cursors: Mutex<Vec<(String, u64)>>,
    /// The follower (the budget state keeper), whose cursor `drop_oldest`
    /// does not pass while it shows signs of life.
    follower: OnceLock<Follower>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub stats: Arc<SpoolStats>,
    /// Held (an exclusive `flock`) while the spool is open: a second
    /// process on the same directory would interleave segments and cursors.
    _lock: std::fs::File,
}

struct Follower {
    cursor: String,
    /// Past this long without a sign of life (a commit, or a tick with
    /// nothing to commit), the follower no longer holds `drop_oldest` back:
    /// the spool stays bounded if it hangs or its snapshots fail.
    stale_after: Duration,
    /// Monotonic origin of `alive_ms` (a wall-clock step must not make a
    /// dead follower look alive, or a live one dead).
    origin: std::time::Instant,
    /// Its last sign of life, in millis since `origin`.
    alive_ms: AtomicU64,
    /// Asks it to commit now: `drop_oldest` is waiting for it.
    wanted: Notify,
}

impl Follower {
    fn mark_alive(&self) {
        self.alive_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn is_alive(&self) -> bool {
        let since = Duration::from_millis(self.alive_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(since) < self.stale_after
    }
}

impl Spool {
    /// Opens (recovering a torn tail) or creates the spool in `dir`, with a
    /// cursor for each sink name. Must run inside a tokio runtime.
    pub fn open(
        dir: &Path,
        policy: SpoolPolicy,
        sinks: &[String],
    ) -> Result<Arc<Spool>, SpoolError> {
        std::fs::create_dir_all(dir.join("cursors"))?;
        let lock = std::fs::File::create(dir.join("lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::InUse(dir.to_path_buf()))
            }
            // Some network filesystems have no flock: run, but say so.
            Err(std::fs::TryLockError::Error(e)) if locks_unsupported(&e) => {
                tracing::warn!(path = %dir.join("lock").display(), error = %e, "cannot lock the spool directory here; a second tollgate on the same data_dir would not be refused");
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let segs = segments::recover(dir)?;
        let gaps = segments::gaps(&segs);
        for (from, to) in &gaps {
            tracing::error!(
                from,
                lost_bytes = to - from,
                "spool: events lost between segments (a power loss before their sync); readers skip them"
            );
        }
        let end = segs.last().map(|s| s.start + s.len).unwrap_or(0);
        let start = segs.first().map(|s| s.start).unwrap_or(end);
        let mut cursors = Vec::new();
        for name in sinks {
            let c = cursor::load(dir, name)?.unwrap_or(Cursor {
                position: start,
                sink_offset: None,
            });
            let position = c.position.clamp(start, end);
            if c.position > end {
                // Delivered past what recovery kept (a power loss before the
                // spool's sync; the cursor is synced at each commit). Saved
                // clamped at once: new lines will reuse the positions past
                // the end, and a restart before the sink's next commit would
                // otherwise skip them and start inside a line.
                tracing::warn!(
                    sink = %name,
                    cursor = c.position,
                    end,
                    "spool: sink cursor past the recovered end (a power loss); moved back to the end"
                );
                cursor::store(dir, name, &Cursor { position, ..c })?;
            }
            cursors.push((name.clone(), position));
        }
        let (end_tx, end_rx) = watch::channel(end);
        let stats = Arc::new(SpoolStats::default());
        let log = Arc::new(writer::Log::open(
            dir.to_path_buf(),
            policy.clone(),
            &segs,
            end_tx,
            stats.clone(),
        )?);
        let mut threads = Vec::new();
        let mut tx = None;
        match policy.fsync {
            Fsync::Always => {
                let (t, rx) = mpsc::channel(QUEUE);
                tx = Some(t);
                let l = log.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name("tollgate-spool".into())
                        .spawn(move || writer::run_group_commit(l, rx))?,
                );
            }
            Fsync::Interval(every) => {
                let l = log.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name("tollgate-fsync".into())
                        .spawn(move || writer::run_syncer(l, every))?,
                );
            }
            Fsync::Never => {}
        }
        let batcher = tx
            .is_none()
            .then(|| Arc::new(batch::Batcher::new(log.clone())));
        let spool = Arc::new(Spool {
            dir: dir.to_path_buf(),
            policy: policy.clone(),
            log,
            tx,
            batcher,
            rt: tokio::runtime::Handle::current(),
            waiting: Arc::new(AtomicUsize::new(0)),
            end: end_rx,
            start: AtomicU64::new(start),
            gaps,
            cursors: Mutex::new(cursors),
            follower: OnceLock::new(),
            threads: Mutex::new(threads),
            stats,
            _lock: lock,
        });
        spool.collect_garbage();
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues one event line (ending in `\n`) at once; the future resolves
    /// when it is in the spool file (and on disk with `fsync = "always"`),
    /// with the position just past it. The line is written even if the
    /// future is dropped: a caller that goes away cannot lose its event.
    ///
    /// Lines queued on one thread in the same scheduler pass share a
    /// `write`, which makes the caller wait for that pass to end. A caller
    /// that would hold back a response not yet started passes
    /// [`Flush::Now`]: waiting would only split the response's write.
    pub fn append(
        &self,
        line: Vec<u8>,
        flush: Flush,
    ) -> impl Future<Output = Result<u64, SpoolError>> + Send + 'static {
        self.append_noted(line, None, flush)
    }

    /// [`Spool::append`] for an event that changes the budget ledger: `note`
    /// is kept for the state keeper when (and only if) the line is written.
    pub fn append_noted(
        &self,
        line: Vec<u8>,
        note: Option<Note>,
        flush: Flush,
    ) -> impl Future<Output = Result<u64, SpoolError>> + Send + 'static {
        enum Queued {
            Failed(SpoolError),
            Batch(batch::Queued),
            Group(oneshot::Receiver<Result<u64, SpoolError>>),
        }
        let queued = if self.log.closed.load(Ordering::Relaxed) {
            self.log.count_lost(1);
            Queued::Failed(SpoolError::Closed)
        } else if let Some(b) = &self.batcher {
            Queued::Batch(b.queue(&line, note, flush == Flush::Now))
        } else {
            let tx = self
                .tx
                .as_ref()
                .expect("no batcher means a group-commit queue");
            let (ack, rx) = oneshot::channel();
            match tx.try_send(Append {
                line,
                note,
                ack: Some(ack),
            }) {
                Ok(()) => Queued::Group(rx),
                // Full: the send finishes on the spool's runtime, so the
                // caller still cannot lose the line by going away. New calls
                // are refused while many wait (`Spool::behind`).
                Err(mpsc::error::TrySendError::Full(a)) => {
                    let waiting = Waiting::new(a, self.log.clone(), self.waiting.clone());
                    self.rt.spawn(waiting.send(tx.clone()));
                    Queued::Group(rx)
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.log.count_lost(1);
                    Queued::Failed(SpoolError::Closed)
                }
            }
        };
        async move {
            match queued {
                Queued::Failed(e) => Err(e),
                Queued::Batch(q) => q.done.wait(q.end_in_batch).await,
                Queued::Group(rx) => rx.await.map_err(|_| SpoolError::Closed)?,
            }
        }
    }

    /// From now on, keep the ledger notes of written lines for the budget
    /// state keeper ([`Spool::take_notes`]), whose snapshot covers the log
    /// up to its `cursor`: a restart replays the segments after it, so
    /// `drop_oldest` waits for its next commit rather than remove them,
    /// unless it has shown no sign of life (a commit, or
    /// [`Spool::follower_alive`]) for `stale_after`. Called once, before
    /// anything is appended.
    pub fn follow(&self, cursor: &str, stale_after: Duration) {
        self.log.follow();
        let _ = self.follower.set(Follower {
            cursor: cursor.to_string(),
            stale_after,
            origin: std::time::Instant::now(),
            alive_ms: AtomicU64::new(0),
            wanted: Notify::new(),
        });
    }

    /// The follower is running and had nothing to commit.
    pub fn follower_alive(&self) {
        if let Some(f) = self.follower.get() {
            f.mark_alive();
        }
    }

    /// Resolves when `drop_oldest` waits for the follower to commit.
    pub async fn commit_wanted(&self) {
        match self.follower.get() {
            Some(f) => f.wanted.notified().await,
            None => std::future::pending().await,
        }
    }

    /// The end of the log and the notes of all lines written since the last
    /// call: folded into a ledger that covered the log up to the previous
    /// end, they make it cover exactly up to this one. `None` once following
    /// stopped (the notes were not taken for too long).
    pub fn take_notes(&self) -> Option<(u64, Vec<Note>)> {
        self.log.take_notes()
    }

    /// Undelivered bytes: from the slowest sink's cursor to the end.
    pub fn backlog_bytes(&self) -> u64 {
        let end = *self.end.borrow();
        end.saturating_sub(self.min_cursor(end))
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.end()
            .saturating_sub(self.start.load(Ordering::Relaxed))
    }

    pub fn end(&self) -> u64 {
        *self.end.borrow()
    }

    /// Admission check for new metered calls. With `when_full = "reject"` a
    /// full spool refuses them (metering fails closed); with `drop_oldest`
    /// the oldest undelivered segments are removed instead, loudly.
    pub fn check_capacity(&self) -> Result<(), SpoolError> {
        if self.failing() {
            return Err(SpoolError::Unwritable);
        }
        if let Some(n) = self.behind() {
            return Err(SpoolError::Behind(n));
        }
        let used = self.backlog_bytes();
        if used < self.policy.max_bytes {
            return Ok(());
        }
        match self.policy.when_full {
            WhenFull::Reject => Err(SpoolError::Full {
                used,
                max: self.policy.max_bytes,
            }),
            WhenFull::DropOldest => {
                self.drop_oldest();
                Ok(())
            }
        }
    }

    /// A write failed less than `FAILED_HOLD_MS` ago, or a failed write's
    /// bytes are still to be cut off (each look tries the cut again, so
    /// calls and probes arriving are what ends it: a spool that refuses
    /// calls gets no writes to retry it with).
    fn failing(&self) -> bool {
        self.write_failing() || !self.log.cut_done()
    }

    /// A circuit breaker on failed writes. After one, calls are refused for
    /// [`FAILED_HOLD_MS`]; then the first caller starts a probe of the disk
    /// on a thread of its own (a stalled disk must not stall a worker) and
    /// calls stay refused, the hold starting again, until it closes the
    /// breaker, which it does only if its write succeeds (as the next good
    /// write does). Before, every call was let through once the hold was
    /// over: with the disk still full, all the calls admitted before one
    /// of them failed its write again lost their events.
    fn write_failing(&self) -> bool {
        let failed = &self.stats.failed_at_ms;
        let at = failed.load(Ordering::Relaxed);
        if at == 0 {
            return false;
        }
        let now = unix_ms().max(1);
        if now.saturating_sub(at) < FAILED_HOLD_MS
            || failed
                .compare_exchange(at, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return true;
        }
        let log = self.log.clone();
        let stats = self.stats.clone();
        let spawned = std::thread::Builder::new()
            .name("tollgate-probe".into())
            .spawn(move || match log.probe() {
                Ok(()) => {
                    // Unless a write failed meanwhile.
                    let _ = stats.failed_at_ms.compare_exchange(
                        now,
                        0,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "spool: the disk still refuses writes; metered calls stay refused");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "spool: cannot start the disk probe; trying again in a second");
        }
        true
    }

    /// `fsync = "always"` on a disk slower than the calls: the appends
    /// waiting for room in the full queue, when there are [`WAITING_MAX`] or
    /// more. Refusing new calls then keeps them bounded.
    fn behind(&self) -> Option<usize> {
        let n = self.waiting.load(Ordering::Relaxed);
        (n >= WAITING_MAX).then_some(n)
    }

    /// Whether new metered calls would be refused now (for `/readyz`;
    /// nothing is dropped; a failed write's cut is retried and, past the
    /// hold, the disk probe started, see [`Spool::failing`]): the last
    /// write failed, the write queue is behind (see [`Spool::behind`]), or
    /// the spool is full under `when_full = "reject"`.
    pub fn refuses_calls(&self) -> bool {
        self.failing()
            || self.behind().is_some()
            || (self.policy.when_full == WhenFull::Reject
                && self.backlog_bytes() >= self.policy.max_bytes)
    }

    /// Whether the spool takes the event of a refused call (one no
    /// admission check let in): not failing, and less than half full. The
    /// other half is kept for billed calls, whatever `when_full` says, so a
    /// flood of refusals during a sink outage can neither fill the spool
    /// (`reject`: every call refused) nor push many billed calls' events out
    /// (`drop_oldest`). Nothing is dropped to make room (a failing spool's
    /// cut and probe are retried, as by [`Spool::refuses_calls`]).
    pub fn has_room_for_refusals(&self) -> bool {
        !self.failing()
            && self.behind().is_none()
            && self.backlog_bytes() < self.policy.max_bytes / 2
    }

    fn cursor_position(&self, name: &str) -> Option<u64> {
        let cursors = self.cursors.lock().unwrap();
        cursors.iter().find(|(n, _)| n == name).map(|(_, p)| *p)
    }

    fn min_cursor(&self, end: u64) -> u64 {
        let cursors = self.cursors.lock().unwrap();
        cursors.iter().map(|(_, p)| *p).min().unwrap_or(end)
    }

    /// A reader for `sink` from its committed cursor.
    pub fn reader(self: &Arc<Self>, sink: &str) -> Result<Reader, SpoolError> {
        let cursor = cursor::load(&self.dir, sink)?;
        let start = self.start.load(Ordering::Relaxed);
        let position = self.cursor_position(sink).unwrap_or(start);
        Ok(Reader::new(
            self.clone(),
            sink.to_string(),
            position.max(start),
            cursor.and_then(|c| c.sink_offset),
            self.end.clone(),
        ))
    }

    /// A reader for `sink` from an explicit position (the state keeper
    /// resumes from its snapshot, which may be past its committed cursor).
    pub fn reader_at(self: &Arc<Self>, sink: &str, position: u64) -> Result<Reader, SpoolError> {
        let start = self.start.load(Ordering::Relaxed);
        Ok(Reader::new(
            self.clone(),
            sink.to_string(),
            // Not past the end either: after a power loss a snapshot can be
            // ahead of what recovery kept.
            position.clamp(start, self.end()),
            None,
            self.end.clone(),
        ))
    }

    /// Records that `sink` delivered everything before `position`.
    pub fn commit(&self, sink: &str, cursor: Cursor) -> Result<(), SpoolError> {
        cursor::store(&self.dir, sink, &cursor)?;
        if let Some(f) = self.follower.get().filter(|f| f.cursor == sink) {
            f.mark_alive();
        }
        {
            let mut cursors = self.cursors.lock().unwrap();
            if let Some(c) = cursors.iter_mut().find(|(n, _)| n == sink) {
                // Never behind the oldest segment (`drop_oldest` moved it on).
                c.1 = cursor.position.max(self.start.load(Ordering::Relaxed));
            }
        }
        self.collect_garbage();
        Ok(())
    }

    /// The committed position of each sink (for lag metrics).
    pub fn cursors(&self) -> Vec<(String, u64)> {
        self.cursors.lock().unwrap().clone()
    }

    /// Removes segments every sink has passed (never the active one).
    fn collect_garbage(&self) {
        let end = self.end();
        let min = self.min_cursor(end);
        self.remove_segments_before(min, false);
    }

    fn drop_oldest(&self) {
        let end = self.end();
        let mut target = end.saturating_sub(self.policy.max_bytes / 2);
        if let Some(f) = self.follower.get() {
            let at = self.cursor_position(&f.cursor).unwrap_or(end);
            if at < target && f.is_alive() {
                // Past its snapshot, dropping would lose spend to a crash
                // (a restart could not replay it): drop up to it, and ask it
                // to move on.
                target = at;
                f.wanted.notify_one();
            }
        }
        let dropped = self.remove_segments_before(target, true);
        if dropped > 0 {
            let new_start = self.start.load(Ordering::Relaxed);
            let mut cursors = self.cursors.lock().unwrap();
            for (name, pos) in cursors.iter_mut() {
                if *pos < new_start {
                    tracing::error!(
                        sink = %name,
                        lost_bytes = new_start - *pos,
                        "spool full: dropped undelivered events (spool.when_full = \"drop_oldest\")"
                    );
                    *pos = new_start;
                }
            }
        }
    }

    /// Deletes closed segments that end at or before `before`. Returns the
    /// bytes removed. `lost` marks them as dropped undelivered.
    fn remove_segments_before(&self, before: u64, lost: bool) -> u64 {
        let Ok(segs) = segments::list(&self.dir) else {
            return 0;
        };
        let active = segs.last().map(|s| s.start);
        let mut removed = 0;
        for s in &segs {
            if Some(s.start) == active || s.start + s.len > before {
                break;
            }
            if std::fs::remove_file(segments::path(&self.dir, s.start)).is_ok() {
                removed += s.len;
                self.start.store(s.start + s.len, Ordering::Relaxed);
                if lost {
                    self.stats.dropped_bytes.fetch_add(s.len, Ordering::Relaxed);
                }
            }
        }
        removed
    }

    /// Stops the writer after it has written (and synced) everything queued.
    pub async fn close(&self) {
        if let Some(b) = &self.batcher {
            b.flush_all();
        }
        if let Some(tx) = &self.tx {
            let _ = tx
                .send(Append {
                    line: Vec::new(),
                    note: None,
                    ack: None,
                })
                .await;
        }
        self.log.closed.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        let log = self.log.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            // Logged; what it covers was acknowledged before the close.
            let _ = log.sync();
        })
        .await;
    }
}

#[cfg(test)]
mod tests;
