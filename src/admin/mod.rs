//! The admin listener: health, readiness, metrics and the admin API
//! (DESIGN §4). Loopback by default; it never carries tenant traffic.

pub mod api;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::limits::budget::BudgetStore;
use crate::server::{full, Body};
use crate::App;

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#),
        ("GET", "/readyz") => ready(&app),
        ("GET", "/metrics") => metrics(&app),
        _ => match api::handle(&app, req).await {
            Some(resp) => resp,
            None => json(
                StatusCode::NOT_FOUND,
                r#"{"error":{"message":"no such admin endpoint","type":"invalid_request_error","code":"not_found"}}"#,
            ),
        },
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

fn ready(app: &App) -> Response<Body> {
    if app.draining.load(Ordering::Relaxed) {
        return json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#);
    }
    // Read-only: a probe must never trigger `drop_oldest`.
    if app.spool.refuses_calls() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"spool_unavailable"}"#,
        );
    }
    if !app.spool.dir().is_dir() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"spool_unwritable"}"#,
        );
    }
    json(StatusCode::OK, r#"{"status":"ready"}"#)
}

fn metrics(app: &App) -> Response<Body> {
    let m = &app.metrics;
    let spool = &app.spool;
    m.spool_disk_bytes.set(spool.disk_bytes() as i64);
    m.spool_backlog_bytes.set(spool.backlog_bytes() as i64);
    m.spool_appended
        .set(spool.stats.appended_events.load(Ordering::Relaxed) as i64);
    m.spool_writes
        .set(spool.stats.writes.load(Ordering::Relaxed) as i64);
    m.spool_dropped_bytes
        .set(spool.stats.dropped_bytes.load(Ordering::Relaxed) as i64);
    let end = spool.end();
    for (sink, pos) in spool.cursors() {
        m.sink_lag_bytes
            .get_or_create(&crate::metrics::SinkLabels { sink })
            .set(end.saturating_sub(pos) as i64);
    }
    let now = time::OffsetDateTime::now_utc();
    let policy = app.policy.load();
    let _scrape = m.scrape.lock().unwrap_or_else(|p| p.into_inner());
    m.tenant_spent.clear();
    m.tenant_remaining.clear();
    for t in policy.tenants.values() {
        let labels = crate::metrics::TenantLabels {
            tenant: t.id.clone(),
        };
        let (spent, remaining) = match &t.budget {
            Some(b) => {
                let s = app.limits.budgets.status(&t.id, b, now);
                (s.spent, Some(s.remaining))
            }
            None => (
                app.limits
                    .budgets
                    .with(|l| l.tenant(&t.id).map(|x| x.total_spent).unwrap_or_default()),
                None,
            ),
        };
        m.tenant_spent
            .get_or_create(&labels)
            .set(f64::try_from(spent).unwrap_or(0.0));
        if let Some(r) = remaining {
            m.tenant_remaining
                .get_or_create(&labels)
                .set(f64::try_from(r).unwrap_or(0.0));
        }
    }
    let mut r = Response::new(full(m.encode()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
            .parse()
            .unwrap(),
    );
    r
}
