//! The usage event, v1 (DESIGN §6): a CloudEvents 1.0 envelope around a
//! neutral record of one metered call, outcome or credit. Field names are
//! stable: add fields, never rename. Never any prompt or completion text.

use std::borrow::Cow;

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
    /// Of the cache writes, those kept an hour (Anthropic's `ttl: "1h"`),
    /// priced at `cache_write_1h_input`. Absent from events written before
    /// it existed: 0.
    #[serde(default)]
    pub cache_write_1h_input_tokens: u64,
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
    /// (malformed JSON, too large, unknown model when rejected).
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
    pub specversion: Cow<'static, str>,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: Cow<'static, str>,
    pub subject: String,
    pub time: String,
    pub datacontenttype: Cow<'static, str>,
    pub data: D,
}

/// `data` of an `llm.call` or `tool.call` event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallData {
    pub schema_version: Cow<'static, str>,
    pub tenant: String,
    pub upstream: String,
    pub provider: Cow<'static, str>,
    pub operation: Cow<'static, str>,
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
    pub currency: Cow<'static, str>,
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
    /// The admin call's idempotency key: a retried top-up with the same
    /// key is applied once.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// An event's `data` as it is written into the line. The default goes
/// through serde; [`CallData`], written once per proxied call, has its own
/// encoder (same bytes, about a fifth of the instructions).
pub trait EventData: Serialize {
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("event data serializes");
    }
}

impl<T: EventData> EventData for &T {
    fn write_json(&self, out: &mut Vec<u8>) {
        (*self).write_json(out)
    }
}

impl EventData for serde_json::Value {}
impl EventData for OutcomeData {}
impl EventData for CreditData {}

impl EventData for CallData {
    fn write_json(&self, o: &mut Vec<u8>) {
        let u = &self.usage;
        json_str_members(
            o,
            [
                (b"{\"schema_version\":", &self.schema_version),
                (b",\"tenant\":", &self.tenant),
                (b",\"upstream\":", &self.upstream),
                (b",\"provider\":", &self.provider),
                (b",\"operation\":", &self.operation),
            ],
        );
        o.extend_from_slice(b",\"request_model\":");
        json_opt_str(o, self.request_model.as_deref());
        o.extend_from_slice(b",\"response_model\":");
        json_opt_str(o, self.response_model.as_deref());
        o.extend_from_slice(b",\"request_id\":");
        json_opt_str(o, self.request_id.as_deref());
        o.extend_from_slice(b",\"http_status\":");
        json_u64(o, u64::from(self.http_status));
        o.extend_from_slice(b",\"stream\":");
        json_bool(o, self.stream);
        o.extend_from_slice(b",\"outcome\":");
        json_str(o, self.outcome.as_str());
        o.extend_from_slice(b",\"usage_source\":");
        json_str(o, self.usage_source.as_str());
        for (name, n) in [
            (&b",\"input_tokens\":"[..], u.input_tokens),
            (b",\"cache_read_input_tokens\":", u.cache_read_input_tokens),
            (
                b",\"cache_write_input_tokens\":",
                u.cache_write_input_tokens,
            ),
            (
                b",\"cache_write_1h_input_tokens\":",
                u.cache_write_1h_input_tokens,
            ),
            (b",\"output_tokens\":", u.output_tokens),
            (b",\"reasoning_output_tokens\":", u.reasoning_output_tokens),
            (b",\"calls\":", self.calls),
        ] {
            o.extend_from_slice(name);
            json_u64(o, n);
        }
        o.extend_from_slice(b",\"cost\":\"");
        // A decimal's digits, sign and point never need escaping.
        json_decimal_digits(o, self.cost);
        o.extend_from_slice(b"\",\"currency\":");
        json_str(o, &self.currency);
        o.extend_from_slice(b",\"price_version\":");
        json_str(o, &self.price_version);
        o.extend_from_slice(b",\"unpriced\":");
        json_bool(o, self.unpriced);
        o.extend_from_slice(b",\"duration_ms\":");
        json_u64(o, self.duration_ms);
        o.extend_from_slice(b",\"ttft_ms\":");
        match self.ttft_ms {
            Some(n) => json_u64(o, n),
            None => o.extend_from_slice(b"null"),
        }
        if let Some(e) = &self.error {
            o.extend_from_slice(b",\"error\":");
            json_str(o, e);
        }
        o.push(b'}');
    }
}

/// A JSON string as serde_json writes it: most strings need no escape and
/// are copied; the others go through serde_json.
fn json_str(o: &mut Vec<u8>, s: &str) {
    // No early exit: the compiler vectorises the whole scan.
    let needs_escape = s
        .bytes()
        .fold(false, |e, b| e | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if !needs_escape {
        o.reserve(s.len() + 2);
        o.push(b'"');
        o.extend_from_slice(s.as_bytes());
        o.push(b'"');
    } else {
        serde_json::to_writer(&mut *o, s).expect("a string serializes");
    }
}

/// Members whose values are strings: each `name` is the key with its
/// leading `{` or `,` and trailing `:`.
fn json_str_members<const N: usize>(o: &mut Vec<u8>, members: [(&[u8], &str); N]) {
    for (name, value) in members {
        o.extend_from_slice(name);
        json_str(o, value);
    }
}

fn json_opt_str(o: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(o, s),
        None => o.extend_from_slice(b"null"),
    }
}

/// `d` as its `Display` writes it (sign, digits, point at the scale),
/// without the formatting machinery.
fn json_decimal_digits(o: &mut Vec<u8>, d: Decimal) {
    if d.is_sign_negative() {
        o.push(b'-');
    }
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(d.mantissa().unsigned_abs()).as_bytes();
    let scale = d.scale() as usize;
    if scale == 0 {
        o.extend_from_slice(digits);
    } else if digits.len() > scale {
        let (int, frac) = digits.split_at(digits.len() - scale);
        o.extend_from_slice(int);
        o.push(b'.');
        o.extend_from_slice(frac);
    } else {
        o.extend_from_slice(b"0.");
        o.resize(o.len() + scale - digits.len(), b'0');
        o.extend_from_slice(digits);
    }
}

fn json_u64(o: &mut Vec<u8>, n: u64) {
    o.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn json_bool(o: &mut Vec<u8>, b: bool) {
    o.extend_from_slice(if b { b"true" } else { b"false" });
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Provider => "provider",
            UsageSource::Estimated => "estimated",
            UsageSource::None => "none",
        }
    }
}

impl<D: EventData> Event<D> {
    /// A new event with a fresh ULID and the current time.
    pub fn new(source: &str, kind: &'static str, subject: impl Into<String>, data: D) -> Event<D> {
        Event::at(OffsetDateTime::now_utc(), source, kind, subject, data)
    }

    pub fn at(
        now: OffsetDateTime,
        source: &str,
        kind: &'static str,
        subject: impl Into<String>,
        data: D,
    ) -> Event<D> {
        Event {
            specversion: Cow::Borrowed("1.0"),
            id: ulid::Ulid::from_datetime(now.into()).to_string(),
            source: source.into(),
            kind: Cow::Borrowed(kind),
            subject: subject.into(),
            time: format_time(now),
            datacontenttype: Cow::Borrowed("application/json"),
            data,
        }
    }

    /// The JSONL line (with trailing newline) as written to the spool: the
    /// bytes serde_json would write for the event.
    pub fn to_line(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(768);
        json_str_members(
            &mut o,
            [
                (b"{\"specversion\":", &self.specversion),
                (b",\"id\":", &self.id),
                (b",\"source\":", &self.source),
                (b",\"type\":", &self.kind),
                (b",\"subject\":", &self.subject),
                (b",\"time\":", &self.time),
                (b",\"datacontenttype\":", &self.datacontenttype),
            ],
        );
        o.extend_from_slice(b",\"data\":");
        self.data.write_json(&mut o);
        o.extend_from_slice(b"}\n");
        o
    }
}

impl Event<serde_json::Value> {
    pub fn call_data(&self) -> Option<CallData> {
        match &*self.kind {
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
    let t = t.to_offset(time::UtcOffset::UTC);
    let (y, m, d) = t.to_calendar_date();
    let (h, mi, s, ms) = t.to_hms_milli();
    if !(0..=9999).contains(&y) {
        let f = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        return t.format(&f).expect("time formats");
    }
    // Digits by hand: the `time` formatter costs ten times as much.
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, y as u32);
    put(5, 2, u32::from(u8::from(m)));
    put(8, 2, u32::from(d));
    put(11, 2, u32::from(h));
    put(14, 2, u32::from(mi));
    put(17, 2, u32::from(s));
    put(20, 3, u32::from(ms));
    String::from_utf8(b.to_vec()).expect("ASCII digits")
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
    fn time_formats_like_the_time_crate() {
        let f = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        for ns in [
            0i128,
            1_795_464_000_123_456_789,
            951_782_400_999_999_999, // 2000-02-29T00:00:00.999
            253_402_300_799_000_000, // 9999-12-31T23:59:59
            253_402_300_800_000_000, // year 10000: the time crate's own format
            -1_000_000,
        ] {
            let t = OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap();
            assert_eq!(format_time(t), t.format(&f).unwrap(), "{ns}");
        }
    }

    fn call(strings: [&str; 5], error: Option<&str>, cost: &str) -> CallData {
        CallData {
            schema_version: SCHEMA_VERSION.into(),
            tenant: strings[0].into(),
            upstream: strings[1].into(),
            provider: "openai".into(),
            operation: "chat".into(),
            request_model: Some(strings[2].into()),
            response_model: (!strings[3].is_empty()).then(|| strings[3].into()),
            request_id: (!strings[4].is_empty()).then(|| strings[4].into()),
            http_status: 200,
            stream: true,
            outcome: Outcome::ClientAborted,
            usage_source: UsageSource::Estimated,
            usage: Usage {
                input_tokens: 1,
                cache_read_input_tokens: 0,
                cache_write_input_tokens: 12_345_678_901,
                cache_write_1h_input_tokens: 12_345,
                output_tokens: u64::MAX,
                reasoning_output_tokens: 7,
            },
            calls: 1,
            cost: cost.parse().unwrap(),
            currency: "USD".into(),
            price_version: "sha256:abc".into(),
            unpriced: false,
            duration_ms: 1234,
            ttft_ms: error.is_none().then_some(56),
            error: error.map(str::to_string),
        }
    }

    /// The hand-written encoder writes exactly what serde_json writes, for
    /// every field shape: strings needing escapes, absent options, the
    /// optional `error`, large and negative numbers.
    #[test]
    fn call_lines_are_byte_identical_to_serde() {
        let datas = [
            call(["acme", "openai", "gpt-4o-mini", "", ""], None, "0.0000123"),
            call(
                [
                    "t\"q\\b\u{1}\n\u{1f}",
                    "up\u{7f}é",
                    "模型",
                    "m\t",
                    "req-\"1\"",
                ],
                Some("upstream_stream_error"),
                "-12.5",
            ),
            call(
                ["a", "b", "c", "d", "e"],
                Some("x\u{0}y"),
                "79228162514264337593543950335",
            ),
        ];
        for (i, d) in datas.into_iter().enumerate() {
            for source in ["tollgate/test", "weird \"source\"\\"] {
                let e = Event::new(source, "llm.call", d.tenant.clone(), d.clone());
                let mut want = serde_json::to_vec(&e).unwrap();
                want.push(b'\n');
                assert_eq!(
                    String::from_utf8(e.to_line()).unwrap(),
                    String::from_utf8(want).unwrap(),
                    "case {i}"
                );
            }
        }
        let v = Event::new("s", "outcome", "t", serde_json::json!({"a": [1, "x\"y"]}));
        let mut want = serde_json::to_vec(&v).unwrap();
        want.push(b'\n');
        assert_eq!(v.to_line(), want);
    }

    #[test]
    fn ids_are_unique_and_sortable() {
        let a = Event::new("s", "llm.call", "t", serde_json::json!({}));
        let b = Event::new("s", "llm.call", "t", serde_json::json!({}));
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 26);
    }

    #[test]
    fn decimals_are_written_as_display_writes_them() {
        let mut cases = vec![
            Decimal::ZERO,
            -Decimal::ZERO,
            Decimal::new(0, 3),
            Decimal::new(5, 3),
            Decimal::new(-5, 3),
            Decimal::new(123, 2),
            Decimal::new(100, 2),
            Decimal::MAX,
            Decimal::MIN,
            Decimal::new(1, 28),
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let m = rng.i64(..) as i128 * rng.i64(1..1 << 31) as i128;
            cases.push(Decimal::from_i128_with_scale(m, rng.u32(0..=28)));
        }
        for d in cases {
            for d in [d, d.normalize()] {
                let mut o = Vec::new();
                super::json_decimal_digits(&mut o, d);
                assert_eq!(String::from_utf8(o).unwrap(), d.to_string(), "{d:?}");
            }
        }
    }
}
