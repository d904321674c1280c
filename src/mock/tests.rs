//! The mock over real sockets: HTTP/1.1 and h2c clients against `serve`.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::serve_with;

struct Mock {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(expect_key: Option<&str>) -> Mock {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    tokio::spawn(serve_with(
        listener,
        shutdown,
        expect_key.map(str::to_owned),
    ));
    Mock { addr, _stop: stop }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Result<Bytes, hyper::Error>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(self.body.as_ref().unwrap()).unwrap()
    }

    /// `(event name, data)` per SSE event.
    fn events(&self) -> Vec<(Option<String>, String)> {
        let text = std::str::from_utf8(self.body.as_ref().unwrap()).unwrap();
        assert!(text.ends_with("\n\n"), "stream ends on an event boundary");
        text.split_terminator("\n\n")
            .map(|ev| {
                let mut name = None;
                let mut data = String::new();
                for line in ev.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                (name, data)
            })
            .collect()
    }
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Request<Full<Bytes>> {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

async fn send(
    mock: &Mock,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let io = TokioIo::new(TcpStream::connect(mock.addr).await.unwrap());
    let (mut client, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = request(method, path, headers, body);
    req.headers_mut().insert("host", "mock".parse().unwrap());
    let res = client.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes());
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn input_tokens(body: &str) -> u64 {
    (body.len() as u64).div_ceil(4)
}

#[tokio::test]
async fn chat_stream_with_include_usage_ends_with_usage_then_done() {
    let mock = start(None).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let headers = [
        ("x-mock-output-tokens", "5"),
        ("x-mock-cached-tokens", "3"),
        ("x-mock-reasoning-tokens", "2"),
    ];
    let a = send(&mock, "POST", "/v1/chat/completions", &headers, body).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-type"], "text/event-stream");
    assert_eq!(a.headers["x-request-id"], "req_1");
    let events = a.events();
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let (last, rest) = chunks.split_last().unwrap();
    assert!(rest
        .iter()
        .all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    assert_eq!(last["choices"], json!([]));
    let u = &last["usage"];
    assert_eq!(u["prompt_tokens"], input_tokens(body) + 3);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 3);
    assert_eq!(u["completion_tokens"], 5);
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 2);
    assert_eq!(last["model"], "gpt-4o-mini-2024-07-18");
    let text: String = rest
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, " hello hello hello");

    let log = send(&mock, "GET", "/__mock/requests", &[], "").await.json();
    let expected = json!({"input_tokens": input_tokens(body) + 3, "cache_read_input_tokens": 3,
        "cache_write_input_tokens": 0, "cache_write_1h_input_tokens": 0, "output_tokens": 5,
        "reasoning_output_tokens": 2});
    assert_eq!(log[0]["usage"], expected);
    assert_eq!(log[0]["request_id"], "req_1");
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage_chunk() {
    let mock = start(None).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#;
    let a = send(&mock, "POST", "/v1/chat/completions", &[], body).await;
    let events = a.events();
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let mut text = String::new();
    for (_, data) in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(data).unwrap();
        assert!(
            c.get("usage").is_none(),
            "no usage key without include_usage"
        );
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(text, " hello".repeat(8));
    let log = send(&mock, "GET", "/__mock/requests", &[], "").await.json();
    assert!(log[0]["usage"].is_null());
}

#[tokio::test]
async fn anthropic_stream_event_order_and_usage() {
    let mock = start(None).await;
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":3,"stream":true,"messages":[]}"#;
    let headers = [
        ("x-mock-cached-tokens", "7"),
        ("x-mock-cache-write-tokens", "11"),
        ("x-mock-cache-write-1h-tokens", "4"),
    ];
    let a = send(&mock, "POST", "/v1/messages", &headers, body).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["request-id"], "req_1");
    let events = a.events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let expected = [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ];
    assert_eq!(names, expected);
    for (name, data) in &events {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], name.as_deref().unwrap());
    }
    let start: Value = serde_json::from_str(&events[0].1).unwrap();
    let u = &start["message"]["usage"];
    assert_eq!(u["input_tokens"], input_tokens(body));
    assert_eq!(u["cache_read_input_tokens"], 7);
    assert_eq!(u["cache_creation_input_tokens"], 11);
    assert_eq!(u["cache_creation"]["ephemeral_5m_input_tokens"], 7);
    assert_eq!(u["cache_creation"]["ephemeral_1h_input_tokens"], 4);
    assert_eq!(u["output_tokens"], 1);
    assert_eq!(start["message"]["model"], "claude-sonnet-4-5");
    let delta: Value = serde_json::from_str(&events[7].1).unwrap();
    assert_eq!(delta["usage"]["output_tokens"], 3);
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    let log = send(&mock, "GET", "/__mock/requests", &[], "").await.json();
    assert_eq!(log[0]["usage"]["input_tokens"], input_tokens(body) + 18);
    assert_eq!(log[0]["usage"]["cache_write_input_tokens"], 11);
    assert_eq!(log[0]["usage"]["cache_write_1h_input_tokens"], 4);
}

#[tokio::test]
async fn fail_after_aborts_the_body() {
    let mock = start(None).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#;
    let a = send(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[("x-mock-fail-after", "2")],
        body,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.is_err(), "the body must end in an error");
    let anthropic = r#"{"model":"claude","stream":true}"#;
    let a = send(
        &mock,
        "POST",
        "/v1/messages",
        &[("x-mock-fail-after", "0")],
        anthropic,
    )
    .await;
    assert!(a.body.is_err());
    let log = send(&mock, "GET", "/__mock/requests", &[], "").await.json();
    assert!(log[0]["usage"].is_null() && log[1]["usage"].is_null());
}

#[tokio::test]
async fn request_log_records_credentials_and_clears() {
    let mock = start(None).await;
    let auth = [("authorization", "Bearer sk-test-123")];
    send(
        &mock,
        "POST",
        "/v1/embeddings",
        &auth,
        r#"{"model":"m","input":["a","b"]}"#,
    )
    .await;
    send(
        &mock,
        "POST",
        "/v1/messages",
        &[("x-api-key", "sk-ant-1")],
        "{}",
    )
    .await;
    let log = send(&mock, "GET", "/__mock/requests", &[], "").await.json();
    assert_eq!(log.as_array().unwrap().len(), 2);
    assert_eq!(log[0]["path"], "/v1/embeddings");
    assert_eq!(log[0]["method"], "POST");
    assert_eq!(log[0]["authorization"], "Bearer sk-test-123");
    assert!(log[0]["x_api_key"].is_null());
    assert!(log[0]["headers"]
        .as_array()
        .unwrap()
        .contains(&json!("authorization")));
    assert_eq!(log[0]["body_bytes"], 31);
    assert_eq!(log[0]["usage"]["input_tokens"], 8);
    assert_eq!(log[0]["usage"]["output_tokens"], 0);
    assert_eq!(log[1]["x_api_key"], "sk-ant-1");
    assert_eq!(log[1]["request_id"], "req_2");
    send(&mock, "DELETE", "/__mock/requests", &[], "").await;
    let log = send(&mock, "GET", "/__mock/requests", &[], "").await.json();
    assert_eq!(log, json!([]));
}

#[tokio::test]
async fn errors_use_the_provider_shape() {
    let mock = start(Some("sk-good")).await;
    let good = [("authorization", "Bearer sk-good")];
    let a = send(&mock, "POST", "/v1/chat/completions", &[], "{}").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["error"]["code"], "invalid_api_key");
    let a = send(&mock, "POST", "/v1/messages", &[("x-api-key", "bad")], "{}").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["error"]["type"], "authentication_error");
    assert_eq!(a.json()["type"], "error");
    let a = send(&mock, "POST", "/v1/chat/completions", &good, "{not json").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    let status = [
        ("authorization", "Bearer sk-good"),
        ("x-mock-status", "429"),
    ];
    let a = send(&mock, "POST", "/v1/responses", &status, "{}").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(a.json()["error"]["message"].is_string());
    let a = send(&mock, "GET", "/v1/nope", &[], "").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.json()["error"]["message"].is_string());
    assert!(a.headers.contains_key("x-request-id"));
    let a = send(&mock, "GET", "/v1/models", &good, "").await;
    assert_eq!(a.json()["object"], "list");
}

#[tokio::test]
async fn json_bodies_follow_the_usage_rule() {
    let mock = start(None).await;
    let body = r#"{"model":"gpt-4o","max_completion_tokens":4,"messages":[]}"#;
    let a = send(&mock, "POST", "/v1/chat/completions", &[], body).await;
    let v = a.json();
    assert_eq!(v["choices"][0]["message"]["content"], " hello".repeat(4));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], input_tokens(body));
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let none = [("x-mock-no-usage", "1")];
    let a = send(&mock, "POST", "/v1/completions", &none, r#"{"model":"x"}"#).await;
    assert!(a.json().get("usage").is_none());
    let body = r#"{"model":"claude","max_tokens":100}"#;
    let a = send(
        &mock,
        "POST",
        "/v1/messages",
        &[("x-mock-cached-tokens", "5")],
        body,
    )
    .await;
    let v = a.json();
    assert_eq!(v["usage"]["input_tokens"], input_tokens(body));
    assert_eq!(v["usage"]["cache_read_input_tokens"], 5);
    assert_eq!(v["usage"]["output_tokens"], 8);
    assert_eq!(v["model"], "claude");
}

#[tokio::test]
async fn responses_stream_has_every_event_in_order() {
    let mock = start(None).await;
    let body = r#"{"model":"gpt-4.1","stream":true,"input":"hi"}"#;
    let headers = [("x-mock-output-tokens", "2"), ("x-mock-delay-ms", "1")];
    let a = send(&mock, "POST", "/v1/responses", &headers, body).await;
    let events = a.events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let expected = [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ];
    assert_eq!(names, expected);
    for (i, (_, data)) in events.iter().enumerate() {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["sequence_number"], i);
    }
    let last: Value = serde_json::from_str(&events[9].1).unwrap();
    assert_eq!(
        last["response"]["usage"]["input_tokens"],
        input_tokens(body)
    );
    assert_eq!(last["response"]["usage"]["output_tokens"], 2);
    assert_eq!(last["response"]["model"], "gpt-4.1-2024-07-18");
}

#[tokio::test]
async fn serves_h2c() {
    let mock = start(None).await;
    let io = TokioIo::new(TcpStream::connect(mock.addr).await.unwrap());
    let (mut client, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = r#"{"model":"gpt-4o-mini","stream":true}"#;
    let req = request(
        "POST",
        &format!("http://{}/v1/chat/completions", mock.addr),
        &[],
        body,
    );
    let res = client.send_request(req).await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    assert!(bytes.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn serve_returns_after_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(super::serve(listener, async {
        let _ = stopped.await;
    }));
    stop.send(()).unwrap();
    let done = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    assert!(matches!(done, Ok(Ok(Ok(())))));
}
