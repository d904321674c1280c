//! Pure validation: raw structs in, a typed [`Policy`] out. No I/O besides
//! reading the environment through the `env` callback for `*_env` secrets.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::raw::{RawConfig, RawSink, RawUpstream};
use super::*;

/// An error: the key path and the reason.
type Invalid = (String, String);

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Invalid {
    (key.into(), reason.into())
}

/// The value of the environment variable a `*_env` key names. The usual
/// mistake is the secret itself pasted in, and the error must not show it
/// (`tollgate check` prints it; a reload logs it): the name is shown only
/// when it looks like a conventional one (upper case, digits, `_`), which a
/// pasted key almost never does.
fn from_env(key: &str, var: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, Invalid> {
    let conventional = !var.is_empty()
        && !var.starts_with(|c: char| c.is_ascii_digit())
        && var
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
        let reason = if conventional {
            format!("environment variable {var} is not set")
        } else {
            "the environment variable named here is not set (its name is not shown: \
             if it is the secret itself, put that in the environment and name the variable here)"
                .to_string()
        };
        invalid(key, reason)
    })
}

/// `sha256:<hex>` of a tenant key, as `tollgate hash-key` prints it.
pub fn hash_key(key: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(key.trim().as_bytes()))
    )
}

fn duration(key: &str, s: &str) -> Result<Duration, Invalid> {
    humantime::parse_duration(s).map_err(|e| invalid(key, format!("invalid duration {s:?}: {e}")))
}

fn positive_duration(key: &str, s: &str) -> Result<Duration, Invalid> {
    match duration(key, s)? {
        d if d.is_zero() => Err(invalid(key, "must be greater than 0")),
        d => Ok(d),
    }
}

fn at_most(key: &str, d: Duration, max: Duration) -> Result<Duration, Invalid> {
    if d > max {
        return Err(invalid(
            key,
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(d)
}

/// The longest timeout, grace or wait accepted elsewhere: a deadline is the
/// clock plus it, which must not overflow.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// A timeout: more than 0 (a zero deadline fails every call or delivery at
/// once) and at most [`MAX_WAIT`].
fn timeout(key: &str, s: &str) -> Result<Duration, Invalid> {
    positive_duration(key, s).and_then(|d| at_most(key, d, MAX_WAIT))
}

/// A wait that may be 0, at most [`MAX_WAIT`].
fn wait(key: &str, s: &str) -> Result<Duration, Invalid> {
    duration(key, s).and_then(|d| at_most(key, d, MAX_WAIT))
}

/// The largest `server.max_connections`.
const MAX_CONNECTIONS: usize = 1_000_000;

/// The longest `server.header_read_timeout` (hyper adds it to the clock
/// unchecked: a huge value would panic every HTTP/1 connection) and
/// `server.write_timeout`.
const MAX_CONN_TIMEOUT: Duration = Duration::from_secs(3600);

/// The smallest spool (and segment): a few events.
const MIN_SPOOL_BYTES: u64 = 4096;

fn addr(key: &str, s: &str) -> Result<SocketAddr, Invalid> {
    s.parse()
        .map_err(|_| invalid(key, format!("invalid socket address {s:?} (want ip:port)")))
}

pub fn validate(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Policy, Invalid> {
    let s = &raw.server;
    let admin_token = match &s.admin_token_env {
        Some(var) => Some(Secret(from_env("server.admin_token_env", var, env)?)),
        None => None,
    };
    if s.max_request_bytes == 0 {
        return Err(invalid(
            "server.max_request_bytes",
            "must be greater than 0",
        ));
    }
    if !(1..=MAX_CONNECTIONS).contains(&s.max_connections) {
        return Err(invalid(
            "server.max_connections",
            format!("must be between 1 and {MAX_CONNECTIONS}"),
        ));
    }
    if s.source.is_empty() {
        return Err(invalid("server.source", "must not be empty"));
    }
    let listen = addr("server.listen", &s.listen)?;
    let admin_listen = addr("server.admin_listen", &s.admin_listen)?;
    // One port on two addresses collides too when either is 0.0.0.0 or ::.
    let overlap = listen.ip() == admin_listen.ip()
        || listen.ip().is_unspecified()
        || admin_listen.ip().is_unspecified();
    if overlap && listen.port() == admin_listen.port() && listen.port() != 0 {
        return Err(invalid(
            "server.admin_listen",
            format!("{admin_listen} is also server.listen: give the admin API its own port"),
        ));
    }
    let server = Server {
        listen,
        admin_listen,
        max_request_bytes: s.max_request_bytes,
        data_dir: PathBuf::from(&s.data_dir),
        source: s.source.clone(),
        admin_token,
        shutdown_grace: wait("server.shutdown_grace", &s.shutdown_grace)?,
        request_body_timeout: timeout("server.request_body_timeout", &s.request_body_timeout)?,
        max_connections: s.max_connections,
        header_read_timeout: positive_duration(
            "server.header_read_timeout",
            &s.header_read_timeout,
        )
        .and_then(|d| at_most("server.header_read_timeout", d, MAX_CONN_TIMEOUT))?,
        write_timeout: positive_duration("server.write_timeout", &s.write_timeout)
            .and_then(|d| at_most("server.write_timeout", d, MAX_CONN_TIMEOUT))?,
    };

    let sp = &raw.spool;
    if sp.max_bytes < MIN_SPOOL_BYTES {
        return Err(invalid(
            "spool.max_bytes",
            format!("must be at least {MIN_SPOOL_BYTES} (below it no event fits and every call is refused)"),
        ));
    }
    let spool = SpoolPolicy {
        max_bytes: sp.max_bytes,
        when_full: match sp.when_full.as_str() {
            "reject" => WhenFull::Reject,
            "drop_oldest" => WhenFull::DropOldest,
            other => {
                return Err(invalid(
                    "spool.when_full",
                    format!("{other:?}: expected \"reject\" or \"drop_oldest\""),
                ))
            }
        },
        fsync: match sp.fsync.as_str() {
            "always" => Fsync::Always,
            "never" => Fsync::Never,
            "interval" => Fsync::Interval(wait("spool.fsync_interval", &sp.fsync_interval)?),
            other => {
                return Err(invalid(
                    "spool.fsync",
                    format!("{other:?}: expected \"interval\", \"always\" or \"never\""),
                ))
            }
        },
        segment_bytes: sp.segment_bytes.clamp(MIN_SPOOL_BYTES, sp.max_bytes),
    };

    let tenancy = match raw.tenancy.mode.as_str() {
        "key" => Tenancy::Key,
        "header" => Tenancy::Header(
            http::HeaderName::from_bytes(raw.tenancy.header.to_ascii_lowercase().as_bytes())
                .map_err(|_| invalid("tenancy.header", "not a valid header name"))?,
        ),
        other => {
            return Err(invalid(
                "tenancy.mode",
                format!("{other:?}: expected \"key\" or \"header\""),
            ))
        }
    };

    let mut upstreams = Vec::new();
    let mut names = HashSet::new();
    for (i, u) in raw.upstreams.iter().enumerate() {
        let up = upstream(&format!("upstreams[{i}]"), u, env)?;
        if !names.insert(up.name.clone()) {
            return Err(invalid(
                format!("upstreams[{i}].name"),
                "duplicate upstream name",
            ));
        }
        if upstreams
            .iter()
            .any(|o: &Arc<Upstream>| o.prefix == up.prefix)
        {
            return Err(invalid(
                format!("upstreams[{i}].prefix"),
                "duplicate prefix",
            ));
        }
        upstreams.push(Arc::new(up));
    }
    // Longest prefix first, so `/openai/v2` wins over `/openai`.
    upstreams.sort_by_key(|u| std::cmp::Reverse(u.prefix.len()));

    let mut models = crate::FastMap::default();
    for (name, m) in &raw.models {
        let key = format!("models.{name}");
        let prices = [
            ("input", Some(m.input)),
            ("output", Some(m.output)),
            ("cache_read_input", m.cache_read_input),
            ("cache_write_input", m.cache_write_input),
            ("cache_write_1h_input", m.cache_write_1h_input),
        ];
        for (field, v) in prices {
            if let Some(v) = v {
                money(format!("{key}.{field}"), v, super::MAX_PRICE)?;
            }
        }
        models.insert(
            name.clone(),
            ModelPrice {
                input: m.input,
                cache_read_input: m.cache_read_input.unwrap_or(m.input),
                cache_write_input: m.cache_write_input.unwrap_or(m.input),
                cache_write_1h_input: m
                    .cache_write_1h_input
                    .or(m.cache_write_input)
                    .unwrap_or(m.input),
                output: m.output,
                max_output_tokens: m.max_output_tokens,
            },
        );
    }

    let unknown_model = match raw.pricing.unknown_model.as_str() {
        "allow" => UnknownModel::Allow,
        "reject" => UnknownModel::Reject,
        other => {
            return Err(invalid(
                "pricing.unknown_model",
                format!("{other:?}: expected \"allow\" or \"reject\""),
            ))
        }
    };
    let price_version = raw
        .pricing
        .version
        .clone()
        .unwrap_or_else(|| price_digest(&raw));

    let mut tenants = crate::FastMap::default();
    let mut keys = crate::FastMap::default();
    for (i, t) in raw.tenants.iter().enumerate() {
        let key = format!("tenants[{i}]");
        if t.id.is_empty() {
            return Err(invalid(format!("{key}.id"), "must not be empty"));
        }
        for (j, k) in t.keys.iter().enumerate() {
            let digest = k
                .strip_prefix("sha256:")
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    invalid(
                        format!("{key}.keys[{j}]"),
                        "expected \"sha256:<64 hex digits>\" (see `tollgate hash-key`)",
                    )
                })?;
            if let Some(other) = keys.insert(digest, t.id.clone()) {
                return Err(invalid(
                    format!("{key}.keys[{j}]"),
                    format!("key already belongs to tenant {other:?}"),
                ));
            }
        }
        let budget = match &t.budget {
            Some(b) => Some(Budget {
                limit: money(format!("{key}.budget.limit"), b.limit, super::MAX_MONEY)?,
                window: match b.window.as_str() {
                    "day" => Window::Day,
                    "month" => Window::Month,
                    "total" => Window::Total,
                    other => {
                        return Err(invalid(
                            format!("{key}.budget.window"),
                            format!("{other:?}: expected \"day\", \"month\" or \"total\""),
                        ))
                    }
                },
            }),
            None => None,
        };
        let rate_limit = t.rate_limit.as_ref().map(|r| RateLimit {
            requests_per_minute: r.requests_per_minute,
            tokens_per_minute: r.tokens_per_minute,
        });
        if let Some(
            RateLimit {
                requests_per_minute: Some(0),
                ..
            }
            | RateLimit {
                tokens_per_minute: Some(0),
                ..
            },
        ) = rate_limit
        {
            return Err(invalid(
                format!("{key}.rate_limit"),
                "limits must be at least 1",
            ));
        }
        let tenant = Tenant {
            id: t.id.clone(),
            budget,
            rate_limit,
        };
        if tenants.insert(t.id.clone(), Arc::new(tenant)).is_some() {
            return Err(invalid(format!("{key}.id"), "duplicate tenant id"));
        }
    }

    let mut sinks = Vec::new();
    let mut sink_names = HashSet::new();
    for (i, s) in raw.sinks.iter().enumerate() {
        let sink = sink(&format!("sinks[{i}]"), s, i, env)?;
        if !sink_names.insert(sink.name.clone()) {
            return Err(invalid(format!("sinks[{i}].name"), "duplicate sink name"));
        }
        sinks.push(sink);
    }

    Ok(Policy {
        server,
        spool,
        tenancy,
        upstreams,
        models,
        price_version,
        unknown_model,
        url_item_tokens: raw.pricing.url_item_tokens,
        stored_context_tokens: raw.pricing.stored_context_tokens,
        tenants,
        keys,
        sinks,
    })
}

fn upstream(
    key: &str,
    u: &RawUpstream,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Upstream, Invalid> {
    if u.name.is_empty() {
        return Err(invalid(format!("{key}.name"), "must not be empty"));
    }
    let prefix = u.prefix.trim_end_matches('/').to_string();
    if !prefix.starts_with('/') || prefix.len() < 2 {
        return Err(invalid(
            format!("{key}.prefix"),
            "must start with '/' and name a path, e.g. \"/openai\"",
        ));
    }
    let url = http_url(&format!("{key}.url"), Some(&u.url), "")?;
    if url.query().is_some() {
        return Err(invalid(
            format!("{key}.url"),
            "must not have a query string",
        ));
    }
    let provider = match u.provider.as_str() {
        "openai" => Provider::OpenAi,
        "anthropic" => Provider::Anthropic,
        "generic" => Provider::Generic,
        other => {
            return Err(invalid(
                format!("{key}.provider"),
                format!("{other:?}: expected \"openai\", \"anthropic\" or \"generic\""),
            ))
        }
    };
    let credential = match &u.api_key_env {
        Some(var) => {
            let value = from_env(&format!("{key}.api_key_env"), var, env)?;
            let header = match (&u.api_key_header, provider) {
                (Some(h), _) => h.to_ascii_lowercase(),
                (None, Provider::Anthropic) => "x-api-key".into(),
                (None, _) => "authorization".into(),
            };
            let name = http::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| invalid(format!("{key}.api_key_header"), "not a valid header name"))?;
            let value = if name == http::header::AUTHORIZATION {
                format!("Bearer {value}")
            } else {
                value
            };
            let Ok(mut value) = http::HeaderValue::from_str(&value) else {
                return Err(invalid(
                    format!("{key}.api_key_env"),
                    format!("{var} holds characters not allowed in a header"),
                ));
            };
            // Never printed (its `Debug` says "Sensitive"), never indexed
            // by HTTP/2 header compression.
            value.set_sensitive(true);
            Some((name, value))
        }
        None if u.api_key_header.is_some() => {
            return Err(invalid(
                format!("{key}.api_key_header"),
                "set api_key_env too, or remove this key",
            ))
        }
        None => None,
    };
    let price_per_call = money(
        format!("{key}.price_per_call"),
        u.price_per_call.unwrap_or_default(),
        super::MAX_PRICE,
    )?;
    if u.price_per_call.is_some() && provider != Provider::Generic {
        return Err(invalid(
            format!("{key}.price_per_call"),
            "only generic upstreams are priced per call; LLM upstreams use [models]",
        ));
    }
    let refuse_unmetered = match (u.unmetered_routes.as_deref(), provider) {
        (None | Some("forward"), _) => false,
        (Some("refuse"), Provider::Generic) => {
            return Err(invalid(
                format!("{key}.unmetered_routes"),
                "only for openai and anthropic upstreams (every generic call is metered)",
            ))
        }
        (Some("refuse"), _) => true,
        (Some(other), _) => {
            return Err(invalid(
                format!("{key}.unmetered_routes"),
                format!("{other:?}: expected \"forward\" or \"refuse\""),
            ))
        }
    };
    let key_finder = credential.as_ref().and_then(|(_, v)| {
        let v = v.as_bytes();
        let key = v.strip_prefix(b"Bearer ").unwrap_or(v);
        (key.len() >= super::MIN_SEARCHED_KEY)
            .then(|| memchr::memmem::Finder::new(key).into_owned())
    });
    Ok(Upstream {
        name: u.name.clone(),
        prefix,
        url,
        provider,
        credential,
        refuse_unmetered,
        key_finder,
        timeout: timeout(&format!("{key}.timeout"), &u.timeout)?,
        connect_timeout: timeout(&format!("{key}.connect_timeout"), &u.connect_timeout)?,
        price_per_call,
    })
}

fn sink(
    key: &str,
    s: &RawSink,
    index: usize,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SinkConfig, Invalid> {
    let only = |allowed: &[&str]| -> Result<(), Invalid> {
        let given = [
            ("path", s.path.is_some()),
            ("url", s.url.is_some()),
            ("format", s.format.is_some()),
            ("headers", !s.headers.is_empty()),
            ("endpoint", s.endpoint.is_some()),
            ("protocol", s.protocol.is_some()),
            ("batch_max_events", s.batch_max_events.is_some()),
            ("batch_max_bytes", s.batch_max_bytes.is_some()),
            ("batch_max_wait", s.batch_max_wait.is_some()),
            ("gzip", s.gzip.is_some()),
            ("timeout", s.timeout.is_some()),
            ("tenant_attributes", s.tenant_attributes.is_some()),
        ];
        match given.iter().find(|(k, set)| *set && !allowed.contains(k)) {
            Some((k, _)) => Err(invalid(
                format!("{key}.{k}"),
                format!("not a key of a {:?} sink", s.kind),
            )),
            None => Ok(()),
        }
    };
    const BATCH: [&str; 3] = ["batch_max_events", "batch_max_bytes", "batch_max_wait"];
    let (default_events, default_wait) = match s.kind.as_str() {
        "file" => (1000, Duration::from_millis(10)),
        _ => (100, Duration::from_secs(1)),
    };
    let batch = BatchPolicy {
        max_events: s.batch_max_events.unwrap_or(default_events).max(1),
        max_bytes: s.batch_max_bytes.unwrap_or(1 << 20).max(1024),
        max_wait: match &s.batch_max_wait {
            Some(w) => wait(&format!("{key}.batch_max_wait"), w)?,
            None => default_wait,
        },
    };
    let timeout = match &s.timeout {
        Some(t) => timeout(&format!("{key}.timeout"), t)?,
        None => Duration::from_secs(10),
    };
    let kind = match s.kind.as_str() {
        "file" => {
            only(&[&["path"][..], &BATCH[..]].concat())?;
            let path = s
                .path
                .as_ref()
                .ok_or_else(|| invalid(format!("{key}.path"), "a file sink needs a path"))?;
            SinkKind::File {
                path: PathBuf::from(path),
            }
        }
        "http" => {
            only(
                &[
                    &["url", "format", "headers", "gzip", "timeout"][..],
                    &BATCH[..],
                ]
                .concat(),
            )?;
            let url = http_url(
                &format!("{key}.url"),
                s.url.as_deref(),
                "an http sink needs a url",
            )?;
            let format = match s.format.as_deref().unwrap_or("cloudevents") {
                "cloudevents" => HttpFormat::CloudEvents,
                "json" => HttpFormat::Json,
                other => {
                    return Err(invalid(
                        format!("{key}.format"),
                        format!("{other:?}: expected \"cloudevents\" or \"json\""),
                    ))
                }
            };
            SinkKind::Http {
                url,
                format,
                headers: sink_headers(key, &s.headers, env)?,
                gzip: s.gzip.unwrap_or(false),
                timeout,
            }
        }
        "otlp" => {
            only(
                &[
                    &[
                        "endpoint",
                        "protocol",
                        "headers",
                        "timeout",
                        "tenant_attributes",
                    ][..],
                    &BATCH[..],
                ]
                .concat(),
            )?;
            let endpoint = http_url(
                &format!("{key}.endpoint"),
                s.endpoint.as_deref(),
                "an otlp sink needs an endpoint",
            )?;
            let protocol = match s.protocol.as_deref().unwrap_or("grpc") {
                "grpc" => OtlpProtocol::Grpc,
                "http" | "http/protobuf" => OtlpProtocol::HttpProtobuf,
                other => {
                    return Err(invalid(
                        format!("{key}.protocol"),
                        format!("{other:?}: expected \"grpc\" or \"http\""),
                    ))
                }
            };
            SinkKind::Otlp {
                endpoint,
                protocol,
                headers: sink_headers(key, &s.headers, env)?,
                timeout,
                tenant_attributes: s.tenant_attributes.unwrap_or(false),
            }
        }
        other => {
            return Err(invalid(
                format!("{key}.type"),
                format!("{other:?}: expected \"file\", \"http\" or \"otlp\""),
            ))
        }
    };
    let name = s
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{index}", s.kind));
    if name.is_empty()
        || name.starts_with('_')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            format!("{key}.name"),
            "use letters, digits, '-' and '_', not starting with '_' (reserved)",
        ));
    }
    Ok(SinkConfig { name, kind, batch })
}

fn http_url(key: &str, s: Option<&str>, missing: &str) -> Result<http::Uri, Invalid> {
    let s = s.ok_or_else(|| invalid(key, missing))?;
    let url: http::Uri = s
        .parse()
        .map_err(|e| invalid(key, format!("invalid URL: {e}")))?;
    match url.scheme_str() {
        Some("http") | Some("https") if url.host().is_some() => {}
        _ => return Err(invalid(key, "must be an absolute http:// or https:// URL")),
    }
    // Userinfo is never sent as credentials, and libraries log authorities.
    if url.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(invalid(
            key,
            "must not hold credentials (user:password@); put them in a header from the environment",
        ));
    }
    Ok(url)
}

/// `headers = { authorization_env = "METER_TOKEN", x-source = "tollgate" }`:
/// a key ending in `_env` names an environment variable holding the value.
/// An `authorization` value without a scheme gets `Bearer `.
fn sink_headers(
    key: &str,
    raw: &std::collections::BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(http::HeaderName, Secret)>, Invalid> {
    let mut out = Vec::new();
    for (k, v) in raw {
        let hkey = format!("{key}.headers.{k}");
        let (name, value) = match k.strip_suffix("_env") {
            Some(name) => (name, from_env(&hkey, v, env)?),
            None => (k.as_str(), v.clone()),
        };
        let name = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| invalid(&hkey, "not a valid header name"))?;
        let value = if name == http::header::AUTHORIZATION && !value.contains(' ') {
            format!("Bearer {value}")
        } else {
            value
        };
        if http::HeaderValue::from_str(&value).is_err() {
            return Err(invalid(
                &hkey,
                "value has characters not allowed in a header",
            ));
        }
        out.push((name, Secret(value)));
    }
    Ok(out)
}

/// An amount of money (a price or a budget limit): not negative, at most
/// `max`, so sums of them stay far from `Decimal`'s bounds.
fn money(key: String, v: Decimal, max: Decimal) -> Result<Decimal, Invalid> {
    if v.is_sign_negative() {
        return Err(invalid(key, "must not be negative"));
    }
    if v > max {
        return Err(invalid(key, format!("must be at most {max}")));
    }
    Ok(v)
}

/// A stable short digest of the price table, used as `price_version` when the
/// config does not name one.
fn price_digest(raw: &RawConfig) -> String {
    let mut h = Sha256::new();
    for (name, m) in &raw.models {
        h.update(name.as_bytes());
        for v in [
            Some(m.input),
            m.cache_read_input,
            m.cache_write_input,
            Some(m.output),
        ] {
            h.update(v.map(|d| d.normalize().to_string()).unwrap_or_default());
            h.update(b"|");
        }
        // Hashed only when set, so a config without it keeps the version
        // it had before the key existed (no decimal has an `h`).
        if let Some(v) = m.cache_write_1h_input {
            h.update(b"1h=");
            h.update(v.normalize().to_string());
            h.update(b"|");
        }
    }
    for u in &raw.upstreams {
        h.update(u.name.as_bytes());
        h.update(
            u.price_per_call
                .map(|d| d.normalize().to_string())
                .unwrap_or_default(),
        );
    }
    format!("sha256:{}", &hex::encode(h.finalize())[..12])
}
