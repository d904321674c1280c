//! Budgets, prepaid balances, rate limits and the admin API, black-box.

mod common;
use common::*;

use std::time::Duration;

use bytes::Bytes;
use rust_decimal::Decimal;

const ADMIN_TOKEN: &str = "admin-blackbox-TOKEN";

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

struct Env {
    dir: tempfile::TempDir,
    _mock: Mock,
    cfg: std::path::PathBuf,
}

/// `acme` gets `acme_extra` (budget / rate_limit keys) appended to its table.
fn setup(acme_extra: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let cfg = config(
        dir.path(),
        &mock.addr,
        "admin_token_env = \"TEST_ADMIN_TOKEN\"",
        "",
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replacen("id = \"acme\"", &format!("id = \"acme\"\n{acme_extra}"), 1);
    std::fs::write(&cfg, text).unwrap();
    Env {
        dir,
        _mock: mock,
        cfg,
    }
}

fn start(env: &Env) -> Proxy {
    let proc = Proc::spawn(
        &["run", "--config", env.cfg.to_str().unwrap()],
        &[
            ("TEST_UPSTREAM_KEY", UPSTREAM_KEY),
            ("TEST_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    );
    let v = proc.wait_for("listening");
    Proxy {
        addr: v["proxy"].as_str().unwrap().to_string(),
        admin: v["admin"].as_str().unwrap().to_string(),
        proc,
    }
}

async fn tenant(admin: &str, id: &str) -> serde_json::Value {
    let r = send(
        "GET",
        &format!("http://{admin}/v1/tenants/{id}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// max_tokens 100 at $0.60/M output + a ~90-byte body at $0.15/M input:
/// a worst case of about $0.0000735 per call.
const CAPPED: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;

fn worst_case() -> Decimal {
    worst_case_of(CAPPED)
}

fn worst_case_of(body: &str) -> Decimal {
    (Decimal::from(body.len() as u64) * d("0.15") + Decimal::from(100) * d("0.60")) / d("1000000")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_calls_on_a_balance_for_three_serve_at_most_three() {
    thirty_on_a_balance_for_three(CAPPED).await;
}

/// A dated snapshot name (what providers recommend pinning) is priced by
/// its configured name when reserving too, not only when settling:
/// it reserved nothing, and 40 concurrent calls spent 184% of a cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dated_model_name_reserves_like_its_base_model() {
    thirty_on_a_balance_for_three(&CAPPED.replace("gpt-4o-mini", "gpt-4o-mini-2024-07-18")).await;
}

async fn thirty_on_a_balance_for_three(body: &str) {
    let limit = (worst_case_of(body) * Decimal::from(3)).normalize();
    let env = setup(&format!(
        "budget = {{ limit = \"{limit}\", window = \"total\" }}"
    ));
    let proxy = start(&env);
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let addr = proxy.addr.clone();
        let body = body.to_string();
        tasks.push(tokio::spawn(async move {
            chat(
                &addr,
                ACME_KEY,
                &body,
                &[
                    ("x-mock-first-byte-delay-ms", "300"),
                    ("x-mock-output-tokens", "90"),
                ],
            )
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            402 => {
                assert_eq!(r.headers["x-should-retry"], "false");
                assert_eq!(r.json()["error"]["code"], "budget_exceeded");
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert!((1..=3).contains(&ok), "served {ok}");
    let ev = wait_events(env.dir.path(), "30 events", |ev| ev.len() >= 30).await;
    assert_eq!(
        ev.iter().filter(|e| e["data"]["outcome"] == "ok").count(),
        ok
    );
    assert_eq!(
        ev.iter()
            .filter(|e| e["data"]["outcome"] == "rejected_budget")
            .count(),
        30 - ok
    );
    let t = tenant(&proxy.admin, "acme").await;
    let spent = d(t["spent"].as_str().unwrap());
    assert!(spent <= limit, "spent {spent} > limit {limit}");
    assert_eq!(t["reserved"], "0");
    let sum: Decimal = ev
        .iter()
        .map(|e| d(e["data"]["cost"].as_str().unwrap()))
        .sum();
    assert_eq!(sum, spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_up_serves_again_and_spend_survives_restarts() {
    let limit = worst_case().normalize();
    let env = setup(&format!(
        "budget = {{ limit = \"{limit}\", window = \"total\" }}"
    ));
    let mut proxy = start(&env);
    assert_eq!(
        chat(
            &proxy.addr,
            ACME_KEY,
            CAPPED,
            &[("x-mock-output-tokens", "90")]
        )
        .await
        .status,
        200
    );
    assert_eq!(chat(&proxy.addr, ACME_KEY, CAPPED, &[]).await.status, 402);

    let url = format!("http://{}/v1/tenants/acme/credits", proxy.admin);
    let body = r#"{"amount":"0.01","reason":"prepaid top-up"}"#;
    let r = send("POST", &url, &[], body).await;
    assert_eq!(r.status, 401, "credits need the admin token");
    let r = send("POST", &url, &[("authorization", "Bearer wrong")], body).await;
    assert_eq!(r.status, 401);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    // Past 10^15 is refused: sums near Decimal's bound once panicked with
    // the budget lock held, and every later call with it.
    for huge in [
        "79228162514264337593543950335",
        "5e28",
        "1000000000000000.01",
    ] {
        let body = format!(r#"{{"amount":"{huge}"}}"#);
        let r = send("POST", &url, &[("authorization", &auth)], body).await;
        assert_eq!(r.status, 400, "{huge}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_amount");
    }
    let r = send("POST", &url, &[("authorization", &auth)], body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(chat(&proxy.addr, ACME_KEY, CAPPED, &[]).await.status, 200);

    let before = tenant(&proxy.admin, "acme").await;
    assert_eq!(before["window"], "total");
    assert_eq!(d(before["limit"].as_str().unwrap()), limit + d("0.01"));
    let ev = wait_events(env.dir.path(), "credit event", |ev| {
        ev.iter().any(|e| e["type"] == "credit")
    })
    .await;
    let credit = ev.iter().find(|e| e["type"] == "credit").unwrap();
    assert_eq!(credit["data"]["amount"], "0.01");
    assert_eq!(credit["data"]["reason"], "prepaid top-up");

    // Clean restart, then a kill -9 restart: neither forgets nor double-counts.
    drop(proxy);
    proxy = start(&env);
    let after = tenant(&proxy.admin, "acme").await;
    assert_eq!(
        (&after["spent"], &after["remaining"], &after["limit"]),
        (&before["spent"], &before["remaining"], &before["limit"])
    );
    assert_eq!(chat(&proxy.addr, ACME_KEY, CAPPED, &[]).await.status, 200);
    let before = tenant(&proxy.admin, "acme").await;
    proxy.proc.kill9();
    let proxy = start(&env);
    let after = tenant(&proxy.admin, "acme").await;
    assert_eq!(after["spent"], before["spent"]);
    assert_eq!(after["remaining"], before["remaining"]);
}

/// A spool too small for a burst, with a sink that is down: `drop_oldest`
/// drops undelivered events, but never the ones a restart must replay to
/// know the spend (those after the budget snapshot). The burst comes
/// `idle` after the start.
async fn spend_survives_kill9_while_drop_oldest_drops(idle: Duration) {
    let env = setup("budget = { limit = \"1000\", window = \"total\" }");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let text = std::fs::read_to_string(&env.cfg).unwrap();
    let text = text.replacen(
        "[spool]\n",
        "[spool]\nmax_bytes = 32768\nsegment_bytes = 4096\nwhen_full = \"drop_oldest\"\n",
        1,
    ) + &format!(
        "\n[[sinks]]\ntype = \"http\"\nname = \"down\"\nurl = \"http://127.0.0.1:{dead_port}/events\"\n"
    );
    std::fs::write(&env.cfg, text).unwrap();
    let mut proxy = start(&env);
    tokio::time::sleep(idle).await;
    // About 200 KB of events, several times the spool, in well under the
    // keeper's second.
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let addr = proxy.addr.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let body = format!(
                    r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"w{worker} c{i}"}}]}}"#
                );
                assert_eq!(chat(&addr, ACME_KEY, &body, &[]).await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let before = tenant(&proxy.admin, "acme").await;
    let dropped = metric(
        &metrics_text(&proxy.admin).await,
        "tollgate_spool_dropped_bytes",
    );
    assert!(dropped > Some(0.0), "the burst must overflow the spool");
    proxy.proc.kill9();
    let proxy = start(&env);
    let after = tenant(&proxy.admin, "acme").await;
    assert_eq!(
        after["spent"], before["spent"],
        "spend lost to dropped segments"
    );
    assert_eq!(after["remaining"], before["remaining"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_survives_kill9_while_drop_oldest_drops_at_start() {
    spend_survives_kill9_while_drop_oldest_drops(Duration::ZERO).await;
}

/// Past the keeper's staleness bound (10 s) with nothing to snapshot: an
/// idle keeper is not a dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_survives_kill9_while_drop_oldest_drops_after_idling() {
    spend_survives_kill9_while_drop_oldest_drops(Duration::from_secs(11)).await;
}

/// A call whose body was still arriving when a reload changed the tenant's
/// rate limit is admitted under the new limit, in the same bucket as the
/// calls after the reload. Admitted under the old one, it rebuilt the
/// tenant's limiters (a fresh burst) and the next call rebuilt them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_begun_before_a_reload_is_limited_by_the_new_limits() {
    let env = setup("rate_limit = { requests_per_minute = 2 }");
    let proxy = start(&env);
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: x\r\n\
         authorization: Bearer {ACME_KEY}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    let mut slow = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, head.as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&env.cfg).unwrap();
    std::fs::write(
        &env.cfg,
        text.replace("requests_per_minute = 2", "requests_per_minute = 3"),
    )
    .unwrap();
    let m = format!("http://{}/metrics", proxy.admin);
    let t = std::time::Instant::now();
    while !send("GET", &m, &[], "")
        .await
        .text()
        .contains(r#"tollgate_config_reloads_total{result="ok"} 1"#)
    {
        assert!(t.elapsed() < Duration::from_secs(10), "no reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(chat(&proxy.addr, ACME_KEY, body, &[]).await.status, 200);
    tokio::io::AsyncWriteExt::write_all(&mut slow, body.as_bytes())
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut slow, &mut answer)
        .await
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    // Three a minute, in one bucket: one more, then refused.
    assert_eq!(chat(&proxy.addr, ACME_KEY, body, &[]).await.status, 200);
    assert_eq!(chat(&proxy.addr, ACME_KEY, body, &[]).await.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_reject_the_third_call_with_retry_after() {
    let env = setup("rate_limit = { requests_per_minute = 2 }");
    let proxy = start(&env);
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    assert_eq!(chat(&proxy.addr, ACME_KEY, body, &[]).await.status, 200);
    assert_eq!(chat(&proxy.addr, ACME_KEY, body, &[]).await.status, 200);
    let r = chat(&proxy.addr, ACME_KEY, body, &[]).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(r.headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    // Another tenant is unaffected; Anthropic routes answer in Anthropic's shape.
    assert_eq!(chat(&proxy.addr, GLOBEX_KEY, body, &[]).await.status, 200);
    let r = send(
        "POST",
        &format!("http://{}/anthropic/v1/messages", proxy.addr),
        &[("x-api-key", ACME_KEY)],
        r#"{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}"#,
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    let ev = wait_events(env.dir.path(), "rejected_rate", |ev| {
        ev.iter()
            .filter(|e| e["data"]["outcome"] == "rejected_rate")
            .count()
            == 2
    })
    .await;
    assert_eq!(ev.len(), 5);
    let m = metrics_text(&proxy.admin).await;
    assert!(
        m.contains(r#"tollgate_rejections_total{reason="rate_limit_exceeded"} 2"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_charge_the_estimate_then_the_output() {
    // ~40-byte body = 10 tokens estimated; each call then owes 200 output.
    let env = setup("rate_limit = { tokens_per_minute = 400 }");
    let proxy = start(&env);
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let out = [("x-mock-output-tokens", "200")];
    assert_eq!(chat(&proxy.addr, ACME_KEY, body, &out).await.status, 200);
    assert_eq!(chat(&proxy.addr, ACME_KEY, body, &out).await.status, 200);
    // Charged so far about 2 x (10 + 200 + the input the estimate missed):
    // the next estimate plus the debt no longer fits.
    let r = chat(&proxy.addr, ACME_KEY, body, &out).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "tokens");
    assert_eq!(r.headers["x-ratelimit-limit-tokens"], "400");
    assert!(r.headers.contains_key("retry-after"));
}

/// A budgeted OpenAI request that names no output cap goes upstream with
/// the cap its reservation assumed (the model's `max_output_tokens`), so a
/// model whose real limit is higher cannot generate past the reservation.
/// A request's own cap, and tenants without a budget, are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budgeted_request_without_an_output_cap_gets_the_reserved_one() {
    let env = setup("budget = { limit = \"100\", window = \"total\" }");
    let text = std::fs::read_to_string(&env.cfg).unwrap().replacen(
        "max_output_tokens = 16384",
        "max_output_tokens = 5",
        1,
    );
    std::fs::write(&env.cfg, text).unwrap();
    let proxy = start(&env);
    let long = [("x-mock-output-tokens", "90")];
    let output = |r: Resp| {
        assert_eq!(r.status, 200, "{}", r.text());
        let rid = request_id(&r);
        let dir = env.dir.path().to_path_buf();
        async move { event_for(&dir, &rid).await["data"]["output_tokens"].clone() }
    };
    let plain = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let r = chat(&proxy.addr, ACME_KEY, plain, &long).await;
    assert_eq!(output(r).await, 5, "the reservation's cap was not sent");
    let stream =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = chat(&proxy.addr, ACME_KEY, stream, &long).await;
    assert_eq!(output(r).await, 5);
    let own =
        r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = chat(&proxy.addr, ACME_KEY, own, &long).await;
    assert_eq!(output(r).await, 50);
    let auth = format!("Bearer {ACME_KEY}");
    let mut h = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    h.extend_from_slice(&long);
    let r = send(
        "POST",
        &format!("http://{}/openai/v1/responses", proxy.addr),
        &h,
        r#"{"model":"gpt-4o-mini","input":"hi"}"#,
    )
    .await;
    assert_eq!(output(r).await, 5);
    // No budget, nothing reserved: the request goes as it came.
    let r = chat(&proxy.addr, GLOBEX_KEY, plain, &long).await;
    assert_eq!(output(r).await, 90);
}

/// A top-up retried with its `id` (its answer was lost) is credited once,
/// also after a kill -9 before and after the budget snapshot took it; the
/// same id on an outcome is not a duplicate of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_are_idempotent_on_their_id() {
    let env = setup("budget = { limit = \"1\", window = \"total\" }");
    let mut proxy = start(&env);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let body = r#"{"amount":"2.5","reason":"invoice 7","id":"topup-7"}"#;
    let credit = |admin: String, body: &'static str| {
        let auth = auth.clone();
        async move {
            let url = format!("http://{admin}/v1/tenants/acme/credits");
            send("POST", &url, &[("authorization", &auth)], body).await
        }
    };
    let r = credit(proxy.admin.clone(), body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["duplicate"], false);
    assert_eq!(r.json()["limit"], "3.5");
    let r = credit(proxy.admin.clone(), body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["duplicate"], true);
    assert_eq!(r.json()["id"], "topup-7");
    assert_eq!(r.json()["limit"], "3.5", "credited twice");
    // Another id credits; a bad one is refused.
    let r = credit(proxy.admin.clone(), r#"{"amount":"1","id":"topup-8"}"#).await;
    assert_eq!(r.json()["limit"], "4.5");
    let r = credit(proxy.admin.clone(), r#"{"amount":"1","id":""}"#).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_id");
    // The same id names an outcome of its own.
    let r = send(
        "POST",
        &format!("http://{}/v1/events", proxy.admin),
        &[("authorization", &auth)],
        r#"{"tenant":"acme","type":"invoice.paid","id":"topup-7"}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());

    // Killed before the snapshot (replayed from the spool), then after it.
    for wait in [Duration::ZERO, Duration::from_millis(1500)] {
        tokio::time::sleep(wait).await;
        proxy.proc.kill9();
        proxy = start(&env);
        let r = credit(proxy.admin.clone(), body).await;
        assert_eq!(r.json()["duplicate"], true, "{}", r.text());
        assert_eq!(r.json()["limit"], "4.5");
    }
    let ev = wait_events(env.dir.path(), "credits", |ev| {
        ev.iter().filter(|e| e["type"] == "credit").count() >= 2
    })
    .await;
    let credits: Vec<_> = ev.iter().filter(|e| e["type"] == "credit").collect();
    assert_eq!(credits.len(), 2, "{credits:#?}");
    assert_eq!(credits[0]["data"]["idempotency_key"], "topup-7");
    assert_eq!(credits[0]["data"]["amount"], "2.5");
    assert_eq!(credits[1]["data"]["idempotency_key"], "topup-8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_events_are_idempotent_on_the_app_key() {
    let env = setup("");
    let mut proxy = start(&env);
    let url = format!("http://{}/v1/events", proxy.admin);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let body = r#"{"tenant":"acme","type":"ticket.resolved","quantity":1,"id":"ticket-42"}"#;
    assert_eq!(send("POST", &url, &[], body).await.status, 401);
    let r = send("POST", &url, &[("authorization", &auth)], body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    // The scheme in any case (RFC 9110).
    let upper = format!("BEARER {ADMIN_TOKEN}");
    let r = send("POST", &url, &[("authorization", &upper)], body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["duplicate"], true);
    let r = send(
        "POST",
        &url,
        &[("authorization", &auth)],
        r#"{"tenant":"acme","type":"ticket.resolved","quantity":"2.5"}"#,
    )
    .await;
    assert_eq!(r.status, 201);
    let r = send(
        "POST",
        &url,
        &[("authorization", &auth)],
        r#"{"tenant":"nobody","type":"x"}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    // Keys and types are bounded: each key is kept for 7 days.
    for (field, long) in [("id", "k".repeat(257)), ("type", "t".repeat(257))] {
        let mut b: serde_json::Value = serde_json::from_str(body).unwrap();
        b[field] = long.into();
        let r = send("POST", &url, &[("authorization", &auth)], b.to_string()).await;
        assert_eq!(r.status, 400, "{field}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], format!("invalid_{field}"));
    }
    // Still a duplicate after a restart (kill -9).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.proc.kill9();
    let proxy = start(&env);
    let url = format!("http://{}/v1/events", proxy.admin);
    let r = send("POST", &url, &[("authorization", &auth)], body).await;
    assert_eq!(r.json()["duplicate"], true, "{}", r.text());
    let ev = wait_events(env.dir.path(), "outcomes", |ev| ev.len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ev = if events(env.dir.path()).len() > ev.len() {
        events(env.dir.path())
    } else {
        ev
    };
    let outcomes: Vec<_> = ev.iter().filter(|e| e["type"] == "outcome").collect();
    assert_eq!(outcomes.len(), 2, "{outcomes:#?}");
    assert_eq!(outcomes[0]["data"]["name"], "ticket.resolved");
    assert_eq!(outcomes[0]["data"]["quantity"], "1");
    assert_eq!(outcomes[0]["data"]["idempotency_key"], "ticket-42");
    assert_eq!(outcomes[1]["data"]["quantity"], "2.5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_api_and_metrics_show_spend_and_remaining() {
    let env = setup("budget = { limit = \"5.00\", window = \"month\" }\nrate_limit = { requests_per_minute = 600, tokens_per_minute = 200000 }");
    let proxy = start(&env);
    assert_eq!(
        chat(
            &proxy.addr,
            ACME_KEY,
            CAPPED,
            &[("x-mock-output-tokens", "10")]
        )
        .await
        .status,
        200
    );
    let list = send(
        "GET",
        &format!("http://{}/v1/tenants", proxy.admin),
        &[],
        Bytes::new(),
    )
    .await
    .json();
    assert_eq!(list["tenants"].as_array().unwrap().len(), 2);
    let t = tenant(&proxy.admin, "acme").await;
    assert_eq!(t["window"], "month");
    assert_eq!(t["limit"], "5");
    assert!(
        t["window_start"]
            .as_str()
            .unwrap()
            .ends_with("-01T00:00:00.000Z"),
        "{t}"
    );
    assert_eq!(t["rate_limit"]["requests_per_minute"], 600);
    let spent = d(t["spent"].as_str().unwrap());
    assert!(spent > Decimal::ZERO);
    assert_eq!(d(t["remaining"].as_str().unwrap()), d("5") - spent);
    let g = tenant(&proxy.admin, "globex").await;
    assert!(g["limit"].is_null());
    let m = metrics_text(&proxy.admin).await;
    assert!(
        m.contains(r#"tollgate_tenant_remaining_usd{tenant="acme"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"tollgate_tenant_spent_usd{tenant="acme"}"#),
        "{m}"
    );
}

/// Tenant ids that need URL-encoding are reachable through the admin API,
/// and a tenant removed by a reload leaves no stale gauges in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_tenant_ids_in_the_admin_api_and_no_stale_tenant_gauges() {
    let env = setup("");
    let base = std::fs::read_to_string(&env.cfg).unwrap();
    let odd = "\n[[tenants]]\nid = \"team/a\"\nbudget = { limit = \"1\", window = \"total\" }\n\
               \n[[tenants]]\nid = \"acme corp\"\nbudget = { limit = \"2\", window = \"total\" }\n";
    std::fs::write(&env.cfg, format!("{base}{odd}")).unwrap();
    let proxy = start(&env);

    let url = format!("http://{}/v1/tenants/team%2Fa/credits", proxy.admin);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let r = send(
        "POST",
        &url,
        &[("authorization", &auth)],
        r#"{"amount":"5"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "team/a");
    assert_eq!(tenant(&proxy.admin, "team%2Fa").await["limit"], "6");
    assert_eq!(tenant(&proxy.admin, "acme%20corp").await["id"], "acme corp");

    let m = metrics_text(&proxy.admin).await;
    assert!(
        metric(&m, r#"tollgate_tenant_remaining_usd{tenant="team/a"}"#).is_some(),
        "{m}"
    );
    // Reload without them: their series go with them.
    std::fs::write(&env.cfg, &base).unwrap();
    proxy.proc.signal("-HUP");
    let gone = format!("http://{}/v1/tenants/team%2Fa", proxy.admin);
    wait_status(&gone, 404, Duration::from_secs(10)).await;
    let m = metrics_text(&proxy.admin).await;
    assert!(!m.contains("team/a") && !m.contains("acme corp"), "{m}");
    assert!(
        metric(&m, r#"tollgate_tenant_spent_usd{tenant="acme"}"#).is_some(),
        "{m}"
    );
}

/// Context the provider adds from its own store (`previous_response_id`,
/// `conversation`, a stored `prompt`) is not bounded by the body's bytes:
/// the reservation allows `stored_context_tokens` for it (128,000 by
/// default, $0.0192 at gpt-4o-mini's input price). Ten concurrent calls on
/// a $0.01 balance, each billed 60k input tokens, spent 9 times it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_context_is_reserved_for() {
    let env = setup("budget = { limit = \"0.01\", window = \"total\" }");
    let proxy = start(&env);
    let responses = |addr: &str, body: &'static str| {
        let url = format!("http://{addr}/openai/v1/responses");
        async move {
            let auth = format!("Bearer {ACME_KEY}");
            send("POST", &url, &[("authorization", &auth)], body).await
        }
    };
    let a = &proxy.addr;
    for body in [
        r#"{"model":"gpt-4o-mini","input":"hi","max_output_tokens":10,"previous_response_id":"resp_1"}"#,
        r#"{"model":"gpt-4o-mini","input":"hi","max_output_tokens":10,"conversation":"conv_1"}"#,
        r#"{"model":"gpt-4o-mini","max_output_tokens":10,"prompt":{"id":"pmpt_1"}}"#,
        r#"{"model":"gpt-4o-mini","max_output_tokens":10,"input":[{"type":"item_reference","id":"msg_1"}]}"#,
    ] {
        let r = responses(a, body).await;
        assert_eq!(r.status, 402, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "budget_exceeded");
    }
    for body in [
        r#"{"model":"gpt-4o-mini","input":"hi","max_output_tokens":10}"#,
        r#"{"model":"gpt-4o-mini","input":"hi","max_output_tokens":10,"previous_response_id":null}"#,
    ] {
        let r = responses(a, body).await;
        assert_eq!(r.status, 200, "{body}: {}", r.text());
    }
    // A legacy completion's `prompt` is its text, not a stored prompt.
    let r = send(
        "POST",
        &format!("http://{a}/openai/v1/completions"),
        &[("authorization", &format!("Bearer {ACME_KEY}"))],
        r#"{"model":"gpt-4o-mini","prompt":"hi","max_tokens":10}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
