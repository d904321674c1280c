//! Sinks deliver events from the spool. Each is one object-safe trait
//! ([`Sink`]) driven by the same loop ([`drive`]): read a batch from the sink's
//! cursor, deliver it, commit the cursor only after the sink said yes. A
//! failing sink retries with backoff and holds back no other sink, and never
//! the proxy: sinks are not on the request path.

pub mod file;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::server::stopped;

use crate::config::{SinkConfig, SinkKind};
use crate::metrics::{Metrics, SinkLabels};
use crate::spool::{Batch, Reader, Spool};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl SinkError {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Io(_) => "io",
        }
    }
}

/// One destination for events.
pub trait Sink: Send {
    /// Called once before the first batch with the offset saved alongside the
    /// cursor by the previous run (file sinks truncate to it).
    fn start(&mut self, saved_offset: Option<u64>) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Delivers a batch. `Ok(offset)` means the receiver has it; the offset is
    /// saved with the cursor.
    fn deliver<'a>(&'a mut self, batch: &'a Batch)
        -> BoxFuture<'a, Result<Option<u64>, SinkError>>;
}

pub fn build(cfg: &SinkConfig) -> Box<dyn Sink> {
    match &cfg.kind {
        SinkKind::File { path } => Box::new(file::FileSink::new(path.clone())),
    }
}

const MAX_BATCH_EVENTS: usize = 1000;
const MAX_BATCH_BYTES: usize = 4 << 20;

/// Runs one sink until `shutdown`; then delivers what is already in the spool
/// (bounded by the caller's grace period) and returns.
pub async fn drive(
    name: String,
    mut sink: Box<dyn Sink>,
    spool: Arc<Spool>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let labels = SinkLabels { sink: name.clone() };
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
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(sink = %name, error = %e, "sink failed to start; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next()) => {}
                    _ = stopped(&mut shutdown) => return,
                }
            }
        }
    }
    let mut draining = false;
    loop {
        let batch = if draining {
            match reader.try_batch(MAX_BATCH_EVENTS, MAX_BATCH_BYTES).await {
                Ok(b) if b.lines.is_empty() => return,
                Ok(b) => b,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                b = reader.next_batch(MAX_BATCH_EVENTS, MAX_BATCH_BYTES) => match b {
                    Ok(b) => b,
                    Err(_) => return,
                },
                _ = stopped(&mut shutdown) => { draining = true; continue; }
            }
        };
        loop {
            match sink.deliver(&batch).await {
                Ok(offset) => {
                    if let Err(e) = reader.commit(batch.end, offset) {
                        tracing::error!(sink = %name, error = %e, "cannot save sink cursor");
                    }
                    metrics
                        .sink_delivered
                        .get_or_create(&labels)
                        .inc_by(batch.lines.len() as u64);
                    metrics
                        .sink_last_success
                        .get_or_create(&labels)
                        .set(unix_now());
                    backoff = Backoff::default();
                    break;
                }
                Err(e) => {
                    metrics.sink_errors.get_or_create(&labels).inc();
                    tracing::warn!(sink = %name, error = %e, kind = e.kind(), "delivery failed; will retry");
                    if draining && *shutdown.borrow() {
                        // Out of patience at shutdown: the batch stays in the spool.
                        tokio::time::sleep(backoff.next()).await;
                    } else {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next()) => {}
                            _ = stopped(&mut shutdown), if !draining => { draining = true; }
                        }
                    }
                }
            }
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Exponential backoff from 100 ms to 30 s.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = Duration::from_millis(100u64 << self.attempt.min(8)).min(Duration::from_secs(30));
        self.attempt += 1;
        d
    }
}
