//! Black-box tests of the proxy binary against the mock upstream: routing,
//! tenancy, header hygiene, errors in provider shapes, metering on every path.

mod common;
use common::*;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use rust_decimal::Decimal;

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

struct Env {
    dir: tempfile::TempDir,
    mock: Mock,
    proxy: Proxy,
}

fn env_with(server_extra: &str, extra: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let extra = extra.replace("{MOCK}", &mock.addr);
    let cfg = config(dir.path(), &mock.addr, server_extra, &extra);
    let proxy = start_proxy(&cfg);
    Env { dir, mock, proxy }
}

/// [`env`] plus an upstream `name` at `http://{addr}` under `/{name}`.
fn env_with_upstream(name: &str, addr: &str, provider: &str) -> Env {
    let extra = format!(
        r#"
[[upstreams]]
name = "{name}"
prefix = "/{name}"
url = "http://{addr}"
provider = "{provider}"
"#
    );
    env_with("", &extra)
}

fn env() -> Env {
    env_with("", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streamed_chat_event_has_provider_tokens_and_formula_cost() {
    let e = env();
    let r = chat(
        &e.proxy.addr,
        ACME_KEY,
        CHAT,
        &[
            ("x-mock-cached-tokens", "4"),
            ("x-mock-output-tokens", "10"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = &r.json()["usage"];
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    assert_eq!(ev["specversion"], "1.0");
    assert_eq!(ev["type"], "llm.call");
    assert_eq!(ev["subject"], "acme");
    assert_eq!(ev["source"], "tollgate/test");
    let d = &ev["data"];
    assert_eq!(d["input_tokens"], u["prompt_tokens"]);
    assert_eq!(d["cache_read_input_tokens"], 4);
    assert_eq!(d["output_tokens"], 10);
    assert_eq!(d["usage_source"], "provider");
    assert_eq!(d["outcome"], "ok");
    assert_eq!(d["operation"], "chat");
    assert_eq!(d["response_model"], "gpt-4o-mini-2024-07-18");
    let input = u["prompt_tokens"].as_u64().unwrap();
    // (input - 4) * 0.15 + 4 * 0.075 + 10 * 0.60, per million
    let micro = (input - 4) * 150 + 4 * 75 + 10 * 600; // in 1e-3 per million
    let want = rust_decimal::Decimal::new(micro as i64, 9).normalize();
    assert_eq!(d["cost"].as_str().unwrap(), want.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_without_include_usage_hides_usage_but_meters_it() {
    let e = env();
    let r = chat(
        &e.proxy.addr,
        ACME_KEY,
        CHAT_STREAM,
        &[("x-mock-output-tokens", "5")],
    )
    .await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(!text.contains("usage"), "client saw usage: {text}");
    assert!(!text.contains("\"choices\":[]"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(text.matches(" hello").count(), 5);
    let rid = request_id(&r);
    let ev = event_for(e.dir.path(), &rid).await;
    let log = mock_log(&e.mock.addr).await;
    let entry = log
        .iter()
        .find(|x| x["request_id"] == rid.as_str())
        .unwrap();
    assert_eq!(ev["data"]["usage_source"], "provider");
    assert_eq!(ev["data"]["input_tokens"], entry["usage"]["input_tokens"]);
    assert_eq!(ev["data"]["output_tokens"], 5);
    assert_eq!(ev["data"]["stream"], true);
    assert!(ev["data"]["ttft_ms"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_with_include_usage_is_passed_through_unchanged() {
    let e = env();
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let direct = send(
        "POST",
        &format!("http://{}/v1/chat/completions", e.mock.addr),
        &[("authorization", &format!("Bearer {UPSTREAM_KEY}"))],
        body,
    )
    .await;
    let r = chat(&e.proxy.addr, ACME_KEY, body, &[]).await;
    // Same shape as direct (ids differ): the usage chunk is there.
    assert!(r.text().contains("\"choices\":[]"));
    assert_eq!(
        r.text().matches("\"usage\":null").count(),
        direct.text().matches("\"usage\":null").count()
    );
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    assert_eq!(ev["data"]["output_tokens"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_cut_midway_is_estimated() {
    let e = env();
    let r = chat(
        &e.proxy.addr,
        ACME_KEY,
        CHAT_STREAM,
        &[("x-mock-fail-after", "3"), ("x-mock-output-tokens", "8")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body_error, "the client must see the stream break");
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    let d = &ev["data"];
    assert_eq!(d["usage_source"], "estimated");
    assert_eq!(d["outcome"], "upstream_error");
    assert_eq!(d["output_tokens"], 3, "{d}");
    assert!(d["input_tokens"].as_u64().unwrap() > 0);
    assert!(d["cost"].as_str().unwrap() != "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abort_is_metered_as_client_aborted() {
    let e = env();
    let req = http::Request::post(format!(
        "http://{}/openai/v1/chat/completions",
        e.proxy.addr
    ))
    .header("authorization", format!("Bearer {ACME_KEY}"))
    .header("x-mock-delay-ms", "100")
    .header("x-mock-output-tokens", "50")
    .body(http_body_util::Full::new(Bytes::from(CHAT_STREAM)))
    .unwrap();
    let resp = client().request(req).await.unwrap();
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut body = resp.into_body();
    let mut seen = 0;
    while seen < 3 {
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(d) = f.into_data() {
            seen += bytes_count(&d, b" hello");
        }
    }
    drop(body);
    let ev = event_for(e.dir.path(), &rid).await;
    let d = &ev["data"];
    assert_eq!(d["outcome"], "client_aborted");
    assert_eq!(d["usage_source"], "estimated");
    let out = d["output_tokens"].as_u64().unwrap();
    assert!((3..50).contains(&out), "{out}");
}

/// A client that goes away after its request went upstream, before the
/// answer began: the provider may bill it, so the prompt is counted
/// (estimated), not settled at nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abort_before_the_answer_counts_the_prompt() {
    let e = env();
    let body = CHAT.replace("hi", &"lorem ipsum ".repeat(200));
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: x\r\n\
         authorization: Bearer {ACME_KEY}\r\nx-mock-first-byte-delay-ms: 5000\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let s = raw_connection(&e.proxy.addr, &head).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
    let ev = wait_events(e.dir.path(), "the aborted call's event", |ev| {
        !ev.is_empty()
    })
    .await;
    let d = &ev[0]["data"];
    assert_eq!(d["outcome"], "client_aborted", "{d}");
    assert_eq!(d["usage_source"], "estimated", "{d}");
    assert_eq!(d["output_tokens"], 0, "{d}");
    let input = d["input_tokens"].as_u64().unwrap();
    assert!((400..=700).contains(&input), "{d}");
    assert!(d["cost"].as_str().unwrap() != "0", "{d}");
}

fn bytes_count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_stream_and_json_follow_the_token_rule() {
    let e = env();
    for stream in [false, true] {
        let body = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":100,"stream":{stream},"messages":[{{"role":"user","content":"x"}}]}}"#
        );
        let r = send(
            "POST",
            &format!("http://{}/anthropic/v1/messages", e.proxy.addr),
            &[
                ("x-api-key", ACME_KEY),
                ("anthropic-version", "2023-06-01"),
                ("x-mock-cached-tokens", "7"),
                ("x-mock-cache-write-tokens", "5"),
                ("x-mock-cache-write-1h-tokens", "2"),
                ("x-mock-output-tokens", "9"),
            ],
            body,
        )
        .await;
        assert_eq!(r.status, 200);
        let rid = request_id(&r);
        let ev = event_for(e.dir.path(), &rid).await;
        let log = mock_log(&e.mock.addr).await;
        let entry = log
            .iter()
            .find(|x| x["request_id"] == rid.as_str())
            .unwrap();
        let d = &ev["data"];
        assert_eq!(
            d["input_tokens"], entry["usage"]["input_tokens"],
            "stream={stream}"
        );
        assert_eq!(d["cache_read_input_tokens"], 7);
        assert_eq!(d["cache_write_input_tokens"], 5);
        assert_eq!(d["cache_write_1h_input_tokens"], 2);
        assert_eq!(d["output_tokens"], 9);
        assert_eq!(d["usage_source"], "provider");
        assert_eq!(d["provider"], "anthropic");
        assert_eq!(d["operation"], "messages");
        // The hour-long writes at their own rate (6), the others at 3.75.
        let uncached = d["input_tokens"].as_u64().unwrap() - 7 - 5;
        let per_million = Decimal::from(uncached) * Decimal::from(3)
            + Decimal::from(7) * Decimal::new(30, 2)
            + Decimal::from(3) * Decimal::new(375, 2)
            + Decimal::from(2) * Decimal::from(6)
            + Decimal::from(9) * Decimal::from(15);
        let cost: Decimal = d["cost"].as_str().unwrap().parse().unwrap();
        assert_eq!(cost, per_million / Decimal::from(1_000_000), "{d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_in_the_provider_shape_and_are_metered() {
    let e = env_with("max_request_bytes = 2048", "");
    let p = &e.proxy.addr;
    // Unknown prefix.
    let r = send(
        "GET",
        &format!("http://{p}/nope/v1/models"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "route_not_found");
    let r = send(
        "GET",
        &format!("http://{p}/openaix/v1/models"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 404);
    // Unknown tenant, both shapes.
    let r = chat(p, "tk-wrong", CHAT, &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = send(
        "POST",
        &format!("http://{p}/anthropic/v1/messages"),
        &[],
        CHAT,
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    // Malformed JSON.
    let r = chat(
        p,
        ACME_KEY,
        r#"{"model": "gpt-4o-mini", "messages": ["#,
        &[],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_json");
    // An array of the fields' values is not an object: 400, not a worker
    // panic (injecting the usage option into it did), and not forwarded.
    for stream in ["true", "false"] {
        let r = chat(
            p,
            ACME_KEY,
            &format!(r#"["gpt-4o-mini",{stream},null,null,null,null,null,null]"#),
            &[],
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_json");
    }
    // Too large, declared and streamed.
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    let r = chat(p, ACME_KEY, &big, &[]).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    // Upstream error passes through, metered without usage.
    let r = chat(p, ACME_KEY, CHAT, &[("x-mock-status", "500")]).await;
    assert_eq!(r.status, 500);
    let rid = request_id(&r);
    let ev = event_for(e.dir.path(), &rid).await;
    assert_eq!(ev["data"]["outcome"], "upstream_error");
    assert_eq!(ev["data"]["usage_source"], "none");
    assert_eq!(ev["data"]["http_status"], 500);

    let ev = wait_events(e.dir.path(), "rejections", |ev| {
        ["rejected_auth", "rejected_request"]
            .iter()
            .all(|o| ev.iter().filter(|x| x["data"]["outcome"] == *o).count() >= 2)
    })
    .await;
    let auth = ev
        .iter()
        .find(|x| x["data"]["outcome"] == "rejected_auth")
        .unwrap();
    assert_eq!(auth["data"]["tenant"], "unknown");
    assert_eq!(auth["data"]["calls"], 0);
    assert_eq!(auth["data"]["http_status"], 401);
    // Nothing rejected reached the upstream.
    let log = mock_log(&e.mock.addr).await;
    assert_eq!(log.len(), 1, "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_and_slow_upstreams_give_502_and_504_with_events() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let extra = format!(
        r#"
[[upstreams]]
name = "dead"
prefix = "/dead"
url = "http://{dead_addr}"
provider = "openai"

[[upstreams]]
name = "slow"
prefix = "/slow"
url = "http://{{MOCK}}"
provider = "openai"
api_key_env = "TEST_UPSTREAM_KEY"
timeout = "300ms"
"#
    );
    let e = env_with("", &extra);
    let auth = format!("Bearer {ACME_KEY}");
    let r = send(
        "POST",
        &format!("http://{}/dead/v1/chat/completions", e.proxy.addr),
        &[("authorization", &auth)],
        CHAT,
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable");
    let r = send(
        "POST",
        &format!("http://{}/slow/v1/chat/completions", e.proxy.addr),
        &[
            ("authorization", &auth),
            ("x-mock-first-byte-delay-ms", "2000"),
        ],
        CHAT,
    )
    .await;
    assert_eq!(r.status, 504);
    let ev = wait_events(e.dir.path(), "502 and 504 events", |ev| ev.len() >= 2).await;
    let statuses: Vec<_> = ev
        .iter()
        .map(|x| x["data"]["http_status"].as_u64().unwrap())
        .collect();
    assert!(
        statuses.contains(&502) && statuses.contains(&504),
        "{statuses:?}"
    );
    assert!(ev
        .iter()
        .all(|x| x["data"]["outcome"] == "upstream_error" && x["data"]["usage_source"] == "none"));
}

/// The upstream timeout bounds the whole call, body included: a stream
/// still running when it passes is cut (the client's body breaks) and its
/// event says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outliving_the_upstream_timeout_is_cut_with_its_event() {
    let extra = r#"
[[upstreams]]
name = "slow"
prefix = "/slow"
url = "http://{MOCK}"
provider = "openai"
api_key_env = "TEST_UPSTREAM_KEY"
timeout = "400ms"
"#;
    let e = env_with("", extra);
    let auth = format!("Bearer {ACME_KEY}");
    // 40 pieces 100 ms apart: about 4 s, ten times the timeout.
    let r = send(
        "POST",
        &format!("http://{}/slow/v1/chat/completions", e.proxy.addr),
        &[
            ("authorization", &auth),
            ("x-mock-output-tokens", "40"),
            ("x-mock-delay-ms", "100"),
        ],
        CHAT_STREAM,
    )
    .await;
    assert_eq!(r.status, 200, "the head went out before the timeout");
    assert!(
        r.body_error,
        "the client's body must break, not end cleanly"
    );
    // Cut at the timeout, not at the stream's end: far fewer than the 40
    // content pieces came through (counted, not timed).
    let pieces = r.text().matches("\"content\":\"").count();
    assert!(
        (1..30).contains(&pieces),
        "{pieces} pieces: the stream was not cut, or nothing came first"
    );
    let ev = wait_events(e.dir.path(), "the cut stream's event", |ev| !ev.is_empty()).await;
    let d = &ev[0]["data"];
    assert_eq!(d["outcome"], "upstream_error", "{d}");
    assert_eq!(d["error"], "upstream_timeout", "{d}");
    assert_eq!(d["usage_source"], "estimated", "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_cross_and_hop_headers_are_dropped() {
    let e = env();
    let r = chat(
        &e.proxy.addr,
        ACME_KEY,
        CHAT,
        &[
            ("connection", "x-hop-secret"),
            ("x-hop-secret", "1"),
            ("x-tollgate-debug", "1"),
            ("x-keep-me", "1"),
            ("openai-organization", "org-the-operators-other"),
            ("openai-project", "proj-the-operators-other"),
            ("x-goog-api-key", "a-tenants-google-key"),
            ("ocp-apim-subscription-key", "a-tenants-azure-key"),
            ("x-mock-leak-headers", "1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r2 = send(
        "POST",
        // Credentials in the query too (Google's `key`, Azure API
        // Management's `subscription-key`), any case, percent-encoded.
        &format!(
            "http://{}/anthropic/v1/messages?beta=true&key=a-tenants-google-key&Subscription-Key=a-tenants-azure-key&%61pi_key=a-tenants-other-key&keys=kept",
            e.proxy.addr
        ),
        &[
            ("x-api-key", GLOBEX_KEY),
            ("authorization", &format!("Bearer {GLOBEX_KEY}")),
            ("x-mock-leak-headers", "1"),
        ],
        r#"{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}"#,
    )
    .await;
    assert_eq!(r2.status, 200, "{}", r2.text());
    let log = mock_log(&e.mock.addr).await;
    assert_eq!(log.len(), 2);
    let all = serde_json::to_string(&log).unwrap();
    assert!(
        !all.contains(ACME_KEY) && !all.contains(GLOBEX_KEY),
        "tenant key reached upstream: {all}"
    );
    assert_eq!(log[0]["authorization"], format!("Bearer {UPSTREAM_KEY}"));
    assert_eq!(log[1]["x_api_key"], UPSTREAM_KEY);
    assert!(
        !all.contains("a-tenants-"),
        "a tenant's credential reached upstream: {all}"
    );
    assert_eq!(log[1]["query"], "beta=true&keys=kept");
    let names: Vec<&str> = log[0]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert!(names.contains(&"x-keep-me"), "{names:?}");
    assert!(
        !names.iter().any(|n| *n == "x-hop-secret"
            || n.starts_with("x-tollgate")
            || n.starts_with("openai-")
            || *n == "x-goog-api-key"
            || *n == "ocp-apim-subscription-key"),
        "{names:?}"
    );
    // The mock echoed the upstream key and added hop-by-hop headers
    // (x-mock-leak-headers): none of it reaches the client.
    for resp in [&r, &r2] {
        let headers = format!("{:?}", resp.headers);
        assert!(!headers.contains(UPSTREAM_KEY) && !resp.text().contains(UPSTREAM_KEY));
        for hop in ["x-upstream-hop", "keep-alive"] {
            assert!(!resp.headers.contains_key(hop), "{hop}: {headers}");
        }
    }
    // Nor in the proxy's log.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = e.proxy.proc.log_text();
    for k in [UPSTREAM_KEY, ACME_KEY, GLOBEX_KEY] {
        assert!(!log.contains(k), "{k} in the log");
    }
}

/// An upstream that echoes its credential in the body (a debugging
/// endpoint, an error quoting it) does not hand the key to the tenant: each
/// occurrence is masked byte for byte, in a JSON body (its length still
/// right) and in a stream that splits the key across two frames; the call is
/// metered as usual. (If the two halves ever arrived in one frame the stream
/// case would not test the hold-back; the unit tests in `src/proxy/mask.rs`
/// do, for every split.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_echoed_in_the_body_is_masked() {
    let e = env();
    let stars = "*".repeat(UPSTREAM_KEY.len());
    let r = chat(&e.proxy.addr, ACME_KEY, CHAT, &[("x-mock-leak-body", "1")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains(UPSTREAM_KEY), "{}", r.text());
    assert_eq!(r.json()["echo"], format!("Bearer {stars}"));
    assert_eq!(r.headers["content-length"], r.text().len().to_string());

    // Usage asked for: frames pass the meter unchanged (stripping it would
    // rewrite the stream event by event, joining the halves first).
    let r = chat(
        &e.proxy.addr,
        ACME_KEY,
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        &[("x-mock-leak-body", "1"), ("x-mock-delay-ms", "20")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(!text.contains(UPSTREAM_KEY), "{text}");
    assert!(
        text.starts_with(&format!(": echo Bearer {stars}\n\n")),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    assert_eq!(ev["data"]["usage_source"], "provider", "{ev}");
    assert_eq!(ev["data"]["output_tokens"], 8, "{ev}");

    e.proxy
        .proc
        .wait_for("upstream response body held the upstream key: masked");
    // An upstream that compresses though asked for `identity` cannot be
    // searched: said at WARN.
    let r = chat(
        &e.proxy.addr,
        ACME_KEY,
        CHAT,
        &[("x-mock-leak-body", "1"), ("x-mock-gzip", "1")],
    )
    .await;
    assert_eq!(r.status, 200);
    e.proxy.proc.wait_for(
        "upstream answered compressed though asked for identity: its body is not searched for the upstream key",
    );
    assert!(!e.proxy.proc.log_text().contains(UPSTREAM_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served() {
    let e = env();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let req = http::Request::post(format!(
        "http://{}/openai/v1/chat/completions",
        e.proxy.addr
    ))
    .header("authorization", format!("Bearer {ACME_KEY}"))
    .body(http_body_util::Full::new(Bytes::from(CHAT_STREAM)))
    .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    let ev = event_for(e.dir.path(), &rid).await;
    assert_eq!(ev["data"]["output_tokens"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_upstream_is_one_priced_call() {
    let extra = r#"
[[upstreams]]
name = "search"
prefix = "/tools/search"
url = "http://{MOCK}"
provider = "generic"
price_per_call = "0.002"
api_key_env = "TEST_UPSTREAM_KEY"
"#;
    let e = env_with("", extra);
    let r = send(
        "GET",
        &format!("http://{}/tools/search/v1/models", e.proxy.addr),
        &[("authorization", &format!("Bearer {ACME_KEY}"))],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ev = wait_events(e.dir.path(), "tool call", |ev| !ev.is_empty()).await;
    assert_eq!(ev[0]["type"], "tool.call");
    assert_eq!(ev[0]["data"]["calls"], 1);
    assert_eq!(ev[0]["data"]["cost"], "0.002");
    assert_eq!(ev[0]["data"]["operation"], "tool_call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_embeddings_are_metered() {
    let e = env();
    let auth = format!("Bearer {ACME_KEY}");
    for (path, body) in [
        ("responses", r#"{"model":"gpt-4o-mini","input":"hi"}"#),
        (
            "responses",
            r#"{"model":"gpt-4o-mini","input":"hi","stream":true}"#,
        ),
        (
            "embeddings",
            r#"{"model":"text-embedding-3-small","input":["a","b"]}"#,
        ),
    ] {
        let r = send(
            "POST",
            &format!("http://{}/openai/v1/{path}", e.proxy.addr),
            &[("authorization", &auth), ("x-mock-reasoning-tokens", "2")],
            body,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let rid = request_id(&r);
        let ev = event_for(e.dir.path(), &rid).await;
        let log = mock_log(&e.mock.addr).await;
        let want = &log
            .iter()
            .find(|x| x["request_id"] == rid.as_str())
            .unwrap()["usage"];
        let d = &ev["data"];
        for k in [
            "input_tokens",
            "output_tokens",
            "reasoning_output_tokens",
            "cache_read_input_tokens",
        ] {
            assert_eq!(d[k], want[k], "{path} {body} {k}");
        }
        assert_eq!(d["usage_source"], "provider");
        if path == "embeddings" {
            assert_eq!(
                d["unpriced"], true,
                "text-embedding-3-small is not in the test price table"
            );
            assert_eq!(d["cost"], "0");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_readiness_and_metrics() {
    let e = env();
    let a = &e.proxy.admin;
    assert_eq!(
        send("GET", &format!("http://{a}/healthz"), &[], Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(
        send("GET", &format!("http://{a}/readyz"), &[], Bytes::new())
            .await
            .status,
        200
    );
    chat(&e.proxy.addr, ACME_KEY, CHAT, &[]).await;
    chat(&e.proxy.addr, "bad", CHAT, &[]).await;
    let m = send("GET", &format!("http://{a}/metrics"), &[], Bytes::new())
        .await
        .text();
    assert!(
        m.contains(r#"tollgate_calls_total{upstream="openai",model="gpt-4o-mini",outcome="ok"} 1"#),
        "{m}"
    );
    assert!(m.contains(r#"outcome="rejected_auth"} 1"#), "{m}");
    assert!(m.contains("tollgate_tokens_total{"), "{m}");
    assert!(m.contains("tollgate_spool_disk_bytes"), "{m}");
}

/// A JSON answer that is whole in its first frame is finished before its
/// head is handed to hyper, so its event joins the spool's batched write and
/// head and body still leave together. Answers arriving together share
/// writes; before, each event was written alone (one `write` a call), since
/// waiting for a batch once the head was out split the answer in two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_arriving_together_share_spool_writes() {
    let env = env_with("", "");
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {text}"))
    };
    let scrape = || async {
        let m = format!("http://{}/metrics", env.proxy.admin);
        send("GET", &m, &[], Bytes::new()).await.text()
    };
    let text = scrape().await;
    let before = metric(&text, "tollgate_spool_writes ");
    let appended = metric(&text, "tollgate_spool_appended_events ");
    // The mock holds every answer for the same 300 ms, so they come back
    // in one burst.
    const CALLS: u64 = 48;
    let calls = (0..CALLS).map(|_| {
        let addr = env.proxy.addr.clone();
        tokio::spawn(async move {
            chat(
                &addr,
                ACME_KEY,
                CHAT,
                &[("x-mock-first-byte-delay-ms", "300")],
            )
            .await
        })
    });
    for c in futures_util::future::join_all(calls).await {
        let r = c.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let text = scrape().await;
    let writes = metric(&text, "tollgate_spool_writes ") - before;
    assert_eq!(
        metric(&text, "tollgate_spool_appended_events ") - appended,
        CALLS
    );
    println!("{CALLS} calls, {writes} spool writes");
    assert!(writes < CALLS, "{writes} writes for {CALLS} calls");
}

/// A model name (or request id) of the client's or upstream's choosing is
/// cut to 256 bytes in the event, on a character boundary: a 2 MB `model`
/// made a 4 MB event line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_model_names_are_cut_in_the_event() {
    let e = env();
    let model = format!("gpt-{}", "é".repeat(5000));
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let r = chat(&e.proxy.addr, ACME_KEY, &body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["model"].as_str().unwrap().len() > 10_000);
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    for field in ["request_model", "response_model"] {
        let v = ev["data"][field].as_str().unwrap();
        assert!(
            v.len() <= 256 && v.len() >= 250,
            "{field}: {} bytes",
            v.len()
        );
        assert!(model.starts_with(v), "{field}");
    }
    assert!(
        ev.to_string().len() < 2048,
        "{} bytes",
        ev.to_string().len()
    );
}

/// `unknown_model = "reject"` refuses a model with no price before it is
/// forwarded, and takes a dated snapshot of a priced model (priced as its
/// configured name, as settling prices it), but not another model whose
/// name starts with a priced one (`o1-pro` is not `o1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_are_refused_when_configured() {
    let e = env_with("", "[pricing]\nunknown_model = \"reject\"\n");
    let body =
        |m: &str| format!(r#"{{"model":"{m}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    for model in ["gpt-9-turbo", "gpt-4o-mini-pro"] {
        let r = chat(&e.proxy.addr, ACME_KEY, &body(model), &[]).await;
        assert_eq!(r.status, 400, "{model}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "model_not_priced");
    }
    let r = chat(
        &e.proxy.addr,
        ACME_KEY,
        &body("gpt-4o-mini-2024-07-18"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    assert_eq!(ev["data"]["unpriced"], false);
    assert_ne!(ev["data"]["cost"], "0");
    let log = mock_log(&e.mock.addr).await;
    assert_eq!(log.len(), 1, "the refused call reached the upstream");
}

/// A POST path with an escape the upstream's front end could read as
/// another route (`chat%2Fcompletions` decoded to a chat call) is refused
/// in the provider's shape, with its event, and never forwarded: metered as
/// `other`, it would have reserved and cost nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_route_escapes_are_refused() {
    let e = env();
    let r = chat_at(&e.proxy.addr, "/openai/v1/chat%2Fcompletions").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_request_path");
    let r = send(
        "POST",
        &format!("http://{}/anthropic/v1%2Fmessages", e.proxy.addr),
        &[("x-api-key", GLOBEX_KEY)],
        r#"{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    // Another spelling of the route without such an escape is metered as it.
    let r = chat_at(&e.proxy.addr, "/openai/v1/chat/completion%73").await;
    let ev = refused_unforwarded(&e, 2, 1).await;
    assert!(
        ev.iter()
            .any(|x| x["data"]["operation"] == "chat" && x["data"]["calls"] == 1),
        "{ev:#?} (last status {})",
        r.status
    );
}

/// Waits for the events of `refused` refusals and `forwarded` calls,
/// checks that many of them are refusals, and that the upstream saw only
/// the forwarded calls; returns the events.
async fn refused_unforwarded(e: &Env, refused: usize, forwarded: usize) -> Vec<serde_json::Value> {
    let all = refused + forwarded;
    let ev = wait_events(e.dir.path(), "every call's event", |ev| ev.len() >= all).await;
    let n = ev
        .iter()
        .filter(|x| x["data"]["outcome"] == "rejected_request")
        .count();
    assert_eq!(n, refused, "{ev:#?}");
    let log = mock_log(&e.mock.addr).await;
    assert_eq!(
        log.len(),
        forwarded,
        "a refused call reached the upstream: {log:#?}"
    );
    ev
}

/// Only GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS are forwarded:
/// TRACE (its answer echoes the request, the injected key included),
/// CONNECT and extension or lower-case methods (`post`, which a lenient
/// upstream could take for a chat call the meter saw as `other`) get 405
/// with `Allow`, in the provider's shape, with their event. A `..` segment,
/// however escaped, gets 400: it would climb out of the upstream's base
/// path. Neither reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_and_dot_segments_are_refused() {
    let e = env();
    let bearer = format!("Bearer {ACME_KEY}");
    let auth = [("authorization", bearer.as_str())];
    let models = format!("http://{}/openai/v1/models", e.proxy.addr);
    for method in ["TRACE", "post", "PROPFIND"] {
        let r = send(method, &models, &auth, "").await;
        assert_eq!(r.status, 405, "{method}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "method_not_allowed");
        assert_eq!(
            r.headers["allow"],
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        );
    }
    // CONNECT in origin form (hyper's client will not send one).
    let mut s = tokio::net::TcpStream::connect(&e.proxy.addr).await.unwrap();
    let head =
        format!("CONNECT /openai/v1/models HTTP/1.1\r\nhost: x\r\nauthorization: {bearer}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut s, head.as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut s, &mut answer),
    )
    .await
    .expect("an answer to CONNECT")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let r = send(
        "TRACE",
        &format!("http://{}/anthropic/v1/messages", e.proxy.addr),
        &[("x-api-key", GLOBEX_KEY)],
        "",
    )
    .await;
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    for path in ["/v1/../../x", "/v1/%2e%2e/x", "/v1/..%2fx"] {
        let url = format!("http://{}/openai{path}", e.proxy.addr);
        let r = send("GET", &url, &auth, "").await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_request_path");
    }
    // The scheme is case-insensitive.
    let r = send(
        "GET",
        &models,
        &[("authorization", &format!("BEARER {ACME_KEY}"))],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    refused_unforwarded(&e, 8, 1).await;
}

/// `unmetered_routes = "refuse"`: what the meter does not read (files,
/// stored completions, batches...) gets 403 rather than going out with the
/// shared key; metered routes work as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_can_refuse_unmetered_routes() {
    let e = env_with(
        "",
        "[[upstreams]]\nname = \"strict\"\nprefix = \"/strict\"\nurl = \"http://{MOCK}\"\nprovider = \"openai\"\napi_key_env = \"TEST_UPSTREAM_KEY\"\nunmetered_routes = \"refuse\"\n",
    );
    let bearer = format!("Bearer {ACME_KEY}");
    for (method, path) in [
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/files/file-x/content"),
        ("POST", "/v1/batches"),
    ] {
        let url = format!("http://{}/strict{path}", e.proxy.addr);
        let r = send(method, &url, &[("authorization", &bearer)], "{}").await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "route_not_metered");
    }
    let r = chat_at(&e.proxy.addr, "/strict/v1/chat/completions").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The default still forwards them.
    let url = format!("http://{}/openai/v1/models", e.proxy.addr);
    let r = send("GET", &url, &[("authorization", &bearer)], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    refused_unforwarded(&e, 3, 2).await;
}

async fn chat_at(proxy: &str, path: &str) -> Resp {
    send(
        "POST",
        &format!("http://{proxy}{path}"),
        &[("authorization", &format!("Bearer {ACME_KEY}"))],
        CHAT,
    )
    .await
}

/// `tenancy.mode = "header"`: a trusted header names the tenant; keys no
/// longer do; an unknown name is 401; the header never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_tenancy_names_the_tenant() {
    let e = env_with("", "[tenancy]\nmode = \"header\"\nheader = \"X-Team\"\n");
    let url = format!("http://{}/openai/v1/chat/completions", e.proxy.addr);
    let r = send("POST", &url, &[("x-team", "globex")], CHAT).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    assert_eq!(ev["subject"], "globex");
    assert_eq!(ev["data"]["tenant"], "globex");
    for h in [
        ("x-team", "initech"),
        ("authorization", &format!("Bearer {ACME_KEY}")[..]),
    ] {
        let r = send("POST", &url, &[h], CHAT).await;
        assert_eq!(r.status, 401, "{h:?}: {}", r.text());
    }
    // Two lines (a client's own, and the one a gateway that appends rather
    // than replaces added): which is the gateway's cannot be told, so
    // neither is taken, in either order.
    for two in [
        [("x-team", "globex"), ("x-team", "acme")],
        [("x-team", "acme"), ("x-team", "globex")],
    ] {
        let r = send("POST", &url, &two, CHAT).await;
        assert_eq!(r.status, 401, "{two:?}: {}", r.text());
    }
    let log = mock_log(&e.mock.addr).await;
    assert_eq!(log.len(), 1, "{log:#?}");
    let names = log[0]["headers"].as_array().unwrap();
    assert!(!names.iter().any(|n| n == "x-team"), "{names:?}");
}

/// SIGHUP reloads at once, changed or not (the file poller reloads only on
/// a change): with the file untouched, only the signal can count a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_an_unchanged_file() {
    let e = env();
    let m = format!("http://{}/metrics", e.proxy.admin);
    let reloads = || async {
        let text = send("GET", &m, &[], Bytes::new()).await.text();
        metric(&text, r#"tollgate_config_reloads_total{result="ok"}"#).unwrap_or(0.0)
    };
    assert_eq!(reloads().await, 0.0);
    e.proxy.proc.signal("-HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reloads().await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `background: true` on the Responses API is answered at once with no
/// usage, and its output fetched later by a GET that carries no tokens to
/// meter: refused, so that no output goes unpaid (a 100,000-token cap
/// settled at 0 output).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_responses_are_refused() {
    let e = env();
    let url = format!("http://{}/openai/v1/responses", e.proxy.addr);
    let auth = format!("Bearer {ACME_KEY}");
    let body = |bg: bool| {
        format!(
            r#"{{"model":"gpt-4o-mini","input":"hi","max_output_tokens":100000,"background":{bg}}}"#
        )
    };
    let r = send("POST", &url, &[("authorization", &auth)], body(true)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unsupported_parameter");
    let r = send("POST", &url, &[("authorization", &auth)], body(false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let log = mock_log(&e.mock.addr).await;
    assert_eq!(log.len(), 1, "the background call reached the upstream");
}

/// An upstream that compresses although Tollgate asked for `identity`: the
/// client gets the body as sent, and the meter reads through the gzip (it
/// metered the compressed bytes as text, 0 output tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_answers_are_metered_through_the_coding() {
    use std::io::Read;
    let e = env();
    let gunzip = |b: &[u8]| {
        let mut s = String::new();
        flate2::read::GzDecoder::new(b)
            .read_to_string(&mut s)
            .expect("the client gets the gzip body as sent");
        s
    };
    let gz = ("x-mock-gzip", "1");
    let out = ("x-mock-output-tokens", "7");
    let r = chat(&e.proxy.addr, ACME_KEY, CHAT, &[gz, out]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-encoding"], "gzip");
    let body: serde_json::Value = serde_json::from_str(&gunzip(&r.body)).unwrap();
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    assert_eq!(ev["data"]["usage_source"], "provider", "{ev}");
    assert_eq!(ev["data"]["output_tokens"], 7);
    assert_eq!(ev["data"]["input_tokens"], body["usage"]["prompt_tokens"]);
    assert_eq!(ev["data"]["response_model"], "gpt-4o-mini-2024-07-18");

    // A stream that did not ask for usage: Tollgate asked for it and cannot
    // strip a compressed body, so the client sees the usage chunk, whole.
    let r = chat(&e.proxy.addr, ACME_KEY, CHAT_STREAM, &[gz, out]).await;
    assert_eq!(r.status, 200);
    let text = gunzip(&r.body);
    assert!(text.contains("\"choices\":[]"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    assert_eq!(ev["data"]["usage_source"], "provider", "{ev}");
    assert_eq!(ev["data"]["output_tokens"], 7);
    assert_eq!(ev["data"]["stream"], true);

    // Cut after 3 of its 8 content events: what came through is counted.
    let cut = ("x-mock-fail-after", "3");
    let r = chat(&e.proxy.addr, ACME_KEY, CHAT_STREAM, &[gz, cut]).await;
    assert!(r.body_error, "the client must see the stream break");
    let ev = event_for(e.dir.path(), &request_id(&r)).await;
    let d = &ev["data"];
    assert_eq!(d["usage_source"], "estimated", "{d}");
    assert_eq!(d["outcome"], "upstream_error", "{d}");
    assert_eq!(d["output_tokens"], 3, "{d}");
}

/// Writes `head` (and nothing after it) on a new connection.
async fn raw_connection(addr: &str, head: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, head.as_bytes())
        .await
        .unwrap();
    s
}

/// Reads until the peer closes or `within` passes; what arrived.
async fn read_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(within, tokio::io::AsyncReadExt::read_to_end(s, &mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// The first 12 bytes of the answer (`HTTP/1.1 200`), or `None` if none
/// came within `within`.
async fn status_of(s: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    let mut head = [0u8; 12];
    let read = tokio::io::AsyncReadExt::read_exact(s, &mut head);
    let r = tokio::time::timeout(within, read).await.ok()?;
    r.unwrap();
    Some(String::from_utf8_lossy(&head).into_owned())
}

fn chat_head(len: usize) -> String {
    format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ACME_KEY}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    )
}

/// A body that stops arriving (a client that sends a head and a trickle)
/// holds its connection only for `server.request_body_timeout`: then 408
/// in the provider's shape, the connection closed, the call's event
/// written, nothing forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408_in_time() {
    let e = env_with(r#"request_body_timeout = "2s""#, "");
    let mut s = raw_connection(&e.proxy.addr, &(chat_head(CHAT.len()) + &CHAT[..10])).await;
    let answer = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // A body that arrives whole, late but within the limit, is served.
    let mut s = raw_connection(&e.proxy.addr, &chat_head(CHAT.len())).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::io::AsyncWriteExt::write_all(&mut s, CHAT.as_bytes())
        .await
        .unwrap();
    let status = status_of(&mut s, Duration::from_secs(10)).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200"));
    let ev = refused_unforwarded(&e, 1, 1).await;
    assert!(
        ev.iter().any(|x| x["data"]["http_status"] == 408
            && x["data"]["error"] == "request_timeout"
            && x["subject"] == "acme"),
        "{ev:#?}"
    );
}

/// Whether the peer closed `s` within `within` (whatever arrived first is
/// read and dropped).
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut sink = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(s, &mut sink);
    matches!(tokio::time::timeout(within, read).await, Ok(Ok(_)))
}

/// `server.header_read_timeout` closes a connection that never sends a
/// byte, or only the start of the HTTP/2 preface (its place under
/// `max_connections` is given back each time), and an HTTP/1 connection
/// left idle between requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_header_read_timeout() {
    let e = env_with("max_connections = 1\nheader_read_timeout = \"1s\"", "");
    let mut silent = tokio::net::TcpStream::connect(&e.proxy.addr).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).await,
        "a connection that sent nothing is still open"
    );
    let mut partial = raw_connection(&e.proxy.addr, "PRI * HTTP/2").await;
    assert!(
        closed_within(&mut partial, Duration::from_secs(10)).await,
        "a connection that sent part of the HTTP/2 preface is still open"
    );
    // Its place is free again: the next connection is served.
    let request = chat_head(CHAT.len()) + CHAT;
    let mut served = raw_connection(&e.proxy.addr, &request).await;
    let status = status_of(&mut served, Duration::from_secs(10)).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200"));
    // Then left idle, waiting for a next request head that never comes.
    assert!(
        closed_within(&mut served, Duration::from_secs(10)).await,
        "an idle keep-alive connection is still open"
    );
}

/// An HTTP/2 connection with no request open for `header_read_timeout` (to
/// twice that) is closed with GOAWAY, as an idle HTTP/1.1 one is: hyper
/// answers its pings and kept it, and its place under `max_connections`,
/// for good. A connection that never sends a request goes the same way; one
/// with a stream open longer than that stays open for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_after_header_read_timeout() {
    use http_body_util::BodyExt;
    let e = env_with("max_connections = 1\nheader_read_timeout = \"1s\"", "");
    let h2 = || async {
        let tcp = tokio::net::TcpStream::connect(&e.proxy.addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        (send, tokio::spawn(conn))
    };
    let closed_within = |conn: tokio::task::JoinHandle<hyper::Result<()>>, secs| async move {
        matches!(
            tokio::time::timeout(Duration::from_secs(secs), conn).await,
            Ok(Ok(Ok(())))
        )
    };
    // Never a request.
    let (_send, conn) = h2().await;
    assert!(
        closed_within(conn, 10).await,
        "an HTTP/2 connection with no request is still open"
    );

    // A stream of about 3 s (over two looks), then idle.
    let (mut send, conn) = h2().await;
    let req = http::Request::post("/openai/v1/chat/completions")
        .header("authorization", format!("Bearer {ACME_KEY}"))
        .header("x-mock-delay-ms", "300")
        .body(http_body_util::Full::new(Bytes::from(CHAT_STREAM)))
        .unwrap();
    let started = std::time::Instant::now();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));
    // Not closed while the stream was open: the next request is served on it.
    let req = http::Request::post("/openai/v1/chat/completions")
        .header("authorization", format!("Bearer {ACME_KEY}"))
        .body(http_body_util::Full::new(Bytes::from(CHAT)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        closed_within(conn, 10).await,
        "an idle HTTP/2 connection is still open"
    );

    // Its place is free again.
    let r = chat(&e.proxy.addr, ACME_KEY, CHAT, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// An HTTP/2 connection over `h2c` with a stream window of `window` bytes:
/// the client releases window only as it reads a body.
async fn h2_with_window(
    addr: &str,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    (send, tokio::spawn(conn))
}

fn h2_chat(
    body: &'static str,
    extra: &[(&str, &str)],
) -> http::Request<http_body_util::Full<Bytes>> {
    let mut req = http::Request::post("/openai/v1/chat/completions")
        .header("authorization", format!("Bearer {ACME_KEY}"));
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap()
}

/// Over HTTP/2 a client that stops reading a stream stops it by flow
/// control, before any socket write blocks, so `Socket`'s write deadline
/// never starts. `server.write_timeout` still cuts its connection, even
/// while other calls on it keep being served; its place comes back, and its
/// call's event says the client went away, with what it was sent counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_a_stream_is_cut_after_write_timeout() {
    let e = env_with("max_connections = 1\nwrite_timeout = \"1s\"", "");
    let (mut send, conn) = h2_with_window(&e.proxy.addr, 1024).await;
    let resp = send
        .send_request(h2_chat(CHAT_STREAM, &[("x-mock-output-tokens", "100000")]))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    // The stream's body is never read. Other calls on the connection are
    // read whole, one after another, until the connection is cut.
    let started = std::time::Instant::now();
    let mut served = 0;
    while !conn.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a stalled HTTP/2 stream still holds its connection ({served} other calls served)"
        );
        let call = async {
            let r = send.send_request(h2_chat(CHAT, &[])).await.ok()?;
            (r.status() == 200).then_some(())?;
            r.into_body().collect().await.ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), call).await {
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served >= 1, "no call served beside the stalled stream");
    // Cut by the stall, not at once.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    drop(resp);
    let ev = event_for(e.dir.path(), &rid).await;
    let d = &ev["data"];
    assert_eq!(d["outcome"], "client_aborted", "{ev}");
    let out = d["output_tokens"].as_u64().unwrap();
    assert!((1..100_000).contains(&out), "{out}");
    // The only place is free again.
    let r = chat(&e.proxy.addr, ACME_KEY, CHAT, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// With `server.write_timeout` at 1 s, HTTP/2 calls whose client reads
/// are never cut, however long their upstream takes: a first byte after
/// 2.5 s, pieces 1.5 s apart, and a stream of megabytes read through a
/// 4 KiB window. (The splitting into pieces is tested in `server`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_calls_that_are_read_are_not_cut_by_write_timeout() {
    let e = env_with("write_timeout = \"1s\"", "");
    let (send, conn) = h2_with_window(&e.proxy.addr, 4096).await;
    let call = |body: &'static str, extra: &'static [(&'static str, &'static str)]| {
        let mut send = send.clone();
        async move {
            let resp = send.send_request(h2_chat(body, extra)).await.unwrap();
            assert_eq!(resp.status(), 200);
            let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (rid, body)
        }
    };
    let started = std::time::Instant::now();
    let calls = async {
        tokio::join!(
            call(CHAT, &[("x-mock-first-byte-delay-ms", "2500")]),
            call(
                CHAT_STREAM,
                &[("x-mock-output-tokens", "3"), ("x-mock-delay-ms", "1500")]
            ),
            call(CHAT_STREAM, &[("x-mock-output-tokens", "100000")]),
        )
    };
    let (late, slow, big) = tokio::time::timeout(Duration::from_secs(60), calls)
        .await
        .expect("HTTP/2 calls still unanswered after 60 s");
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    for (rid, body, tokens) in [
        (&late.0, &late.1, None),
        (&slow.0, &slow.1, Some(3)),
        (&big.0, &big.1, Some(100_000)),
    ] {
        if tokens.is_some() {
            assert!(String::from_utf8_lossy(body).ends_with("data: [DONE]\n\n"));
        }
        let ev = event_for(e.dir.path(), rid).await;
        assert_eq!(ev["data"]["outcome"], "ok", "{ev}");
        if let Some(t) = tokens {
            assert_eq!(ev["data"]["output_tokens"], t, "{ev}");
        }
    }
    assert!(big.1.len() > 1_000_000, "{}", big.1.len());
    assert!(!conn.is_finished());
}

/// A finished response can sit unread in HTTP/2's send buffer, its body
/// gone (so no stream is open) and the stream not done: the GOAWAY of an
/// idle connection then waits for it for good. `server.write_timeout` after
/// that GOAWAY the connection is cut, and its place comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_with_an_unread_response_is_cut() {
    let e = env_with(
        "max_connections = 1\nheader_read_timeout = \"1s\"\nwrite_timeout = \"1s\"",
        "",
    );
    // A window of 16 bytes: the JSON answer (hundreds) cannot all be sent.
    let (mut send, conn) = h2_with_window(&e.proxy.addr, 16).await;
    let resp = send.send_request(h2_chat(CHAT, &[])).await.unwrap();
    assert_eq!(resp.status(), 200);
    let finished = tokio::time::timeout(Duration::from_secs(15), conn).await;
    assert!(
        finished.is_ok(),
        "an HTTP/2 connection with an unread response is still open"
    );
    drop(resp);
    let r = chat(&e.proxy.addr, ACME_KEY, CHAT, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// `server.write_timeout` cuts a client that stopped reading its response
/// (its buffers and the proxy's full, hyper waiting to write for good): its
/// place under `max_connections` is given back, and the call's event says
/// the client went away, with what it was sent counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = env_with("max_connections = 1\nwrite_timeout = \"1s\"", "");
    // A small receive window, and a stream far larger than every buffer on
    // the way (about 20 MB).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(e.proxy.addr.parse().unwrap()).await.unwrap();
    let head = chat_head(CHAT_STREAM.len())
        .replace("\r\n\r\n", "\r\nx-mock-output-tokens: 100000\r\n\r\n");
    stuck
        .write_all((head + CHAT_STREAM).as_bytes())
        .await
        .unwrap();
    // Read the head (for the request id), then nothing more.
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), stuck.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the head");
        got.extend_from_slice(&buf[..n]);
    }
    let got = String::from_utf8_lossy(&got).to_lowercase();
    let rid = got
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .trim()
        .to_string();
    // The only place is taken until the stuck connection is cut.
    let request = chat_head(CHAT.len()) + CHAT;
    let mut next = raw_connection(&e.proxy.addr, &request).await;
    let status = status_of(&mut next, Duration::from_secs(20)).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200"));
    let ev = event_for(e.dir.path(), &rid).await;
    let d = &ev["data"];
    assert_eq!(d["outcome"], "client_aborted", "{ev}");
    let out = d["output_tokens"].as_u64().unwrap();
    assert!((1..100_000).contains(&out), "{out}");
    drop(stuck);
}

/// Past `server.max_connections` open connections nothing more is
/// accepted: a new connection waits (in the listen backlog) until one
/// closes, then is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_until_one_closes() {
    let e = env_with("max_connections = 2", "");
    let request = chat_head(CHAT.len()) + CHAT;
    let mut open = Vec::new();
    for _ in 0..2 {
        // Served, and kept open (keep-alive).
        let mut s = raw_connection(&e.proxy.addr, &request).await;
        let status = status_of(&mut s, Duration::from_secs(10)).await;
        assert_eq!(status.as_deref(), Some("HTTP/1.1 200"));
        open.push(s);
    }
    let mut third = raw_connection(&e.proxy.addr, &request).await;
    let early = status_of(&mut third, Duration::from_millis(500)).await;
    assert_eq!(early, None, "served past the limit");
    drop(open.pop());
    let status = status_of(&mut third, Duration::from_secs(10)).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200"));
}

/// An upstream that answers every request with the whole of `body`: with
/// `cut`, as one chunk of a chunked response whose connection then closes
/// without the last chunk (the answer all there, its framing cut); else
/// with a `content-length`, ending cleanly.
async fn raw_upstream(content_type: &'static str, body: &'static [u8], cut: bool) -> String {
    let mut out = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n").into_bytes();
    if cut {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
        out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
    }
    raw_upstream_answering(Bytes::from(out)).await
}

/// An upstream that reads each request whole (head and a small body),
/// writes `answer` as it is, and closes the connection soon after.
async fn raw_upstream_answering(answer: Bytes) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut got = 0;
                loop {
                    let n = s.read(&mut buf[got..]).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got += n;
                    let text = String::from_utf8_lossy(&buf[..got]);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if got >= head_end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = s.write_all(&answer).await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Gone without a chunked body's `0\r\n\r\n`.
            });
        }
    });
    addr
}

/// An HTTP/1.0 upstream (Python's `http.server` by default) is answered
/// to an HTTP/1.1 client in HTTP/1.1: its version passed on made the
/// client's connection close after every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_upstream_answers_http11_clients_in_http11() {
    let upstream = raw_upstream_answering(Bytes::from_static(
        b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    ))
    .await;
    let e = env_with_upstream("old", &upstream, "generic");
    let head =
        format!("GET /old/status HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ACME_KEY}\r\n\r\n");
    let mut s = raw_connection(&e.proxy.addr, &head).await;
    let status = status_of(&mut s, Duration::from_secs(5)).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200"));
}

/// One chat call through an upstream `raw_upstream` answers (200 expected);
/// returns its event's `data`.
async fn event_through_raw(
    content_type: &'static str,
    answer: &'static [u8],
    cut: bool,
    request: &str,
) -> serde_json::Value {
    let upstream = raw_upstream(content_type, answer, cut).await;
    let e = env_with_upstream("raw", &upstream, "openai");
    let auth = format!("Bearer {ACME_KEY}");
    let r = send(
        "POST",
        &format!("http://{}/raw/v1/chat/completions", e.proxy.addr),
        &[("authorization", &auth)],
        request.to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let ev = wait_events(e.dir.path(), "the call", |ev| {
        ev.iter().any(|x| x["data"]["upstream"] == "raw")
    })
    .await;
    ev.into_iter()
        .find(|x| x["data"]["upstream"] == "raw")
        .unwrap()["data"]
        .clone()
}

/// A non-streamed answer is generated in full before its head is sent: when
/// its body arrives whole but the upstream breaks off before the framing's
/// end, the provider's usage in it is metered (it was estimated at 0 output
/// tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_json_answer_whose_framing_is_cut_is_metered_from_its_usage() {
    const BODY: &[u8] = include_bytes!("fixtures/openai/chat_reasoning_cached.json");
    let d = event_through_raw("application/json", BODY, true, CHAT).await;
    assert_eq!(d["outcome"], "upstream_error", "{d}");
    assert_eq!(d["usage_source"], "provider", "{d}");
    assert_eq!(d["input_tokens"], 2006, "{d}");
    assert_eq!(d["cache_read_input_tokens"], 1920, "{d}");
    assert_eq!(d["output_tokens"], 300, "{d}");
    assert_eq!(d["reasoning_output_tokens"], 256, "{d}");
}

/// A stream whose body ends cleanly but without its final event (`[DONE]`
/// here) was cut short: estimated, and not `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_without_its_final_event_is_an_upstream_error() {
    const BODY: &[u8] = b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" hello hello\"}}]}\n\n";
    let d = event_through_raw("text/event-stream", BODY, false, CHAT_STREAM).await;
    assert_eq!(d["outcome"], "upstream_error", "{d}");
    assert_eq!(d["error"], "upstream_stream_truncated", "{d}");
    assert_eq!(d["usage_source"], "estimated", "{d}");
    assert_eq!(d["output_tokens"], 2, "{d}");
}
