//! Upstream connections of the proxy path: one pool per worker thread, per
//! origin (scheme and authority). HTTP/1.1 connections are reused last-in,
//! first-out; an HTTP/2 connection (negotiated by ALPN) is shared by calls,
//! up to `MAX_STREAMS` at once (past that a call opens another), and calls
//! that arrive while one is being made wait for it (`claim_connect`).
//! Connections are made by [`super::client::connector`].
//!
//! hyper-util's legacy client did this behind a mutex and a hash of the
//! origin on every checkout, built a connect future for every request (used
//! or not) and spawned a task per request to hand the connection back once
//! its body was read. Here a checkout is a short scan of this thread's
//! origins and a pop, and the body hands its connection back itself
//! ([`Returner::release`]), when it has read its last byte.
//!
//! A pooled connection found closed is skipped, and a request hyper hands
//! back unsent goes out on another connection (the legacy client's
//! `retry_canceled_requests`). A request that was written may have reached
//! the upstream and is never sent twice: a hang-up racing it fails that call
//! (a 502, with its event), as it did with the legacy client.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tower_service::Service;

type Body = Full<Bytes>;
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A connection idle this long (HTTP/1.1: back in the pool; HTTP/2: no
/// call open on it) is closed rather than reused. For HTTP/2 this is also
/// what closes the extra connections a burst past `MAX_STREAMS` opened.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[cfg(test)]
thread_local! {
    /// This thread's idle timeout in tests, when set.
    static TEST_IDLE_TIMEOUT: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
}

fn idle_timeout() -> Duration {
    #[cfg(test)]
    if let Some(t) = TEST_IDLE_TIMEOUT.with(std::cell::Cell::get) {
        return t;
    }
    IDLE_TIMEOUT
}

/// Milliseconds on a monotonic clock, for times kept in atomics.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
/// Idle HTTP/1.1 connections kept per origin and thread.
const MAX_IDLE: usize = 256;
/// Streams an HTTP/2 connection carries at once before a call opens
/// another. hyper queues requests past the peer's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` without bound, so calls past it waited
/// for others to end (a long stream's minutes) on one connection. hyper
/// reports the peer's value only on the connection's driver, which is
/// polled as requests come, so a burst sees a stale value: the pool uses
/// RFC 9113's recommended minimum (6.5.2) instead.
const MAX_STREAMS: usize = 100;

struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// `Host` for HTTP/1.1 requests, made once.
    host: http::HeaderValue,
    /// Idle HTTP/1.1 connections, most recently used last.
    idle: VecDeque<(http1::SendRequest<Body>, Instant)>,
    /// Open HTTP/2 connections, each with its count of open streams.
    h2: Vec<H2Conn>,
    /// A connect in progress that may bring an HTTP/2 connection: calls that
    /// find no connection wait for it instead of each opening their own.
    connecting: Option<Arc<Notify>>,
    /// The last connection made negotiated HTTP/1.1: calls connect at once.
    h1_only: bool,
}

impl Origin {
    fn is(&self, scheme: &Scheme, authority: &Authority) -> bool {
        self.authority == *authority && self.scheme == *scheme
    }
}

thread_local! {
    static ORIGINS: RefCell<Vec<Origin>> = const { RefCell::new(Vec::new()) };
    static CONNECTORS: RefCell<Vec<(Duration, HttpsConnector<HttpConnector>)>> =
        const { RefCell::new(Vec::new()) };
}

fn with_origin<T>(scheme: &Scheme, authority: &Authority, f: impl FnOnce(&mut Origin) -> T) -> T {
    ORIGINS.with(|o| {
        let mut origins = o.borrow_mut();
        let i = match origins.iter().position(|o| o.is(scheme, authority)) {
            Some(i) => i,
            None => {
                origins.push(Origin {
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    host: host_header(scheme, authority),
                    idle: VecDeque::new(),
                    h2: Vec::new(),
                    connecting: None,
                    h1_only: false,
                });
                origins.len() - 1
            }
        };
        f(&mut origins[i])
    })
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>, StreamSlot),
}

struct H2Conn {
    tx: http2::SendRequest<Body>,
    calls: Arc<Calls>,
}

/// The calls on an HTTP/2 connection.
struct Calls {
    /// Open streams, each held by a [`StreamSlot`].
    open: AtomicUsize,
    /// When the last stream ended (or the connection was made), in
    /// [`clock_ms`].
    last_end: AtomicU64,
}

impl H2Conn {
    fn new(tx: http2::SendRequest<Body>) -> H2Conn {
        let calls = Calls {
            open: AtomicUsize::new(0),
            last_end: AtomicU64::new(clock_ms()),
        };
        H2Conn {
            tx,
            calls: Arc::new(calls),
        }
    }

    fn open(&self) -> usize {
        self.calls.open.load(Ordering::Acquire)
    }

    fn has_room(&self) -> bool {
        self.open() < MAX_STREAMS
    }

    /// No call on it for the idle timeout (`now`: [`clock_ms`]).
    fn idle_too_long(&self, now: u64) -> bool {
        // `open` first: a count seen at 0 (Acquire) comes with the time its
        // last call stored before leaving (Release).
        self.open() == 0 && {
            let last = self.calls.last_end.load(Ordering::Relaxed);
            Duration::from_millis(now.saturating_sub(last)) >= idle_timeout()
        }
    }

    fn sender(&self) -> Sender {
        self.calls.open.fetch_add(1, Ordering::AcqRel);
        Sender::H2(self.tx.clone(), StreamSlot(self.calls.clone()))
    }
}

/// A call's place among its HTTP/2 connection's streams, given back when
/// dropped (the response body read or dropped, or the call failed).
struct StreamSlot(Arc<Calls>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        // The time first: a connection seen with no call open has its
        // last call's end.
        self.0.last_end.store(clock_ms(), Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

/// The origin's open HTTP/2 connection with the fewest calls, full or not:
/// where a call goes when no other connection can be made (hyper sends it
/// when a stream ends), rather than failing.
fn least_loaded_h2(scheme: &Scheme, authority: &Authority) -> Option<Sender> {
    with_origin(scheme, authority, |o| {
        o.h2.retain(|c| !c.tx.is_closed());
        o.h2.iter().min_by_key(|c| c.open()).map(H2Conn::sender)
    })
}

/// What a call that found no pooled connection does.
enum Claim {
    /// Connect, holding the guard that wakes the calls waiting for it.
    Connect(Option<Connecting>),
    /// Wait for the connect in progress, then look again.
    Wait(OwnedNotified),
}

/// Decides who connects. Over https the first connection's ALPN may pick
/// HTTP/2, which calls share: while it is being made, the others wait for
/// it (a burst of first calls opens one connection, not one each; a burst
/// past a full connection's streams opens one more). Plain http, an origin
/// that last negotiated HTTP/1.1, or a call that waited once and found no
/// HTTP/2 connection after all (the connect failed), connects at once.
fn claim_connect(scheme: &Scheme, authority: &Authority, waited: bool) -> Claim {
    with_origin(scheme, authority, |o| {
        if (waited && o.h2.is_empty()) || o.h1_only || *scheme != Scheme::HTTPS {
            return Claim::Connect(None);
        }
        match &o.connecting {
            Some(n) => Claim::Wait(n.clone().notified_owned()),
            None => {
                let done = Arc::new(Notify::new());
                o.connecting = Some(done.clone());
                Claim::Connect(Some(Connecting {
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    done,
                }))
            }
        }
    })
}

/// A connect others wait for: when it ends (made, failed or dropped), they
/// are woken to look again.
struct Connecting {
    scheme: Scheme,
    authority: Authority,
    done: Arc<Notify>,
}

impl Drop for Connecting {
    fn drop(&mut self) {
        // The waiters are woken whatever happens below; the origin forgets
        // this connect if it can (`try_`: a runtime torn down with its
        // thread drops its calls late).
        self.done.notify_waiters();
        let _ = ORIGINS.try_with(|o| {
            let Ok(mut origins) = o.try_borrow_mut() else {
                return;
            };
            if let Some(o) = origins
                .iter_mut()
                .find(|o| o.is(&self.scheme, &self.authority))
            {
                if o.connecting
                    .as_ref()
                    .is_some_and(|n| Arc::ptr_eq(n, &self.done))
                {
                    o.connecting = None;
                }
            }
        });
    }
}

/// A pooled connection, if this thread has one open to the origin with room
/// for the call, and the origin's `Host`.
fn checkout(scheme: &Scheme, authority: &Authority) -> (Option<Sender>, http::HeaderValue) {
    with_origin(scheme, authority, |o| {
        if !o.h2.is_empty() {
            // Dropping a connection's last sender closes it (its calls
            // ended: nothing is cut off).
            let now = clock_ms();
            o.h2.retain(|c| !c.tx.is_closed() && !c.idle_too_long(now));
            if let Some(c) = o.h2.iter().find(|c| c.has_room()) {
                return (Some(c.sender()), o.host.clone());
            }
        }
        while let Some((tx, since)) = o.idle.pop_back() {
            if !tx.is_closed() && since.elapsed() < idle_timeout() {
                return (Some(Sender::H1(tx)), o.host.clone());
            }
        }
        (None, o.host.clone())
    })
}

fn connector(connect_timeout: Duration) -> HttpsConnector<HttpConnector> {
    CONNECTORS.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((_, conn)) = c.iter().find(|(t, _)| *t == connect_timeout) {
            return conn.clone();
        }
        let https = super::client::connector(connect_timeout);
        c.push((connect_timeout, https.clone()));
        https
    })
}

/// Makes `https` this thread's connector for `connect_timeout` (tests: one
/// that trusts a test CA).
#[cfg(test)]
fn set_connector(connect_timeout: Duration, https: HttpsConnector<HttpConnector>) {
    CONNECTORS.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|(t, _)| *t != connect_timeout);
        c.push((connect_timeout, https));
    })
}

/// Opens a connection (TCP, TLS for https, HTTP/2 when ALPN picks it) whose
/// driver runs on this thread's runtime.
async fn connect(origin: Uri, connect_timeout: Duration) -> Result<Sender, Error> {
    let io = connector(connect_timeout).call(origin).await?;
    if io.connected().is_negotiated_h2() {
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(H2Conn::new(tx).sender())
    } else {
        let (tx, conn) = http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Sender::H1(tx))
    }
}

/// Goes with a response body. Over HTTP/1.1 it hands the connection back
/// to its pool once the body has been read to its end; dropped without
/// [`Returner::release`] (the body broke off or the client went away), the
/// connection is closed. Over HTTP/2 it holds the call's stream place on
/// its connection until released or dropped.
pub struct Returner(Held);

enum Held {
    H1 {
        tx: http1::SendRequest<Body>,
        scheme: Scheme,
        authority: Authority,
    },
    /// Held only to be dropped.
    H2(#[allow(dead_code)] StreamSlot),
}

impl Returner {
    pub fn release(self) {
        let Held::H1 {
            tx,
            scheme,
            authority,
        } = self.0
        else {
            return;
        };
        if tx.is_closed() {
            return;
        }
        with_origin(&scheme, &authority, |o| {
            let now = Instant::now();
            while o
                .idle
                .front()
                .is_some_and(|(_, since)| now.duration_since(*since) >= idle_timeout())
            {
                o.idle.pop_front();
            }
            if o.idle.len() >= MAX_IDLE {
                o.idle.pop_front();
            }
            o.idle.push_back((tx, now));
        });
    }
}

/// The scheme and authority of an upstream URL (config validation makes
/// sure both are there).
pub fn origin_of(url: &Uri) -> Option<(&Scheme, &Authority)> {
    Some((url.scheme()?, url.authority()?))
}

/// Sends `req` to `scheme://authority` on a pooled or new connection; its
/// URI's path and query are the request target (HTTP/1.1 sends them in
/// origin form with `Host`, HTTP/2 as `:scheme`, `:authority`, `:path`).
/// The returned [`Returner`] goes with the body (it hands an HTTP/1.1
/// connection back, or gives an HTTP/2 call's stream place back). `dispatched`
/// is set while the request is with a connection, that is from when it is
/// handed to one until it comes back unsent (to be tried on another).
pub async fn send_to(
    mut req: Request<Body>,
    scheme: &Scheme,
    authority: &Authority,
    connect_timeout: Duration,
    dispatched: &mut bool,
) -> Result<(Response<Incoming>, Option<Returner>), Error> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut waited = false;
    // Set when this call first needs a connection: waiting for another
    // call's connect and making its own share one connect timeout.
    let mut deadline = None;
    loop {
        let (pooled, host) = checkout(scheme, authority);
        let (sender, reused) = match pooled {
            Some(s) => (s, true),
            None => {
                let deadline =
                    *deadline.get_or_insert_with(|| tokio::time::Instant::now() + connect_timeout);
                match new_connection(scheme, authority, connect_timeout, deadline, waited).await? {
                    Some(found) => found,
                    // Woken by another call's connect: look again.
                    None => {
                        waited = true;
                        continue;
                    }
                }
            }
        };
        match sender {
            Sender::H1(mut tx) => {
                if tx.ready().await.is_err() {
                    // Closed while idle; the request was not sent.
                    if reused {
                        continue;
                    }
                    return Err("upstream closed the new connection".into());
                }
                if req.uri().authority().is_some() {
                    // Back from an HTTP/2 attempt: origin form again.
                    *req.uri_mut() = Uri::from(path_and_query.clone());
                }
                req.headers_mut().insert(http::header::HOST, host);
                *dispatched = true;
                match tx.try_send_request(req).await {
                    Ok(resp) => {
                        let returner = Returner(Held::H1 {
                            tx,
                            scheme: scheme.clone(),
                            authority: authority.clone(),
                        });
                        return Ok((resp, Some(returner)));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(r) if reused => {
                            *dispatched = false;
                            req = r;
                        }
                        _ => return Err(e.into_error().into()),
                    },
                }
            }
            Sender::H2(mut tx, slot) => {
                if tx.ready().await.is_err() {
                    forget_closed_h2(scheme, authority);
                    if reused {
                        continue;
                    }
                    return Err("upstream closed the new connection".into());
                }
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(scheme.clone());
                parts.authority = Some(authority.clone());
                parts.path_and_query = Some(path_and_query.clone());
                *req.uri_mut() = Uri::from_parts(parts)?;
                // HTTP/2 carries the authority in `:authority`.
                req.headers_mut().remove(http::header::HOST);
                *dispatched = true;
                match tx.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, Some(Returner(Held::H2(slot))))),
                    Err(mut e) => match e.take_message() {
                        Some(r) if reused => {
                            forget_closed_h2(scheme, authority);
                            *dispatched = false;
                            req = r;
                        }
                        _ => return Err(e.into_error().into()),
                    },
                }
            }
        }
    }
}

/// A connection for a call that found none with room: one it makes, or,
/// when another call is making one, `None` once that ends (to look again).
/// When none can be made (the connect fails or times out, or so does the
/// wait), a full HTTP/2 connection still takes the call, queued by hyper
/// until a stream ends; only an origin with none open fails it. The second
/// value says whether the connection was pooled (a call it hands back
/// unsent may be tried on another).
async fn new_connection(
    scheme: &Scheme,
    authority: &Authority,
    connect_timeout: Duration,
    deadline: tokio::time::Instant,
    waited: bool,
) -> Result<Option<(Sender, bool)>, Error> {
    let full_or = |e: Error| {
        least_loaded_h2(scheme, authority)
            .map(|s| Some((s, true)))
            .ok_or(e)
    };
    let connecting = match claim_connect(scheme, authority, waited) {
        Claim::Connect(guard) => guard,
        Claim::Wait(made) => {
            return match tokio::time::timeout_at(deadline, made).await {
                Ok(()) => Ok(None),
                Err(_) => full_or("upstream connect timed out".into()),
            };
        }
    };
    let origin = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()?;
    // Boxed: connecting is rare, and its future (TLS, handshakes) is large;
    // inline it would be copied with every call's. The whole connect (TCP,
    // TLS, handshake) within the deadline; the connector bounds only its
    // TCP part.
    let s =
        match tokio::time::timeout_at(deadline, Box::pin(connect(origin, connect_timeout))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return full_or(e),
            Err(_) => return full_or("upstream connect timed out".into()),
        };
    with_origin(scheme, authority, |o| match &s {
        Sender::H2(tx, slot) => {
            o.h1_only = false;
            // Shared from now on (with those made at the same time: each
            // carries calls until it is full).
            o.h2.push(H2Conn {
                tx: tx.clone(),
                calls: slot.0.clone(),
            });
        }
        Sender::H1(_) => o.h1_only = true,
    });
    // The waiting calls look again: they find the HTTP/2 connection, or
    // connect themselves.
    drop(connecting);
    Ok(Some((s, false)))
}

/// Drops the origin's closed HTTP/2 connections.
fn forget_closed_h2(scheme: &Scheme, authority: &Authority) {
    with_origin(scheme, authority, |o| o.h2.retain(|c| !c.tx.is_closed()));
}

/// `Host` as the legacy client wrote it: the host, and the port unless it
/// is the scheme's default (never userinfo).
fn host_header(scheme: &Scheme, authority: &Authority) -> http::HeaderValue {
    let default_port = match scheme.as_str() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    let host = match authority.port_u16() {
        Some(p) if Some(p) != default_port => format!("{}:{p}", authority.host()),
        _ => authority.host().to_string(),
    };
    // An authority holds only visible ASCII, all valid in a header value.
    http::HeaderValue::from_str(&host).expect("an authority is a valid header value")
}

#[cfg(test)]
mod tests;
