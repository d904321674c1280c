//! OpenAI Responses API shapes: the `response` object and its event stream,
//! the same shapes as `tests/fixtures/openai/responses*`.

use serde_json::{json, Value};

use super::control::{Tokens, CHUNK};
use super::sse::Piece;
use super::CREATED;

fn message_item(n: u64, text: &str, status: &str) -> Value {
    json!({"id": format!("msg_mock{n}"), "type": "message", "status": status,
        "role": "assistant", "content": [text_part(text)]})
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
}

/// A Responses API `response` object; `done` fills in the output and status.
pub(crate) fn response(
    n: u64,
    model: &str,
    t: &Tokens,
    usage: Option<Tokens>,
    done: bool,
) -> Value {
    let status = match (done, t.hit_max) {
        (false, _) => "in_progress",
        (true, false) => "completed",
        (true, true) => "incomplete",
    };
    let mut output = Vec::new();
    if done && t.reasoning > 0 {
        output.push(json!({"id": format!("rs_mock{n}"), "type": "reasoning", "summary": []}));
    }
    if done {
        output.push(message_item(n, &t.text(), status));
    }
    let incomplete = t.hit_max.then(|| json!({"reason": "max_output_tokens"}));
    let usage = match (done, usage) {
        (true, Some(u)) => json!({
            "input_tokens": u.total_input(),
            "input_tokens_details": {"cached_tokens": u.cache_read},
            "output_tokens": u.output,
            "output_tokens_details": {"reasoning_tokens": u.reasoning},
            "total_tokens": u.total_input() + u.output,
        }),
        _ => Value::Null,
    };
    json!({"id": format!("resp_mock{n}"), "object": "response", "created_at": CREATED,
        "status": status, "background": false, "error": null,
        "incomplete_details": if done { incomplete } else { None },
        "instructions": null, "max_output_tokens": null, "model": model, "output": output,
        "parallel_tool_calls": true, "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null}, "service_tier": "default",
        "store": true, "temperature": 1.0, "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
        "usage": usage, "user": null, "metadata": {}})
}

pub(crate) fn stream(n: u64, model: &str, t: &Tokens, usage: Option<Tokens>) -> Vec<Piece> {
    let mut out = Vec::with_capacity(t.chunks() + 9);
    let mut push = |name: &str, mut data: Value, content: bool| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(out.len());
        out.push(Piece::event(Some(name), &data, content));
    };
    let item_id = format!("msg_mock{n}");
    let at = |extra: Value| {
        let mut v = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
        if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        v
    };
    let started = response(n, model, t, None, false);
    push("response.created", json!({"response": started}), false);
    push("response.in_progress", json!({"response": started}), false);
    let added = json!({"id": item_id, "type": "message", "status": "in_progress",
        "content": [], "role": "assistant"});
    push(
        "response.output_item.added",
        json!({"output_index": 0, "item": added}),
        false,
    );
    push(
        "response.content_part.added",
        at(json!({"part": text_part("")})),
        false,
    );
    for _ in 0..t.chunks() {
        let delta = at(json!({"delta": CHUNK, "logprobs": []}));
        push("response.output_text.delta", delta, true);
    }
    let text = t.text();
    let done = json!({"text": text, "logprobs": []});
    push("response.output_text.done", at(done), false);
    push(
        "response.content_part.done",
        at(json!({"part": text_part(&text)})),
        false,
    );
    let status = if t.hit_max { "incomplete" } else { "completed" };
    let item = message_item(n, &text, status);
    push(
        "response.output_item.done",
        json!({"output_index": 0, "item": item}),
        false,
    );
    let last = response(n, model, t, usage, true);
    push(
        &format!("response.{status}"),
        json!({"response": last}),
        false,
    );
    out
}
