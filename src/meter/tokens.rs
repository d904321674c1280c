//! Token estimation with tiktoken-rs.
//!
//! The BPE tables are large (o200k_base takes ~170 ms and about 42 MB of
//! RSS to load, cl100k_base about 20 MB more), so they are loaded lazily,
//! the first time an estimate is needed, and shared through tiktoken-rs's
//! process-wide singletons. Estimates run on a few threads of their own
//! ([`estimate_blocking`]), so the async workers never wait on a table load
//! and a burst of estimates (every stream of an upstream that reset at
//! once) queues for a fixed number of threads instead of starting one
//! blocking thread each.

use std::sync::{Arc, Mutex, OnceLock};

use tiktoken_rs::CoreBPE;

/// Which BPE a model family uses. Models we do not know (Anthropic's, tool
/// APIs) are estimated with o200k_base: not their tokenizer, but close.
fn bpe_for(model: &str) -> &'static CoreBPE {
    let legacy = model.starts_with("gpt-4-")
        || model == "gpt-4"
        || model.starts_with("gpt-3.5")
        || model.starts_with("text-embedding-");
    if legacy && !model.starts_with("gpt-4o") {
        tiktoken_rs::cl100k_base_singleton()
    } else {
        tiktoken_rs::o200k_base_singleton()
    }
}

/// Number of tokens in `text` for `model`. May load a table: call from a
/// blocking context.
pub fn count(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    bpe_for(model).encode_with_special_tokens(text).len() as u64
}

/// The most estimates that run at once: tokenizing is CPU work, so more
/// threads than cores gain nothing, and each thread that tokenizes keeps
/// its own regex caches.
pub const MAX_ESTIMATORS: usize = 4;
/// Estimates waiting for a thread; past it callers wait to queue (each is
/// a call's task, itself bounded by the connection limits).
const QUEUE: usize = 1024;

type Job = Box<dyn FnOnce() + Send>;

/// The estimator threads' queue, started on first use.
fn estimators() -> &'static tokio::sync::mpsc::Sender<Job> {
    static QUEUE_TX: OnceLock<tokio::sync::mpsc::Sender<Job>> = OnceLock::new();
    QUEUE_TX.get_or_init(|| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..estimator_threads() {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name("tollgate-tokens".into())
                .spawn(move || loop {
                    // One thread waits on the queue, the others on the lock.
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).blocking_recv();
                    match job {
                        Some(job) => job(),
                        None => return,
                    }
                });
            if let Err(e) = spawned {
                // With none started the queue is closed, and estimates fall
                // back (see `estimate_blocking`).
                tracing::error!(error = %e, "cannot start a token estimator thread");
            }
        }
        tx
    })
}

/// How many estimator threads: one a core, at most [`MAX_ESTIMATORS`].
pub fn estimator_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_ESTIMATORS)
}

/// Runs `f` on the estimator threads when inside a runtime, inline
/// otherwise. `None` if it did not finish (it panicked, or no estimator
/// thread could be started): the caller falls back (a byte-length estimate
/// for an event, a refusal at admission) rather than lose the call's event
/// or its budget settlement.
pub async fn estimate_blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Some(f());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        // Its caller went away while it queued (the client left during
        // admission, the call's task was dropped): nobody wants the count.
        if tx.is_closed() {
            return;
        }
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok());
    });
    let outcome = match estimators().send(job).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    match outcome {
        Some(Some(v)) => Some(v),
        // Not the error itself: a panic's message could quote text.
        Some(None) => {
            tracing::error!("token estimate panicked; falling back to a bound from byte lengths");
            None
        }
        None => {
            tracing::error!("no token estimator thread; falling back to a bound from byte lengths");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_estimate_is_none_not_a_panic() {
        assert_eq!(estimate_blocking(|| 7).await, Some(7));
        let failed = estimate_blocking(|| -> u64 { panic!("tokenizer broke") }).await;
        assert_eq!(failed, None);
    }

    /// A burst of estimates runs on the estimator threads, at most
    /// `estimator_threads()` at once, and every one finishes. (On tokio's
    /// blocking pool all 32 ran at once, each on a thread of its own.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_estimates_shares_a_few_threads() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NOW: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        let burst = (0..32u64).map(|i| {
            tokio::spawn(estimate_blocking(move || {
                let n = NOW.fetch_add(1, Ordering::SeqCst) + 1;
                MOST.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
                NOW.fetch_sub(1, Ordering::SeqCst);
                assert_eq!(std::thread::current().name(), Some("tollgate-tokens"));
                i
            }))
        });
        let done: Vec<_> = futures_util::future::join_all(burst).await;
        let sum: u64 = done.into_iter().map(|r| r.unwrap().unwrap()).sum();
        assert_eq!(sum, (0..32).sum::<u64>());
        let most = MOST.load(Ordering::SeqCst);
        assert!(
            (1..=estimator_threads()).contains(&most),
            "{most} estimates ran at once"
        );
    }

    /// A count whose caller went away while it queued is skipped, not run
    /// (a tenant leaving during admission queued up to 0.3 s of CPU each).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_count_nobody_waits_for_is_skipped() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static RAN: AtomicBool = AtomicBool::new(false);
        // Every estimator thread busy with a job of this test.
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        let busy: Vec<_> = (0..estimator_threads())
            .map(|_| {
                let (started_tx, wait) = (started_tx.clone(), wait.clone());
                tokio::spawn(estimate_blocking(move || {
                    started_tx.send(()).unwrap();
                    let _ = wait.lock().unwrap().recv();
                }))
            })
            .collect();
        for _ in 0..estimator_threads() {
            started
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap();
        }
        // Queued behind them, then its caller is dropped.
        let queued = Box::pin(estimate_blocking(|| RAN.store(true, Ordering::SeqCst)));
        let mut queued = queued;
        assert!(futures_util::poll!(&mut queued).is_pending());
        drop(queued);
        drop(release);
        for b in busy {
            assert_eq!(b.await.unwrap(), Some(()));
        }
        // Anything queued after it has run once this one does.
        assert_eq!(estimate_blocking(|| 1).await, Some(1));
        assert!(!RAN.load(Ordering::SeqCst), "a count nobody waited for ran");
    }

    #[test]
    fn counts_mock_words_as_one_token_each() {
        assert_eq!(count("gpt-4o-mini", " hello hello hello"), 3);
        assert_eq!(count("gpt-3.5-turbo", " hello hello"), 2);
        assert_eq!(count("claude-sonnet-4-5", ""), 0);
    }
}
