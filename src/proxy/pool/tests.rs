use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{send_to, Body, Error, Returner};

/// `send_to` the origin of `req`'s absolute URI, as the proxy does with an
/// upstream's configured URL.
async fn send(
    req: Request<Body>,
    connect_timeout: Duration,
) -> Result<(Response<hyper::body::Incoming>, Option<Returner>), Error> {
    let uri = req.uri().clone();
    let (scheme, authority) = super::origin_of(&uri).expect("an absolute URI");
    let mut dispatched = false;
    let r = send_to(req, scheme, authority, connect_timeout, &mut dispatched).await;
    // An answer means the request went to a connection.
    assert!(r.is_err() || dispatched);
    r
}

/// Listens on 127.0.0.1, counts the connections it accepts and serves each
/// on its own task.
async fn counting_listener<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    (addr, accepted)
}

/// An HTTP/1.1 upstream that answers with the `Host` it was sent and counts
/// the connections it accepted; with `close_after_one` it hangs up after
/// each answer without saying so (as an upstream's idle timeout does).
async fn upstream(close_after_one: bool) -> (String, Arc<AtomicUsize>) {
    counting_listener(move |mut stream| async move {
        if close_after_one {
            // Answer one request in raw bytes, then drop the socket.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.ends_with(b"\r\n\r\n{}") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            // The hang-up comes after the client pooled the connection.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        let service =
            hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let host = req.headers().get("host").cloned();
                let uri = req.uri().to_string();
                let body = format!(
                    "{} {}",
                    host.map_or("-".into(), |h| h.to_str().unwrap().to_string()),
                    uri
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await
}

fn request(addr: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/x?q=1"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

/// One call: its answer text, and the connection handed back if `release`.
async fn call(addr: &str, release: bool) -> String {
    let (resp, conn) = send(request(addr), Duration::from_secs(1)).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    if let (true, Some(c)) = (release, conn) {
        c.release();
    }
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn sequential_calls_reuse_one_connection_in_origin_form_with_host() {
    let (addr, accepted) = upstream(false).await;
    for _ in 0..5 {
        assert_eq!(call(&addr, true).await, format!("{addr} /v1/x?q=1"));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_connection_not_handed_back_is_not_reused() {
    let (addr, accepted) = upstream(false).await;
    call(&addr, false).await;
    call(&addr, true).await;
    call(&addr, true).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// The upstream hangs up idle connections: one whose close was seen is not
/// handed out again, and no call fails for it.
#[tokio::test]
async fn connections_the_upstream_closed_are_not_reused() {
    let (addr, accepted) = upstream(true).await;
    for _ in 0..3 {
        assert_eq!(call(&addr, true).await, "ok");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// A hang-up that races the next request (the runtime was busy, so the
/// connection's driver had not seen it): the request was written, so it
/// may have reached the upstream and is not sent again; that call fails
/// (a 502 to the client, with its event) and the next one gets a new
/// connection. The legacy client behaved the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_racing_a_request_fails_that_call_only() {
    let (addr, accepted) = upstream(true).await;
    // The exchange runs on one thread (one pool), which blocks while the
    // upstream hangs up.
    let done = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(call(&addr, true).await, "ok");
            std::thread::sleep(Duration::from_millis(300));
            assert!(send(request(&addr), Duration::from_secs(1)).await.is_err());
            assert_eq!(call(&addr, true).await, "ok");
        });
    });
    done.await.unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_unreachable_upstream_is_an_error() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    assert!(send(request(&addr), Duration::from_secs(1)).await.is_err());
}

#[test]
fn host_is_the_host_and_a_non_default_port_never_userinfo() {
    let host = |u: &str| {
        let u: http::Uri = u.parse().unwrap();
        super::host_header(u.scheme().unwrap(), u.authority().unwrap())
    };
    assert_eq!(
        host("http://user:pw@up.internal:8080/x"),
        "up.internal:8080"
    );
    assert_eq!(host("https://user@api.openai.com:443"), "api.openai.com");
    assert_eq!(host("http://127.0.0.1:80"), "127.0.0.1");
    assert_eq!(host("https://api.anthropic.com"), "api.anthropic.com");
}

/// HTTPS upstreams, as OpenAI and Anthropic are: TLS verified against the
/// roots, HTTP/2 when ALPN picks it (connections shared by up to
/// `MAX_STREAMS` calls each),
/// HTTP/1.1 otherwise. The test CA and certificates are in
/// `tests/fixtures/tls`.
mod tls {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::*;

    const CA: &[u8] = include_bytes!("../../../tests/fixtures/tls/ca.pem");
    /// `localhost` and `127.0.0.1`, signed by `CA`.
    const CERT: &[u8] = include_bytes!("../../../tests/fixtures/tls/localhost.pem");
    const KEY: &[u8] = include_bytes!("../../../tests/fixtures/tls/localhost.key");
    /// Self-signed, for `127.0.0.1`: trusted by nobody.
    const ROGUE: &[u8] = include_bytes!("../../../tests/fixtures/tls/rogue.pem");
    /// Signed by `CA`, for `other.example` only.
    const OTHER: &[u8] = include_bytes!("../../../tests/fixtures/tls/other.pem");
    const TIMEOUT: Duration = Duration::from_secs(2);

    /// An HTTPS upstream on 127.0.0.1 presenting `cert` and offering `alpn`;
    /// it answers with the HTTP version and the request's path, and counts
    /// the TCP connections it accepted.
    async fn upstream(cert: &[u8], alpn: &[&[u8]]) -> (String, Arc<AtomicUsize>) {
        upstream_with(cert, alpn, None, None, false, None).await
    }

    /// As [`upstream`]; its HTTP/2 allows `max_streams` at once, each
    /// request waits at `barrier` (or 50 ms, with `max_streams`) before it
    /// is answered, and with `first_only` every connection after the first
    /// is hung up on before TLS; `live` counts the connections it is
    /// serving.
    async fn upstream_with(
        cert: &[u8],
        alpn: &[&[u8]],
        max_streams: Option<u32>,
        barrier: Option<Arc<tokio::sync::Barrier>>,
        first_only: bool,
        live: Option<Arc<AtomicUsize>>,
    ) -> (String, Arc<AtomicUsize>) {
        let connections = Arc::new(AtomicUsize::new(0));
        let chain = vec![CertificateDer::from_pem_slice(cert).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(KEY).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        counting_listener(move |tcp| {
            let acceptor = acceptor.clone();
            let barrier = barrier.clone();
            let live = live.clone();
            let nth = connections.fetch_add(1, Ordering::SeqCst);
            async move {
                if first_only && nth > 0 {
                    return;
                }
                if let Some(l) = &live {
                    l.fetch_add(1, Ordering::SeqCst);
                }
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let barrier = barrier.clone();
                        async move {
                            if let Some(b) = barrier {
                                b.wait().await;
                            } else if max_streams.is_some() {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            let body = format!("{:?} {}", req.version(), req.uri().path());
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                let mut builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if let Some(max) = max_streams {
                    builder.http2().max_concurrent_streams(max);
                }
                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                if let Some(l) = &live {
                    l.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .await
    }

    /// This thread's pool trusts the test CA only.
    fn trust_test_ca() {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CA).unwrap())
            .unwrap();
        super::super::set_connector(
            TIMEOUT,
            crate::proxy::client::connector_trusting(TIMEOUT, roots),
        );
    }

    fn request(addr: &str) -> Request<Full<Bytes>> {
        Request::post(format!("https://{addr}/v1/x"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    /// One call: its answer, and whether a connection came back to release.
    async fn call(addr: &str) -> (String, bool) {
        let (resp, conn) = send(request(addr), TIMEOUT).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let pooled = conn.is_some();
        if let Some(c) = conn {
            c.release();
        }
        (String::from_utf8(body.to_vec()).unwrap(), pooled)
    }

    #[tokio::test]
    async fn alpn_h2_gives_one_shared_http2_connection() {
        trust_test_ca();
        let (addr, accepted) = upstream(CERT, &[b"h2", b"http/1.1"]).await;
        for _ in 0..3 {
            // The hand-back gives the call's stream place back; the
            // connection stays shared.
            assert_eq!(call(&addr).await, ("HTTP/2.0 /v1/x".to_string(), true));
        }
        // Concurrent calls multiplex on it.
        burst(&addr, 8, "HTTP/2.0 /v1/x").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// `n` calls at once; each must answer `want`.
    async fn burst(addr: &str, n: usize, want: &str) {
        let answers = futures_util::future::join_all((0..n).map(|_| call(addr))).await;
        assert!(answers.iter().all(|a| a.0 == want), "{answers:?}");
    }

    /// Past `MAX_STREAMS` calls at once on a connection, a call opens
    /// another: against a server that allows exactly that many streams,
    /// 150 calls that are each answered only once all 150 have arrived
    /// all get answers (on one connection, 50 waited behind the 100
    /// forever). Their stream places come back when they end, and
    /// connections left with no call for the idle timeout are closed.
    #[tokio::test]
    async fn calls_past_the_stream_limit_open_another_http2_connection() {
        trust_test_ca();
        let n = super::super::MAX_STREAMS + 50;
        let barrier = Arc::new(tokio::sync::Barrier::new(n));
        let max = u32::try_from(super::super::MAX_STREAMS).unwrap();
        let live = Arc::new(AtomicUsize::new(0));
        let (addr, accepted) = upstream_with(
            CERT,
            &[b"h2"],
            Some(max),
            Some(barrier),
            false,
            Some(live.clone()),
        )
        .await;
        let calls = futures_util::future::join_all((0..n).map(|_| call(&addr)));
        let answers = tokio::time::timeout(Duration::from_secs(20), calls)
            .await
            .expect("calls past the stream limit waited behind the others");
        assert!(answers.iter().all(|a| a.0 == "HTTP/2.0 /v1/x"));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let uri: http::Uri = format!("https://{addr}/").parse().unwrap();
        let (scheme, authority) = super::super::origin_of(&uri).unwrap();
        super::super::with_origin(scheme, authority, |o| {
            assert_eq!(o.h2.len(), 2);
            assert!(o.h2.iter().all(|c| c.open() == 0));
        });
        assert_eq!(live.load(Ordering::SeqCst), 2);
        // Idle past the timeout, both are closed: the next burst makes new
        // ones, and the upstream sees the old ones go.
        super::super::TEST_IDLE_TIMEOUT.set(Some(Duration::from_millis(200)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let calls = futures_util::future::join_all((0..n).map(|_| call(&addr)));
        let answers = tokio::time::timeout(Duration::from_secs(20), calls)
            .await
            .expect("the second burst got answers");
        super::super::TEST_IDLE_TIMEOUT.set(None);
        assert!(answers.iter().all(|a| a.0 == "HTTP/2.0 /v1/x"));
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while live.load(Ordering::SeqCst) != 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "idle connections left open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// When another connection cannot be made, a full one still takes the
    /// call (queued until a stream ends) instead of failing it.
    #[tokio::test]
    async fn calls_past_a_full_connection_queue_on_it_when_no_other_can_be_made() {
        trust_test_ca();
        let max = u32::try_from(super::super::MAX_STREAMS).unwrap();
        let (addr, accepted) = upstream_with(CERT, &[b"h2"], Some(max), None, true, None).await;
        let n = super::super::MAX_STREAMS + 5;
        let answers = futures_util::future::join_all((0..n).map(|_| call(&addr))).await;
        assert!(answers.iter().all(|a| a.0 == "HTTP/2.0 /v1/x"));
        // A second connection was tried (and hung up on).
        assert!(accepted.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn a_burst_of_first_calls_opens_one_http2_connection() {
        trust_test_ca();
        let (addr, accepted) = upstream(CERT, &[b"h2", b"http/1.1"]).await;
        burst(&addr, 8, "HTTP/2.0 /v1/x").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_burst_of_first_calls_to_an_http1_origin_all_get_answers() {
        // The first connect decides the protocol; the others, having waited
        // for it, connect themselves (HTTP/1.1 is not shared).
        trust_test_ca();
        let (addr, accepted) = upstream(CERT, &[b"http/1.1"]).await;
        burst(&addr, 4, "HTTP/1.1 /v1/x").await;
        assert!(accepted.load(Ordering::SeqCst) > 1);
        // Known to be HTTP/1.1 now: a call that finds no connection connects
        // at once, without waiting for anyone.
        let uri: http::Uri = format!("https://{addr}/").parse().unwrap();
        let (scheme, authority) = super::super::origin_of(&uri).unwrap();
        assert!(matches!(
            super::super::claim_connect(scheme, authority, false),
            super::super::Claim::Connect(None)
        ));
    }

    #[tokio::test]
    async fn calls_waiting_for_a_connect_that_fails_are_woken_at_once() {
        // Each waiter then tries (and fails) on its own, well inside the
        // connect timeout it would otherwise have waited out.
        trust_test_ca();
        let (addr, _) = upstream(ROGUE, &[b"h2", b"http/1.1"]).await;
        let started = std::time::Instant::now();
        let results =
            futures_util::future::join_all((0..4).map(|_| send(request(&addr), TIMEOUT))).await;
        assert!(results.iter().all(|r| r.is_err()));
        assert!(started.elapsed() < TIMEOUT, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn without_h2_in_alpn_http1_connections_are_pooled() {
        trust_test_ca();
        let (addr, accepted) = upstream(CERT, &[b"http/1.1"]).await;
        for _ in 0..3 {
            assert_eq!(call(&addr).await, ("HTTP/1.1 /v1/x".to_string(), true));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// The TLS failure of a call to `addr` (its whole error chain), and the
    /// TCP connections the upstream accepted meanwhile.
    async fn refused(addr: &str, accepted: &AtomicUsize, timeout: Duration) -> String {
        let Err(err) = send(request(addr), timeout).await else {
            panic!("the certificate was accepted");
        };
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain = format!("{chain}: {s}");
            source = s.source();
        }
        // The TCP connect succeeded: it is the certificate that failed.
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "{chain}");
        chain
    }

    #[tokio::test]
    async fn certificates_are_verified() {
        trust_test_ca();
        // Self-signed: no root vouches for it.
        let (addr, accepted) = upstream(ROGUE, &[b"h2", b"http/1.1"]).await;
        let e = refused(&addr, &accepted, TIMEOUT).await;
        assert!(e.contains("UnknownIssuer"), "{e}");
        // Signed by the trusted CA, but for another name.
        let (addr, accepted) = upstream(OTHER, &[b"h2", b"http/1.1"]).await;
        let e = refused(&addr, &accepted, TIMEOUT).await;
        assert!(e.contains("not valid for name"), "{e}");
        // The production connector (a fresh one: connectors are kept per
        // connect timeout) trusts the webpki roots, not the test CA.
        let (addr, accepted) = upstream(CERT, &[b"h2", b"http/1.1"]).await;
        let e = refused(&addr, &accepted, Duration::from_millis(1999)).await;
        assert!(e.contains("UnknownIssuer"), "{e}");
    }
}
