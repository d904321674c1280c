//! Sinks, black-box: the real binary in front of `tollgate mock`, delivering
//! to in-process receivers (an OpenMeter-style HTTP ingest and an OTLP
//! collector on the official protobuf messages). What a billing user cares
//! about: every served call's event reaches every sink, unchanged (same `id`
//! and `time`), through receiver outages, refusals, crashes and restarts; a
//! failing sink holds back no other; a full spool fails closed (or drops the
//! oldest, loudly) as configured.

mod common;
use common::*;

#[path = "common/receivers.rs"]
mod receivers;
use receivers::*;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{metric, HistogramDataPoint, NumberDataPoint};
use serde_json::Value;

const METER_TOKEN: &str = "meter-blackbox-TOKEN";

/// Starts the proxy with the upstream key and the meter token in its env.
fn start(cfg: &Path) -> Proxy {
    let proc = Proc::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        &[
            ("TEST_UPSTREAM_KEY", UPSTREAM_KEY),
            ("TEST_METER_TOKEN", METER_TOKEN),
        ],
    );
    let v = proc.wait_for("listening");
    Proxy {
        addr: v["proxy"].as_str().unwrap().to_string(),
        admin: v["admin"].as_str().unwrap().to_string(),
        proc,
    }
}

/// An `http` sink table named `name` posting to `url`, with the bearer token
/// from the environment and `extra` keys.
fn http_sink(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[[sinks]]
type = "http"
name = "{name}"
url = "{url}"
headers = {{ authorization_env = "TEST_METER_TOKEN" }}
batch_max_wait = "50ms"
{extra}
"#
    )
}

fn otlp_sink(name: &str, endpoint: &str, protocol: &str, extra: &str) -> String {
    format!(
        r#"
[[sinks]]
type = "otlp"
name = "{name}"
endpoint = "{endpoint}"
protocol = "{protocol}"
batch_max_wait = "50ms"
{extra}
"#
    )
}

/// Replaces the harness's `[spool]` table.
fn set_spool(cfg: &Path, spool: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let old = "[spool]\nfsync = \"never\"\n";
    assert!(text.contains(old), "harness config changed: {text}");
    std::fs::write(cfg, text.replacen(old, &format!("[spool]\n{spool}\n"), 1)).unwrap();
}

/// Call `i` of a varied mix: OpenAI JSON (cache read + reasoning), OpenAI
/// stream (cache read), Anthropic (cache read + write); tenants alternate.
async fn call(addr: &str, i: usize) -> Resp {
    let key = if i.is_multiple_of(2) {
        ACME_KEY
    } else {
        GLOBEX_KEY
    };
    match i % 3 {
        0 => {
            let body = format!(
                r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"call {i}"}}]}}"#
            );
            chat(
                addr,
                key,
                &body,
                &[
                    ("x-mock-cached-tokens", "3"),
                    ("x-mock-reasoning-tokens", "2"),
                    ("x-mock-output-tokens", "9"),
                ],
            )
            .await
        }
        1 => {
            let body = format!(
                r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"streamed call {i}"}}]}}"#
            );
            chat(addr, key, &body, &[("x-mock-cached-tokens", "5")]).await
        }
        _ => {
            let body = format!(
                r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{{"role":"user","content":"call {i}"}}]}}"#
            );
            send(
                "POST",
                &format!("http://{addr}/anthropic/v1/messages"),
                &[
                    ("content-type", "application/json"),
                    ("x-api-key", key),
                    ("x-mock-cached-tokens", "7"),
                    ("x-mock-cache-write-tokens", "11"),
                ],
                body,
            )
            .await
        }
    }
}

/// `n` served calls one after another; their request ids.
async fn serve(addr: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = call(addr, i).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.body_error);
        ids.push(request_id(&r));
    }
    ids
}

/// `n` concurrent served calls; their request ids.
async fn burst(addr: &str, n: usize) -> HashSet<String> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let addr = addr.to_string();
            tokio::spawn(async move { call(&addr, i).await })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.body_error);
        ids.insert(request_id(&r));
    }
    assert_eq!(ids.len(), n);
    ids
}

async fn get(url: &str) -> Resp {
    send("GET", url, &[], Bytes::new()).await
}

/// Polls `/metrics` until `series` satisfies `pred`; the text.
async fn wait_metric(admin: &str, series: &str, pred: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics_text(admin).await;
        if metric(&m, series).is_some_and(&pred) {
            return m;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {series}; metrics:\n{m}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn id(e: &Value) -> String {
    e["id"].as_str().expect("event id").to_string()
}

fn ids(evs: &[Value]) -> HashSet<String> {
    evs.iter().map(id).collect()
}

/// Every event in `got` is, as a whole JSON value, the file sink's event of
/// the same id, and `got` covers exactly the file sink's ids.
fn assert_same_events(file: &[Value], got: &[Value], what: &str) {
    let by_id: HashMap<String, &Value> = file.iter().map(|e| (id(e), e)).collect();
    assert_eq!(by_id.len(), file.len(), "duplicate ids in the file sink");
    for e in got {
        let want = by_id
            .get(&id(e))
            .unwrap_or_else(|| panic!("{what}: event not in the file sink: {e}"));
        assert_eq!(e, *want, "{what}: event differs from the file sink's");
    }
    assert_eq!(
        ids(got),
        by_id.keys().cloned().collect::<HashSet<_>>(),
        "{what}: not every event arrived"
    );
}

/// Waits until the receiver accepted `n` distinct events.
async fn wait_accepted(rx: &HttpReceiver, n: usize, limit: Duration) -> Vec<Value> {
    poll(&format!("{n} events at {}", rx.url()), limit, || {
        let acc = rx.accepted();
        (ids(&acc).len() >= n).then_some(acc)
    })
    .await
}

/// The dead-letter file of sink `name` once it holds `n` entries.
async fn wait_dead_letters(dir: &Path, name: &str, n: usize) -> Vec<Value> {
    let path = dir.join(format!("data/deadletter/{name}.jsonl"));
    poll(
        &format!("{n} dead-lettered events"),
        Duration::from_secs(15),
        || {
            let text = std::fs::read_to_string(&path).ok()?;
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (lines.len() >= n).then_some(lines)
        },
    )
    .await
}

fn header<'a>(h: &'a http::HeaderMap, name: &str) -> &'a str {
    h.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

fn assert_no_duplicates(evs: &[Value], what: &str) {
    assert_eq!(ids(evs).len(), evs.len(), "{what}: an event arrived twice");
}

// ---------------------------------------------------------------------------
// HTTP sink

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_retries_503_429_401_and_403_and_delivers_every_event_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let rx = HttpReceiver::start().await;
    // A rotated meter token (401, 403) is fixed in a setting: the events
    // wait in the spool, they are not set aside.
    rx.fail_next(1, 401, None);
    rx.fail_next(1, 403, None);
    rx.fail_next(1, 503, None);
    rx.fail_next(1, 429, Some(1));
    let cfg = config(
        dir.path(),
        &mock.addr,
        "",
        &http_sink("meter", &rx.url(), ""),
    );
    let proxy = start(&cfg);
    serve(&proxy.addr, 10).await;
    let file = wait_events(dir.path(), "10 events", |ev| ev.len() >= 10).await;

    let acc = wait_accepted(&rx, 10, Duration::from_secs(20)).await;
    assert_same_events(&file, &acc, "http sink");
    assert_no_duplicates(&acc, "http sink");

    let posts = rx.posts();
    let statuses: Vec<u16> = posts.iter().map(|p| p.status).collect();
    assert_eq!(&statuses[..4], &[401, 403, 503, 429], "{statuses:?}");
    assert!(!dir.path().join("data/deadletter").exists());
    assert!(statuses[4..].iter().all(|s| *s == 204), "{statuses:?}");
    for p in &posts {
        assert!(p.valid, "not a JSON array: {:?}", p.raw);
        assert_eq!(
            header(&p.headers, "content-type"),
            "application/cloudevents-batch+json"
        );
        assert_eq!(
            header(&p.headers, "authorization"),
            format!("Bearer {METER_TOKEN}")
        );
        assert_eq!(header(&p.headers, "content-encoding"), "");
        assert_eq!(p.path, "/api/v1/events");
    }
    // A refused batch is sent again unchanged.
    for p in &posts[..4] {
        for e in &p.events {
            assert!(acc.contains(e), "refused event never delivered: {e}");
        }
    }
    // `retry-after: 1` is honoured.
    let waited = posts[4].at.duration_since(posts[3].at);
    assert!(
        waited >= Duration::from_millis(950),
        "retried {waited:?} after a 429 with retry-after: 1"
    );

    let m = wait_metric(
        &proxy.admin,
        r#"tollgate_sink_delivered_events_total{sink="meter"}"#,
        |v| v >= 10.0,
    )
    .await;
    let retries = metric(&m, r#"tollgate_sink_retries_total{sink="meter"}"#).unwrap_or(0.0);
    assert!(retries >= 4.0, "retries {retries}; metrics:\n{m}");
    assert_eq!(
        metric(&m, r#"tollgate_sink_delivered_events_total{sink="meter"}"#),
        Some(10.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_json_format_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let json_rx = HttpReceiver::start().await;
    let gz_rx = HttpReceiver::start().await;
    let sinks = http_sink("meter-json", &json_rx.url(), "format = \"json\"")
        + &http_sink("meter-gzip", &gz_rx.url(), "gzip = true");
    let cfg = config(dir.path(), &mock.addr, "", &sinks);
    let proxy = start(&cfg);
    serve(&proxy.addr, 6).await;
    let file = wait_events(dir.path(), "6 events", |ev| ev.len() >= 6).await;

    let acc = wait_accepted(&json_rx, 6, Duration::from_secs(15)).await;
    assert_same_events(&file, &acc, "json sink");
    for p in json_rx.posts() {
        assert_eq!(header(&p.headers, "content-type"), "application/json");
        assert_eq!(header(&p.headers, "content-encoding"), "");
        assert_eq!(
            header(&p.headers, "authorization"),
            format!("Bearer {METER_TOKEN}")
        );
    }

    let acc = wait_accepted(&gz_rx, 6, Duration::from_secs(15)).await;
    assert_same_events(&file, &acc, "gzip sink");
    for p in gz_rx.posts() {
        assert_eq!(
            header(&p.headers, "content-type"),
            "application/cloudevents-batch+json"
        );
        assert_eq!(header(&p.headers, "content-encoding"), "gzip");
        assert_eq!(&p.raw[..2], &[0x1f, 0x8b], "not gzip bytes");
        assert!(p.valid);
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_through_kill9_and_restart_gets_every_event_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let port = down_port();
    let url = format!("http://{}/api/v1/events", port.addr);
    let cfg = config(dir.path(), &mock.addr, "", &http_sink("meter", &url, ""));
    let mut proxy = start(&cfg);
    serve(&proxy.addr, 20).await;
    let before = wait_events(dir.path(), "20 events", |ev| ev.len() >= 20).await;
    // The sink is trying (and failing) to reach the receiver.
    wait_metric(
        &proxy.admin,
        r#"tollgate_sink_retries_total{sink="meter"}"#,
        |v| v >= 1.0,
    )
    .await;
    proxy.proc.kill9();

    let proxy = start(&cfg);
    let rx = HttpReceiver::start_on(port).await;
    let acc = wait_accepted(&rx, 20, Duration::from_secs(30)).await;
    let file = events(dir.path());
    assert_eq!(file, before, "the file sink changed across the restart");
    assert_same_events(&file, &acc, "http sink after restart");
    assert_no_duplicates(&acc, "http sink after restart");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_64_calls_every_sink_gets_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let rx = HttpReceiver::start().await;
    let otel = OtlpReceiver::start().await;
    let sinks =
        http_sink("meter", &rx.url(), "") + &otlp_sink("otel", &otel.endpoint(), "grpc", "");
    let cfg = config(dir.path(), &mock.addr, "", &sinks);
    let mut proxy = start(&cfg);
    let served = burst(&proxy.addr, 64).await;
    // Straight away: no grace, no flush.
    proxy.proc.kill9();

    let proxy = start(&cfg);
    let file = wait_events(dir.path(), "64 events", |ev| ev.len() >= 64).await;
    let got: HashSet<String> = file
        .iter()
        .map(|e| e["data"]["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, served, "every served call has its event");
    assert_eq!(file.len(), 64, "duplicate lines in the file sink");

    // HTTP: at least once (a receiver dedupes on source + id), unchanged.
    let acc = wait_accepted(&rx, 64, Duration::from_secs(30)).await;
    assert_same_events(&file, &acc, "http sink");

    // OTLP: one log record per event, carrying the event id.
    let want = ids(&file);
    let got = poll("64 log records", Duration::from_secs(30), || {
        let got: HashSet<String> = records(&otel.logs())
            .iter()
            .map(|r| attr_str(&r.attributes, "cloudevents.event_id").to_string())
            .collect();
        want.is_subset(&got).then_some(got)
    })
    .await;
    assert_eq!(got, want, "log records for events that do not exist");
    drop(proxy);
}

/// A proxy whose HTTP sink `meter` posts to a receiver answering every
/// batch with `status`, after `n` calls (and their events, returned).
async fn meter_receiver_answering(
    status: u16,
    n: usize,
) -> (tempfile::TempDir, Mock, HttpReceiver, Proxy, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let rx = HttpReceiver::start().await;
    rx.always(Some(status));
    let cfg = config(
        dir.path(),
        &mock.addr,
        "",
        &http_sink("meter", &rx.url(), ""),
    );
    let proxy = start(&cfg);
    serve(&proxy.addr, n).await;
    let events = wait_events(dir.path(), &format!("{n} events"), |ev| ev.len() >= n).await;
    (dir, mock, rx, proxy, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_refusing_with_400_dead_letters_the_batch_and_delivery_goes_on() {
    let (dir, _mock, rx, proxy, first) = meter_receiver_answering(400, 3).await;
    let dead = wait_dead_letters(dir.path(), "meter", 3).await;
    for d in &dead {
        assert_eq!(d["sink"], "meter", "{d}");
        let reason = d["reason"].as_str().unwrap_or_else(|| panic!("{d}"));
        assert!(reason.contains("400"), "reason {reason:?}");
        assert!(d["time"].is_string(), "{d}");
    }
    let dead_events: Vec<Value> = dead.iter().map(|d| d["event"].clone()).collect();
    assert_same_events(&first, &dead_events, "dead-letter file");
    assert_no_duplicates(&dead_events, "dead-letter file");

    // The receiver recovers: later events are delivered.
    rx.always(None);
    serve(&proxy.addr, 3).await;
    let file = wait_events(dir.path(), "6 events", |ev| ev.len() >= 6).await;
    let acc = wait_accepted(&rx, 3, Duration::from_secs(15)).await;
    assert_same_events(&file[3..], &acc, "http sink after recovery");
    // A 400 is never retried: each refused event was posted once.
    let refused: Vec<Value> = rx
        .posts()
        .iter()
        .filter(|p| p.status == 400)
        .flat_map(|p| p.events.clone())
        .collect();
    assert_eq!(refused.len(), 3, "a refused batch was retried");

    let m = wait_metric(
        &proxy.admin,
        r#"tollgate_sink_delivered_events_total{sink="meter"}"#,
        |v| v >= 3.0,
    )
    .await;
    assert_eq!(
        metric(
            &m,
            r#"tollgate_sink_dead_lettered_events_total{sink="meter"}"#
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"tollgate_sink_delivered_events_total{sink="meter"}"#),
        Some(3.0),
        "{m}"
    );
    assert!(
        proxy.proc.log_text().contains("dead-letter"),
        "the refusal is logged"
    );
}

/// A receiver that refuses a batch as too large (413: a body size limit,
/// which a backlog's full batches hit) gets it again in halves, down to
/// single events: every event is delivered, none set aside; only an event
/// refused alone goes to the dead-letter file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_refusing_a_batch_as_too_large_gets_it_in_halves() {
    let (dir, _mock, rx, proxy, file) = meter_receiver_answering(503, 7).await;
    // The backlog goes out in batches (at most two: the one retried
    // through the 503s, and the rest), one of them past the receiver's
    // limit.
    rx.max_events(Some(2));
    rx.always(None);
    let acc = wait_accepted(&rx, 7, Duration::from_secs(20)).await;
    assert_same_events(&file, &acc, "http sink through 413s");
    assert_no_duplicates(&acc, "http sink through 413s");
    // The halves go out in the batch's order.
    let order = |evs: &[Value]| evs.iter().map(id).collect::<Vec<_>>();
    assert_eq!(order(&acc), order(&file));
    let posts = rx.posts();
    assert!(posts.iter().any(|p| p.status == 413), "{posts:?}");
    assert!(posts.iter().all(|p| p.status != 413 || p.events.len() > 2));
    // An event too large alone is set aside, and delivery goes on.
    rx.max_events(Some(0));
    serve(&proxy.addr, 1).await;
    let dead = wait_dead_letters(dir.path(), "meter", 1).await;
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(reason.contains("413"), "{reason}");
    rx.max_events(None);
    serve(&proxy.addr, 1).await;
    wait_accepted(&rx, 8, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_holds_back_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let rx = HttpReceiver::start().await;
    rx.always(Some(503));
    let cfg = config(
        dir.path(),
        &mock.addr,
        "",
        &http_sink("meter", &rx.url(), ""),
    );
    let proxy = start(&cfg);
    // The http sink is failing before the calls come in.
    serve(&proxy.addr, 1).await;
    poll("a failed post", Duration::from_secs(10), || {
        (!rx.posts().is_empty()).then_some(())
    })
    .await;
    let started = Instant::now();
    serve(&proxy.addr, 20).await;
    let served_in = started.elapsed();
    let file = wait_events(dir.path(), "21 events", |ev| ev.len() >= 21).await;
    let caught_up = started.elapsed();
    assert!(
        caught_up < served_in + Duration::from_secs(2),
        "the file sink took {caught_up:?} (calls took {served_in:?})"
    );
    assert_eq!(file.len(), 21);
    assert!(rx.accepted().is_empty());
    assert!(rx.posts().iter().all(|p| p.status == 503));
    let ready = get(&format!("http://{}/readyz", proxy.admin)).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let m = metrics_text(&proxy.admin).await;
    assert!(
        metric(&m, r#"tollgate_sink_retries_total{sink="meter"}"#).unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

// ---------------------------------------------------------------------------
// Full spool

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_with_reject_fails_closed_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let port = down_port();
    let url = format!("http://{}/api/v1/events", port.addr);
    let cfg = config(
        dir.path(),
        &mock.addr,
        "admin_token_env = \"TEST_METER_TOKEN\"",
        &http_sink("meter", &url, ""),
    );
    set_spool(
        &cfg,
        "fsync = \"never\"\nmax_bytes = 4096\nsegment_bytes = 4096\nwhen_full = \"reject\"",
    );
    let proxy = start(&cfg);
    let mut served = Vec::new();
    let mut refused = None;
    for i in 0..60 {
        let r = call(&proxy.addr, i).await;
        match r.status {
            200 => served.push(request_id(&r)),
            503 => {
                refused = Some(r);
                break;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    let r = refused.expect("60 calls of ~700 bytes each never filled a 4096-byte spool");
    assert!(!served.is_empty(), "refused before anything was spooled");
    assert_eq!(
        r.json()["error"]["code"],
        "metering_unavailable",
        "{}",
        r.text()
    );
    let ready = get(&format!("http://{}/readyz", proxy.admin)).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    // The app's outcome events are refused too: they would grow the spool
    // past max_bytes as well.
    let auth = format!("Bearer {METER_TOKEN}");
    let r = send(
        "POST",
        &format!("http://{}/v1/events", proxy.admin),
        &[("authorization", &auth)],
        r#"{"tenant":"acme","type":"ticket.resolved","quantity":1}"#,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "metering_unavailable");
    let m = metrics_text(&proxy.admin).await;
    assert!(
        metric(
            &m,
            r#"tollgate_rejections_total{reason="metering_unavailable"}"#
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    let backlog = metric(&m, "tollgate_spool_backlog_bytes").expect("backlog gauge");
    assert!(backlog >= 4096.0, "backlog {backlog}; metrics:\n{m}");
    // A refused call writes no event (it would grow the full spool): each
    // is counted instead.
    assert_eq!(
        metric(&m, "tollgate_rejected_unrecorded_total"),
        metric(
            &m,
            r#"tollgate_rejections_total{reason="metering_unavailable"}"#
        ),
        "{m}"
    );
    // Every call that was served has its event.
    let file = wait_events(dir.path(), "served calls' events", |ev| {
        let got: HashSet<&str> = ev
            .iter()
            .filter_map(|e| e["data"]["request_id"].as_str())
            .collect();
        served.iter().all(|s| got.contains(s.as_str()))
    })
    .await;

    // The receiver comes up: the backlog drains and calls are served again.
    let rx = HttpReceiver::start_on(port).await;
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let ready = get(&format!("http://{}/readyz", proxy.admin)).await;
        if ready.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still not ready after the receiver came up: {}",
            ready.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = call(&proxy.addr, 0).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let acc = wait_accepted(&rx, file.len(), Duration::from_secs(15)).await;
    let acc_ids = ids(&acc);
    for e in &file {
        assert!(acc_ids.contains(&id(e)), "event never delivered: {e}");
    }
}

/// `max_bytes` bounds the spool on disk (DESIGN §3) also while calls are
/// being refused: a client retrying against the 503 must not fill the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_stays_bounded_while_calls_are_refused() {
    let (_dir, _mock, _port, proxy) = receiver_down(
        "fsync = \"never\"\nmax_bytes = 4096\nsegment_bytes = 4096\nwhen_full = \"reject\"",
    );
    let mut refused = 0;
    for i in 0..300 {
        match call(&proxy.addr, i).await.status {
            200 => assert_eq!(refused, 0, "served after the spool was full"),
            503 => refused += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert!(refused >= 250, "only {refused} of 300 refused");
    // Refusals that come before the capacity check (401 needs no
    // credential) write no event either while the spool is full.
    let unauthenticated = flood_unauthenticated(&proxy.addr, 300).await;
    let m = metrics_text(&proxy.admin).await;
    assert_eq!(
        metric(&m, "tollgate_rejected_unrecorded_total"),
        Some((refused + unauthenticated) as f64),
        "{m}"
    );
    let backlog = metric(&m, "tollgate_spool_backlog_bytes").expect("backlog gauge");
    let disk = metric(&m, "tollgate_spool_disk_bytes").expect("disk gauge");
    // One event of slack past the limit (the call admitted last), not one
    // per refused call.
    assert!(
        backlog < 2.0 * 4096.0 && disk < 3.0 * 4096.0,
        "{refused} refused calls grew the spool past max_bytes = 4096: backlog {backlog}, disk {disk}"
    );
}

/// A proxy whose one http sink's receiver is down (not started on `port`
/// yet), with `spool` in its `[spool]` table.
fn receiver_down(spool: &str) -> (tempfile::TempDir, Mock, DownPort, Proxy) {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let port = down_port();
    let url = format!("http://{}/api/v1/events", port.addr);
    let cfg = config(dir.path(), &mock.addr, "", &http_sink("meter", &url, ""));
    set_spool(&cfg, spool);
    let proxy = start(&cfg);
    (dir, mock, port, proxy)
}

/// `n` requests without a credential, each answered 401; returns `n`.
async fn flood_unauthenticated(addr: &str, n: usize) -> usize {
    let url = format!("http://{addr}/openai/v1/chat/completions");
    for _ in 0..n {
        let r = send(
            "POST",
            &url,
            &[],
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
        .await;
        assert_eq!(r.status, 401, "{}", r.text());
    }
    n
}

/// Refusals get at most half the spool: while the sinks are down, a flood
/// of 401s (they need no credential) stops being written at half of
/// `max_bytes`, and the other half still takes billed calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_half_the_spool_to_billed_calls() {
    let (dir, _mock, _port, proxy) = receiver_down(
        "fsync = \"never\"\nmax_bytes = 8192\nsegment_bytes = 1024\nwhen_full = \"reject\"",
    );
    let flood = flood_unauthenticated(&proxy.addr, 300).await;
    let m = metrics_text(&proxy.admin).await;
    let backlog = metric(&m, "tollgate_spool_backlog_bytes").expect("backlog gauge");
    // Written until half full: one refusal's event of slack past it.
    assert!(
        (4096.0..4096.0 + 1024.0).contains(&backlog),
        "backlog {backlog} after {flood} refusals; metrics:\n{m}"
    );
    let unrecorded = metric(&m, "tollgate_rejected_unrecorded_total").unwrap_or(0.0);
    assert!(unrecorded >= (flood - 10) as f64, "{m}");
    // Billed calls still have the other half.
    let served = serve(&proxy.addr, 3).await;
    wait_events(dir.path(), "the billed calls' events", |ev| {
        served
            .iter()
            .all(|s| ev.iter().any(|e| e["data"]["request_id"] == s.as_str()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_with_drop_oldest_keeps_serving_and_counts_the_loss() {
    let (dir, _mock, port, proxy) = receiver_down(
        "fsync = \"never\"\nmax_bytes = 4096\nsegment_bytes = 4096\nwhen_full = \"drop_oldest\"",
    );
    let served = serve(&proxy.addr, 40).await;
    let ready = get(&format!("http://{}/readyz", proxy.admin)).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let m = metrics_text(&proxy.admin).await;
    let dropped = metric(&m, "tollgate_spool_dropped_bytes").expect("dropped gauge");
    assert!(dropped > 0.0, "nothing dropped; metrics:\n{m}");
    assert!(
        proxy.proc.log_text().contains("dropped undelivered events"),
        "the loss is logged at ERROR"
    );
    // The file sink goes on (with a 4 KB spool, even it can be more than
    // max_bytes / 2 behind for a moment and lose some: no assertion on that).
    let last = served.last().unwrap();
    let file = wait_events(dir.path(), "the last call's event", |ev| {
        ev.iter().any(|e| e["data"]["request_id"] == last.as_str())
    })
    .await;
    assert_no_duplicates(&file, "file sink");

    // The receiver comes up: the http sink resumes past the hole and
    // delivers what is left, unchanged.
    let rx = HttpReceiver::start_on(port).await;
    let acc = poll("the last call's event", Duration::from_secs(45), || {
        let acc = rx.accepted();
        acc.iter()
            .any(|e| e["data"]["request_id"] == last.as_str())
            .then_some(acc)
    })
    .await;
    assert!(acc.len() < 40, "nothing was dropped from the http sink");
    assert_no_duplicates(&acc, "http sink");
    let by_id: HashMap<String, &Value> = file.iter().map(|e| (id(e), e)).collect();
    for e in &acc {
        if let Some(want) = by_id.get(&id(e)) {
            assert_eq!(e, *want, "delivered event differs");
        }
    }
}

/// drop_oldest removes segments while lagging sinks read them: no sink may
/// stop delivering because a segment vanished under it. (A race: the storm
/// is long enough, and there are enough lagging sinks, to hit it most runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_under_load_never_stops_a_sink() {
    storm_keeps_every_sink_alive(
        "fsync = \"never\"\nmax_bytes = 4096\nsegment_bytes = 4096\nwhen_full = \"drop_oldest\"",
        [2, 3, 5],
        true,
    )
    .await;
}

/// Segments every sink has passed are removed while other sinks read the
/// spool directory: no sink may stop delivering because of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_cleanup_under_load_never_stops_a_sink() {
    storm_keeps_every_sink_alive("fsync = \"never\"\nsegment_bytes = 4096", [0, 0, 1], false).await;
}

/// Serves 1600 calls to sinks behind receivers answering after `delays`
/// ms (one event a batch), then checks every sink delivers one more call.
async fn storm_keeps_every_sink_alive(spool: &str, delays: [u64; 3], dropping: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    // Slow receivers: their sinks stay behind, one event a batch, reading
    // the oldest segments, the ones being dropped.
    let mut rxs = Vec::new();
    let mut sinks = String::new();
    for (i, ms) in delays.into_iter().enumerate() {
        let rx = HttpReceiver::start().await;
        rx.delay(Duration::from_millis(ms));
        sinks += &http_sink(&format!("slow-{i}"), &rx.url(), "").replace(
            "batch_max_wait = \"50ms\"",
            "batch_max_wait = \"0s\"\nbatch_max_events = 1",
        );
        rxs.push(rx);
    }
    let cfg = config(dir.path(), &mock.addr, "", &sinks);
    set_spool(&cfg, spool);
    let proxy = start(&cfg);
    for _ in 0..100 {
        burst(&proxy.addr, 16).await;
    }
    let m = metrics_text(&proxy.admin).await;
    let dropped = metric(&m, "tollgate_spool_dropped_bytes").unwrap_or(0.0);
    assert_eq!(dropped > 0.0, dropping, "dropped {dropped}");
    // Every sink still delivers a call made after the storm.
    for rx in &rxs {
        rx.delay(Duration::ZERO);
    }
    let r = call(&proxy.addr, 0).await;
    assert_eq!(r.status, 200);
    let last = request_id(&r);
    let has = |evs: &[Value]| evs.iter().any(|e| e["data"]["request_id"] == last.as_str());
    // Sinks may have a backlog to work off: a sink has stopped when its lag
    // stays the same for 5 s.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut lags: HashMap<String, (f64, Instant)> = HashMap::new();
    loop {
        let file = has(&events(dir.path()));
        let http: Vec<bool> = rxs.iter().map(|rx| has(&rx.accepted())).collect();
        if file && http.iter().all(|h| *h) {
            break;
        }
        let m = metrics_text(&proxy.admin).await;
        let mut stuck = Vec::new();
        for l in m
            .lines()
            .filter(|l| l.starts_with("tollgate_sink_lag_bytes{"))
        {
            let (series, v) = l.rsplit_once(' ').unwrap();
            let v: f64 = v.parse().unwrap();
            let e = lags
                .entry(series.to_string())
                .or_insert((v, Instant::now()));
            if e.0 != v || v == 0.0 {
                *e = (v, Instant::now());
            } else if e.1.elapsed() > Duration::from_secs(5) {
                stuck.push(l);
            }
        }
        if !stuck.is_empty() || Instant::now() > deadline {
            let log = proxy.proc.log_text();
            let errors: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("\"ERROR\"") && !l.contains("dropped"))
                .collect();
            panic!(
                "a sink stopped delivering after segments were removed under it \
                 (no log line says so): the call after the storm reached the file sink: \
                 {file}, slow-0/1/2: {http:?}; no progress for 5 s: {stuck:?}\nerrors:\n{}",
                errors[errors.len().saturating_sub(10)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// Graceful stop

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_delivers_every_event_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let rx = HttpReceiver::start().await;
    // Batches would wait a minute for company: only the shutdown sends them.
    let sink = http_sink("meter", &rx.url(), "").replace(
        "batch_max_wait = \"50ms\"",
        "batch_max_wait = \"60s\"\nbatch_max_events = 1000",
    );
    let cfg = config(dir.path(), &mock.addr, "", &sink);
    let mut proxy = start(&cfg);
    serve(&proxy.addr, 15).await;
    let file = wait_events(dir.path(), "15 events", |ev| ev.len() >= 15).await;

    proxy.proc.signal("-TERM");
    let status = poll("the proxy to exit", Duration::from_secs(30), || {
        proxy.proc.child.try_wait().unwrap()
    })
    .await;
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        proxy.proc.log_text()
    );
    let acc = rx.accepted();
    assert_same_events(&file, &acc, "http sink at shutdown");
    assert_no_duplicates(&acc, "http sink at shutdown");
    assert_eq!(events(dir.path()), file);
}

// ---------------------------------------------------------------------------
// OTLP

fn records(reqs: &[ExportLogsServiceRequest]) -> Vec<LogRecord> {
    reqs.iter()
        .flat_map(|r| &r.resource_logs)
        .flat_map(|r| &r.scope_logs)
        .flat_map(|s| s.log_records.clone())
        .collect()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn attr_str<'a>(attrs: &'a [KeyValue], key: &str) -> &'a str {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => s,
        other => panic!("{key}: want a string, got {other:?} in {attrs:?}"),
    }
}

fn attr_int(attrs: &[KeyValue], key: &str) -> i64 {
    match attr(attrs, key) {
        Some(any_value::Value::IntValue(i)) => *i,
        other => panic!("{key}: want an int, got {other:?} in {attrs:?}"),
    }
}

fn histogram_points(reqs: &[ExportMetricsServiceRequest], name: &str) -> Vec<HistogramDataPoint> {
    metrics_named(reqs, name)
        .into_iter()
        .flat_map(|d| match d {
            metric::Data::Histogram(h) => h.data_points,
            other => panic!("{name}: want a histogram, got {other:?}"),
        })
        .collect()
}

fn sum_points(reqs: &[ExportMetricsServiceRequest], name: &str) -> Vec<NumberDataPoint> {
    metrics_named(reqs, name)
        .into_iter()
        .flat_map(|d| match d {
            metric::Data::Sum(s) => {
                assert!(s.is_monotonic, "{name} is a counter");
                s.data_points
            }
            other => panic!("{name}: want a sum, got {other:?}"),
        })
        .collect()
}

fn metrics_named(reqs: &[ExportMetricsServiceRequest], name: &str) -> Vec<metric::Data> {
    reqs.iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .filter(|m| m.name == name)
        .filter_map(|m| m.data.clone())
        .collect()
}

fn nanos(t: &str) -> u64 {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp_nanos() as u64
}

fn u(e: &Value, field: &str) -> i64 {
    e["data"][field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} in {e}"))
}

/// Checks what one OTLP receiver got against the file sink's events.
fn check_otlp(file: &[Value], otel: &OtlpReceiver, tenant_attributes: bool, grpc: bool) {
    for c in otel.calls() {
        assert!(c.ok, "undecodable export: {c:?}");
        if grpc {
            assert!(c.path == GRPC_LOGS || c.path == GRPC_METRICS, "{c:?}");
            assert_eq!(c.version, http::Version::HTTP_2, "gRPC is HTTP/2");
            assert_eq!(header(&c.headers, "content-type"), "application/grpc");
        } else {
            assert!(c.path == "/v1/logs" || c.path == "/v1/metrics", "{c:?}");
            assert_eq!(header(&c.headers, "content-type"), "application/x-protobuf");
        }
    }

    // Logs: one record per event, its fields as GenAI attributes.
    let recs = records(&otel.logs());
    assert_eq!(recs.len(), file.len(), "one log record per event");
    let by_id: HashMap<&str, &LogRecord> = recs
        .iter()
        .map(|r| (attr_str(&r.attributes, "cloudevents.event_id"), r))
        .collect();
    assert_eq!(by_id.len(), file.len(), "a log record per event id");
    for e in file {
        let id = e["id"].as_str().unwrap();
        let r = by_id
            .get(id)
            .unwrap_or_else(|| panic!("no log record for {e}"));
        let a = &r.attributes;
        let d = &e["data"];
        assert_eq!(r.time_unix_nano, nanos(e["time"].as_str().unwrap()), "{e}");
        assert_eq!(attr_str(a, "gen_ai.operation.name"), "chat", "{e}");
        assert_eq!(attr_str(a, "gen_ai.provider.name"), d["provider"], "{e}");
        assert_eq!(
            attr_str(a, "gen_ai.request.model"),
            d["request_model"],
            "{e}"
        );
        assert_eq!(
            attr_str(a, "gen_ai.response.model"),
            d["response_model"],
            "{e}"
        );
        for (key, field) in [
            ("gen_ai.usage.input_tokens", "input_tokens"),
            ("gen_ai.usage.output_tokens", "output_tokens"),
            (
                "gen_ai.usage.cache_read.input_tokens",
                "cache_read_input_tokens",
            ),
            (
                "gen_ai.usage.cache_creation.input_tokens",
                "cache_write_input_tokens",
            ),
            (
                "gen_ai.usage.reasoning.output_tokens",
                "reasoning_output_tokens",
            ),
            (
                "tollgate.usage.cache_creation_1h.input_tokens",
                "cache_write_1h_input_tokens",
            ),
        ] {
            assert_eq!(attr_int(a, key), u(e, field), "{key} of {e}");
        }
        assert_eq!(attr_str(a, "tollgate.tenant"), d["tenant"], "{e}");
        assert_eq!(attr_str(a, "tollgate.cost"), d["cost"], "{e}");
        assert_eq!(attr_str(a, "cloudevents.event_source"), e["source"]);
        assert_eq!(attr_str(a, "cloudevents.event_type"), e["type"]);
    }

    // Metrics: token usage by type, durations, cost.
    let reqs = otel.metrics();
    let total = |field: &str, tenant: Option<&str>| -> i64 {
        file.iter()
            .filter(|e| tenant.is_none_or(|t| e["data"]["tenant"] == t))
            .map(|e| u(e, field))
            .sum()
    };
    let tokens = histogram_points(&reqs, "gen_ai.client.token.usage");
    let tenants: Vec<Option<&str>> = if tenant_attributes {
        vec![Some("acme"), Some("globex")]
    } else {
        vec![None]
    };
    for tenant in tenants {
        for (ty, field) in [("input", "input_tokens"), ("output", "output_tokens")] {
            let pts: Vec<&HistogramDataPoint> = tokens
                .iter()
                .filter(|p| attr_str(&p.attributes, "gen_ai.token.type") == ty)
                .filter(|p| tenant.is_none_or(|t| attr_str(&p.attributes, "tollgate.tenant") == t))
                .collect();
            let sum: f64 = pts.iter().map(|p| p.sum.unwrap_or(0.0)).sum();
            assert_eq!(
                sum,
                total(field, tenant) as f64,
                "{ty} tokens of {tenant:?}"
            );
            let count: u64 = pts.iter().map(|p| p.count).sum();
            let calls = file
                .iter()
                .filter(|e| tenant.is_none_or(|t| e["data"]["tenant"] == t))
                .filter(|e| u(e, field) > 0)
                .count();
            assert_eq!(count as usize, calls, "{ty} token count of {tenant:?}");
        }
    }
    for p in &tokens {
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), p.count, "{p:?}");
        assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1, "{p:?}");
    }
    let durations = histogram_points(&reqs, "gen_ai.client.operation.duration");
    assert_eq!(
        durations.iter().map(|p| p.count).sum::<u64>() as usize,
        file.len(),
        "one duration per call"
    );
    let want_secs: f64 = file
        .iter()
        .map(|e| u(e, "duration_ms") as f64 / 1000.0)
        .sum();
    let got_secs: f64 = durations.iter().map(|p| p.sum.unwrap_or(0.0)).sum();
    assert!(
        (got_secs - want_secs).abs() < 1e-6,
        "{got_secs} != {want_secs}"
    );
    let cost = sum_points(&reqs, "tollgate.cost");
    let got_cost: f64 = cost
        .iter()
        .map(|p| match p.value {
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(
                v,
            )) => v,
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(v)) => {
                v as f64
            }
            None => 0.0,
        })
        .sum();
    let want_cost: f64 = file
        .iter()
        .map(|e| e["data"]["cost"].as_str().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(want_cost > 0.0);
    assert!(
        (got_cost - want_cost).abs() < 1e-12,
        "cost {got_cost} != {want_cost}"
    );

    // Tenant labels on metrics only when asked for (cardinality).
    let all_attrs: Vec<&[KeyValue]> = tokens
        .iter()
        .map(|p| &p.attributes[..])
        .chain(durations.iter().map(|p| &p.attributes[..]))
        .chain(cost.iter().map(|p| &p.attributes[..]))
        .collect();
    for a in all_attrs {
        let tenant = attr(a, "tollgate.tenant");
        if tenant_attributes {
            assert!(tenant.is_some(), "no tollgate.tenant on {a:?}");
        } else {
            assert!(tenant.is_none(), "tollgate.tenant on {a:?}");
        }
        assert!(attr(a, "gen_ai.operation.name").is_some(), "{a:?}");
        assert!(attr(a, "gen_ai.provider.name").is_some(), "{a:?}");
    }
}

async fn otlp_follows_genai_conventions(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let plain = OtlpReceiver::start().await;
    let tenant = OtlpReceiver::start().await;
    let sinks = otlp_sink("otel", &plain.endpoint(), protocol, "")
        + &otlp_sink(
            "otel-tenant",
            &tenant.endpoint(),
            protocol,
            "tenant_attributes = true",
        );
    let cfg = config(dir.path(), &mock.addr, "", &sinks);
    let proxy = start(&cfg);
    serve(&proxy.addr, 6).await;
    let file = wait_events(dir.path(), "6 events", |ev| ev.len() >= 6).await;
    for rx in [&plain, &tenant] {
        poll(
            "6 log records and 6 durations",
            Duration::from_secs(20),
            || {
                let durations: u64 =
                    histogram_points(&rx.metrics(), "gen_ai.client.operation.duration")
                        .iter()
                        .map(|p| p.count)
                        .sum();
                (records(&rx.logs()).len() >= 6 && durations >= 6).then_some(())
            },
        )
        .await;
    }
    // Anything late would show up now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let grpc = protocol == "grpc";
    check_otlp(&file, &plain, false, grpc);
    check_otlp(&file, &tenant, true, grpc);
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_logs_and_metrics_follow_genai_conventions() {
    otlp_follows_genai_conventions("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_protobuf_logs_and_metrics_follow_genai_conventions() {
    otlp_follows_genai_conventions("http").await;
}

/// A proxy with one otlp sink to a receiver set up by `prepare`, after `n`
/// served calls.
async fn otlp_served(
    protocol: &str,
    n: usize,
    prepare: impl FnOnce(&OtlpReceiver),
) -> (tempfile::TempDir, Mock, OtlpReceiver, Proxy) {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let rx = OtlpReceiver::start().await;
    prepare(&rx);
    let cfg = config(
        dir.path(),
        &mock.addr,
        "",
        &otlp_sink("otel", &rx.endpoint(), protocol, ""),
    );
    let proxy = start(&cfg);
    serve(&proxy.addr, n).await;
    (dir, mock, rx, proxy)
}

/// Waits until `series` on the otel sink reaches `n`, then long enough for a
/// retry to show up (the first comes within 100 ms).
async fn settled_otel(proxy: &Proxy, series: &str, n: f64) {
    wait_metric(&proxy.admin, &format!(r#"{series}{{sink="otel"}}"#), |v| {
        v >= n
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// The receiver got every event of `file` in its logs, each once.
fn assert_logged_once(rx: &OtlpReceiver, file: &[Value], what: &str) {
    let ids: Vec<String> = records(&rx.logs())
        .iter()
        .map(|r| attr_str(&r.attributes, "cloudevents.event_id").to_string())
        .collect();
    assert_eq!(ids.len(), file.len(), "logs sent again {what}: {ids:?}");
    let expected: HashSet<String> = file.iter().map(id).collect();
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), expected);
}

/// A receiver that accepts an export but reports records rejected (OTLP
/// `partial_success`): nothing is dropped silently and nothing is sent
/// again, not even when the metrics export that follows fails. The answer
/// does not say which records were rejected, so the batch goes to the
/// dead-letter file, once, flagged as a partial success.
async fn otlp_partial_success_is_dead_lettered(protocol: &str, metrics_fail: bool) {
    let (dir, _mock, rx, proxy) = otlp_served(protocol, 3, |rx| {
        rx.reject_logs(1, "attribute value too long");
        if metrics_fail {
            rx.fail_metrics();
        }
    })
    .await;
    let file = wait_events(dir.path(), "3 events", |ev| ev.len() >= 3).await;
    let dead = wait_dead_letters(dir.path(), "otel", 3).await;
    for d in &dead {
        assert_eq!(d["sink"], "otel", "{d}");
        let reason = d["reason"].as_str().unwrap_or_else(|| panic!("{d}"));
        assert!(
            reason.contains("partial success")
                && reason.contains("rejected 1 of")
                && reason.contains("attribute value too long"),
            "reason {reason:?}"
        );
    }
    let dead_events: Vec<Value> = dead.iter().map(|d| d["event"].clone()).collect();
    assert_same_events(&file, &dead_events, "dead-letter file");
    assert_no_duplicates(&dead_events, "dead-letter file");
    // Anything sent again would show up now.
    settled_otel(&proxy, "tollgate_sink_dead_lettered_events_total", 3.0).await;
    assert_eq!(
        records(&rx.logs()).len(),
        3,
        "a partially accepted export was sent again"
    );
    let again = wait_dead_letters(dir.path(), "otel", 3).await;
    assert_eq!(again.len(), 3, "the batch was dead-lettered more than once");
    if metrics_fail {
        assert!(!rx.metrics().is_empty(), "no metrics export was tried");
    }
    let m = metrics_text(&proxy.admin).await;
    assert_eq!(
        metric(
            &m,
            r#"tollgate_sink_dead_lettered_events_total{sink="otel"}"#
        ),
        Some(3.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_partial_success_is_dead_lettered_once_even_when_metrics_fail() {
    otlp_partial_success_is_dead_lettered("grpc", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_partial_success_is_dead_lettered_not_dropped() {
    otlp_partial_success_is_dead_lettered("http", false).await;
}

/// A metrics export that fails after the logs export of the same batch
/// succeeded: the retry sends the metrics only. The receiver took the logs,
/// so sending them again would hand it every event twice.
async fn otlp_metrics_retry_does_not_resend_logs(protocol: &str) {
    let (dir, _mock, rx, proxy) = otlp_served(protocol, 3, |rx| rx.fail_metrics_next(2)).await;
    let file = wait_events(dir.path(), "3 events", |ev| ev.len() >= 3).await;
    settled_otel(&proxy, "tollgate_sink_delivered_events_total", 3.0).await;
    assert!(
        rx.metrics().len() >= 3,
        "two failed metrics exports and one accepted, got {}",
        rx.metrics().len()
    );
    assert_logged_once(&rx, &file, "with the metrics retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_metrics_retry_does_not_resend_logs() {
    otlp_metrics_retry_does_not_resend_logs("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_metrics_retry_does_not_resend_logs() {
    otlp_metrics_retry_does_not_resend_logs("http").await;
}

/// A collector with a logs pipeline only refuses every metrics export
/// (HTTP 404, gRPC UNIMPLEMENTED). The logs were taken and the metrics are
/// derived from them: the batch counts as delivered, nothing is set aside
/// as a dead letter, and neither export is sent again.
async fn otlp_refused_metrics_do_not_stall_the_logs(protocol: &str) {
    let (dir, _mock, rx, proxy) = otlp_served(protocol, 3, |rx| rx.refuse_metrics()).await;
    let file = wait_events(dir.path(), "3 events", |ev| ev.len() >= 3).await;
    settled_otel(&proxy, "tollgate_sink_delivered_events_total", 3.0).await;
    assert_logged_once(&rx, &file, "after refused metrics");
    assert_eq!(
        rx.metrics().len(),
        rx.logs().len(),
        "a refused metrics export was retried"
    );
    let m = metrics_text(&proxy.admin).await;
    assert_eq!(
        metric(
            &m,
            r#"tollgate_sink_dead_lettered_events_total{sink="otel"}"#
        )
        .unwrap_or(0.0),
        0.0,
        "{m}"
    );
    let dead = dir.path().join("data/deadletter/otel.jsonl");
    assert!(!dead.exists(), "dead letters written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_refused_metrics_do_not_stall_the_logs() {
    otlp_refused_metrics_do_not_stall_the_logs("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_refused_metrics_do_not_stall_the_logs() {
    otlp_refused_metrics_do_not_stall_the_logs("http").await;
}
