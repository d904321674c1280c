//! Sinks deliver events from the spool. Each is one object-safe trait
//! ([`Sink`]) driven by the same loop ([`drive`]): read a batch from the sink's
//! cursor, deliver it, commit the cursor only after the sink said yes. A
//! failing sink retries with backoff and holds back no other sink, and never
//! the proxy: sinks are not on the request path.

pub mod file;
pub mod http;
pub mod otlp;

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::server::stopped;

use crate::config::{BatchPolicy, SinkConfig, SinkKind};
use crate::metrics::{Metrics, SinkLabels};
use crate::proxy::client::Clients;
use crate::spool::{Batch, Reader, Spool};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The receiver did not take the batch this time; try again later
    /// (`after`: what it asked for, e.g. `retry-after`).
    #[error("delivery failed: {reason}")]
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

impl SinkError {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Io(_) => "io",
            SinkError::Retry { .. } => "retry",
        }
    }
}

/// An HTTP answer to retry: the receiver is busy or failing (408, 425,
/// 429, 5xx), or refuses the sender rather than the batch: a credential
/// rotated or expired (401, 403), a URL not there yet (404) or moved (3xx:
/// redirects are not followed, so the URL needs fixing), a coding or
/// content type it does not take (415: `gzip` against a receiver without
/// it). Billing data is not set aside for a fixable setting; the spool
/// holds it meanwhile, and the sink's lag and retries show it. Anything
/// else (400, 422…) is about the batch: it goes to the dead-letter file
/// (413 first has the HTTP sink send it in halves).
pub(crate) fn retry_http_status(status: u16) -> bool {
    matches!(status, 300..=399 | 401 | 403 | 404 | 408 | 415 | 425 | 429 | 500..=599)
}

/// A gRPC status to retry: OTLP's retryable ones (CANCELLED,
/// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, OUT_OF_RANGE,
/// UNAVAILABLE, DATA_LOSS), and, as for HTTP, those that refuse the sender
/// rather than the batch (PERMISSION_DENIED, UNAUTHENTICATED). Not
/// NOT_FOUND and UNIMPLEMENTED: from an OTLP receiver they say it has no
/// service for the signal (a logs-only collector asked for metrics).
pub(crate) fn retry_grpc_status(code: u32) -> bool {
    matches!(code, 1 | 4 | 7 | 8 | 10 | 11 | 14 | 15 | 16)
}

/// A batch the receiver took (or that was set aside in a dead-letter file).
#[derive(Debug, Default)]
pub struct Delivered {
    /// Saved with the cursor (file sinks: the file's length).
    pub sink_offset: Option<u64>,
    /// Events written to the dead-letter file instead of delivered.
    pub dead_lettered: usize,
}

/// One destination for events.
pub trait Sink: Send {
    /// Called once before the first batch with the offset saved alongside the
    /// cursor by the previous run (file sinks truncate to it). Returns the
    /// offset to record with the cursor right away, if the sink keeps one.
    fn start(&mut self, saved_offset: Option<u64>)
        -> BoxFuture<'_, Result<Option<u64>, SinkError>>;

    /// Delivers a batch. `Ok` means the receiver has it (or it was
    /// dead-lettered); only then does the cursor move.
    fn deliver<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<Delivered, SinkError>>;

    /// Makes delivered batches durable before the cursor moves past them
    /// (the file sink's fsync). Most receivers acknowledge durably already.
    fn sync(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

pub fn build(cfg: &SinkConfig, data_dir: &std::path::Path, clients: &Clients) -> Box<dyn Sink> {
    match &cfg.kind {
        SinkKind::File { path } => Box::new(file::FileSink::new(path.clone())),
        SinkKind::Http {
            url,
            format,
            headers,
            gzip,
            timeout,
        } => Box::new(http::HttpSink {
            name: cfg.name.clone(),
            url: url.clone(),
            format: *format,
            headers: headers.clone(),
            gzip: *gzip,
            timeout: *timeout,
            client: clients.get(Duration::from_secs(10)),
            dead_letter: data_dir
                .join("deadletter")
                .join(format!("{}.jsonl", cfg.name)),
        }),
        SinkKind::Otlp { .. } => Box::new(otlp::OtlpSink::new(cfg, data_dir)),
    }
}

/// Runs one sink until `shutdown`; then delivers what is already in the spool
/// (bounded by the caller's grace period) and returns.
pub async fn drive(
    name: String,
    batch_policy: BatchPolicy,
    mut sink: Box<dyn Sink>,
    spool: Arc<Spool>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let labels = SinkLabels { sink: name.clone() };
    let BatchPolicy {
        max_events,
        max_bytes,
        max_wait,
    } = batch_policy;
    let mut reader: Reader = match spool.reader(&name) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(sink = %name, error = %e, "sink cannot read the spool");
            return;
        }
    };
    let mut backoff = Backoff::default();
    loop {
        match sink.start(reader.sink_offset()).await {
            Ok(offset) => {
                // Record where the sink starts, so a crash before the first
                // commit cuts back to here rather than duplicating.
                if offset.is_some() && offset != reader.sink_offset() {
                    if let Err(e) = reader.commit(reader.position(), offset).await {
                        tracing::error!(sink = %name, error = %e, "cannot save sink cursor");
                    }
                }
                break;
            }
            Err(e) => {
                tracing::warn!(sink = %name, error = %e, "sink failed to start; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next(None)) => {}
                    _ = stopped(&mut shutdown) => return,
                }
            }
        }
    }
    let mut draining = false;
    // Delivered but not yet committed: (position, sink offset).
    let mut pending: Option<(u64, Option<u64>)> = None;
    let mut last_commit = tokio::time::Instant::now();
    loop {
        if !draining {
            let due = last_commit + COMMIT_EVERY;
            tokio::select! {
                r = reader.wait_data() => if r.is_err() {
                    let _ = commit(&name, &mut *sink, &mut reader, &mut pending).await;
                    return;
                },
                _ = tokio::time::sleep_until(due), if pending.is_some() => {
                    if commit(&name, &mut *sink, &mut reader, &mut pending).await {
                        metrics.sink_errors.get_or_create(&labels).inc();
                        tokio::time::sleep(backoff.next(None)).await;
                    }
                    last_commit = tokio::time::Instant::now();
                    continue;
                }
                _ = stopped(&mut shutdown) => { draining = true; continue; }
            }
            // Let a batch fill for up to `max_wait` (one read per batch, not
            // one per event), unless a full batch is already there.
            if !max_wait.is_zero() && reader.lag_bytes() < max_bytes as u64 {
                tokio::select! {
                    _ = tokio::time::sleep(max_wait) => {}
                    _ = stopped(&mut shutdown) => { draining = true; }
                }
            }
        }
        let batch = match reader.try_batch(max_events, max_bytes).await {
            Ok(b) if !b.lines.is_empty() => b,
            Ok(_) if !draining => continue,
            Ok(_) => {
                let _ = commit(&name, &mut *sink, &mut reader, &mut pending).await;
                return;
            }
            Err(e) => {
                // Never give up silently: log, back off, read again.
                tracing::error!(sink = %name, error = %e, "sink cannot read the spool; retrying");
                if draining {
                    let _ = commit(&name, &mut *sink, &mut reader, &mut pending).await;
                    return;
                }
                tokio::time::sleep(backoff.next(None)).await;
                continue;
            }
        };
        loop {
            match sink.deliver(&batch).await {
                Ok(done) => {
                    pending = Some((batch.end, done.sink_offset));
                    let delivered = batch.lines.len() - done.dead_lettered;
                    metrics
                        .sink_delivered
                        .get_or_create(&labels)
                        .inc_by(delivered as u64);
                    if done.dead_lettered > 0 {
                        metrics
                            .sink_dead_lettered
                            .get_or_create(&labels)
                            .inc_by(done.dead_lettered as u64);
                    } else {
                        metrics
                            .sink_last_success
                            .get_or_create(&labels)
                            .set(unix_now());
                    }
                    backoff = Backoff::default();
                    if draining || last_commit.elapsed() >= COMMIT_EVERY {
                        if commit(&name, &mut *sink, &mut reader, &mut pending).await {
                            metrics.sink_errors.get_or_create(&labels).inc();
                            tokio::time::sleep(backoff.next(None)).await;
                        }
                        last_commit = tokio::time::Instant::now();
                    }
                    break;
                }
                Err(e) => {
                    metrics.sink_errors.get_or_create(&labels).inc();
                    let after = match &e {
                        SinkError::Retry { after, .. } => *after,
                        _ => None,
                    };
                    let wait = backoff.next(after);
                    tracing::warn!(sink = %name, error = %e, kind = e.kind(), retry_in = ?wait, "delivery failed; will retry");
                    // What was delivered before stays delivered, unless its
                    // sync fails: then the reader went back, and this batch
                    // is read again after what came before it.
                    let rewound = commit(&name, &mut *sink, &mut reader, &mut pending).await;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stopped(&mut shutdown), if !draining => { draining = true; }
                    }
                    if rewound {
                        break;
                    }
                }
            }
        }
    }
}

/// Cursor commits are batched in time: a crash re-delivers at most this much
/// (the file sink re-writes it exactly, cutting its file back first).
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// Makes what was delivered durable at the sink, then moves the cursor.
/// `true` when the sync failed and the reader went back to the last commit:
/// the caller drops any batch in hand (it is read again) and backs off.
#[must_use]
async fn commit(
    name: &str,
    sink: &mut dyn Sink,
    reader: &mut Reader,
    pending: &mut Option<(u64, Option<u64>)>,
) -> bool {
    let Some((end, offset)) = pending.take() else {
        return false;
    };
    if let Err(e) = sink.sync().await {
        // What was delivered since the last commit may not be durable, and
        // a later sync can succeed without it (Linux marks the pages clean
        // after a failed `fdatasync`): deliver it again from the last commit,
        // the sink cut back to that commit's offset (as after a crash).
        tracing::error!(sink = %name, error = %e, "sink sync failed; delivering again from the last commit");
        reader.rewind();
        if let Err(e) = sink.start(reader.sink_offset()).await {
            tracing::error!(sink = %name, error = %e, "sink cannot restart after a failed sync; retrying with the next delivery");
        }
        return true;
    }
    if let Err(e) = reader.commit(end, offset).await {
        tracing::error!(sink = %name, error = %e, "cannot save sink cursor");
    }
    false
}

/// Appends the lines of a refused batch (or part of one) to `path`
/// (`data_dir/deadletter/<sink>.jsonl`), one line an event:
/// `{"time","sink","reason","event"}`; logged at ERROR.
pub fn dead_letter(
    path: &std::path::Path,
    sink: &str,
    lines: &[Bytes],
    reason: &str,
) -> Result<(), SinkError> {
    use std::io::Write;
    tracing::error!(
        sink,
        events = lines.len(),
        reason,
        "receiver refused a batch; written to the dead-letter file"
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let now = crate::event::format_time(time::OffsetDateTime::now_utc());
    let mut out = Vec::new();
    for line in lines {
        let event: serde_json::Value =
            serde_json::from_slice(line).unwrap_or(serde_json::Value::Null);
        let entry =
            serde_json::json!({"time": now, "sink": sink, "reason": reason, "event": event});
        serde_json::to_writer(&mut out, &entry).expect("serializes");
        out.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&out)?;
    f.sync_data()?;
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The longest wait between attempts, also when the receiver asks for more.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Exponential backoff from 100 ms to 30 s with full jitter, or what the
/// receiver asked for (`retry-after`), whichever is longer, but never past
/// 30 s: one `Retry-After: 3600` would otherwise hold every event for an
/// hour after the receiver is back (and fill the spool meanwhile).
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self, asked: Option<Duration>) -> Duration {
        let cap = Duration::from_millis(100u64 << self.attempt.min(9)).min(MAX_BACKOFF);
        self.attempt += 1;
        let jittered = cap.mul_f64(0.5 + fastrand::f64() / 2.0);
        asked.map_or(jittered, |a| a.max(jittered).min(MAX_BACKOFF))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_honours_retry_after_up_to_its_cap() {
        let mut b = Backoff::default();
        assert!(b.next(None) <= Duration::from_millis(100));
        assert!(b.next(Some(Duration::from_secs(5))) >= Duration::from_secs(5));
        assert_eq!(b.next(Some(Duration::from_secs(3600))), MAX_BACKOFF);
        for _ in 0..20 {
            assert!(b.next(None) <= MAX_BACKOFF);
        }
    }

    #[test]
    fn sender_refusals_are_retried_batch_refusals_are_not() {
        for s in [
            301, 302, 307, 308, 401, 403, 404, 408, 415, 425, 429, 500, 503, 599,
        ] {
            assert!(retry_http_status(s), "{s}");
        }
        for s in [400, 405, 409, 413, 422] {
            assert!(!retry_http_status(s), "{s}");
        }
        // UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE…
        for c in [1, 4, 7, 8, 10, 11, 14, 15, 16] {
            assert!(retry_grpc_status(c), "{c}");
        }
        // INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, UNIMPLEMENTED…
        for c in [2, 3, 5, 6, 9, 12, 13] {
            assert!(!retry_grpc_status(c), "{c}");
        }
    }

    /// Records what it takes; its first sync fails, and so does its
    /// delivery number `fail_delivery` (from 1), if any.
    struct FlakySink {
        delivered: Arc<std::sync::Mutex<Vec<Bytes>>>,
        syncs: usize,
        deliveries: usize,
        fail_delivery: Option<usize>,
    }

    use bytes::Bytes;

    impl Sink for FlakySink {
        fn start(&mut self, _: Option<u64>) -> BoxFuture<'_, Result<Option<u64>, SinkError>> {
            Box::pin(async { Ok(None) })
        }
        fn deliver<'a>(
            &'a mut self,
            batch: &'a Batch,
        ) -> BoxFuture<'a, Result<Delivered, SinkError>> {
            self.deliveries += 1;
            if self.fail_delivery == Some(self.deliveries) {
                return Box::pin(async {
                    Err(SinkError::Retry {
                        reason: "down".into(),
                        after: Some(Duration::from_millis(1)),
                    })
                });
            }
            self.delivered
                .lock()
                .unwrap()
                .extend(batch.lines.iter().cloned());
            Box::pin(async { Ok(Delivered::default()) })
        }
        fn sync(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
            self.syncs += 1;
            let first = self.syncs == 1;
            Box::pin(async move {
                if first {
                    Err(SinkError::Io(std::io::Error::other("EIO")))
                } else {
                    Ok(())
                }
            })
        }
    }

    /// A failed sync does not let a later one cover what it failed to make
    /// durable: the sink is given those lines again, and the cursor moves
    /// only past what a successful sync covered.
    /// Runs `drive` over three lines, `max_events` a batch, until the sink
    /// has taken `want` lines, and checks the cursor ends past all three;
    /// returns the lines the sink took.
    async fn drive_flaky(
        fail_delivery: Option<usize>,
        max_events: usize,
        want: usize,
    ) -> Vec<Bytes> {
        use crate::config::{Fsync, SpoolPolicy, WhenFull};
        let dir = tempfile::tempdir().unwrap();
        let policy = SpoolPolicy {
            max_bytes: 1 << 20,
            when_full: WhenFull::Reject,
            fsync: Fsync::Never,
            segment_bytes: 1 << 20,
        };
        let spool = Spool::open(dir.path(), policy, &["s".to_string()]).unwrap();
        for i in 0..3 {
            spool
                .append(line(i), crate::spool::Flush::Batch)
                .await
                .unwrap();
        }
        let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = FlakySink {
            delivered: delivered.clone(),
            syncs: 0,
            deliveries: 0,
            fail_delivery,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let policy = BatchPolicy {
            max_events,
            max_bytes: 1 << 20,
            max_wait: Duration::ZERO,
        };
        let task = tokio::spawn(drive(
            "s".into(),
            policy,
            Box::new(sink),
            spool.clone(),
            Arc::new(Metrics::default()),
            stop_rx,
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while delivered.lock().unwrap().len() < want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never delivered again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        // Committed once a sync succeeded: a restart starts past all three.
        assert_eq!(spool.reader("s").unwrap().position(), spool.end());
        spool.close().await;
        let got = delivered.lock().unwrap().clone();
        got
    }

    fn line(i: usize) -> Vec<u8> {
        format!("{{\"n\":{i}}}\n").into_bytes()
    }

    /// The batch in hand when a sync fails is not retried ahead of the
    /// lines before it: everything is read again in order (it was written
    /// after the cut, then again: out of order, and twice).
    #[tokio::test]
    async fn a_sync_failing_during_a_retry_reads_again_in_order() {
        let got = drive_flaky(Some(2), 1, 4).await;
        let want: Vec<Bytes> = [0, 0, 1, 2].map(|i| Bytes::from(line(i))).to_vec();
        assert_eq!(got[..4], want[..]);
    }

    #[tokio::test]
    async fn after_a_failed_sync_the_lines_are_delivered_again() {
        let got = drive_flaky(None, 100, 6).await;
        let want: Vec<Bytes> = (0..3).chain(0..3).map(|i| Bytes::from(line(i))).collect();
        assert_eq!(got[..6], want[..]);
    }
}
