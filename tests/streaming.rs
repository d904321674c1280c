//! No buffering: the first chunk of a stream reaches the client before the
//! upstream sends its second. Not timed: the upstream holds its second chunk
//! until the test has seen the first one through the proxy; a proxy that
//! buffered would never deliver it, and the test would fail at its timeout.

mod common;
use common::*;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{mpsc, oneshot};

const CHUNK1: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" first\"}}]}\n\n";
const CHUNK2: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" second\"}}]}\n\n";
const USAGE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\ndata: [DONE]\n\n";

/// An upstream that sends CHUNK1, then waits for `release` before the rest
/// (with `hold_first`, waits before CHUNK1 too).
async fn gated_upstream(
    release: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    hold_first: bool,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let release = release.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let gate = release.lock().unwrap().take();
                    async move {
                        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
                        tokio::spawn(async move {
                            let mut gate = gate;
                            if hold_first {
                                if let Some(gate) = gate.take() {
                                    let _ = gate.await;
                                }
                            }
                            tx.send(Ok(Frame::data(Bytes::from(CHUNK1)))).await.ok();
                            if let Some(gate) = gate {
                                let _ = gate.await;
                            }
                            tx.send(Ok(Frame::data(Bytes::from(CHUNK2)))).await.ok();
                            tx.send(Ok(Frame::data(Bytes::from(USAGE)))).await.ok();
                        });
                        let body = StreamBody::new(tokio_stream(rx));
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "text/event-stream")
                                .header("x-request-id", "req_gated")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn tokio_stream<T>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_chunk_arrives_before_the_upstream_sends_the_second() {
    for include_usage in [false, true] {
        let (release_tx, release_rx) = oneshot::channel();
        let upstream = gated_upstream(Arc::new(Mutex::new(Some(release_rx))), false).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &upstream, "", "");
        let proxy = start_proxy_env(&cfg, &[("TEST_UPSTREAM_KEY", "k")]);
        let body = if include_usage {
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#
        } else {
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#
        };
        let req = http::Request::post(format!("http://{}/openai/v1/chat/completions", proxy.addr))
            .header("authorization", format!("Bearer {ACME_KEY}"))
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
            .await
            .expect("headers before the upstream finished")
            .unwrap();
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains(" first") {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("the first chunk must arrive while the upstream holds the second")
                .unwrap()
                .unwrap();
            if let Ok(d) = frame.into_data() {
                got.extend_from_slice(&d);
            }
        }
        assert!(!String::from_utf8_lossy(&got).contains(" second"));
        release_tx.send(()).unwrap();
        let rest = body.collect().await.unwrap().to_bytes();
        got.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains(" second") && text.contains("[DONE]"));
        assert_eq!(text.contains("\"usage\""), include_usage, "{text}");
        let ev = event_for(dir.path(), "req_gated").await;
        assert_eq!(ev["data"]["output_tokens"], 2);
    }
}

/// A proxy (and its data directory) in front of `upstream`.
fn proxy_to(upstream: &str) -> (tempfile::TempDir, Proxy) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), upstream, "", "");
    let proxy = start_proxy_env(&cfg, &[("TEST_UPSTREAM_KEY", "k")]);
    (dir, proxy)
}

fn chat_request(proxy: &Proxy, body: &'static str) -> http::Request<http_body_util::Full<Bytes>> {
    http::Request::post(format!("http://{}/openai/v1/chat/completions", proxy.addr))
        .header("authorization", format!("Bearer {ACME_KEY}"))
        .body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap()
}

/// The response head does not wait for the body: it reaches the client
/// while the upstream still holds its first chunk (a proxy that waited
/// for it would never answer, and the test would fail at its timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_arrives_before_the_upstream_sends_any_body() {
    let (release_tx, release_rx) = oneshot::channel();
    let upstream = gated_upstream(Arc::new(Mutex::new(Some(release_rx))), true).await;
    let (_dir, proxy) = proxy_to(&upstream);
    let req = chat_request(
        &proxy,
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
    );
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .expect("the head must arrive while the upstream holds its first chunk")
        .unwrap();
    assert_eq!(resp.status(), 200);
    release_tx.send(()).unwrap();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("[DONE]"));
}

/// An upstream that sends a head promising 100 bytes, then hangs up: the
/// client sees its body break (not a clean, empty 200), and the event says
/// what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_hanging_up_before_the_body_breaks_the_clients_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_cut\r\ncontent-length: 100\r\n\r\n",
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            });
        }
    });
    let (dir, proxy) = proxy_to(&upstream);
    let req = chat_request(&proxy, r#"{"model":"gpt-4o-mini","messages":[]}"#);
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "100");
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .unwrap();
    assert!(body.is_err(), "the client must see the body break");
    let ev = event_for(dir.path(), "req_cut").await;
    assert_eq!(ev["data"]["outcome"], "upstream_error");
    assert_eq!(ev["data"]["error"], "upstream_body_error");
}
