//! Errors the proxy answers itself, in the upstream provider's shape
//! (DESIGN §5). Each knows its source: client -> 4xx, upstream -> 502/504,
//! internal -> 5xx; and each has a short stable `kind()`.

use http::{HeaderValue, Response, StatusCode};

use crate::config::Provider;
use crate::event::Outcome;
use crate::limits::rate::LimitKind;
use crate::server::{full, Body};

/// The methods the proxy forwards (and the `Allow` of its 405): TRACE and
/// CONNECT never (a TRACE answer echoes the request, the injected key
/// included; CONNECT would tunnel), nor extension or lower-case methods,
/// which an upstream might take for a POST the meter did not see.
pub const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Whether the proxy forwards `m` (see [`FORWARDED_METHODS`]).
pub fn forwarded_method(m: &http::Method) -> bool {
    use http::Method;
    // A match rather than a search of the list: this runs on every call.
    matches!(
        *m,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no upstream is configured for this path")]
    NoRoute,
    #[error("missing or unknown tenant credential")]
    Unauthenticated,
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("request body could not be read: {0}")]
    BadBody(String),
    #[error("request body did not arrive within {}s (server.request_body_timeout)", .0.as_secs_f64())]
    BodyTimeout(std::time::Duration),
    #[error("{0}")]
    MalformedJson(String),
    #[error("model {0:?} has no price and unpriced models are rejected")]
    UnknownModel(String),
    #[error("request path has an escape that could name another route (write it unescaped)")]
    AmbiguousPath,
    #[error("request path climbs above the upstream's base path ('..' segment)")]
    DotSegment,
    #[error("method not forwarded: only {FORWARDED_METHODS} are")]
    MethodNotAllowed,
    #[error("this route is not metered, and this upstream refuses unmetered routes (unmetered_routes = \"refuse\")")]
    Unmetered,
    #[error("background responses are not supported through this proxy: their output is fetched later and could be neither metered nor budgeted")]
    Background,
    #[error("{0}")]
    BudgetExceeded(crate::limits::budget::BudgetExceeded),
    #[error("rate limit reached for {}; retry after {}s", match .0.kind { LimitKind::Requests => "requests", LimitKind::Tokens => "tokens" }, retry_secs(.0))]
    RateLimited(crate::limits::rate::RateLimited),
    #[error("usage metering is unavailable (spool full or unwritable); retry later")]
    SpoolUnavailable,
    #[error("upstream could not be reached")]
    UpstreamUnreachable,
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ProxyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BadBody(_)
            | ProxyError::MalformedJson(_)
            | ProxyError::UnknownModel(_)
            | ProxyError::AmbiguousPath
            | ProxyError::DotSegment
            | ProxyError::Background => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Unmetered => StatusCode::FORBIDDEN,
            ProxyError::BudgetExceeded(_) => StatusCode::PAYMENT_REQUIRED,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::SpoolUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable, machine-readable; also the `code` in the body.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "route_not_found",
            ProxyError::Unauthenticated => "invalid_api_key",
            ProxyError::TooLarge { .. } => "request_too_large",
            ProxyError::BadBody(_) => "bad_request_body",
            ProxyError::BodyTimeout(_) => "request_timeout",
            ProxyError::MalformedJson(_) => "invalid_json",
            ProxyError::UnknownModel(_) => "model_not_priced",
            ProxyError::AmbiguousPath | ProxyError::DotSegment => "invalid_request_path",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::Unmetered => "route_not_metered",
            ProxyError::Background => "unsupported_parameter",
            ProxyError::BudgetExceeded(_) => "budget_exceeded",
            ProxyError::RateLimited(_) => "rate_limit_exceeded",
            ProxyError::SpoolUnavailable => "metering_unavailable",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The event outcome of a call that ended in this error.
    pub fn outcome(&self) -> Outcome {
        match self {
            ProxyError::Unauthenticated => Outcome::RejectedAuth,
            ProxyError::BudgetExceeded(_) => Outcome::RejectedBudget,
            ProxyError::RateLimited(_) => Outcome::RejectedRate,
            ProxyError::UpstreamUnreachable | ProxyError::UpstreamTimeout => Outcome::UpstreamError,
            _ => Outcome::RejectedRequest,
        }
    }

    fn error_type(&self, provider: Provider) -> &'static str {
        match (provider, self.status().as_u16()) {
            (Provider::Anthropic, 401) => "authentication_error",
            (Provider::Anthropic, 404) => "not_found_error",
            (Provider::Anthropic, 413) => "request_too_large",
            (Provider::Anthropic, 400 | 405 | 408) => "invalid_request_error",
            (Provider::Anthropic, 403) => "permission_error",
            (Provider::Anthropic, 402) => "billing_error",
            (Provider::Anthropic, 429) => "rate_limit_error",
            (_, 402) => "insufficient_quota",
            (_, 429) => match self {
                ProxyError::RateLimited(r) if r.kind == LimitKind::Tokens => "tokens",
                _ => "requests",
            },
            (Provider::Anthropic, _) => "api_error",
            (_, 401) => "invalid_request_error",
            (_, 400 | 403 | 404 | 405 | 408 | 413) => "invalid_request_error",
            (_, _) => "server_error",
        }
    }

    pub fn to_response(&self, provider: Provider) -> Response<Body> {
        let mut resp = error_response(
            provider,
            self.status(),
            self.error_type(provider),
            self.kind(),
            &self.to_string(),
        );
        let h = resp.headers_mut();
        match self {
            ProxyError::MethodNotAllowed => {
                h.insert(
                    http::header::ALLOW,
                    HeaderValue::from_static(FORWARDED_METHODS),
                );
            }
            ProxyError::BudgetExceeded(_) => {
                h.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            // The rest of the body was never read: the connection cannot
            // carry another request.
            ProxyError::BodyTimeout(_) => {
                h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            ProxyError::RateLimited(r) => {
                let secs = retry_secs(r);
                h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
                let reset = HeaderValue::from_str(&format!("{secs}s")).expect("ascii");
                for (what, limit, hit) in [
                    ("requests", r.limit_requests, r.kind == LimitKind::Requests),
                    ("tokens", r.limit_tokens, r.kind == LimitKind::Tokens),
                ] {
                    if let Some(limit) = limit {
                        h.insert(header_name("limit", what), HeaderValue::from(limit));
                        if hit {
                            h.insert(header_name("remaining", what), HeaderValue::from(0));
                            h.insert(header_name("reset", what), reset.clone());
                        }
                    }
                }
            }
            _ => {}
        }
        resp
    }
}

/// Whole seconds to wait, at least one.
fn retry_secs(r: &crate::limits::rate::RateLimited) -> u64 {
    r.retry_after.as_secs_f64().ceil().max(1.0) as u64
}

fn header_name(part: &str, what: &str) -> http::HeaderName {
    http::HeaderName::from_bytes(format!("x-ratelimit-{part}-{what}").as_bytes())
        .expect("valid header name")
}

/// A JSON error in the provider's shape: OpenAI
/// `{"error":{"message","type","param","code"}}`, Anthropic
/// `{"type":"error","error":{"type","message"}}`.
pub fn error_response(
    provider: Provider,
    status: StatusCode,
    error_type: &str,
    code: &str,
    message: &str,
) -> Response<Body> {
    let body = match provider {
        Provider::Anthropic => serde_json::json!({
            "type": "error",
            "error": {"type": error_type, "message": message, "code": code},
        }),
        _ => serde_json::json!({
            "error": {"message": message, "type": error_type, "param": null, "code": code},
        }),
    };
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The match and the `Allow` list name the same methods.
    #[test]
    fn the_forwarded_methods_are_the_allow_list() {
        for m in FORWARDED_METHODS.split(", ") {
            assert!(forwarded_method(&m.parse().unwrap()), "{m}");
        }
        for m in ["TRACE", "CONNECT", "post", "PROPFIND", "get"] {
            assert!(!forwarded_method(&m.parse().unwrap()), "{m}");
        }
    }
}
