//! Usage events as OTLP: one log record per event with the OpenTelemetry
//! GenAI attribute names, plus per-batch delta metrics:
//! `gen_ai.client.token.usage` and `gen_ai.client.operation.duration`
//! (histograms, semantic-convention buckets) and a `tollgate.cost` counter.
//! Tenant attributes go on metrics only when configured (cardinality).

use std::collections::BTreeMap;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Histogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::event::{CallData, Event};

const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(key: &str, v: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.into()))
}

fn i(key: &str, v: u64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v as i64))
}

/// GenAI `gen_ai.operation.name` for our operation.
fn operation_name(op: &str) -> &str {
    match op {
        "chat" | "responses" | "messages" => "chat",
        "completions" => "text_completion",
        "embeddings" => "embeddings",
        "tool_call" => "execute_tool",
        other => other,
    }
}

fn nanos(t: &str) -> u64 {
    OffsetDateTime::parse(t, &Rfc3339)
        .map(|t| t.unix_timestamp_nanos() as u64)
        .unwrap_or(0)
}

/// Parsed events of a batch (unreadable lines are skipped and logged).
pub fn parse(lines: &[Bytes]) -> Vec<Event> {
    lines
        .iter()
        .filter_map(|l| match serde_json::from_slice(l) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::error!(error = %e, "otlp: unreadable event line skipped");
                None
            }
        })
        .collect()
}

fn resource(source: &str) -> Option<Resource> {
    Some(Resource {
        attributes: vec![s("service.name", "tollgate"), s("tollgate.source", source)],
        ..Default::default()
    })
}

fn scope() -> Option<InstrumentationScope> {
    Some(InstrumentationScope {
        name: "tollgate".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    })
}

/// One log record per event.
pub fn logs(events: &[Event]) -> ExportLogsServiceRequest {
    let records = events
        .iter()
        .map(|e| {
            let mut attrs = vec![
                s("cloudevents.event_id", &e.id),
                s("cloudevents.event_source", &e.source),
                s("cloudevents.event_type", &e.kind),
                s("tollgate.tenant", &e.subject),
            ];
            if let Some(d) = e.call_data() {
                attrs.extend(call_attributes(&d));
            } else if let Some(obj) = e.data.as_object() {
                // Outcome and credit events: their fields, as strings.
                for (k, v) in obj.iter().filter(|(k, _)| *k != "tenant") {
                    let text = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    attrs.push(s(&format!("tollgate.{k}"), &text));
                }
            }
            LogRecord {
                time_unix_nano: nanos(&e.time),
                observed_time_unix_nano: nanos(&e.time),
                severity_number: 9,
                severity_text: "INFO".into(),
                body: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(e.kind.to_string())),
                }),
                event_name: format!("tollgate.{}", e.kind),
                attributes: attrs,
                ..Default::default()
            }
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: resource(events.first().map(|e| e.source.as_str()).unwrap_or("")),
            scope_logs: vec![ScopeLogs {
                scope: scope(),
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn call_attributes(d: &CallData) -> Vec<KeyValue> {
    let u = &d.usage;
    let mut a = vec![
        s("gen_ai.operation.name", operation_name(&d.operation)),
        s("gen_ai.provider.name", provider_name(d)),
        i("gen_ai.usage.input_tokens", u.input_tokens),
        i("gen_ai.usage.output_tokens", u.output_tokens),
        i(
            "gen_ai.usage.cache_read.input_tokens",
            u.cache_read_input_tokens,
        ),
        i(
            "gen_ai.usage.cache_creation.input_tokens",
            u.cache_write_input_tokens,
        ),
        i(
            "gen_ai.usage.reasoning.output_tokens",
            u.reasoning_output_tokens,
        ),
        // No GenAI convention splits cache writes by lifetime.
        i(
            "tollgate.usage.cache_creation_1h.input_tokens",
            u.cache_write_1h_input_tokens,
        ),
        s("tollgate.cost", &d.cost.to_string()),
        s("tollgate.currency", &d.currency),
        s("tollgate.outcome", d.outcome.as_str()),
        s(
            "tollgate.usage_source",
            &format!("{:?}", d.usage_source).to_lowercase(),
        ),
        s("tollgate.upstream", &d.upstream),
        i("tollgate.calls", d.calls),
        i("http.response.status_code", u64::from(d.http_status)),
        i("tollgate.duration_ms", d.duration_ms),
    ];
    if let Some(m) = &d.request_model {
        a.push(s("gen_ai.request.model", m));
    }
    if let Some(m) = &d.response_model {
        a.push(s("gen_ai.response.model", m));
    }
    if let Some(r) = &d.request_id {
        a.push(s("gen_ai.response.id", r));
    }
    a
}

fn provider_name(d: &CallData) -> &str {
    match &*d.provider {
        "generic" => &d.upstream,
        p => p,
    }
}

/// Attribute set of a metric point, as a sortable key.
type Key = Vec<(String, String)>;

#[derive(Default)]
struct Hist {
    count: u64,
    sum: f64,
    buckets: Vec<u64>,
}

impl Hist {
    fn add(&mut self, v: f64, bounds: &[f64]) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; bounds.len() + 1];
        }
        self.count += 1;
        self.sum += v;
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len());
        self.buckets[i] += 1;
    }
}

/// Delta metrics over the batch's calls.
pub fn metrics(events: &[Event], tenant_attributes: bool) -> Option<ExportMetricsServiceRequest> {
    let calls: Vec<(u64, CallData)> = events
        .iter()
        .filter_map(|e| e.call_data().map(|d| (nanos(&e.time), d)))
        .filter(|(_, d)| d.calls > 0)
        .collect();
    if calls.is_empty() {
        return None;
    }
    let start = calls.iter().map(|(t, _)| *t).min().unwrap_or(0);
    let end = calls.iter().map(|(t, _)| *t).max().unwrap_or(0);
    let mut tokens: BTreeMap<Key, Hist> = BTreeMap::new();
    let mut duration: BTreeMap<Key, Hist> = BTreeMap::new();
    let mut cost: BTreeMap<Key, f64> = BTreeMap::new();
    for (_, d) in &calls {
        let mut key: Key = vec![
            (
                "gen_ai.operation.name".into(),
                operation_name(&d.operation).into(),
            ),
            ("gen_ai.provider.name".into(), provider_name(d).into()),
        ];
        if let Some(m) = &d.request_model {
            key.push(("gen_ai.request.model".into(), m.clone()));
        }
        if tenant_attributes {
            key.push(("tollgate.tenant".into(), d.tenant.clone()));
        }
        if d.outcome.as_str() != "ok" {
            key.push(("error.type".into(), d.outcome.as_str().into()));
        }
        duration
            .entry(key.clone())
            .or_default()
            .add(d.duration_ms as f64 / 1000.0, DURATION_BUCKETS);
        *cost.entry(key.clone()).or_default() += f64::try_from(d.cost).unwrap_or(0.0);
        for (kind, n) in [
            ("input", d.usage.input_tokens),
            ("output", d.usage.output_tokens),
        ] {
            if n > 0 {
                let mut k = key.clone();
                k.push(("gen_ai.token.type".into(), kind.into()));
                tokens.entry(k).or_default().add(n as f64, TOKEN_BUCKETS);
            }
        }
    }
    let attrs = |k: &Key| k.iter().map(|(a, b)| s(a, b)).collect::<Vec<_>>();
    let hist =
        |name: &str, desc: &str, unit: &str, m: &BTreeMap<Key, Hist>, bounds: &[f64]| Metric {
            name: name.into(),
            description: desc.into(),
            unit: unit.into(),
            data: Some(metric::Data::Histogram(Histogram {
                aggregation_temporality: AggregationTemporality::Delta as i32,
                data_points: m
                    .iter()
                    .map(|(k, h)| HistogramDataPoint {
                        attributes: attrs(k),
                        start_time_unix_nano: start,
                        time_unix_nano: end,
                        count: h.count,
                        sum: Some(h.sum),
                        bucket_counts: h.buckets.clone(),
                        explicit_bounds: bounds.to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        };
    let metrics = vec![
        hist(
            "gen_ai.client.token.usage",
            "Number of input and output tokens used",
            "{token}",
            &tokens,
            TOKEN_BUCKETS,
        ),
        hist(
            "gen_ai.client.operation.duration",
            "GenAI operation duration",
            "s",
            &duration,
            DURATION_BUCKETS,
        ),
        Metric {
            name: "tollgate.cost".into(),
            description: "Cost of calls at price-table rates".into(),
            unit: "USD".into(),
            data: Some(metric::Data::Sum(Sum {
                aggregation_temporality: AggregationTemporality::Delta as i32,
                is_monotonic: true,
                data_points: cost
                    .iter()
                    .map(|(k, v)| NumberDataPoint {
                        attributes: attrs(k),
                        start_time_unix_nano: start,
                        time_unix_nano: end,
                        value: Some(number_data_point::Value::AsDouble(*v)),
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        },
    ];
    Some(ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: resource(&events[0].source),
            scope_metrics: vec![ScopeMetrics {
                scope: scope(),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    })
}
