//! Group commit without a thread hop (`fsync = "interval"` and `"never"`).
//!
//! Appenders on one thread put their lines into that thread's pending
//! buffer; the first one schedules a flush task behind the tasks already
//! queued on its runtime, so every call that finishes in the same pass of the
//! scheduler shares one `write`. Each appender then waits for the flush that
//! carries its line. The line is queued synchronously, so a waiter that is
//! dropped (the client went away) cannot lose it: the flush task writes it,
//! and so does its `Drop` if the runtime shuts down first, and so does
//! [`Batcher::flush_all`] when the spool closes.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::Notify;

use super::writer::Log;
use super::SpoolError;
use crate::limits::state::Note;

/// A pending buffer this large is written at once, without waiting for the
/// flush task (bounds the memory a burst can hold).
const FLUSH_AT_BYTES: usize = 256 * 1024;

thread_local! {
    /// This thread's pending buffer, per spool (tests open several).
    static LOCAL: RefCell<Vec<(Weak<Batcher>, Arc<Pending>)>> = const { RefCell::new(Vec::new()) };
}

pub struct Batcher {
    log: Arc<Log>,
    /// Every thread's pending buffer, to flush them all at close.
    all: Mutex<Vec<Weak<Pending>>>,
}

struct Pending {
    inner: Mutex<Lines>,
}

struct Lines {
    buf: Vec<u8>,
    events: u64,
    /// The ledger notes of the lines in `buf`.
    notes: Vec<Note>,
    /// Completed when the lines now in `buf` are written.
    done: Arc<Done>,
    flush_scheduled: bool,
}

/// The outcome of one flush: where its bytes start in the log.
#[derive(Default)]
pub struct Done {
    start: OnceLock<Result<u64, Failure>>,
    notify: Notify,
}

/// Why a flush did not write (kept apart so callers see the right kind).
#[derive(Debug, Clone)]
enum Failure {
    Closed,
    Io(String),
}

impl Done {
    /// Waits for the flush; returns the log position just past a line that
    /// ended `end_in_batch` bytes into the batch.
    pub async fn wait(&self, end_in_batch: u64) -> Result<u64, SpoolError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.start.get() {
                return match r {
                    Ok(start) => Ok(start + end_in_batch),
                    Err(Failure::Closed) => Err(SpoolError::Closed),
                    Err(Failure::Io(e)) => Err(SpoolError::Io(std::io::Error::other(e.clone()))),
                };
            }
            notified.await;
        }
    }

    fn complete(&self, r: Result<u64, Failure>) {
        let _ = self.start.set(r);
        self.notify.notify_waiters();
    }
}

/// A queued line: wait on `done` for it to be written.
pub struct Queued {
    pub done: Arc<Done>,
    pub end_in_batch: u64,
}

impl Batcher {
    pub fn new(log: Arc<Log>) -> Batcher {
        Batcher {
            log,
            all: Mutex::new(Vec::new()),
        }
    }

    /// Queues `line` in this thread's buffer and makes sure a flush follows
    /// (`now`: at once, with whatever else is pending).
    pub fn queue(self: &Arc<Self>, line: &[u8], note: Option<Note>, now: bool) -> Queued {
        let pending = self.local();
        let mut lines = pending.inner.lock().unwrap();
        lines.buf.extend_from_slice(line);
        lines.events += 1;
        lines.notes.extend(note);
        let queued = Queued {
            done: lines.done.clone(),
            end_in_batch: lines.buf.len() as u64,
        };
        // Written now when asked (unless another thread holds the log: then
        // with the scheduled flush) or when the buffer is large.
        let written = (lines.buf.len() >= FLUSH_AT_BYTES && self.write(&mut lines, false))
            || (now && self.write(&mut lines, true));
        if !written && !lines.flush_scheduled {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    lines.flush_scheduled = true;
                    drop(lines);
                    let guard = FlushOnDrop {
                        batcher: self.clone(),
                        pending: pending.clone(),
                    };
                    // Queued behind the tasks already runnable: the calls
                    // finishing in this pass join the batch. (Spawned with
                    // the buffer unlocked: a runtime that is shutting down
                    // drops the task at once, and the guard flushes.)
                    rt.spawn(async move { drop(guard) });
                }
                // Not on a runtime: write now.
                Err(_) => {
                    self.write(&mut lines, false);
                }
            }
        }
        queued
    }

    /// Writes every thread's pending lines (at close).
    pub fn flush_all(&self) {
        let all: Vec<Arc<Pending>> = {
            let mut all = self.all.lock().unwrap();
            all.retain(|w| w.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        for p in all {
            self.write(&mut p.inner.lock().unwrap(), false);
        }
    }

    fn local(self: &Arc<Self>) -> Arc<Pending> {
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            let me = Arc::as_ptr(self);
            if let Some((_, p)) = l.iter().find(|(b, _)| std::ptr::eq(b.as_ptr(), me)) {
                return p.clone();
            }
            // Forget buffers of spools that are gone (tests open several).
            l.retain(|(b, _)| b.strong_count() > 0);
            let p = Arc::new(Pending {
                inner: Mutex::new(Lines {
                    buf: Vec::with_capacity(16 * 1024),
                    events: 0,
                    notes: Vec::new(),
                    done: Arc::default(),
                    flush_scheduled: false,
                }),
            });
            self.all.lock().unwrap().push(Arc::downgrade(&p));
            l.push((Arc::downgrade(self), p.clone()));
            p
        })
    }

    /// One `write` for everything pending (the lock is held throughout, so
    /// `flush_all` never overtakes a write in progress). With `only_if_free`
    /// nothing happens (`false`) when another thread is writing the log.
    fn write(&self, lines: &mut Lines, only_if_free: bool) -> bool {
        if lines.buf.is_empty() {
            return true;
        }
        let result = if self.log.closed.load(Ordering::Relaxed) {
            Err(SpoolError::Closed)
        } else if only_if_free {
            match self
                .log
                .try_write(&lines.buf, lines.events, &mut lines.notes)
            {
                Some(r) => r,
                None => return false,
            }
        } else {
            self.log.write(&lines.buf, lines.events, &mut lines.notes)
        };
        let done = std::mem::take(&mut lines.done);
        let len = lines.buf.len() as u64;
        if result.is_err() {
            self.log.count_lost(lines.events);
        }
        done.complete(result.map(|end| end - len).map_err(|e| match e {
            SpoolError::Closed => Failure::Closed,
            e => Failure::Io(e.to_string()),
        }));
        lines.buf.clear();
        if lines.buf.capacity() > FLUSH_AT_BYTES {
            lines.buf.shrink_to(16 * 1024);
        }
        lines.events = 0;
        lines.notes.clear();
        true
    }
}

/// The scheduled flush; it runs when dropped, so a task that never gets to
/// run (its runtime shut down) still writes.
struct FlushOnDrop {
    batcher: Arc<Batcher>,
    pending: Arc<Pending>,
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        let mut lines = self.pending.inner.lock().unwrap();
        lines.flush_scheduled = false;
        self.batcher.write(&mut lines, false);
    }
}
