//! The accept loop shared by the proxy and admin listeners: HTTP/1.1 and h2c
//! (prior knowledge) on one port, graceful shutdown that stops accepting at
//! once and lets in-flight requests and streams finish.
//!
//! The proxy runs its connections on worker threads, one single-threaded
//! runtime per core, the way nginx runs workers: a connection stays on one
//! thread for its life, with no work-stealing or cross-thread wake-ups on
//! the hot path (measured: about a third less CPU per request than tokio's
//! multi-threaded scheduler on 2 cores). Background work (sinks, the spool
//! syncer, the state keeper, reload) stays on the main runtime.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// When to stop: `shutdown` starts the drain, `force` cuts what is left,
/// `grace` bounds the drain.
#[derive(Clone)]
pub struct Stop {
    pub shutdown: watch::Receiver<bool>,
    pub force: watch::Receiver<bool>,
    pub grace: Duration,
}

/// Bounds on the connections a listener serves.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Open at once at most: past it, nothing is accepted until one closes
    /// (new connections wait in the kernel's listen backlog).
    pub max: usize,
    /// A new connection's first byte, and each HTTP/1 request head, must
    /// arrive within this; otherwise the connection is closed.
    pub header_read_timeout: Duration,
}

fn builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(1024)
        // A peer gone without a word is found by the pings going unanswered.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// An accepted connection and its place under the connection limit, given
/// back when the connection ends.
type Accepted = (std::net::TcpStream, OwnedSemaphorePermit);

/// Serves connections handed to it until `incoming` closes (or `shutdown`),
/// then drains them as `Stop` says. Connections that are cut drop their
/// calls, which still write their events (on the main runtime).
async fn serve_connections<H, F>(
    mut incoming: mpsc::Receiver<Accepted>,
    handler: Arc<H>,
    mut stop: Stop,
    header_read_timeout: Duration,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = Arc::new(builder(header_read_timeout));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    let tick = tokio::spawn(keep_next_wake_near());
    loop {
        // Reap finished connection tasks so the set stays small.
        while conns.try_join_next().is_some() {}
        let (stream, permit) = tokio::select! {
            s = incoming.recv() => match s.map(|(s, p)| (tokio::net::TcpStream::from_std(s), p)) {
                Some((Ok(s), p)) => (s, p),
                Some((Err(e), _)) => {
                    tracing::warn!(error = %e, "cannot register a connection");
                    continue;
                }
                None => break,
            },
            _ = stopped(&mut stop.shutdown) => break,
        };
        let h = handler.clone();
        let service = hyper::service::service_fn(move |req| {
            let fut = h(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let mut draining = stop.shutdown.clone();
        conns.spawn(async move {
            // hyper-util reads the first bytes to tell HTTP/1 from HTTP/2
            // without a deadline: a connection that never sends one would
            // keep its place under the limit for good.
            tokio::select! {
                r = tokio::time::timeout(header_read_timeout, stream.readable()) => {
                    if !matches!(r, Ok(Ok(()))) {
                        tracing::debug!("connection sent nothing within header_read_timeout; closed");
                        return;
                    }
                }
                // Shutdown: nothing started on it yet, so nothing to drain.
                _ = stopped(&mut draining) => return,
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(stop.grace) => {
            tracing::warn!(grace = ?stop.grace, open = conns.len(), "shutdown grace ran out; cutting open connections");
        }
        _ = stopped(&mut stop.force) => {
            tracing::warn!(open = conns.len(), "second signal: cutting open connections");
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    tick.abort();
}

/// Keeps a timer at most a second away on this runtime, so the timer
/// driver's next wake-up is always earlier than a new connection's
/// header-read deadline (hyper's 30 s). Otherwise, whenever the nearest
/// timer is a call's upstream timeout (minutes away), every request head
/// hyper starts to read registers an earlier deadline, and tokio wakes its
/// own driver for it: an `eventfd` `write` on the worker, measured at 0.22
/// a call under load.
async fn keep_next_wake_near() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Serves `handler` on `listener` until `stop.shutdown` turns true: new
/// connections are refused from then on, open ones drain (see [`Stop`]).
/// With `workers > 0` connections run on that many single-threaded worker
/// runtimes; with 0, on the caller's runtime. `limits` bounds how many
/// connections are open and how long one may stay silent.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    stop: Stop,
    workers: usize,
    limits: ConnLimits,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let mut lanes = Vec::new();
    let mut done = Vec::new();
    if workers == 0 {
        let (tx, rx) = mpsc::channel::<Accepted>(256);
        lanes.push(tx);
        done.push(tokio::spawn(serve_connections(
            rx,
            handler.clone(),
            stop.clone(),
            limits.header_read_timeout,
        )));
    } else {
        for i in 0..workers {
            let (tx, rx) = mpsc::channel::<Accepted>(256);
            lanes.push(tx);
            let (h, s) = (handler.clone(), stop.clone());
            let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<()>();
            let spawned = std::thread::Builder::new()
                .name(format!("tollgate-worker-{i}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a worker runtime");
                    rt.block_on(serve_connections(rx, h, s, limits.header_read_timeout));
                    let _ = finished_tx.send(());
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a worker thread");
                continue;
            }
            done.push(tokio::spawn(async move {
                let _ = finished_rx.await;
            }));
        }
    }
    let mut shutdown = stop.shutdown.clone();
    let mut next = 0usize;
    let max_connections = limits.max;
    let open = Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)));
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let permit = match open.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // At most once a minute: at the limit, every closed
                // connection lets one more in and the loop waits again.
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    warned = Some(std::time::Instant::now());
                    tracing::warn!(
                        max_connections,
                        "connection limit reached; new connections wait until one closes"
                    );
                }
                tokio::select! {
                    p = open.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    _ = stopped(&mut shutdown) => break,
                }
            }
        };
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        // A peer that vanished without closing (a dead node, a dropped NAT
        // entry) is found in about 2.5 minutes, and its place given back.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        // It travels as a std stream and registers with the runtime that
        // serves it.
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        // Round robin; a worker's queue is bounded, so a busy one slows accept.
        next = (next + 1) % lanes.len();
        if lanes[next].send((stream, permit)).await.is_err() {
            tracing::error!("a worker is gone; connection dropped");
        }
    }
    // Stop accepting: new connections are refused from here on.
    drop(listener);
    drop(lanes);
    for d in done {
        let _ = d.await;
    }
}
