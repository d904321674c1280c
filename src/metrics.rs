//! Every metric Tollgate exports, in one place. Labels are low-cardinality by
//! construction: models are labelled only when they are in the price table
//! (anything else is `"unpriced"`), tenants only when configured.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub upstream: String,
    pub model: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub upstream: String,
    pub model: String,
    pub outcome: String,
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub upstream: String,
    pub model: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: String,
}

pub struct Metrics {
    registry: Registry,
    pub calls: Family<CallLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    pub rejections: Family<ReasonLabels, Counter>,
    pub unpriced: Family<UpstreamLabels, Counter>,
    pub events_lost: Counter,
    pub rejected_unrecorded: Counter,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub config_last_load: Gauge,
    pub config_last_reload_ok: Gauge,
    pub tenant_spent: Family<TenantLabels, Gauge<f64, AtomicU64>>,
    pub tenant_remaining: Family<TenantLabels, Gauge<f64, AtomicU64>>,
    pub spool_disk_bytes: Gauge,
    pub spool_backlog_bytes: Gauge,
    pub spool_appended: Gauge,
    pub spool_writes: Gauge,
    pub spool_dropped_bytes: Gauge,
    pub sink_lag_bytes: Family<SinkLabels, Gauge>,
    pub sink_delivered: Family<SinkLabels, Counter>,
    pub sink_errors: Family<SinkLabels, Counter>,
    pub sink_dead_lettered: Family<SinkLabels, Counter>,
    pub sink_last_success: Family<SinkLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::with_events_lost(Counter::default())
    }

    /// `events_lost` is the spool's own counter (it counts failed writes).
    pub fn with_events_lost(events_lost: Counter) -> Metrics {
        let mut r = Registry::with_prefix("tollgate");
        let m = Metrics {
            calls: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            rejections: Family::default(),
            unpriced: Family::default(),
            events_lost,
            rejected_unrecorded: Counter::default(),
            config_reloads: Family::default(),
            config_last_load: Gauge::default(),
            config_last_reload_ok: Gauge::default(),
            tenant_spent: Family::default(),
            tenant_remaining: Family::default(),
            spool_disk_bytes: Gauge::default(),
            spool_backlog_bytes: Gauge::default(),
            spool_appended: Gauge::default(),
            spool_writes: Gauge::default(),
            spool_dropped_bytes: Gauge::default(),
            sink_lag_bytes: Family::default(),
            sink_delivered: Family::default(),
            sink_errors: Family::default(),
            sink_dead_lettered: Family::default(),
            sink_last_success: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "calls",
            "Metered calls by upstream, model and outcome",
            m.calls.clone(),
        );
        r.register(
            "tokens",
            "Tokens by upstream, model and type",
            m.tokens.clone(),
        );
        r.register(
            "cost_usd",
            "Cost at price-table rates (for dashboards; bill from events)",
            m.cost.clone(),
        );
        r.register(
            "rejections",
            "Requests the proxy refused, by reason",
            m.rejections.clone(),
        );
        r.register(
            "unpriced_calls",
            "Calls to models missing from the price table",
            m.unpriced.clone(),
        );
        r.register(
            "events_lost",
            "Usage events that could not be written (logged at ERROR)",
            m.events_lost.clone(),
        );
        r.register(
            "tenant_spent_usd",
            "Spend in the tenant's current budget window (configured tenants)",
            m.tenant_spent.clone(),
        );
        r.register(
            "tenant_remaining_usd",
            "Budget left in the current window (tenants with a budget)",
            m.tenant_remaining.clone(),
        );
        r.register(
            "config_reloads",
            "Config reload attempts by result (ok, error)",
            m.config_reloads.clone(),
        );
        r.register(
            "config_last_load_timestamp_seconds",
            "Unix time the running config was loaded",
            m.config_last_load.clone(),
        );
        r.register(
            "config_last_reload_ok",
            "1 if the last reload attempt succeeded, 0 if the file was rejected",
            m.config_last_reload_ok.clone(),
        );
        r.register(
            "rejected_unrecorded",
            "Calls refused with 503 metering_unavailable: counted here, not written to the full spool",
            m.rejected_unrecorded.clone(),
        );
        r.register(
            "spool_disk_bytes",
            "Bytes of spool segments on disk",
            m.spool_disk_bytes.clone(),
        );
        r.register(
            "spool_backlog_bytes",
            "Bytes not yet delivered by the slowest sink",
            m.spool_backlog_bytes.clone(),
        );
        r.register(
            "spool_appended_events",
            "Events appended since start",
            m.spool_appended.clone(),
        );
        r.register(
            "spool_writes",
            "Writes into the spool since start (events share a write when batched)",
            m.spool_writes.clone(),
        );
        r.register(
            "spool_dropped_bytes",
            "Undelivered bytes dropped by when_full = drop_oldest",
            m.spool_dropped_bytes.clone(),
        );
        r.register(
            "sink_lag_bytes",
            "Spool bytes a sink has not delivered yet",
            m.sink_lag_bytes.clone(),
        );
        r.register(
            "sink_delivered_events",
            "Events a sink delivered",
            m.sink_delivered.clone(),
        );
        r.register(
            "sink_dead_lettered_events",
            "Events a receiver refused for good, written to the dead-letter file",
            m.sink_dead_lettered.clone(),
        );
        r.register(
            "sink_retries",
            "Failed delivery attempts",
            m.sink_errors.clone(),
        );
        r.register(
            "sink_last_success_timestamp_seconds",
            "Unix time of a sink's last delivery",
            m.sink_last_success.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Prometheus/OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
