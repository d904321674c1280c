//! The proxy listener. A request walks these phases, in [`handle`]:
//!
//! 1. **route**: the upstream from the path prefix (config only; never an open proxy)
//! 2. **authenticate**: the tenant from its key or the trusted header
//! 3. **read**: the body, capped at `server.max_request_bytes` and `server.request_body_timeout`
//! 4. **inspect**: model, stream, output cap (metered routes; 400 on bad JSON)
//! 5. **admit**: spool capacity, then limits (rate, budget reservation)
//! 6. **forward**: hygienic headers, the upstream key, optional usage injection
//! 7. **meter**: the response body wrapped in a `MeteredBody`
//! 8. **emit**: one event per call, on every path (the `Call` guarantees it)

pub mod client;
pub mod error;
pub mod headers;
pub mod mask;
pub mod pool;

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::config::{Policy, Provider, Tenancy, Tenant, UnknownModel};
use crate::limits::{Ask, Refusal};
use crate::meter::{
    self, Call, Coding, End, Format, MeteredBody, Operation, RequestInfo, ResponseMeter,
};
use crate::server::Body;
use crate::spool::Flush;
use crate::App;

pub use error::ProxyError;

/// Tenant id recorded for calls whose credential matched no tenant.
pub const UNKNOWN_TENANT: &str = "unknown";

/// The request's future, boxed once: it is a few KiB, and hyper moves it
/// around by value otherwise (each move a copy).
pub fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>> {
    use tracing::Instrument;
    // At debug level: at info, an enabled span cost about a fifth of a
    // call's instructions (made, formatted and recorded for every request). The
    // warnings a call can log name its upstream and tenant themselves.
    let span = tracing::debug_span!(
        "call",
        upstream = tracing::field::Empty,
        tenant = tracing::field::Empty,
        model = tracing::field::Empty,
    );
    Box::pin(phases(app, req).instrument(span))
}

// Names made once: a lookup by `&str` parses and checks the name first.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The request phases, in order; every exit path finishes the call.
async fn phases(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let policy = app.policy.load_full();
    // route
    let Some((upstream, rest)) = policy.route(req.uri().path()) else {
        return ProxyError::NoRoute.to_response(Provider::OpenAi);
    };
    let upstream = upstream.clone();
    let target = upstream_target(upstream.url.path(), rest, req.uri().query());
    let op = Operation::classify(upstream.provider, req.method(), rest);
    let span = tracing::Span::current();
    span.record("upstream", upstream.name.as_str());

    // authenticate
    let tenant = authenticate(&policy, req.headers()).cloned();
    let mut call = Call::new(
        app.clone(),
        policy.clone(),
        tenant
            .as_ref()
            .map_or_else(|| UNKNOWN_TENANT.to_string(), |t| t.id.clone()),
        upstream.clone(),
        op,
    );
    let Some(tenant) = tenant else {
        return reject(call, ProxyError::Unauthenticated, upstream.provider).await;
    };
    if !error::forwarded_method(req.method()) {
        return reject(call, ProxyError::MethodNotAllowed, upstream.provider).await;
    }
    if meter::request::climbs(rest) {
        return reject(call, ProxyError::DotSegment, upstream.provider).await;
    }
    if upstream.refuse_unmetered && op == Operation::Other {
        return reject(call, ProxyError::Unmetered, upstream.provider).await;
    }
    if upstream.provider != Provider::Generic
        && req.method() == http::Method::POST
        && meter::request::ambiguous_path(rest)
    {
        return reject(call, ProxyError::AmbiguousPath, upstream.provider).await;
    }
    span.record("tenant", tenant.id.as_str());

    // read
    let (parts, body) = req.into_parts();
    let limit = policy.server.request_body_timeout;
    let body = match within(
        limit,
        read_body(body, &parts.headers, policy.server.max_request_bytes),
    )
    .await
    {
        Some(Ok(b)) => b,
        Some(Err(e)) => return reject(call, e, upstream.provider).await,
        None => return reject(call, ProxyError::BodyTimeout(limit), upstream.provider).await,
    };

    // inspect
    let mut strip_usage = false;
    let mut body = body;
    if op.is_metered() {
        let info = match RequestInfo::parse(&body, op) {
            Ok(i) => i,
            Err(e) => {
                return reject(
                    call,
                    ProxyError::MalformedJson(e.to_string()),
                    upstream.provider,
                )
                .await
            }
        };
        if info.background && op == Operation::Responses {
            return reject(call, ProxyError::Background, upstream.provider).await;
        }
        if policy.unknown_model == UnknownModel::Reject {
            if let Some(m) = info
                .model
                .as_deref()
                .filter(|m| policy.price(m, m).is_none())
            {
                let e = ProxyError::UnknownModel(m.to_string());
                return reject(call, e, upstream.provider).await;
            }
        }
        if info.stream
            && !info.client_wants_usage
            && matches!(op, Operation::Chat | Operation::Completions)
        {
            match meter::request::inject_include_usage(&body) {
                Ok(b) => {
                    body = b;
                    strip_usage = true;
                }
                Err(e) => {
                    let e = ProxyError::MalformedJson(e.to_string());
                    return reject(call, e, upstream.provider).await;
                }
            }
        }
        if let Some(m) = &info.model {
            span.record("model", m.as_str());
        }
        call.state().request = info;
    }
    call.state().request_body = body.clone();

    // admit
    if let Err(e) = app.spool.check_capacity() {
        tracing::warn!(
            upstream = %upstream.name,
            tenant = %tenant.id,
            error = %e,
            "rejecting a call: metering fails closed"
        );
        return reject(call, ProxyError::SpoolUnavailable, upstream.provider).await;
    }

    // The tenant's limits as configured now, not when the call began: a
    // reload during the body read (up to `request_body_timeout`) left such
    // calls admitted under the old limits, and each switch between the two
    // rebuilt the tenant's rate limiters with a fresh burst.
    // A reload that removed the tenant, or its key, refuses the call.
    // A short-lived guard, not a clone: no reference count is touched on
    // the usual path, and none is held past this block.
    let still = {
        let current = app.policy.load();
        if Arc::ptr_eq(&current, &policy) {
            Some(tenant)
        } else {
            authenticate(&current, &parts.headers)
                .filter(|t| t.id == tenant.id)
                .cloned()
        }
    };
    let Some(tenant) = still else {
        return reject(call, ProxyError::Unauthenticated, upstream.provider).await;
    };
    let state = call.state();
    let ask = Ask {
        policy: &policy,
        tenant: &tenant,
        upstream: &upstream,
        op,
        info: &state.request,
        body: &state.request_body,
    };
    match app.limits.admit(ask, time::OffsetDateTime::now_utc()).await {
        Ok(admission) => call.state().admission = Some(admission),
        Err(Refusal::Budget(e)) => {
            return reject(call, ProxyError::BudgetExceeded(e), upstream.provider).await
        }
        Err(Refusal::Rate(e)) => {
            return reject(call, ProxyError::RateLimited(e), upstream.provider).await
        }
    }

    // An OpenAI request that names no output cap gets the one its budget
    // reservation assumed: otherwise the upstream may generate past it (a
    // model's real limit is often above `max_output_tokens`), and
    // concurrent calls could spend past the limit.
    let cap = call.state().admission.as_ref().and_then(|a| a.output_cap);
    if let (Some(cap), Provider::OpenAi) = (cap, upstream.provider) {
        let field = meter::request::output_cap_field(op).expect("set only where there is one");
        match meter::request::add_output_cap(&body, field, cap) {
            Ok(b) => body = b,
            Err(e) => {
                let e = ProxyError::MalformedJson(e.to_string());
                return reject(call, e, upstream.provider).await;
            }
        }
    }

    // forward
    let tenancy_header = match &policy.tenancy {
        Tenancy::Header(h) => Some(h),
        Tenancy::Key => None,
    };
    let mut headers = parts.headers;
    headers::upstream_request_headers(&mut headers, &upstream, tenancy_header, op.is_metered());
    let mut up_req = Request::new(Full::new(body));
    *up_req.method_mut() = parts.method;
    *up_req.uri_mut() = target;
    *up_req.headers_mut() = headers;
    let Some((scheme, authority)) = pool::origin_of(&upstream.url) else {
        return fail(call, ProxyError::UpstreamUnreachable, upstream.provider).await;
    };
    // One timer for the whole call: it bounds the wait for the response
    // head here, then the body (it moves into the `MeteredBody`).
    let mut deadline = Box::pin(tokio::time::sleep(upstream.timeout));
    let sent = {
        // Scoped: on a timeout the request (and its connection) is dropped
        // here, not after the failed call's event is written.
        let mut send = std::pin::pin!(pool::send_to(
            up_req,
            scheme,
            authority,
            upstream.connect_timeout,
            &mut call.state().dispatched,
        ));
        std::future::poll_fn(|cx| match send.as_mut().poll(cx) {
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
            std::task::Poll::Pending => deadline.as_mut().poll(cx).map(|()| None),
        })
        .await
    };
    let (resp, conn) = match sent {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            tracing::warn!(
                upstream = %upstream.name,
                tenant = %tenant.id,
                error = %e,
                "upstream request failed"
            );
            return fail(call, ProxyError::UpstreamUnreachable, upstream.provider).await;
        }
        None => return fail(call, ProxyError::UpstreamTimeout, upstream.provider).await,
    };

    // meter
    let (mut parts, incoming) = resp.into_parts();
    headers::client_response_head(&mut parts, &upstream);
    let state = call.state();
    state.status = parts.status.as_u16();
    state.request_id = parts
        .headers
        .get(&X_REQUEST_ID)
        .or_else(|| parts.headers.get(&REQUEST_ID))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if op.is_metered() {
        let format = Format::from_content_type(parts.headers.get(http::header::CONTENT_TYPE));
        let coding = Coding::from_headers(parts.headers.get_all(http::header::CONTENT_ENCODING));
        let meter = ResponseMeter::new(upstream.provider, op, format, strip_usage).decoding(coding);
        strip_usage = meter.strips();
        state.meter = Some(meter);
    }
    let content_length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if strip_usage {
        // The body changes length; it streams chunked anyway.
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    let mut body = MeteredBody::new(incoming, call, content_length, deadline, conn);
    body.prefetch().await;
    let body = match mask::MaskKey::new(body, upstream, &parts.headers) {
        Ok(masked) => masked.boxed_unsync(),
        Err(body) => body.boxed_unsync(),
    };
    Response::from_parts(parts, body)
}

/// The tenant of a request, or `None` (401).
fn authenticate<'p>(policy: &'p Policy, h: &HeaderMap) -> Option<&'p Arc<Tenant>> {
    let id = match &policy.tenancy {
        // Exactly one line: a gateway that appends its line to one the
        // client sent (Envoy's default) would otherwise bill whichever
        // came first, the client's choice.
        Tenancy::Header(name) => {
            let mut lines = h.get_all(name).iter();
            let line = lines.next()?;
            if lines.next().is_some() {
                return None;
            }
            line.to_str().ok()?
        }
        Tenancy::Key => {
            let key = h
                .get(http::header::AUTHORIZATION)
                .and_then(headers::bearer)
                .or_else(|| h.get(&X_API_KEY).and_then(|v| v.to_str().ok()))?;
            let digest: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
            policy.keys.get(&digest)?
        }
    };
    policy.tenants.get(id)
}

async fn read_body(body: Incoming, h: &HeaderMap, limit: u64) -> Result<Bytes, ProxyError> {
    let declared = h
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::TooLarge { limit });
    }
    match Limited::new(body, limit as usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::TooLarge { limit }),
        Err(e) => Err(ProxyError::BadBody(e.to_string())),
    }
}

/// `fut`'s output, or `None` once `limit` has passed. The timer is made
/// only when the first poll does not finish: a body that came with its
/// head (the usual case) costs no timer.
async fn within<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if timer.is_none() {
            timer.set(Some(tokio::time::sleep(limit)));
        }
        let timer = timer.as_mut().as_pin_mut().expect("set above");
        timer.poll(cx).map(|()| None)
    })
    .await
}

/// The request target upstream, in origin form: the upstream URL's path,
/// then the rest of the client's path and its query, less any credential
/// parameters. (The pool adds the scheme and authority, from config only.)
fn upstream_target(base_path: &str, rest: &str, query: Option<&str>) -> http::Uri {
    let query = query.and_then(headers::query_without_credentials);
    let query = query.as_deref();
    let base = base_path.trim_end_matches('/');
    let mut pq = String::with_capacity(base.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(base);
    pq.push_str(rest);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    // Both halves come from parsed URIs, so this parses; "/" if not.
    let pq = http::uri::PathAndQuery::from_maybe_shared(Bytes::from(pq))
        .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"));
    http::Uri::from(pq)
}

/// Refuses a call before forwarding: its event first, then the answer.
async fn reject(mut call: Call, e: ProxyError, provider: Provider) -> Response<Body> {
    let status = e.status().as_u16();
    call.state()
        .app
        .metrics
        .rejections
        .get_or_create(&crate::metrics::ReasonLabels { reason: e.kind() })
        .inc();
    // `finish` returns a boxed future: nothing large is inlined into every
    // request's future.
    let end = End::Rejected {
        status,
        outcome: e.outcome(),
        kind: e.kind(),
    };
    call.finish(end, Flush::Batch).await;
    e.to_response(provider)
}

/// The upstream gave no response: the event records it, the client gets 502/504.
async fn fail(call: Call, e: ProxyError, provider: Provider) -> Response<Body> {
    let end = End::NoResponse {
        status: e.status().as_u16(),
        kind: e.kind(),
    };
    call.finish(end, Flush::Batch).await;
    e.to_response(provider)
}

#[cfg(test)]
mod tests {
    use super::upstream_target;

    #[test]
    fn the_target_is_the_upstream_path_then_the_rest_and_query() {
        let t = |base, rest, q| upstream_target(base, rest, q).to_string();
        assert_eq!(t("/", "/v1/chat/completions", None), "/v1/chat/completions");
        assert_eq!(t("/sse/", "/v1/x", Some("a=1&b")), "/sse/v1/x?a=1&b");
        assert_eq!(t("/openai", "/v1/models", Some("")), "/openai/v1/models?");
        assert_eq!(t("/", "", None), "/");
        // Credential parameters stay behind; the rest keep their bytes and order.
        assert_eq!(
            t(
                "/",
                "/v1beta/models/g:generateContent",
                Some("key=SECRET&alt=sse")
            ),
            "/v1beta/models/g:generateContent?alt=sse"
        );
        assert_eq!(
            t(
                "/",
                "/x",
                Some("api-version=2024-10-21&Subscription-Key=s&b=%2F")
            ),
            "/x?api-version=2024-10-21&b=%2F"
        );
        assert_eq!(
            t(
                "/",
                "/x",
                Some("k%65y=s&API_KEY=t&apikey&access_token=u&api+key")
            ),
            "/x?api+key"
        );
        assert_eq!(t("/", "/x", Some("%6Bey=s&Api-Key=t")), "/x");
        assert_eq!(
            t("/", "/x", Some("keys=1&monkey=2&key_id=3")),
            "/x?keys=1&monkey=2&key_id=3"
        );
        // Never absolute: the scheme and authority come from config, in the pool.
        assert!(upstream_target("/", "/v1", None).authority().is_none());
    }
}
