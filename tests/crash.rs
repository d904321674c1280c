//! kill -9 straight after a burst of served calls: after a restart every
//! served call has its event, and the JSONL file has no duplicate line.

mod common;
use common::*;

use std::collections::HashSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_burst_loses_no_event_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let cfg = config(dir.path(), &mock.addr, "", "");
    let mut proxy = start_proxy(&cfg);

    // A burst of 64 concurrent calls, streamed and not, both providers.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let addr = proxy.addr.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let stream = if i % 4 == 0 { "true" } else { "false" };
                let body = format!(
                    r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"call {i}"}}]}}"#
                );
                chat(&addr, ACME_KEY, &body, &[]).await
            } else {
                let body = format!(
                    r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"stream":{},"messages":[{{"role":"user","content":"call {i}"}}]}}"#,
                    i % 3 == 0
                );
                send(
                    "POST",
                    &format!("http://{addr}/anthropic/v1/messages"),
                    &[("content-type", "application/json"), ("x-api-key", GLOBEX_KEY)],
                    body,
                )
                .await
            }
        }));
    }
    let mut served = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.body_error);
        served.insert(request_id(&r));
    }
    assert_eq!(served.len(), 64);
    // Straight away: no grace, no flush.
    proxy.proc.kill9();

    let proxy = start_proxy(&cfg);
    let ev = wait_events(dir.path(), "all 64 events", |ev| ev.len() >= 64).await;
    // Give the sink a moment to (wrongly) write more, then check exactly.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ev = if events(dir.path()).len() > ev.len() {
        events(dir.path())
    } else {
        ev
    };
    let ids: Vec<&str> = ev.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let unique: HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate lines in the JSONL file");
    let got: HashSet<String> = ev
        .iter()
        .map(|e| e["data"]["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, served, "every served call has exactly its event");
    let raw = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let lines: Vec<&str> = raw.lines().collect();
    assert_eq!(lines.len(), 64);
    assert_eq!(lines.iter().collect::<HashSet<_>>().len(), 64);
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_resumes_without_duplicates_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock();
    let cfg = config(dir.path(), &mock.addr, "", "");
    for round in 0..3 {
        let mut proxy = start_proxy(&cfg);
        for i in 0..10 {
            let body = format!(
                r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"r{round} c{i}"}}]}}"#
            );
            assert_eq!(chat(&proxy.addr, ACME_KEY, &body, &[]).await.status, 200);
        }
        if round == 1 {
            proxy.proc.kill9();
        } else {
            wait_events(dir.path(), "round's events", |ev| {
                ev.len() >= (round + 1) * 10
            })
            .await;
            drop(proxy);
        }
    }
    let proxy = start_proxy(&cfg);
    let ev = wait_events(dir.path(), "30 events", |ev| ev.len() >= 30).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ev2 = events(dir.path());
    assert_eq!(ev2.len(), 30, "{ev:#?}");
    let ids: HashSet<_> = ev2
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 30);
    drop(proxy);
}
