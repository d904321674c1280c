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
    /// Tells this registry's counters apart in the per-thread handle cache.
    id: u64,
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
    pub config_restart_pending: Gauge,
    pub tenant_spent: Family<TenantLabels, Gauge<f64, AtomicU64>>,
    pub tenant_remaining: Family<TenantLabels, Gauge<f64, AtomicU64>>,
    /// Held by a scrape while it refills the tenant gauges (cleared first,
    /// so a tenant removed by a reload leaves no stale series) and encodes.
    pub scrape: std::sync::Mutex<()>,
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

/// `tollgate_tokens_total{type}`, in the order [`Metrics::count_call`] takes.
pub const TOKEN_TYPES: [&str; 5] = [
    "input",
    "output",
    "cache_read_input",
    "cache_write_input",
    "reasoning_output",
];

/// One thread's handles to the counters of one (upstream, model, outcome):
/// counting a call then costs a short scan instead of hashing and cloning
/// label strings into each family's map (about 5,000 instructions a call).
struct CallHandles {
    metrics: u64,
    upstream: String,
    model: String,
    outcome: &'static str,
    calls: Counter,
    tokens: [Option<Counter>; 5],
    cost: Option<Counter<f64, AtomicU64>>,
}

/// Label sets a thread keeps handles for; past it the cache starts over.
const MAX_CACHED_LABEL_SETS: usize = 256;

thread_local! {
    static CALL_HANDLES: std::cell::RefCell<Vec<CallHandles>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts one call in `calls_total`, `tokens_total` (`tokens` in
    /// [`TOKEN_TYPES`] order) and `cost_total`. Zero tokens and zero cost
    /// create no series.
    pub fn count_call(
        &self,
        upstream: &str,
        model: &str,
        outcome: &'static str,
        tokens: [u64; 5],
        cost: f64,
    ) {
        CALL_HANDLES.with(|cache| {
            let mut cache = cache.borrow_mut();
            let found = cache.iter().position(|h| {
                h.metrics == self.id
                    && h.outcome == outcome
                    && h.model == model
                    && h.upstream == upstream
            });
            let i = found.unwrap_or_else(|| {
                if cache.len() >= MAX_CACHED_LABEL_SETS {
                    cache.clear();
                }
                let labels = CallLabels {
                    upstream: upstream.to_string(),
                    model: model.to_string(),
                    outcome: outcome.to_string(),
                };
                cache.push(CallHandles {
                    metrics: self.id,
                    upstream: labels.upstream.clone(),
                    model: labels.model.clone(),
                    outcome,
                    calls: self.calls.get_or_create(&labels).clone(),
                    tokens: Default::default(),
                    cost: None,
                });
                cache.len() - 1
            });
            let h = &mut cache[i];
            h.calls.inc();
            for ((n, handle), r#type) in tokens.into_iter().zip(&mut h.tokens).zip(TOKEN_TYPES) {
                if n > 0 {
                    handle
                        .get_or_insert_with(|| {
                            self.tokens
                                .get_or_create(&TokenLabels {
                                    upstream: upstream.to_string(),
                                    model: model.to_string(),
                                    outcome: outcome.to_string(),
                                    r#type,
                                })
                                .clone()
                        })
                        .inc_by(n);
                }
            }
            if cost > 0.0 {
                h.cost
                    .get_or_insert_with(|| {
                        self.cost
                            .get_or_create(&CostLabels {
                                upstream: upstream.to_string(),
                                model: model.to_string(),
                                outcome: outcome.to_string(),
                            })
                            .clone()
                    })
                    .inc_by(cost);
            }
        });
    }

    pub fn new() -> Metrics {
        Metrics::with_events_lost(Counter::default())
    }

    /// `events_lost` is the spool's own counter (it counts failed writes).
    pub fn with_events_lost(events_lost: Counter) -> Metrics {
        let mut r = Registry::with_prefix("tollgate");
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let m = Metrics {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
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
            config_restart_pending: Gauge::default(),
            tenant_spent: Family::default(),
            tenant_remaining: Family::default(),
            scrape: std::sync::Mutex::new(()),
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
            "config_restart_pending",
            "1 while the file changes settings that apply only on restart (listeners, data_dir, shutdown_grace, max_connections, header_read_timeout, write_timeout, [spool], [[sinks]])",
            m.config_restart_pending.clone(),
        );
        r.register(
            "rejected_unrecorded",
            "Refused calls counted here, not written to the spool: 503 metering_unavailable, and any refusal while the spool is half full or failing",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    /// Cached handles count into their own registry's series, survive the
    /// cache starting over, and create no series for zero counts.
    #[test]
    fn cached_call_counters_land_in_their_own_registry() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.count_call("openai", "gpt-4o-mini", "ok", [10, 5, 0, 0, 0], 0.25);
        b.count_call("openai", "gpt-4o-mini", "ok", [1, 0, 0, 0, 0], 0.0);
        // Fill the cache past its bound so it starts over.
        for i in 0..MAX_CACHED_LABEL_SETS {
            a.count_call("openai", &format!("m{i}"), "ok", [0; 5], 0.0);
        }
        a.count_call("openai", "gpt-4o-mini", "ok", [10, 5, 0, 0, 0], 0.25);
        let (ta, tb) = (a.encode(), b.encode());
        let calls = r#"tollgate_calls_total{upstream="openai",model="gpt-4o-mini",outcome="ok"}"#;
        assert_eq!(line(&ta, calls), Some(&*format!("{calls} 2")));
        assert_eq!(line(&tb, calls), Some(&*format!("{calls} 1")));
        let input = r#"tollgate_tokens_total{upstream="openai",model="gpt-4o-mini",outcome="ok",type="input"}"#;
        assert_eq!(line(&ta, input), Some(&*format!("{input} 20")));
        assert_eq!(line(&tb, input), Some(&*format!("{input} 1")));
        let cost = r#"tollgate_cost_usd_total{upstream="openai",model="gpt-4o-mini",outcome="ok"}"#;
        assert_eq!(line(&ta, cost), Some(&*format!("{cost} 0.5")));
        assert_eq!(line(&tb, cost), None, "zero cost makes no series");
        assert!(
            !tb.contains(r#"type="output""#),
            "zero tokens make no series"
        );
    }
}
