//! Configuration: the TOML file (DESIGN §3) is parsed into [`raw`] structs,
//! validated without I/O into a typed [`Policy`], and shared through
//! `arc-swap` so a reload swaps the whole policy at once.
//!
//! Every error names the key and the line: `file:line: key: reason`
//! (see [`ConfigError`] for the errors that have no key or line).

mod locate;
pub mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;

pub use validate::hash_key;

/// A config error that points at the offending key: `file:line: key: reason`.
/// A syntax error has no key (`file:line: reason`), and a file that cannot
/// be read no line either (`file: reason`).
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the error is not at a line.
    pub line: usize,
    /// Empty when the error is not about one key.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Loads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Policy, ConfigError> {
    read(path)?.parse()
}

/// The bytes of a config file as read once: what was parsed and what a
/// watcher compares against are the same read, so a change landing between
/// start-up and the first look cannot go unnoticed.
pub struct Source {
    pub file: String,
    pub text: String,
    pub sha256: [u8; 32],
}

impl Source {
    /// Parses with the process environment resolving `*_env` secrets.
    pub fn parse(&self) -> Result<Policy, ConfigError> {
        parse(&self.text, &self.file, &|name| std::env::var(name).ok())
    }
}

/// Reads a config file (following symlinks, as a ConfigMap mount needs).
pub fn read(path: &Path) -> Result<Source, ConfigError> {
    use sha2::{Digest, Sha256};
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        key: String::new(),
        reason: format!("cannot read: {e}"),
    })?;
    let sha256 = Sha256::digest(text.as_bytes()).into();
    Ok(Source { file, text, sha256 })
}

/// Parses and validates config text. `env` resolves `*_env` secrets, so tests
/// and `check` can run without touching the process environment.
pub fn parse(
    src: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Policy, ConfigError> {
    let err = |key: String, span: Option<std::ops::Range<usize>>, reason: String| ConfigError {
        file: file.to_string(),
        line: span.map(|s| locate::line_of(src, s.start)).unwrap_or(0),
        key,
        reason,
    };
    let doc = toml::de::DeTable::parse(src)
        .map_err(|e| err(String::new(), e.span(), e.message().to_string()))?;
    let de = toml::de::Deserializer::from(doc.clone());
    let raw: raw::RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let span = e.inner().span().or_else(|| locate::span_of(&doc, &key));
        err(key, span, without_strings(e.inner().message()))
    })?;
    validate::validate(raw, env).map_err(|(key, reason)| {
        let span = locate::span_of(&doc, &key);
        err(key, span, reason)
    })
}

/// A deserializer's message without the string values it quotes
/// (`invalid type: string "sk-…", expected u64` becomes `invalid type: a
/// string, expected u64`): a value in the wrong place may be a secret, and a
/// reload logs the error.
fn without_strings(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i]);
        out.push_str("a string");
        // Past the closing quote (the value is Debug-escaped: `\"` inside).
        let body = &rest[i + "string \"".len()..];
        let mut escaped = false;
        let end = body.char_indices().find_map(|(j, c)| {
            let close = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            close.then_some(j + 1)
        });
        rest = end.map_or("", |j| &body[j..]);
    }
    out.push_str(rest);
    out
}

/// A secret string whose `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The validated, typed configuration the proxy runs on.
#[derive(Debug)]
pub struct Policy {
    pub server: Server,
    pub spool: SpoolPolicy,
    pub tenancy: Tenancy,
    pub upstreams: Vec<Arc<Upstream>>,
    pub models: crate::FastMap<String, ModelPrice>,
    pub price_version: String,
    pub unknown_model: UnknownModel,
    pub url_item_tokens: u64,
    /// Input tokens a reservation allows for context the provider adds from
    /// its own store (`previous_response_id`, `conversation`, a stored prompt).
    pub stored_context_tokens: u64,
    pub tenants: crate::FastMap<String, Arc<Tenant>>,
    /// sha256 digest (raw bytes) of a tenant key -> tenant id.
    pub keys: crate::FastMap<[u8; 32], String>,
    pub sinks: Vec<SinkConfig>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_request_bytes: u64,
    pub data_dir: PathBuf,
    pub source: String,
    pub admin_token: Option<Secret>,
    pub shutdown_grace: Duration,
    /// A request body must arrive within this, from the end of its head.
    pub request_body_timeout: Duration,
    /// Open proxy connections at most; past it, new ones wait in the
    /// listen backlog.
    pub max_connections: usize,
    /// A connection's first bytes (its protocol), and each HTTP/1 request
    /// head, must arrive within this; otherwise the connection is closed.
    pub header_read_timeout: Duration,
    /// A write to a client that stays blocked this long (the client reads
    /// nothing) closes the connection.
    pub write_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    Reject,
    DropOldest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Always,
    Interval(Duration),
    Never,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpoolPolicy {
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub fsync: Fsync,
    pub segment_bytes: u64,
}

#[derive(Debug, Clone)]
pub enum Tenancy {
    Key,
    Header(http::HeaderName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Anthropic,
    Generic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Generic => "generic",
        }
    }
}

/// The highest price accepted (per million tokens, or per call): a dollar a
/// token. With it the cost of even `u64::MAX` tokens of every kind fits a
/// `Decimal` (about 7.9e28) with room to spare.
pub const MAX_PRICE: rust_decimal::Decimal =
    rust_decimal::Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// The largest budget limit or credit accepted: 10^15 (a quadrillion).
pub const MAX_MONEY: rust_decimal::Decimal =
    rust_decimal::Decimal::from_parts(0xA4C6_8000, 0x0003_8D7E, 0, false, 0);

/// The shortest upstream key (and start of one) searched for in responses:
/// shorter ones are too likely to match by chance.
pub const MIN_SEARCHED_KEY: usize = 8;

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// Path prefix without a trailing slash, e.g. `/openai`.
    pub prefix: String,
    pub url: http::Uri,
    pub provider: Provider,
    /// Header to inject and its value (already formatted, e.g. `Bearer sk-…`).
    /// The upstream key's header, made once at load (marked sensitive).
    pub credential: Option<(http::HeaderName, http::HeaderValue)>,
    /// `unmetered_routes = "refuse"`: calls the meter does not read (operation
    /// `other`: file, batch, image, stored-completion routes...) get 403
    /// instead of going out with the shared key.
    pub refuse_unmetered: bool,
    /// Finds the upstream key in response headers, trailers and bodies (see
    /// `proxy::headers::client_response_head`, `proxy::mask`); `None`
    /// without a key, or for one under [`MIN_SEARCHED_KEY`] bytes.
    pub key_finder: Option<memchr::memmem::Finder<'static>>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub price_per_call: Decimal,
}

#[cfg(test)]
impl Upstream {
    /// An OpenAI upstream whose injected key is `key` (`Bearer`), searched
    /// for in responses.
    pub fn with_key(key: &str) -> Upstream {
        let bearer = http::HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
        Upstream {
            name: "openai".into(),
            prefix: "/openai".into(),
            url: "http://127.0.0.1:9".parse().unwrap(),
            provider: Provider::OpenAi,
            credential: Some((http::header::AUTHORIZATION, bearer)),
            refuse_unmetered: false,
            key_finder: Some(memchr::memmem::Finder::new(key).into_owned()),
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            price_per_call: Decimal::ZERO,
        }
    }
}

/// USD per million tokens.
#[derive(Debug, Clone)]
pub struct ModelPrice {
    pub input: Decimal,
    pub cache_read_input: Decimal,
    pub cache_write_input: Decimal,
    /// Cache writes kept an hour (Anthropic's `ttl: "1h"`); defaults to
    /// `cache_write_input`.
    pub cache_write_1h_input: Decimal,
    pub output: Decimal,
    pub max_output_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownModel {
    Allow,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Day,
    Month,
    Total,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Month => "month",
            Window::Total => "total",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Budget {
    pub limit: Decimal,
    pub window: Window,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

#[derive(Debug)]
pub struct Tenant {
    pub id: String,
    pub budget: Option<Budget>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFormat {
    /// `application/cloudevents-batch+json` (OpenMeter's ingest).
    CloudEvents,
    /// A plain JSON array of the same events.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// How a sink groups events into one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

/// Compared by value on reload (secrets included: `Debug` hides them).
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    File {
        path: PathBuf,
    },
    Http {
        url: http::Uri,
        format: HttpFormat,
        headers: Vec<(http::HeaderName, Secret)>,
        gzip: bool,
        timeout: Duration,
    },
    Otlp {
        endpoint: http::Uri,
        protocol: OtlpProtocol,
        headers: Vec<(http::HeaderName, Secret)>,
        timeout: Duration,
        tenant_attributes: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// Unique name; names the sink's cursor in the spool.
    pub name: String,
    pub kind: SinkKind,
    pub batch: BatchPolicy,
}

impl Policy {
    /// The upstream whose prefix matches `path` at a segment boundary, and the
    /// rest of the path (always starting with `/`).
    pub fn route<'p>(&self, path: &'p str) -> Option<(&Arc<Upstream>, &'p str)> {
        self.upstreams.iter().find_map(|u| {
            let rest = path.strip_prefix(u.prefix.as_str())?;
            if rest.is_empty() {
                Some((u, "/"))
            } else if rest.starts_with('/') {
                Some((u, rest))
            } else {
                None
            }
        })
    }

    /// Price for a model: the exact request model, else the exact response
    /// model, else a dated snapshot of a configured name, the response
    /// model's, then the request model's. Only a date may follow the name
    /// (`gpt-4o-mini-2024-07-18`, `claude-sonnet-4-5-20250929`,
    /// `gpt-4-0613`): `o1-pro` is not priced as `o1`.
    pub fn price(&self, request_model: &str, response_model: &str) -> Option<&ModelPrice> {
        self.models
            .get(request_model)
            .or_else(|| self.models.get(response_model))
            .or_else(|| self.models.get(undated(response_model)?))
            .or_else(|| self.models.get(undated(request_model)?))
    }
}

/// The name before a snapshot date (`-YYYY-MM-DD`, `-YYYYMMDD` or `-MMDD`,
/// with a real month and day) or the `-latest` alias.
fn undated(model: &str) -> Option<&str> {
    if let Some(base) = model.strip_suffix("-latest") {
        return Some(base).filter(|b| !b.is_empty());
    }
    let b = model.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let n = b.len();
    let cut = if n > 11
        && b[n - 11] == b'-'
        && b[n - 6] == b'-'
        && b[n - 3] == b'-'
        && digits(n - 10..n - 6)
        && digits(n - 5..n - 3)
        && digits(n - 2..n)
    {
        let two = |i: usize| (b[i] - b'0') * 10 + (b[i + 1] - b'0');
        if !(1..=12).contains(&two(n - 5)) || !(1..=31).contains(&two(n - 2)) {
            return None;
        }
        n - 11
    } else {
        // `-YYYYMMDD` or `-MMDD`, with a real month and day.
        let (base, date) = model.rsplit_once('-')?;
        let d = date.as_bytes();
        if !matches!(d.len(), 4 | 8) || !d.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let two = |i: usize| (d[i] - b'0') * 10 + (d[i + 1] - b'0');
        let (month, day) = (two(d.len() - 4), two(d.len() - 2));
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return None;
        }
        base.len()
    };
    // The byte at `cut` is an ASCII '-', so `cut` is a char boundary.
    Some(&model[..cut]).filter(|base| !base.is_empty())
}

#[cfg(test)]
mod tests;
