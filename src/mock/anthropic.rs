//! Anthropic Messages API shapes, as JSON and as SSE, the same shapes as
//! `tests/fixtures/anthropic`.

use serde_json::{json, Value};

use super::control::{Tokens, CHUNK};
use super::router::{Handled, Reply};
use super::sse::Piece;

/// `{"type":"error","error":{...}}`, Anthropic's error shape.
pub(crate) fn error(status: http::StatusCode, message: &str) -> Value {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

pub(crate) fn handle(req: &Value, t: Tokens, no_usage: bool, n: u64) -> Handled {
    let model = req["model"].as_str().unwrap_or("mock").to_owned();
    let usage = (!no_usage).then_some(t);
    let reply = if req["stream"].as_bool() == Some(true) {
        Reply::Stream(stream(n, &model, &t, usage))
    } else {
        let mut body = message(
            n,
            &model,
            &t,
            vec![json!({"type": "text", "text": t.text()})],
        );
        body["stop_reason"] = json!(stop_reason(&t));
        match (usage, body.as_object_mut()) {
            (Some(u), _) => body["usage"] = usage_json(&u, u.output),
            (None, Some(o)) => {
                o.remove("usage");
            }
            (None, None) => {}
        }
        Reply::Json(body)
    };
    Handled {
        reply,
        reported: usage.map(|u| u.normalized()),
    }
}

fn stop_reason(t: &Tokens) -> &'static str {
    if t.hit_max {
        "max_tokens"
    } else {
        "end_turn"
    }
}

/// `input_tokens` excludes cache reads and writes, as Anthropic reports it.
fn usage_json(t: &Tokens, output: u64) -> Value {
    json!({
        "input_tokens": t.uncached_input,
        "cache_creation_input_tokens": t.cache_write,
        "cache_read_input_tokens": t.cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": t.cache_write - t.cache_write_1h,
            "ephemeral_1h_input_tokens": t.cache_write_1h},
        "output_tokens": output,
        "service_tier": "standard",
    })
}

fn message(n: u64, model: &str, t: &Tokens, content: Vec<Value>) -> Value {
    json!({"id": format!("msg_mock{n}"), "type": "message", "role": "assistant",
        "model": model, "content": content, "stop_reason": null, "stop_sequence": null,
        "usage": usage_json(t, 1)})
}

/// message_start, content_block_start, ping, one content_block_delta per
/// chunk, content_block_stop, message_delta (cumulative output_tokens only),
/// message_stop.
fn stream(n: u64, model: &str, t: &Tokens, usage: Option<Tokens>) -> Vec<Piece> {
    let ev = |name: &str, data: Value, content: bool| Piece::event(Some(name), &data, content);
    let mut start = message(n, model, t, Vec::new());
    if usage.is_none() {
        start.as_object_mut().and_then(|o| o.remove("usage"));
    }
    let mut out = Vec::with_capacity(t.chunks() + 6);
    out.push(ev(
        "message_start",
        json!({"type": "message_start", "message": start}),
        false,
    ));
    out.push(ev(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        false,
    ));
    out.push(ev("ping", json!({"type": "ping"}), false));
    for _ in 0..t.chunks() {
        let delta = json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": CHUNK}});
        out.push(ev("content_block_delta", delta, true));
    }
    out.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
        false,
    ));
    let mut delta = json!({"type": "message_delta",
        "delta": {"stop_reason": stop_reason(t), "stop_sequence": null}});
    if let Some(u) = usage {
        delta["usage"] = json!({"output_tokens": u.output});
    }
    out.push(ev("message_delta", delta, false));
    out.push(ev("message_stop", json!({"type": "message_stop"}), false));
    out
}
