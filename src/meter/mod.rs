//! Metering: what a call used and what it cost, turned into exactly one
//! usage event per call.
//!
//! A [`Call`] is opened once the tenant is known and travels through the
//! request phases; the response body is wrapped in a [`MeteredBody`] that owns
//! it from then on. Whatever happens (the body completes, the upstream fails,
//! the client goes away) the call ends in [`Call::finish`] or, if dropped, in
//! a detached finish: one event, never zero, never two.

mod body;
mod json_scan;
pub mod needles;
pub mod price;
pub mod request;
pub mod response;
pub mod sse;
pub mod tokens;
pub mod usage;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::OptionFuture;
use rust_decimal::Decimal;

use crate::config::{Policy, Provider, Upstream};
use crate::event::{CallData, Event, Outcome, Usage, UsageSource, SCHEMA_VERSION};
use crate::metrics::UpstreamLabels;
use crate::spool::Flush;
use crate::App;

pub use body::MeteredBody;
pub use request::{Operation, RequestInfo};
pub use response::{Coding, Format, ResponseMeter};

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The response body reached its end (or its terminal event).
    Complete,
    /// The upstream broke off the body (reset, timeout, bad framing).
    BodyError(&'static str),
    /// The client went away before the end.
    ClientAborted,
    /// No response from the upstream (502 unreachable, 504 timeout).
    NoResponse { status: u16, kind: &'static str },
    /// The proxy refused the call before forwarding it.
    Rejected {
        status: u16,
        outcome: Outcome,
        kind: &'static str,
    },
}

impl End {
    /// The call reached the upstream (everything but a refusal).
    fn forwarded(self) -> bool {
        !matches!(self, End::Rejected { .. })
    }
}

/// One metered call, from authentication to its event.
pub struct Call {
    state: Option<Box<CallState>>,
}

pub struct CallState {
    pub app: Arc<App>,
    pub policy: Arc<Policy>,
    pub tenant: String,
    pub upstream: Arc<Upstream>,
    pub op: Operation,
    pub request: RequestInfo,
    /// Kept (reference-counted, not copied) for estimation if usage is missing.
    pub request_body: Bytes,
    pub started: Instant,
    pub first_byte: Option<Instant>,
    pub status: u16,
    /// The request was handed to an upstream connection (set by
    /// `pool::send_to`; back to `false` if it came back unsent).
    pub dispatched: bool,
    pub request_id: Option<String>,
    pub meter: Option<ResponseMeter>,
    /// What admission granted (reservation, token charge); settled at the end.
    pub admission: Option<crate::limits::Admission>,
}

impl Call {
    pub fn new(
        app: Arc<App>,
        policy: Arc<Policy>,
        tenant: String,
        upstream: Arc<Upstream>,
        op: Operation,
    ) -> Call {
        app.inflight.enter();
        Call {
            state: Some(Box::new(CallState {
                app,
                policy,
                tenant,
                upstream,
                op,
                request: RequestInfo::default(),
                request_body: Bytes::new(),
                started: Instant::now(),
                first_byte: None,
                status: 0,
                dispatched: false,
                request_id: None,
                meter: None,
                admission: None,
            })),
        }
    }

    pub fn state(&mut self) -> &mut CallState {
        self.state
            .as_mut()
            .expect("a call is only used until it finishes")
    }

    /// Ends the call: prices it, writes its event to the spool; the future
    /// returned waits until the event is there.
    ///
    /// When the usage is known (reported, or none to count) the event is
    /// built, settled and its line queued here, before this returns, so
    /// dropping the future (the client went away) loses nothing. A call that
    /// needs an estimate is handed to a task of the main runtime here too
    /// (with its end time and in-flight count taken now), so a dropped or
    /// never-polled future cannot cancel it either. `flush` says when the
    /// line is written (see `Spool::append`).
    pub fn finish(mut self, end: End, flush: Flush) -> Finishing {
        let mut state = self.state.take().expect("finish runs once");
        state.cut_short(end);
        match state.usage_plan(end) {
            UsagePlan::Known(usage, source) => {
                let guard = InflightGuard(state.app.clone());
                let now = time::OffsetDateTime::now_utc();
                Box::pin(state.record_with(end, flush, now, usage, source, guard))
            }
            UsagePlan::Estimate(_) => {
                let rt = state.app.rt.clone();
                let task = rt.spawn(state.record(end, flush));
                Box::pin(async move {
                    let _ = task.await;
                })
            }
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(mut state) = self.state.take() {
            // Dropped mid-flight: the client went away. Finish on a task of
            // the main runtime (a worker's may be shutting down).
            state.cut_short(End::ClientAborted);
            let rt = state.app.rt.clone();
            rt.spawn(state.record(End::ClientAborted, Flush::Batch));
        }
    }
}

/// The wait for a finished call's event to be written.
pub type Finishing = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Where a call's usage comes from, decided when it ends.
enum UsagePlan {
    Known(Usage, UsageSource),
    /// Tokens were spent but not (fully) reported: estimate, keeping what
    /// the provider did report.
    Estimate(Option<Usage>),
}

/// Counts the call out of `App::inflight` when the event is written (or
/// whatever ends the call's task first).
struct InflightGuard(Arc<App>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.exit();
    }
}

impl CallState {
    /// A body that stopped before its end: the meter reads what came.
    fn cut_short(&mut self, end: End) {
        if end != End::Complete {
            if let Some(m) = self.meter.as_mut() {
                m.cut_short();
            }
        }
    }

    /// Provider usage when reported, else an estimate when tokens were
    /// spent, else none.
    fn usage_plan(&self, end: End) -> UsagePlan {
        let meter = self.meter.as_ref();
        let provider_usage = meter.and_then(|m| m.usage());
        let complete = meter.is_some_and(|m| m.complete);
        let got_response =
            end.forwarded() && self.status != 0 && !matches!(end, End::NoResponse { .. });
        // Tokens were spent when the upstream answered a metered call with a
        // success status; trust its usage only when the stream completed.
        match provider_usage {
            Some(u) if complete => UsagePlan::Known(u, UsageSource::Provider),
            partial if self.op.is_metered() && got_response && self.status < 400 => {
                UsagePlan::Estimate(partial)
            }
            // The client went away after the request went upstream, before
            // the answer began: the provider may bill the prompt (and what
            // it generated), so the input at least is counted, estimated.
            None if self.op.is_metered()
                && self.dispatched
                && self.status == 0
                && end == End::ClientAborted =>
            {
                UsagePlan::Estimate(None)
            }
            _ => UsagePlan::Known(Usage::default(), UsageSource::None),
        }
    }

    /// [`CallState::record_with`] after estimating the usage if needed, and
    /// the wait for the write. The end time and the in-flight guard are
    /// taken at once, not when the returned future first runs; the guard
    /// also ends the count if the estimate fails.
    fn record(self: Box<Self>, end: End, flush: Flush) -> impl std::future::Future<Output = ()> {
        let guard = InflightGuard(self.app.clone());
        let now = time::OffsetDateTime::now_utc();
        async move {
            let (usage, source) = match self.usage_plan(end) {
                UsagePlan::Known(u, s) => (u, s),
                UsagePlan::Estimate(partial) => {
                    (estimate(&self, partial).await, UsageSource::Estimated)
                }
            };
            self.record_with(end, flush, now, usage, source, guard)
                .await
        }
    }

    /// Builds the event, settles the limits and queues the event's line in
    /// the spool; the returned future waits until the line is written.
    fn record_with(
        mut self: Box<Self>,
        end: End,
        flush: Flush,
        now: time::OffsetDateTime,
        usage: Usage,
        source: UsageSource,
        guard: InflightGuard,
    ) -> impl std::future::Future<Output = ()> {
        let app = self.app.clone();
        let policy = self.policy.clone();
        let admission = self.admission.take();
        let refused = !end.forwarded();
        let event = self.into_event(end, now, usage, source);
        let data = &event.data;
        // Settle before the event is written: the spend is live at once and
        // the snapshot keeper counts the event when it reads it.
        app.limits.settle(
            &data.tenant,
            admission,
            data.cost,
            data.usage.input_tokens,
            data.usage.output_tokens,
            now,
        );
        record_metrics(&app, &policy, data);
        tracing::debug!(
            event_id = %event.id,
            outcome = data.outcome.as_str(),
            status = data.http_status,
            input_tokens = data.usage.input_tokens,
            output_tokens = data.usage.output_tokens,
            cost = %data.cost,
            "call metered"
        );
        // A refused call (nothing forwarded, nothing spent) is written only
        // while the spool has room for refusals (see
        // `Spool::has_room_for_refusals`): refused because metering is
        // unavailable, its event would grow the very backlog that is full;
        // and a flood of refusals (a 401 needs no credential) must not take
        // the room billed calls need. Counted in the metrics instead.
        let unrecorded = refused && !app.spool.has_room_for_refusals();
        let written = if unrecorded {
            app.metrics.rejected_unrecorded.inc();
            None
        } else {
            let note = crate::limits::state::Note::Spend {
                tenant: data.tenant.clone(),
                amount: data.cost,
                at: crate::event::event_instant(now),
            };
            Some(app.spool.append_noted(event.to_line(), Some(note), flush))
        };
        let (event_id, tenant, upstream) = (event.id, event.data.tenant, event.data.upstream);
        async move {
            if let Some(Err(e)) = OptionFuture::from(written).await {
                // Counted in `events_lost` by the spool.
                tracing::error!(
                    error = %e,
                    event_id = %event_id,
                    tenant = %tenant,
                    upstream = %upstream,
                    "usage event lost: spool append failed"
                );
            }
            drop(guard);
        }
    }

    /// Builds the event from the call and its usage.
    fn into_event(
        self: Box<Self>,
        end: End,
        now: time::OffsetDateTime,
        usage: Usage,
        source: UsageSource,
    ) -> Event<CallData> {
        let mut s = *self;
        let stream_error = s.meter.as_ref().is_some_and(|m| m.stream_error);
        let stream_cut = s.meter.as_ref().is_some_and(|m| m.stream_cut());
        let (status, outcome, error) = match end {
            End::Rejected {
                status,
                outcome,
                kind,
            } => (status, outcome, Some(kind)),
            End::NoResponse { status, kind } => (status, Outcome::UpstreamError, Some(kind)),
            End::ClientAborted => (s.status, Outcome::ClientAborted, None),
            End::BodyError(kind) => (s.status, Outcome::UpstreamError, Some(kind)),
            End::Complete if s.status >= 400 => (s.status, Outcome::UpstreamError, None),
            End::Complete if stream_error => (
                s.status,
                Outcome::UpstreamError,
                Some("upstream_stream_error"),
            ),
            End::Complete if stream_cut => (
                s.status,
                Outcome::UpstreamError,
                Some("upstream_stream_truncated"),
            ),
            End::Complete => (s.status, Outcome::Ok, None),
        };
        // Moved, not copied: the state ends here.
        let model = s.request.model.take();
        let response_model = s.meter.as_mut().and_then(|m| m.response_model.take());
        let price = s.policy.price(
            model.as_deref().unwrap_or(""),
            response_model.as_deref().unwrap_or(""),
        );
        let mut cost = match price {
            Some(p) => price::cost(p, &usage),
            None => Decimal::ZERO,
        };
        if s.upstream.provider == Provider::Generic && outcome == Outcome::Ok {
            cost += s.upstream.price_per_call;
        }
        // Flag only calls whose model was read and has no price (not, say, a
        // 401 refused before the body was parsed).
        let unpriced = s.op.is_metered() && model.is_some() && price.is_none();
        let data = CallData {
            schema_version: SCHEMA_VERSION.into(),
            tenant: s.tenant.clone(),
            upstream: s.upstream.name.clone(),
            provider: s.upstream.provider.as_str().into(),
            operation: s.op.as_str().into(),
            request_model: bounded(model),
            response_model: bounded(response_model),
            request_id: bounded(s.request_id.take()),
            http_status: status,
            stream: s.request.stream,
            outcome,
            usage_source: source,
            usage,
            calls: u64::from(end.forwarded()),
            cost: cost.normalize(),
            currency: "USD".into(),
            price_version: s.policy.price_version.clone(),
            unpriced,
            duration_ms: s.started.elapsed().as_millis() as u64,
            ttft_ms: s
                .first_byte
                .filter(|_| s.request.stream)
                .map(|t| t.duration_since(s.started).as_millis() as u64),
            error: error.map(str::to_string),
        };
        let kind = if s.upstream.provider == Provider::Generic {
            "tool.call"
        } else {
            "llm.call"
        };
        Event::at(now, &s.policy.server.source, kind, s.tenant, data)
    }
}

/// Estimates usage for a call the provider did not (fully) report: input from
/// the request text, output from the text that streamed. Provider figures
/// seen so far (Anthropic's `message_start`) win where they are larger.
async fn estimate(s: &CallState, partial: Option<Usage>) -> Usage {
    let body = s.request_body.clone();
    let model = s.request.model.clone().unwrap_or_default();
    let (out_text, overflow) = s
        .meter
        .as_ref()
        .map(|m| m.generated_text())
        .unwrap_or_default();
    let embeddings = s.op == Operation::Embeddings;
    // Images and files passed by reference (or inline images) are not text:
    // each counts as the configured allowance, as when admitting.
    let per_item = s.policy.url_item_tokens;
    // If the count fails: four bytes a token over the body and the text.
    let by_length = (
        (s.request_body.len() as u64).div_ceil(4),
        if embeddings {
            0
        } else {
            (out_text.len() as u64 + overflow).div_ceil(4)
        },
    );
    let est = tokens::estimate_blocking(move || {
        let input_tokens = request::input_text(&body).tokens(&model, per_item);
        let output_tokens = if embeddings {
            0
        } else {
            tokens::count(&model, &out_text) + overflow.div_ceil(4)
        };
        (input_tokens, output_tokens)
    })
    .await
    .unwrap_or(by_length);
    let p = partial.unwrap_or_default();
    Usage {
        input_tokens: if p.input_tokens > 0 {
            p.input_tokens
        } else {
            est.0
        },
        cache_read_input_tokens: p.cache_read_input_tokens,
        cache_write_input_tokens: p.cache_write_input_tokens,
        cache_write_1h_input_tokens: p.cache_write_1h_input_tokens,
        output_tokens: p.output_tokens.max(est.1),
        reasoning_output_tokens: p.reasoning_output_tokens,
    }
}

/// `policy` is the one the call ran on, so labels match its price table.
fn record_metrics(app: &App, policy: &Policy, d: &CallData) {
    let m = &app.metrics;
    let model = match (&d.unpriced, &d.request_model) {
        (false, Some(model)) if policy.models.contains_key(model) => model.as_str(),
        (false, _) if d.provider == "generic" => "none",
        (false, _) => "priced",
        (true, _) => "unpriced",
    };
    if d.unpriced {
        m.unpriced
            .get_or_create(&UpstreamLabels {
                upstream: d.upstream.clone(),
            })
            .inc();
    }
    let u = &d.usage;
    m.count_call(
        &d.upstream,
        model,
        d.outcome.as_str(),
        [
            u.input_tokens,
            u.output_tokens,
            u.cache_read_input_tokens,
            u.cache_write_input_tokens,
            u.reasoning_output_tokens,
        ],
        f64::try_from(d.cost).unwrap_or(0.0),
    );
}

/// The most bytes of a client- or upstream-chosen string (model, request id)
/// an event keeps: a 2 MB `model` made a 4 MB event (and an OTLP message
/// past receivers' 4 MiB limit, retried forever).
const MAX_FIELD_BYTES: usize = 256;

fn bounded(s: Option<String>) -> Option<String> {
    s.map(|mut s| {
        if s.len() > MAX_FIELD_BYTES {
            let mut n = MAX_FIELD_BYTES;
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            s.truncate(n);
        }
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that needs an estimate is recorded even if the future
    /// `finish` returns is dropped before it is ever polled: its event is
    /// written and it is counted out of the in-flight calls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_estimated_call_is_recorded_when_its_wait_is_never_polled() {
        let dir = tempfile::tempdir().unwrap();
        let src = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "{}"

[[upstreams]]
name = "openai"
prefix = "/openai"
url = "http://127.0.0.1:9"
provider = "openai"

[[tenants]]
id = "acme"
keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
"#,
            dir.path().display()
        );
        let policy = crate::config::parse(&src, "t.toml", &|_| None).unwrap();
        let running = crate::start(policy).await.unwrap();
        let app = running.app.clone();
        let policy = app.policy.load_full();
        let upstream = policy.upstreams[0].clone();
        let mut call = Call::new(
            app.clone(),
            policy.clone(),
            "acme".into(),
            upstream,
            Operation::Chat,
        );
        let s = call.state();
        s.request_body = Bytes::from_static(
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        );
        s.status = 200;
        // A stream cut before its usage: tokens were spent, none reported.
        s.meter = Some(ResponseMeter::new(
            Provider::OpenAi,
            Operation::Chat,
            response::Format::Sse,
            false,
        ));
        let before = app
            .spool
            .stats
            .appended_events
            .load(std::sync::atomic::Ordering::SeqCst);
        drop(call.finish(End::BodyError("upstream_reset"), Flush::Now));
        tokio::time::timeout(std::time::Duration::from_secs(10), app.inflight.zero())
            .await
            .expect("the call is counted out once its event is written");
        let after = app
            .spool
            .stats
            .appended_events
            .load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(after, before + 1, "exactly one event");
        running.shutdown().await;
    }
}
