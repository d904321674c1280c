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
    // Durable first: the credit exists once its event is in the spool.
    let key = body
        .id
        .clone()
        .map(|k| (KeyKind::Credit, id.to_string(), k));
    let (tid, amount) = (id.to_string(), body.amount);
    let raise = move |app: &App| app.limits.budgets.credit(&tid, amount, now);
    if let Err(e) = record_settled(app, event.to_line(), Some(note), key, now, raise).await {
        tracing::error!(error = %e, tenant = %id, "credit not recorded: spool append failed");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "metering_unavailable",
            "spool unavailable",
        );
    }
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
/// or forget it, see [`record_settled`]); `Some(Ok)`: a duplicate of a recorded
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
            match kind {
                KeyKind::Outcome => "an outcome with this id is being recorded; retry",
                KeyKind::Credit => "a credit with this id is being recorded; retry",
            },
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

/// Appends an admin event, then settles what hangs on it: `then` (a
/// credit raises the balance) once the event is in the spool, and the
/// idempotency key (`kind`, tenant, key), from pending to remembered, or
/// freed if the append failed. In a task of its own: a handler dropped at
/// this await (the client gone, the admin server stopping) left the line
/// queued, to be written, but the balance not raised, so a retry with the
/// key was told "duplicate" for a credit the running process never made.
async fn record_settled(
    app: &Arc<App>,
    line: Vec<u8>,
    note: Option<crate::limits::state::Note>,
    key: Option<(KeyKind, String, String)>,
    at: OffsetDateTime,
    then: impl FnOnce(&App) + Send + 'static,
) -> Result<u64, crate::spool::SpoolError> {
    let app = app.clone();
    let task = tokio::spawn(async move {
        let written = record(&app, line, note).await;
        if written.is_ok() {
            then(&app);
        }
        if let Some((kind, tenant, key)) = key {
            app.limits.budgets.with(|l| match &written {
                Ok(_) => l.confirm_key(kind, &tenant, &key, at),
                Err(_) => l.forget_key(kind, &tenant, &key),
            });
        }
        written
    });
    task.await
        .unwrap_or_else(|e| Err(crate::spool::SpoolError::Io(std::io::Error::other(e))))
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
    let key = body
        .id
        .clone()
        .map(|k| (KeyKind::Outcome, body.tenant.clone(), k));
    if let Err(e) = record_settled(app, event.to_line(), note, key, now, |_| {}).await {
        tracing::error!(error = %e, "outcome not recorded: spool append failed");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "metering_unavailable",
            "spool unavailable",
        );
    }
    respond(
        StatusCode::CREATED,
        json!({"duplicate": false, "event_id": event.id}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn app(dir: &std::path::Path) -> Arc<App> {
        let src = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             [[upstreams]]\nname = \"openai\"\nprefix = \"/openai\"\nurl = \"http://127.0.0.1:9\"\nprovider = \"openai\"\n\
             [[tenants]]\nid = \"acme\"\nkeys = [\"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"]\n\
             budget = {{ limit = \"1\", window = \"total\" }}\n",
            dir.display()
        );
        let policy = crate::config::parse(&src, "t.toml", &|_| None).unwrap();
        let spool =
            crate::spool::Spool::open(&dir.join("spool"), policy.spool.clone(), &[]).unwrap();
        Arc::new(App {
            policy: arc_swap::ArcSwap::from_pointee(policy),
            spool: spool.clone(),
            metrics: Arc::new(crate::metrics::Metrics::with_events_lost(
                spool.stats.lost_events.clone(),
            )),
            clients: Default::default(),
            limits: crate::limits::Limits::new(Default::default()),
            draining: AtomicBool::new(false),
            inflight: Default::default(),
            rt: tokio::runtime::Handle::current(),
        })
    }

    /// A credit whose handler is dropped at the append (the admin client
    /// gave up, the server stopping) still raises the balance and confirms
    /// its key once the line is written: before, the key was confirmed on
    /// drop and the balance never raised, so the client's retry was told
    /// "duplicate" for a credit the running process never made.
    #[tokio::test(flavor = "current_thread")]
    async fn a_credit_dropped_at_the_append_still_settles() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let now = OffsetDateTime::now_utc();
        let key = |app: &App| {
            app.limits
                .budgets
                .with(|l| l.begin_key(KeyKind::Credit, "acme", "k"))
        };
        assert_eq!(key(&app), Remembered::Fresh { forgot: 0 });
        let note = crate::limits::state::Note::Credit {
            tenant: "acme".into(),
            amount: Decimal::TWO,
            at: now,
            key: Some("k".into()),
        };
        let settle = record_settled(
            &app,
            b"{\"type\":\"credit\"}\n".to_vec(),
            Some(note),
            Some((KeyKind::Credit, "acme".into(), "k".into())),
            now,
            move |app: &App| app.limits.budgets.credit("acme", Decimal::TWO, now),
        );
        // Polled once (the append is queued), then dropped.
        assert!(futures_util::poll!(Box::pin(settle)).is_pending());
        let budget = app.policy.load().tenants["acme"].budget.clone().unwrap();
        let started = std::time::Instant::now();
        while app.limits.budgets.status("acme", &budget, now).credits != Decimal::TWO {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "never credited"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(key(&app), Remembered::Duplicate);
        app.spool.close().await;
    }
}
