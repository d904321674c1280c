//! The CLI commands of DESIGN §2 other than `run` and `mock`.

mod common;
use common::*;

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn check_accepts_good_config_and_names_key_and_line_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "127.0.0.1:9", "", "");
    let ok = Command::new(bin())
        .args(["check", "--config", cfg.to_str().unwrap()])
        .env("TEST_UPSTREAM_KEY", "x")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let text = std::fs::read_to_string(&cfg).unwrap();
    let bad = text.replace("output = \"0.60\"", "output = \"0.60\"\nouptut = \"1\"");
    std::fs::write(&cfg, &bad).unwrap();
    let line = bad.lines().position(|l| l.starts_with("ouptut")).unwrap() + 1;
    let out = Command::new(bin())
        .args(["check", "--config", cfg.to_str().unwrap()])
        .env("TEST_UPSTREAM_KEY", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("tollgate.toml:{line}: models.gpt-4o-mini.ouptut")),
        "{err}"
    );

    // A missing secret names its key too.
    std::fs::write(&cfg, &text).unwrap();
    let out = Command::new(bin())
        .args(["check", "--config", cfg.to_str().unwrap()])
        .env_remove("TEST_UPSTREAM_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstreams[0].api_key_env") && err.contains("TEST_UPSTREAM_KEY"),
        "{err}"
    );
}

#[test]
fn hash_key_matches_what_config_expects() {
    let mut child = Command::new(bin())
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"tk-acme-1\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        sha("tk-acme-1")
    );
}

#[test]
fn report_totals_per_tenant_and_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let ev = |tenant: &str, model: &str, input: u64, output: u64, cost: &str| {
        serde_json::json!({"specversion":"1.0","id":"01J","source":"s","type":"llm.call","subject":tenant,
          "time":"2026-11-23T20:00:00.000Z","datacontenttype":"application/json",
          "data":{"schema_version":"1","tenant":tenant,"upstream":"openai","provider":"openai","operation":"chat",
            "request_model":model,"response_model":model,"request_id":null,"http_status":200,"stream":false,
            "outcome":"ok","usage_source":"provider","input_tokens":input,"cache_read_input_tokens":0,
            "cache_write_input_tokens":0,"output_tokens":output,"reasoning_output_tokens":0,"calls":1,
            "cost":cost,"currency":"USD","price_version":"v","unpriced":false,"duration_ms":1,"ttft_ms":null}})
        .to_string()
    };
    let lines = [
        ev("acme", "gpt-4o-mini", 10, 5, "0.0000045"),
        ev("acme", "gpt-4o-mini", 20, 5, "0.000006"),
        ev("globex", "claude-sonnet-4-5", 100, 10, "0.00045"),
    ];
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = Command::new(bin())
        .args(["report", "--events", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let row = |tenant: &str| {
        text.lines()
            .find(|l| l.starts_with(tenant))
            .unwrap()
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("acme"),
        ["acme", "gpt-4o-mini", "2", "0", "30", "10", "0.0000105"]
    );
    assert_eq!(
        row("globex"),
        [
            "globex",
            "claude-sonnet-4-5",
            "1",
            "0",
            "100",
            "10",
            "0.00045"
        ]
    );
    assert_eq!(row("TOTAL"), ["TOTAL", "3", "0", "130", "20", "0.0004605"]);
}

#[test]
fn demo_runs_and_prints_a_usage_table() {
    // Twice, in one temp dir: each run starts from nothing (same tables)
    // and keeps its events in a directory of its own.
    let tmp = tempfile::tempdir().unwrap();
    let demo = || {
        let out = Command::new(bin())
            .arg("demo")
            .env("TMPDIR", tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (first, second) = (demo(), demo());
    let tables = |t: &str| {
        t.lines()
            .filter(|l| !l.contains(tmp.path().to_str().unwrap()) && !l.contains("127.0.0.1"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(tables(&first), tables(&second));
    let text = first;
    assert!(
        text.contains("acme") && text.contains("globex") && text.contains("TOTAL"),
        "{text}"
    );
    let events_of = |t: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix("Events (CloudEvents JSONL): "))
            .unwrap()
            .trim()
            .to_string()
    };
    let events = events_of(&text);
    assert_ne!(events, events_of(&second));
    assert!(events.starts_with(tmp.path().to_str().unwrap()), "{events}");
    let n = std::fs::read_to_string(events).unwrap().lines().count();
    assert!(n >= 5, "{n}");
}

/// The binary's jemalloc carries the options `.cargo/config.toml` compiles
/// in (a thread-cache collection every 1 MiB allocated, not every 64 KiB:
/// see docs/PERFORMANCE.md). jemalloc prints its options at exit when asked.
#[cfg(feature = "jemalloc")]
#[test]
fn jemalloc_is_built_with_the_projects_options() {
    let out = Command::new(bin())
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    for option in [
        "opt.tcache_gc_incr_bytes: 1048576",
        "opt.narenas: 2",
        "opt.dirty_decay_ms: 1000 (arenas.dirty_decay_ms: 1000)",
        "opt.muzzy_decay_ms: 0 (arenas.muzzy_decay_ms: 0)",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == option),
            "jemalloc options lack {option:?}: {}",
            text.lines()
                .filter(|l| l.contains("opt.") || l.contains("malloc_conf"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
