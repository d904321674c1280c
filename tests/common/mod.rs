//! Black-box harness: starts the real `tollgate` binary (mock and proxy) on
//! ephemeral ports, talks to it over HTTP, reads the events it wrote.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const UPSTREAM_KEY: &str = "sk-upstream-blackbox-KEY";
pub const ACME_KEY: &str = "tk-acme-blackbox-SECRET";
pub const GLOBEX_KEY: &str = "tk-globex-blackbox-SECRET";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

/// A child process that is killed when dropped, with its stdout lines.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Proc::start(cmd)
    }

    /// Starts `cmd` (the binary, or a shell that `exec`s it) with its output
    /// collected.
    pub fn start(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info");
        let mut child = cmd.spawn().expect("start tollgate");
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Proc {
            child,
            lines: rx,
            log,
        }
    }

    /// Waits (bounded) for a JSON log line with `message == msg`.
    pub fn wait_for(&self, msg: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {msg:?} line; log: {:?}", self.log.lock().unwrap()));
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == msg {
                    return v;
                }
            }
        }
    }

    /// Sends `sig` (as `kill` takes it: `-TERM`, `-HUP`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

pub struct Mock {
    pub proc: Proc,
    pub addr: String,
}

pub fn start_mock() -> Mock {
    let proc = Proc::spawn(
        &["mock", "--listen", "127.0.0.1:0"],
        &[("TOLLGATE_MOCK_EXPECT_KEY", UPSTREAM_KEY)],
    );
    let addr = proc.wait_for("mock listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    Mock { proc, addr }
}

pub fn sha(key: &str) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    )
}

/// The standard black-box config; `extra` is appended (more tables).
pub fn config(dir: &Path, mock: &str, server_extra: &str, extra: &str) -> PathBuf {
    let data = dir.join("data");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "{data}"
source = "tollgate/test"
{server_extra}

[spool]
fsync = "never"

[[upstreams]]
name = "openai"
prefix = "/openai"
url = "http://{mock}"
provider = "openai"
api_key_env = "TEST_UPSTREAM_KEY"

[[upstreams]]
name = "anthropic"
prefix = "/anthropic"
url = "http://{mock}"
provider = "anthropic"
api_key_env = "TEST_UPSTREAM_KEY"

[models."gpt-4o-mini"]
input = "0.15"
cache_read_input = "0.075"
output = "0.60"
max_output_tokens = 16384

[models."claude-sonnet-4-5"]
input = "3"
cache_read_input = "0.30"
cache_write_input = "3.75"
cache_write_1h_input = "6"
output = "15"

[[tenants]]
id = "acme"
keys = ["{acme}"]

[[tenants]]
id = "globex"
keys = ["{globex}"]

[[sinks]]
type = "file"
path = "{events}"
{extra}
"#,
        data = data.display(),
        events = dir.join("events.jsonl").display(),
        acme = sha(ACME_KEY),
        globex = sha(GLOBEX_KEY),
    );
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub struct Proxy {
    pub proc: Proc,
    pub addr: String,
    pub admin: String,
}

pub fn start_proxy(config: &Path) -> Proxy {
    start_proxy_env(config, &[("TEST_UPSTREAM_KEY", UPSTREAM_KEY)])
}

pub fn start_proxy_env(config: &Path, envs: &[(&str, &str)]) -> Proxy {
    let proc = Proc::spawn(&["run", "--config", config.to_str().unwrap()], envs);
    let v = proc.wait_for("listening");
    Proxy {
        addr: v["proxy"].as_str().unwrap().to_string(),
        admin: v["admin"].as_str().unwrap().to_string(),
        proc,
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// The body broke off with an error (after `body` bytes).
    pub body_error: bool,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One request, bounded in time; reads the whole body.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let fut = async {
        let resp = client().request(req).await.expect("request");
        let (parts, mut body) = resp.into_parts();
        let mut buf = Vec::new();
        let mut body_error = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
                Err(_) => {
                    body_error = true;
                    break;
                }
            }
        }
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: Bytes::from(buf),
            body_error,
        }
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("request timed out")
}

pub async fn chat(proxy: &str, key: &str, body: &str, extra: &[(&str, &str)]) -> Resp {
    let auth = format!("Bearer {key}");
    let mut h = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    h.extend_from_slice(extra);
    send(
        "POST",
        &format!("http://{proxy}/openai/v1/chat/completions"),
        &h,
        body.to_string(),
    )
    .await
}

/// GETs `url` until it answers `status`; fails the test after `within`.
pub async fn wait_status(url: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = send("GET", url, &[], Bytes::new()).await.status;
        if got == status {
            return;
        }
        assert!(Instant::now() < deadline, "{url} still {got}, not {status}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The admin listener's `/metrics` text.
pub async fn metrics_text(admin: &str) -> String {
    let r = send("GET", &format!("http://{admin}/metrics"), &[], Bytes::new()).await;
    assert_eq!(r.status, 200);
    r.text()
}

/// The value of one series (`name{labels}` exactly as exposed).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Events in the JSONL file: complete lines only (the sink may be writing).
pub fn events(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("events.jsonl")).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Waits (bounded) until `pred` holds for the event file.
pub async fn wait_events(
    dir: &Path,
    what: &str,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ev = events(dir);
        if pred(&ev) {
            return ev;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; have {} events: {ev:#?}",
                ev.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the event of the call with `request_id`.
pub async fn event_for(dir: &Path, request_id: &str) -> serde_json::Value {
    let ev = wait_events(dir, request_id, |ev| {
        ev.iter().any(|e| e["data"]["request_id"] == request_id)
    })
    .await;
    ev.into_iter()
        .find(|e| e["data"]["request_id"] == request_id)
        .unwrap()
}

pub fn request_id(r: &Resp) -> String {
    r.headers
        .get("x-request-id")
        .or_else(|| r.headers.get("request-id"))
        .expect("request id header")
        .to_str()
        .unwrap()
        .to_string()
}

/// The mock's request log.
pub async fn mock_log(mock: &str) -> Vec<serde_json::Value> {
    let r = send(
        "GET",
        &format!("http://{mock}/__mock/requests"),
        &[],
        Bytes::new(),
    )
    .await;
    serde_json::from_slice(&r.body).unwrap()
}
