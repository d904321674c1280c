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
use std::io;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicU8,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    /// A new connection must show its protocol (its first bytes, see
    /// `Socket`), and each HTTP/1 request head must arrive, within this;
    /// otherwise the connection is closed.
    pub header_read_timeout: Duration,
    /// A write to the client blocked this long (it reads nothing, its
    /// buffers are full) closes the connection.
    pub write_timeout: Duration,
}

/// Open files a proxy at `max_connections` may need: each client connection
/// and the upstream connection its call holds, plus a reserve for the spool,
/// sinks, listeners and the runtime. (An HTTP/2 client multiplexes more calls,
/// and so more upstream connections, over one connection.)
fn files_needed(max_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64)
}

/// Raises the soft open-file limit to the hard one (much as Go's runtime
/// does at start): a shell's soft limit of 1024 would fail accepts and
/// upstream connects (`EMFILE`) far below `max_connections`. With no hard
/// limit (macOS refuses an unlimited soft one) it asks for what is needed.
/// Warns when the limit is still short of `files_needed`.
#[cfg(unix)]
pub fn raise_open_files(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let needed = files_needed(max_connections);
    let was = getrlimit(Resource::Nofile);
    let target = match was.maximum {
        Some(hard) => Some(hard),
        None => was.current.map(|soft| soft.max(needed)),
    };
    let mut limit = was.current;
    if was.current != target {
        let raised = Rlimit {
            current: target,
            maximum: was.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limit = target,
            Err(e) => {
                tracing::warn!(error = %e, from = ?was.current, to = ?target, "cannot raise the open-file limit")
            }
        }
    }
    if let Some(limit) = limit.filter(|l| *l < needed) {
        tracing::warn!(
            limit,
            needed,
            max_connections,
            "the open-file limit is below what server.max_connections may need: past it, \
             connections and upstream calls fail; raise it (ulimit -n, systemd's LimitNOFILE, \
             the container runtime's nofile) or lower server.max_connections"
        );
    }
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

/// A WARN whose cause can last: logged at most once a minute, with how many
/// times it was held back since (`repeated`).
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(60);

    /// `Some(times held back since the last)` when it is time to log.
    fn due(&mut self) -> Option<u64> {
        self.due_at(Instant::now())
    }

    fn due_at(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now - t < Throttle::EVERY) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
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
    limits: ConnLimits,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = builder(limits.header_read_timeout);
    let mut conns = tokio::task::JoinSet::new();
    let tick = tokio::spawn(keep_next_wake_near());
    // Every open connection's control, to look at and to close; dead ones
    // are dropped at each look, and whenever the list has doubled.
    let mut controls: Vec<Weak<Control>> = Vec::new();
    let mut kept = 0;
    let every = limits.header_read_timeout.min(limits.write_timeout);
    let mut looks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Reap finished connection tasks so the set stays small.
        while conns.try_join_next().is_some() {}
        if controls.len() >= 2 * kept.max(64) {
            controls.retain(|c| c.strong_count() > 0);
            kept = controls.len();
        }
        let (stream, permit) = tokio::select! {
            s = incoming.recv() => match s.map(|(s, p)| (tokio::net::TcpStream::from_std(s), p)) {
                Some((Ok(s), p)) => (s, p),
                Some((Err(e), _)) => {
                    tracing::warn!(error = %e, "cannot register a connection");
                    continue;
                }
                None => break,
            },
            due = looks.tick() => {
                look_at(&mut controls, &limits, due, every);
                kept = controls.len();
                continue;
            }
            _ = stopped(&mut stop.shutdown) => break,
        };
        let h = handler.clone();
        let control = Arc::new(Control::new());
        controls.push(Arc::downgrade(&control));
        let c = control.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let open = (req.version() == http::Version::HTTP_2).then(|| Open::new(&c));
            let fut = h(req);
            async move {
                let resp = fut.await;
                Ok::<_, Infallible>(match open {
                    None => resp,
                    Some(open) => resp.map(|body| UnsyncBoxBody::new(Counted::new(body, open))),
                })
            }
        });
        let io = TokioIo::new(Socket::new(stream, limits, control.clone()));
        let conn = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            // Asked to close: it finishes gracefully (the response in
            // progress completes; HTTP/2 sends GOAWAY). Cut: it is dropped,
            // and its streams end with an error.
            let ended = std::future::poll_fn(|cx| {
                control.waker.register(cx.waker());
                match control.state.load(Acquire) {
                    CUT => return Poll::Ready(None),
                    CLOSE if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ => {}
                }
                conn.as_mut().poll(cx).map(Some)
            })
            .await;
            // (A cut is logged by the look that made it.)
            if let Some(Err(e)) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    let now = millis();
    for c in controls.iter().filter_map(Weak::upgrade) {
        // What the unsent-response rule counts from.
        let _ = c.closing_at.compare_exchange(0, now, Relaxed, Relaxed);
        c.close();
    }
    // The looks go on while they drain: a stalled HTTP/2 stream is still cut.
    let cut = {
        let drained = async { while conns.join_next().await.is_some() {} };
        let grace = tokio::time::sleep(stop.grace);
        tokio::pin!(drained, grace);
        loop {
            tokio::select! {
                _ = &mut drained => break None,
                _ = &mut grace => break Some("shutdown grace ran out; cutting open connections"),
                _ = stopped(&mut stop.force) => break Some("second signal: cutting open connections"),
                due = looks.tick() => look_at(&mut controls, &limits, due, every),
            }
        }
    };
    if let Some(why) = cut {
        tracing::warn!(grace = ?stop.grace, open = conns.len(), "{why}");
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    tick.abort();
}

/// Looks at each connection still open (see `Control`), and forgets the
/// others. A look that comes late (the worker was stalled: the reads that
/// would show progress may be queued behind it) cuts nothing.
fn look_at(
    controls: &mut Vec<Weak<Control>>,
    limits: &ConnLimits,
    due: tokio::time::Instant,
    every: Duration,
) {
    let may_cut = due.elapsed() <= every / 2;
    let now = millis();
    controls.retain(|c| {
        c.upgrade()
            .inspect(|c| c.look(now, limits, may_cut))
            .is_some()
    });
}

/// One connection's controls, looked at by its worker every
/// `min(header_read_timeout, write_timeout)`. hyper closes an idle HTTP/1.1
/// connection itself (`header_read_timeout` between requests), and
/// `Socket` cuts one whose client stops reading. Over HTTP/2 neither
/// happens: hyper keeps a connection that answers pings for good, in its
/// `max_connections` slot, and a client that stops reading a stream stops
/// it by flow control before any socket write blocks, so its response (and
/// the upstream call behind it) waits for good. So a look
/// - asks an HTTP/2 connection with no request open, and none begun or
///   ended for `header_read_timeout`, to close gracefully (GOAWAY);
/// - cuts one (drops it, ending its streams) with a response that has been
///   waiting on the client for `write_timeout` (`Counted`), or one with
///   nothing open that was asked to close, and had its last request end,
///   `write_timeout` ago and is still open (a finished response can sit in
///   HTTP/2's send buffer, unread, with its body gone).
///
/// The connection's task registers its waker and reads one atomic a
/// wake-up; nothing else is polled beside it. At shutdown every connection
/// is asked to close the same way.
struct Control {
    /// `RUNNING`, `CLOSE` or `CUT`.
    state: AtomicU8,
    waker: AtomicWaker,
    /// Set once the whole HTTP/2 preface has come.
    h2: AtomicBool,
    /// When an HTTP/2 request last began or ended (or the connection was
    /// accepted), in `millis()`.
    active_at: AtomicU64,
    /// When a look asked it to close as idle, in `millis()`; 0 if none did.
    closing_at: AtomicU64,
    /// The HTTP/2 requests whose response has not ended (their `Open`s
    /// hold the only strong reference): since when each has waited on the
    /// client (see `Counted`). Locked when a request begins and at a look,
    /// both on the connection's worker.
    streams: Mutex<Vec<Weak<AtomicU64>>>,
}

const RUNNING: u8 = 0;
const CLOSE: u8 = 1;
const CUT: u8 = 2;

/// Milliseconds since the first call, from 1 (0 stands for "never").
fn millis() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    EPOCH.elapsed().as_millis() as u64 + 1
}

impl Control {
    fn new() -> Control {
        Control {
            state: AtomicU8::new(RUNNING),
            waker: AtomicWaker::new(),
            h2: AtomicBool::new(false),
            active_at: AtomicU64::new(millis()),
            closing_at: AtomicU64::new(0),
            streams: Mutex::new(Vec::new()),
        }
    }

    /// Asks it to finish gracefully; a cut stays a cut.
    fn close(&self) {
        let _ = self
            .state
            .compare_exchange(RUNNING, CLOSE, Release, Relaxed);
        self.waker.wake();
    }

    fn cut(&self) {
        self.state.store(CUT, Release);
        self.waker.wake();
    }

    /// One look at `now` (see `Control`); cuts only if `may_cut`.
    fn look(&self, now: u64, limits: &ConnLimits, may_cut: bool) {
        if !self.h2.load(Relaxed) || self.state.load(Relaxed) == CUT {
            return;
        }
        let waited = |since: u64, limit: Duration| {
            since != 0 && u128::from(now.saturating_sub(since)) >= limit.as_millis()
        };
        let mut stalled = 0;
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.retain(|s| {
            let s = s.upgrade();
            if let Some(s) = &s {
                stalled += usize::from(waited(s.load(Relaxed), limits.write_timeout));
            }
            s.is_some()
        });
        let open = streams.len();
        if streams.capacity() > 64 && open < streams.capacity() / 4 {
            streams.shrink_to(open * 2);
        }
        drop(streams);
        let closing = self.closing_at.load(Relaxed);
        let active = self.active_at.load(Relaxed);
        // Sent its GOAWAY with nothing open, and not closed since: only a
        // finished response left unsent holds it. (Calls begun as the
        // GOAWAY went out are open, and watched as streams.)
        let unsent = open == 0 && closing != 0 && waited(closing.max(active), limits.write_timeout);
        if may_cut && (unsent || stalled > 0) {
            tracing::debug!(
                open,
                stalled,
                "HTTP/2 connection cut: its client read nothing within server.write_timeout"
            );
            self.cut();
        } else if closing == 0 && open == 0 && waited(active, limits.header_read_timeout) {
            self.closing_at.store(now, Relaxed);
            self.close();
        }
    }
}

/// Held by an HTTP/2 request, then by its response body, until it ends.
struct Open {
    control: Arc<Control>,
    /// Since when the response has waited on the client, in `millis()`; 0
    /// while it is not.
    waiting: Arc<AtomicU64>,
}

impl Open {
    fn new(c: &Arc<Control>) -> Open {
        c.active_at.store(millis(), Relaxed);
        let waiting = Arc::new(AtomicU64::new(0));
        let mut streams = c.streams.lock().unwrap_or_else(|p| p.into_inner());
        // Ended streams are dropped before the list grows, so it stays
        // within twice the streams open (a `Weak` keeps its allocation).
        if streams.len() == streams.capacity() {
            streams.retain(|s| s.strong_count() > 0);
        }
        streams.push(Arc::downgrade(&waiting));
        Open {
            control: c.clone(),
            waiting,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.control.active_at.store(millis(), Relaxed);
    }
}

/// An HTTP/2 response body: keeps its request open until it ends, and
/// keeps the time from each data frame handed over to the next ask. hyper
/// (its `PipeToSendStream`) asks for the next frame only once the client's
/// flow-control window has room for all it has buffered, so a long wait is
/// a client that reads nothing. Frames are handed over in pieces of at most
/// `PIECE`: a wait then means less than that read, whatever size of read
/// the upstream's bytes arrived in.
struct Counted {
    body: Body,
    open: Open,
    /// What is left of a frame larger than `PIECE`.
    rest: Bytes,
}

const PIECE: usize = 16 * 1024;

impl Counted {
    fn new(body: Body, open: Open) -> Counted {
        Counted {
            body,
            open,
            rest: Bytes::new(),
        }
    }
}

/// The next piece of `d`, at most `PIECE` bytes.
fn piece(d: &mut Bytes) -> Bytes {
    if d.len() > PIECE {
        d.split_to(PIECE)
    } else {
        std::mem::take(d)
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = if this.rest.is_empty() {
            Pin::new(&mut this.body)
                .poll_frame(cx)
                .map_ok(|f| match f.into_data() {
                    Ok(mut d) => {
                        let head = piece(&mut d);
                        this.rest = d;
                        hyper::body::Frame::data(head)
                    }
                    Err(f) => f,
                })
        } else {
            Poll::Ready(Some(Ok(hyper::body::Frame::data(piece(&mut this.rest)))))
        };
        let since = match &r {
            Poll::Ready(Some(Ok(f))) if f.is_data() => millis(),
            _ => 0,
        };
        this.open.waiting.store(since, Relaxed);
        r
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let mut hint = self.body.size_hint();
        let rest = self.rest.len() as u64;
        // The upper bound first: a lower bound above it panics.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint.set_lower(hint.lower().saturating_add(rest));
        hint
    }
}

/// The HTTP/2 client preface, by which hyper-util tells HTTP/2 from HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A proxy connection's socket, with the two deadlines hyper does not keep,
/// without which a client could hold its place under `max_connections` for
/// good:
/// - The first bytes. hyper-util reads until 24 bytes have come or one
///   differs from the HTTP/2 preface, to pick the protocol, and has no
///   deadline for it (a client that sends nothing, or the preface's first
///   bytes and then nothing). Until the protocol is known, a read still
///   waiting at `header_read_timeout` fails with `TimedOut` (the
///   connection closes); after that reads pass straight through, and over
///   HTTP/1.1 hyper's own header-read timer takes over.
/// - Stalled writes. A client that stops reading a response fills its
///   buffers and ours, and hyper waits to write for good (it polls the body,
///   and so the call's own deadline, only when it can write). A write
///   still blocked after `write_timeout` fails with `TimedOut`. The timer
///   is made only when a write blocks.
struct Socket {
    io: tokio::net::TcpStream,
    /// While the protocol is unknown: the deadline, and how many bytes of
    /// the preface have matched.
    detecting: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
    write_timeout: Duration,
    /// Since a write blocked (cleared by the next that does not).
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Told when the HTTP/2 preface has come.
    control: Arc<Control>,
}

impl Socket {
    fn new(io: tokio::net::TcpStream, limits: ConnLimits, control: Arc<Control>) -> Socket {
        Socket {
            io,
            detecting: Some((Box::pin(tokio::time::sleep(limits.header_read_timeout)), 0)),
            write_timeout: limits.write_timeout,
            stalled: None,
            control,
        }
    }

    /// A write's result, or `TimedOut` once writes have been blocked for
    /// `write_timeout`.
    fn unless_stalled<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let timeout = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing within server.write_timeout",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some((deadline, matched)) = &mut this.detecting else {
            return read;
        };
        match &read {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                let n = new.len().min(H2_PREFACE.len() - *matched);
                let matching = !new.is_empty() && new[..n] == H2_PREFACE[*matched..*matched + n];
                if matching && *matched + n < H2_PREFACE.len() {
                    *matched += n;
                } else {
                    // EOF, HTTP/1 or the whole preface: hyper-util decides.
                    this.control.h2.store(matching, Relaxed);
                    this.detecting = None;
                }
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within server.header_read_timeout",
                )));
            }
            _ => {}
        }
        read
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.unless_stalled(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.unless_stalled(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Keeps a timer at most a second away on this runtime, so the timer
/// driver's next wake-up is always earlier than a request head's read
/// deadline (`server.header_read_timeout`, 30 s by default; one under a
/// second defeats this, at a cost in wake-ups only). Otherwise, whenever
/// the nearest timer is a call's upstream timeout (minutes away), every
/// request head hyper starts to read registers an earlier deadline, and
/// tokio wakes its own driver for it: an `eventfd` `write` on the worker,
/// measured at 0.22 a call under load.
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
    for i in 0..workers {
        // Built here, before the first accept: a runtime takes files of its
        // own (epoll, an eventfd), which accepted connections can use up. A
        // worker that built its runtime on its own thread could find none
        // left and die, and every connection handed to it was dropped.
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot build a worker runtime");
                continue;
            }
        };
        let (tx, rx) = mpsc::channel::<Accepted>(256);
        let (h, s) = (handler.clone(), stop.clone());
        let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("tollgate-worker-{i}"))
            .spawn(move || {
                rt.block_on(serve_connections(rx, h, s, limits));
                let _ = finished_tx.send(());
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a worker thread");
            continue;
        }
        lanes.push(tx);
        done.push(tokio::spawn(async move {
            let _ = finished_rx.await;
        }));
    }
    if lanes.is_empty() {
        // No worker (asked for none, or none could start): serve on the
        // caller's runtime.
        if workers > 0 {
            tracing::error!("no worker runtime started; serving on the main runtime");
        }
        let (tx, rx) = mpsc::channel::<Accepted>(256);
        lanes.push(tx);
        done.push(tokio::spawn(serve_connections(
            rx,
            handler.clone(),
            stop.clone(),
            limits,
        )));
    }
    let mut shutdown = stop.shutdown.clone();
    let mut next = 0usize;
    let max_connections = limits.max;
    let open = Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)));
    // At the limit, every closed connection lets one more in and the loop
    // waits again; an accept that fails (out of file descriptors) is retried
    // every 50 ms. Either says so once a minute, not every time.
    let mut at_limit = Throttle::default();
    let mut accept_failing = Throttle::default();
    loop {
        let permit = match open.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if let Some(repeated) = at_limit.due() {
                    tracing::warn!(
                        max_connections,
                        repeated,
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
                    if let Some(repeated) = accept_failing.due() {
                        tracing::warn!(error = %e, repeated, "accept failed; retrying every 50 ms");
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lasting_warning_is_logged_once_a_minute_with_what_was_held_back() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        assert_eq!(t.due_at(t0), Some(0));
        for s in [0, 1, 30, 59] {
            assert_eq!(t.due_at(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(t.due_at(t0 + Duration::from_secs(60)), Some(4));
        assert_eq!(t.due_at(t0 + Duration::from_secs(61)), None);
        assert_eq!(t.due_at(t0 + Duration::from_secs(600)), Some(1));
    }

    fn state(c: &Control) -> u8 {
        c.state.load(Relaxed)
    }

    /// An HTTP/2 connection's `Control` at time 1,000 (ms), last active then.
    fn h2_control() -> Arc<Control> {
        let c = Arc::new(Control::new());
        c.h2.store(true, Relaxed);
        c.active_at.store(1_000, Relaxed);
        c
    }

    #[test]
    fn a_look_closes_idle_http2_connections_and_cuts_stalled_ones() {
        let limits = ConnLimits {
            max: 10,
            header_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
        };
        // HTTP/1.1: never touched (hyper and `Socket` keep its deadlines).
        let c = Control::new();
        c.look(u64::MAX / 2, &limits, true);
        assert_eq!((state(&c), c.closing_at.load(Relaxed)), (RUNNING, 0));

        // Idle: closed once nothing has begun or ended for 30 s.
        let c = h2_control();
        c.look(30_999, &limits, true);
        assert_eq!(state(&c), RUNNING);
        c.look(31_000, &limits, true);
        assert_eq!((state(&c), c.closing_at.load(Relaxed)), (CLOSE, 31_000));
        // Still open 60 s after its GOAWAY, nothing open: an unsent
        // response holds it.
        c.look(90_999, &limits, true);
        assert_eq!(state(&c), CLOSE);
        c.look(91_000, &limits, true);
        assert_eq!(state(&c), CUT);

        // A call begun as the GOAWAY went out, waiting on its upstream, is
        // not cut; once it ends, the wait counts from its end.
        let c = h2_control();
        c.look(31_000, &limits, true);
        let open = Open::new(&c);
        c.look(500_000, &limits, true);
        assert_eq!(state(&c), CLOSE);
        drop(open);
        c.active_at.store(500_000, Relaxed);
        c.look(559_999, &limits, true);
        assert_eq!(state(&c), CLOSE);
        c.look(560_000, &limits, true);
        assert_eq!(state(&c), CUT);

        // A stream whose client has had its last frame for 60 s is cut, even
        // with other calls active; one waiting on nothing is not.
        // A late look (the worker was stalled) cuts nothing.
        let c = h2_control();
        let (stalled, busy) = (Open::new(&c), Open::new(&c));
        stalled.waiting.store(2_000, Relaxed);
        c.look(61_999, &limits, true);
        assert_eq!(state(&c), RUNNING);
        c.active_at.store(61_999, Relaxed);
        c.look(62_000, &limits, false);
        assert_eq!(state(&c), RUNNING);
        c.look(62_000, &limits, true);
        assert_eq!(state(&c), CUT);
        drop((stalled, busy));

        // Ended streams are forgotten at a look, and the list shrinks.
        let c = h2_control();
        let many: Vec<Open> = (0..200).map(|_| Open::new(&c)).collect();
        assert!(c.streams.lock().unwrap().capacity() >= 200);
        drop(many);
        c.look(2_000, &limits, true);
        let streams = c.streams.lock().unwrap();
        assert!(streams.is_empty() && streams.capacity() <= 64);
    }

    #[test]
    fn http2_response_frames_are_handed_over_in_pieces() {
        use http_body_util::BodyExt;
        use hyper::body::Body as _;
        let c = h2_control();
        let big: Bytes = (0..40_000u32).map(|i| i as u8).collect();
        let mut body = Counted::new(full(big.clone()), Open::new(&c));
        assert_eq!(body.size_hint().exact(), Some(40_000));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut got = Vec::new();
        rt.block_on(async {
            while let Some(f) = body.frame().await {
                let d = f.unwrap().into_data().unwrap();
                assert!(d.len() <= PIECE);
                got.push(d);
                // Handed over: waiting on the client until asked again.
                assert_ne!(body.open.waiting.load(Relaxed), 0);
            }
        });
        assert_eq!(
            got.iter().map(Bytes::len).collect::<Vec<_>>(),
            [16_384, 16_384, 7_232]
        );
        assert_eq!(got.concat(), big);
        assert!(body.is_end_stream());
        assert_eq!(body.open.waiting.load(Relaxed), 0);

        // Trailers come after the last piece; the rest is counted in the
        // size and keeps the body from ending.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-t", http::HeaderValue::from_static("1"));
        let frames = vec![
            Ok::<_, BoxError>(hyper::body::Frame::data(big.slice(..20_000))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut body = Counted::new(UnsyncBoxBody::new(inner), Open::new(&c));
        rt.block_on(async {
            let first = body.frame().await.unwrap().unwrap();
            assert_eq!(first.data_ref().map(Bytes::len), Some(PIECE));
            assert_eq!(body.rest.len(), 20_000 - PIECE);
            assert!(!body.is_end_stream());
            assert!(body.size_hint().lower() >= (20_000 - PIECE) as u64);
            let second = body.frame().await.unwrap().unwrap();
            assert_eq!(second.data_ref().map(Bytes::len), Some(20_000 - PIECE));
            let third = body.frame().await.unwrap().unwrap();
            assert!(third.is_trailers());
            assert!(body.frame().await.is_none());
        });
    }
}
