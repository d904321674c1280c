//! `tollgate demo`: the in-process mock upstream, the proxy on the embedded
//! demo config, and sample traffic from several tenants, then a usage table.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo config is invalid: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Run(#[from] crate::RunError),
    #[error("demo request failed: {0}")]
    Request(String),
}

struct Traffic {
    tenant_key: &'static str,
    path: &'static str,
    body: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

const TRAFFIC: &[Traffic] = &[
    Traffic {
        tenant_key: "demo-key-acme",
        path: "/openai/v1/chat/completions",
        body: r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Summarise the ticket."}]}"#,
        headers: &[
            ("x-mock-output-tokens", "40"),
            ("x-mock-cached-tokens", "3"),
        ],
    },
    Traffic {
        tenant_key: "demo-key-acme",
        path: "/openai/v1/chat/completions",
        body: r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Draft a reply."}]}"#,
        headers: &[("x-mock-output-tokens", "25")],
    },
    Traffic {
        tenant_key: "demo-key-globex",
        path: "/anthropic/v1/messages",
        body: r#"{"model":"claude-sonnet-4-5","max_tokens":512,"messages":[{"role":"user","content":"Plan the migration."}]}"#,
        headers: &[
            ("x-mock-output-tokens", "120"),
            ("x-mock-cache-write-tokens", "200"),
        ],
    },
    Traffic {
        tenant_key: "demo-key-globex",
        path: "/anthropic/v1/messages",
        body: r#"{"model":"claude-sonnet-4-5","max_tokens":512,"stream":true,"messages":[{"role":"user","content":"Continue."}]}"#,
        headers: &[
            ("x-mock-output-tokens", "60"),
            ("x-mock-cached-tokens", "200"),
        ],
    },
    Traffic {
        tenant_key: "demo-key-acme",
        path: "/openai/v1/chat/completions",
        body: r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Write a long essay."}]}"#,
        headers: &[("x-mock-output-tokens", "30"), ("x-mock-fail-after", "12")],
    },
    // initech runs on a small prepaid balance: three calls fit, then 402.
    INITECH,
    INITECH,
    INITECH,
    INITECH,
    INITECH,
    Traffic {
        tenant_key: "not-a-tenant",
        path: "/openai/v1/chat/completions",
        body: r#"{"model":"gpt-4o-mini","messages":[]}"#,
        headers: &[],
    },
];

const INITECH: Traffic = Traffic {
    tenant_key: "demo-key-initech",
    path: "/openai/v1/chat/completions",
    body: r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"Classify this."}]}"#,
    headers: &[("x-mock-output-tokens", "40")],
};

pub async fn run() -> Result<(), DemoError> {
    // A new directory each run (kept: the output points at its events). A
    // name from the PID alone came back in containers, where the demo is
    // PID 1, and the next run inherited the last one's spend.
    let data = tempfile::Builder::new()
        .prefix("tollgate-demo-")
        .tempdir()?
        .keep();
    let mock = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock_addr = mock.local_addr()?;
    let (stop_mock, mock_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(crate::mock::serve(mock, async {
        let _ = mock_stopped.await;
    }));

    let src = DEMO_CONFIG
        .replace("{MOCK}", &mock_addr.to_string())
        .replace("{DATA}", &data.display().to_string());
    let policy = crate::config::parse(&src, "config/demo.toml", &|_| None)?;
    let running = crate::start(policy).await?;
    println!(
        "tollgate demo: mock upstream on {mock_addr}, proxy on {}, admin on {}",
        running.proxy_addr, running.admin_addr
    );

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    println!("\n{:<10} {:<34} {:>6}", "tenant", "route", "status");
    for t in TRAFFIC {
        let mut req = http::Request::post(format!("http://{}{}", running.proxy_addr, t.path))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", t.tenant_key));
        for (k, v) in t.headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from_static(t.body.as_bytes())))
            .map_err(|e| DemoError::Request(e.to_string()))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| DemoError::Request(e.to_string()))?;
        let status = resp.status();
        // Read the body; a stream cut short by the upstream ends in an error.
        let _ = resp.into_body().collect().await;
        let tenant = t.tenant_key.trim_start_matches("demo-key-");
        println!("{tenant:<10} {:<34} {:>6}", t.path, status.as_u16());
    }

    let policy = running.app.policy.load_full();
    println!(
        "\n{:<10} {:>8} {:>12} {:>12} {:>12}",
        "tenant", "window", "limit", "spent", "remaining"
    );
    let now = time::OffsetDateTime::now_utc();
    let mut ids: Vec<_> = policy.tenants.keys().cloned().collect();
    ids.sort();
    for id in ids {
        let v = crate::admin::api::tenant_json(&running.app, &policy.tenants[&id], now);
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        println!(
            "{id:<10} {:>8} {:>12} {:>12} {:>12}",
            s("window"),
            s("limit"),
            s("spent"),
            s("remaining")
        );
    }

    running.shutdown().await;
    let _ = stop_mock.send(());
    let events = data.join("events.jsonl");
    // The file sink flushed on shutdown; give the filesystem a moment.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let f = std::fs::File::open(&events)?;
    let (totals, _) = crate::report::totals(std::io::BufReader::new(f))?;
    println!(
        "\nUsage by tenant and model (tollgate report --events {}):\n",
        events.display()
    );
    print!("{}", crate::report::render(&totals));
    println!("\nEvents (CloudEvents JSONL): {}", events.display());
    println!("Spool: {}", data.join("spool").display());
    Ok(())
}
