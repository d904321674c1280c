//! The admin API (DESIGN §4): tenant budgets, prepaid credits and outcome
//! events. Reads are open on the (pod-local) admin port; mutating calls need
//! the bearer token named by `server.admin_token_env`.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use crate::config::{Policy, Tenant};
use crate::event::{format_time, CreditData, Event, OutcomeData, SCHEMA_VERSION};
use crate::limits::budget::BudgetStore;
use crate::limits::ledger::{KeyKind, Remembered, MAX_OUTCOME_KEYS};
use crate::server::{full, Body};
use crate::App;

const MAX_BODY: usize = 64 * 1024;

/// Routes `/v1/...`; `None` when the path is not the API's.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Option<Response<Body>> {
    // Segments are percent-decoded after the split, so a tenant id with a
    // space or a `/` is reachable as `acme%20corp` or `team%2Fa`.
    let segs: Vec<Cow<'_, str>> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy())
        .collect();
    let segs: Vec<&str> = segs.iter().map(|s| s.as_ref()).collect();
    let policy = app.policy.load_full();
    Some(match (req.method().clone(), segs.as_slice()) {
        (Method::GET, ["v1", "tenants"]) => {
            let now = OffsetDateTime::now_utc();
            let mut ids: Vec<&String> = policy.tenants.keys().collect();
            ids.sort();
            let list: Vec<_> = ids
                .into_iter()
                .map(|id| tenant_json(app, &policy.tenants[id], now))
                .collect();
            ok(json!({ "tenants": list }))
        }
        (Method::GET, ["v1", "tenants", id]) => match policy.tenants.get(*id) {
            Some(t) => ok(tenant_json(app, t, OffsetDateTime::now_utc())),
            None => error(StatusCode::NOT_FOUND, "tenant_not_found", "no such tenant"),
        },
        (Method::POST, ["v1", "tenants", id, "credits"]) => {
            let id = id.to_string();
            if let Some(denied) = authorize(&policy, &req) {
                return Some(denied);
            }
            credit(app, &policy, &id, req).await
        }
        (Method::POST, ["v1", "events"]) => {
            if let Some(denied) = authorize(&policy, &req) {
                return Some(denied);
            }
            outcome(app, &policy, req).await
        }
        _ => return None,
    })
}

fn ok(v: serde_json::Value) -> Response<Body> {
    respond(StatusCode::OK, v)
}

fn respond(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    respond(
        status,
        json!({"error": {"message": message, "type": "invalid_request_error", "code": code}}),
    )
}

fn authorize(policy: &Policy, req: &Request<Incoming>) -> Option<Response<Body>> {
    let Some(token) = &policy.server.admin_token else {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "admin_token_not_configured",
            "mutating admin calls need server.admin_token_env to be set",
        ));
    };
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(crate::proxy::headers::bearer);
    let matches = given.is_some_and(|g| {
        // Length leaks nothing useful; the bytes are compared in full.
        g.len() == token.0.len()
            && g.bytes()
                .zip(token.0.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    (!matches).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "invalid_admin_token",
            "missing or wrong admin bearer token",
        )
    })
}

pub fn tenant_json(app: &App, t: &Tenant, now: OffsetDateTime) -> serde_json::Value {
    let rate_limit = t.rate_limit.map(|r| {
        json!({"requests_per_minute": r.requests_per_minute, "tokens_per_minute": r.tokens_per_minute})
    });
    match &t.budget {
        Some(b) => {
            let s = app.limits.budgets.status(&t.id, b, now);
            json!({
                "id": t.id,
                "spent": s.spent.normalize().to_string(),
                "reserved": s.reserved.normalize().to_string(),
                "remaining": s.remaining.normalize().to_string(),
                "limit": b.limit.saturating_add(s.credits).normalize().to_string(),
                "credits": s.credits.normalize().to_string(),
                "window": b.window.as_str(),
                "window_start": s.window_start.map(format_time),
                "rate_limit": rate_limit,
            })
        }
        None => {
            let spent = app
                .limits
                .budgets
                .with(|l| l.tenant(&t.id).map(|x| x.total_spent).unwrap_or_default());
            json!({
                "id": t.id,
                "spent": spent.normalize().to_string(),
                "reserved": "0",
                "remaining": null,
                "limit": null,
                "window": null,
                "window_start": null,
                "rate_limit": rate_limit,
            })
        }
    }
}

/// Appends an admin event (credit, outcome). Refused as a proxied call is
/// when the spool is full under `reject`, or failing: these events must not
/// grow a spool past `max_bytes` either.
async fn record(
    app: &App,
    line: Vec<u8>,
    note: Option<crate::limits::state::Note>,
) -> Result<u64, crate::spool::SpoolError> {
    app.spool.check_capacity()?;
    app.spool
        .append_noted(line, note, crate::spool::Flush::Batch)
        .await
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    let bytes: Bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "body too large",
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditReq {
    amount: Decimal,
    #[serde(default)]
    reason: String,
    /// An idempotency key: a retry with it (say after a lost answer) is
    /// answered as a duplicate instead of crediting again.
    #[serde(default)]
    id: Option<String>,
}

async fn credit(
    app: &Arc<App>,
    policy: &Policy,
    id: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some(tenant) = policy.tenants.get(id) else {
        return error(StatusCode::NOT_FOUND, "tenant_not_found", "no such tenant");
    };
    let body: CreditReq = match read_json(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if body.amount <= Decimal::ZERO || body.amount > crate::config::MAX_MONEY {
        let max = crate::config::MAX_MONEY;
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_amount",
            &format!("amount must be a positive decimal string, at most {max}"),
        );
    }
    if let Some(denied) = check_key(body.id.as_deref()) {
        return denied;
    }
    let now = OffsetDateTime::now_utc();
    if let Some(key) = &body.id {
        if let Some(answer) = begin_key(app, KeyKind::Credit, id, key) {
            return match answer {
                Ok(()) => {
                    let mut v = tenant_json(app, tenant, now);
                    v["duplicate"] = json!(true);
                    v["id"] = json!(key);
                    ok(v)
                }
                Err(r) => r,
            };
        }
    }
    let data = CreditData {
        schema_version: SCHEMA_VERSION.into(),
        tenant: id.to_string(),
        amount: body.amount.normalize(),
        currency: "USD".into(),
        reason: body.reason,
        idempotency_key: body.id.clone(),
    };
    let event = Event::at(now, &policy.server.source, "credit", id, &data);
    let note = crate::limits::state::Note::Credit {
        tenant: id.to_string(),
        amount: data.amount,
        at: crate::event::event_instant(now),
        key: body.id.clone(),
    };
    let mut hold = KeyHold {
        app,
        kind: KeyKind::Credit,
        tenant: id,
        key: body.id.as_deref(),
        at: now,
    };
    // Durable first: the credit exists once its event is in the spool.
    if let Err(e) = record(app, event.to_line(), Some(note)).await {
        hold.forget();
        tracing::error!(error = %e, tenant = %id, "credit not recorded: spool append failed");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "metering_unavailable",
            "spool unavailable",
        );
    }
    app.limits.budgets.credit(id, body.amount, now);
    drop(hold);
    let mut v = tenant_json(app, tenant, now);
    v["duplicate"] = json!(false);
    v["event_id"] = json!(event.id);
    ok(v)
}

/// Refuses an idempotency key that is empty or too long (each is held in
/// memory and in the ledger snapshot for 7 days).
fn check_key(key: Option<&str>) -> Option<Response<Body>> {
    key.is_some_and(|k| k.is_empty() || k.len() > MAX_OUTCOME_FIELD)
        .then(|| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_id",
                "id must be 1 to 256 bytes",
            )
        })
}

/// Takes an idempotency key as pending. `None`: fresh, go on (and confirm
/// or forget it, see [`KeyHold`]); `Some(Ok)`: a duplicate of a recorded
/// call; `Some(Err)`: the answer to give (409 while the first is still
/// being recorded: it may yet fail, and a client told "duplicate" would
/// not retry).
fn begin_key(
    app: &App,
    kind: KeyKind,
    tenant: &str,
    key: &str,
) -> Option<Result<(), Response<Body>>> {
    match app.limits.budgets.with(|l| l.begin_key(kind, tenant, key)) {
        Remembered::Duplicate => Some(Ok(())),
        Remembered::Pending => Some(Err(error(
            StatusCode::CONFLICT,
            "idempotency_key_in_use",
            "a call with this id is being recorded; retry",
        ))),
        Remembered::Fresh { forgot: 0 } => None,
        Remembered::Fresh { forgot } => {
            tracing::warn!(
                forgot,
                max = MAX_OUTCOME_KEYS,
                "idempotency keys: more than the most remembered; the oldest forgotten (a retry with one of them counts again)"
            );
            None
        }
    }
}

/// The longest outcome `type` and idempotency key, in bytes.
const MAX_OUTCOME_FIELD: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeReq {
    tenant: String,
    #[serde(rename = "type")]
    name: String,
    /// A number or a decimal string; 1 when absent.
    #[serde(default)]
    quantity: Option<serde_json::Value>,
    #[serde(default)]
    id: Option<String>,
}

fn quantity(v: Option<&serde_json::Value>) -> Option<Decimal> {
    match v {
        None => Some(Decimal::ONE),
        Some(serde_json::Value::Number(n)) => n.to_string().parse().ok(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        Some(_) => None,
    }
}

/// A pending idempotency key, confirmed when dropped (see
/// `Ledger::begin_key`) unless [`KeyHold::forget`] was called: dropped at
/// an await (the admin server stopping), the call's line is queued and
/// will be written, so the key must not stay pending.
struct KeyHold<'a> {
    app: &'a App,
    kind: KeyKind,
    tenant: &'a str,
    key: Option<&'a str>,
    at: OffsetDateTime,
}

impl KeyHold<'_> {
    /// The call was not recorded: its key is free again.
    fn forget(&mut self) {
        if let Some(key) = self.key.take() {
            let (kind, tenant) = (self.kind, self.tenant);
            self.app
                .limits
                .budgets
                .with(|l| l.forget_key(kind, tenant, key));
        }
    }
}

impl Drop for KeyHold<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let (kind, tenant, at) = (self.kind, self.tenant, self.at);
            self.app
                .limits
                .budgets
                .with(|l| l.confirm_key(kind, tenant, key, at));
        }
    }
}

async fn outcome(app: &Arc<App>, policy: &Policy, req: Request<Incoming>) -> Response<Body> {
    let body: OutcomeReq = match read_json(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !policy.tenants.contains_key(&body.tenant) {
        return error(StatusCode::NOT_FOUND, "tenant_not_found", "no such tenant");
    }
    if body.name.is_empty() || body.name.len() > MAX_OUTCOME_FIELD {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_type",
            "type must be 1 to 256 bytes",
        );
    }
    if let Some(denied) = check_key(body.id.as_deref()) {
        return denied;
    }
    let Some(quantity) = quantity(body.quantity.as_ref()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_quantity",
            "quantity must be a number or a decimal string",
        );
    };
    let now = OffsetDateTime::now_utc();
    if let Some(key) = &body.id {
        if let Some(answer) = begin_key(app, KeyKind::Outcome, &body.tenant, key) {
            return answer.map_or_else(|r| r, |()| ok(json!({"duplicate": true, "id": key})));
        }
    }
    let data = OutcomeData {
        schema_version: SCHEMA_VERSION.into(),
        tenant: body.tenant.clone(),
        name: body.name,
        quantity: quantity.normalize(),
        idempotency_key: body.id.clone(),
    };
    let event = Event::at(
        now,
        &policy.server.source,
        "outcome",
        body.tenant.clone(),
        &data,
    );
    let note = body.id.clone().map(|key| crate::limits::state::Note::Key {
        tenant: body.tenant.clone(),
        key,
        at: crate::event::event_instant(now),
    });
    let mut hold = KeyHold {
        app,
        kind: KeyKind::Outcome,
        tenant: &body.tenant,
        key: body.id.as_deref(),
        at: now,
    };
    if let Err(e) = record(app, event.to_line(), note).await {
        hold.forget();
        tracing::error!(error = %e, "outcome not recorded: spool append failed");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "metering_unavailable",
            "spool unavailable",
        );
    }
    drop(hold);
    respond(
        StatusCode::CREATED,
        json!({"duplicate": false, "event_id": event.id}),
    )
}
