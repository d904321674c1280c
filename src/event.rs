//! The usage event, v1 (DESIGN §6): a CloudEvents 1.0 envelope around a
//! neutral record of one metered call, outcome or credit. Field names are
//! stable: add fields, never rename. Never any prompt or completion text.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub const SCHEMA_VERSION: &str = "1";

/// Token counts in the OpenTelemetry GenAI rule: `input_tokens` includes cache
/// reads and writes, `output_tokens` includes reasoning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_write_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_output_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    Provider,
    Estimated,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    ClientAborted,
    UpstreamError,
    RejectedBudget,
    RejectedRate,
    RejectedAuth,
    /// A request the proxy refused before forwarding for another reason
    /// (malformed JSON, too large, spool full, unknown model when rejected).
    RejectedRequest,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamError => "upstream_error",
            Outcome::RejectedBudget => "rejected_budget",
            Outcome::RejectedRate => "rejected_rate",
            Outcome::RejectedAuth => "rejected_auth",
            Outcome::RejectedRequest => "rejected_request",
        }
    }
}

/// The CloudEvents envelope. `id` (a ULID) and `time` are fixed at creation
/// and never change on resend. Written with typed `data` (no intermediate
/// JSON tree); read back with `data` as a JSON value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event<D = serde_json::Value> {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub time: String,
    pub datacontenttype: String,
    pub data: D,
}

/// `data` of an `llm.call` or `tool.call` event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallData {
    pub schema_version: String,
    pub tenant: String,
    pub upstream: String,
    pub provider: String,
    pub operation: String,
    pub request_model: Option<String>,
    pub response_model: Option<String>,
    pub request_id: Option<String>,
    pub http_status: u16,
    pub stream: bool,
    pub outcome: Outcome,
    pub usage_source: UsageSource,
    #[serde(flatten)]
    pub usage: Usage,
    pub calls: u64,
    pub cost: Decimal,
    pub currency: String,
    pub price_version: String,
    /// True when the model had no price: cost is 0 and needs re-rating.
    pub unpriced: bool,
    pub duration_ms: u64,
    pub ttft_ms: Option<u64>,
    /// Short stable error kind when the proxy or upstream failed the call.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// `data` of an `outcome` event reported by the app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeData {
    pub schema_version: String,
    pub tenant: String,
    pub name: String,
    pub quantity: Decimal,
    pub idempotency_key: Option<String>,
}

/// `data` of a `credit` event (a prepaid top-up).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreditData {
    pub schema_version: String,
    pub tenant: String,
    pub amount: Decimal,
    pub currency: String,
    pub reason: String,
}

impl<D: Serialize> Event<D> {
    /// A new event with a fresh ULID and the current time.
    pub fn new(source: &str, kind: &str, subject: &str, data: D) -> Event<D> {
        Event::at(OffsetDateTime::now_utc(), source, kind, subject, data)
    }

    pub fn at(now: OffsetDateTime, source: &str, kind: &str, subject: &str, data: D) -> Event<D> {
        Event {
            specversion: "1.0".into(),
            id: ulid::Ulid::from_datetime(now.into()).to_string(),
            source: source.into(),
            kind: kind.into(),
            subject: subject.into(),
            time: format_time(now),
            datacontenttype: "application/json".into(),
            data,
        }
    }

    /// The JSONL line (with trailing newline) as written to the spool.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = Vec::with_capacity(768);
        serde_json::to_writer(&mut line, self).expect("event serializes");
        line.push(b'\n');
        line
    }
}

impl Event<serde_json::Value> {
    pub fn call_data(&self) -> Option<CallData> {
        match self.kind.as_str() {
            "llm.call" | "tool.call" => serde_json::from_value(self.data.clone()).ok(),
            _ => None,
        }
    }
}

/// RFC 3339 UTC with milliseconds: `2026-11-23T20:00:00.123Z`.
/// `t` as events carry it: milliseconds (what a replay of the line reads).
pub fn event_instant(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000_000 * 1_000_000)
        .expect("a whole number of milliseconds is a valid nanosecond")
}

pub fn format_time(t: OffsetDateTime) -> String {
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&f)
        .expect("time formats")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_has_millis_and_z() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_795_464_000_123_456_789).unwrap();
        assert_eq!(format_time(t), "2026-11-23T20:00:00.123Z");
    }

    #[test]
    fn ids_are_unique_and_sortable() {
        let a = Event::new("s", "llm.call", "t", serde_json::json!({}));
        let b = Event::new("s", "llm.call", "t", serde_json::json!({}));
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 26);
    }
}
