//! OpenAI response shapes: chat completions, completions, Responses and
//! embeddings, as JSON and as SSE, the same shapes as `tests/fixtures/openai`.

use serde_json::{json, Value};

use super::control::{Tokens, CHUNK};
use super::responses;
use super::router::{Handled, Reply};
use super::sse::Piece;
use super::CREATED;

const FINGERPRINT: &str = "fp_5ca7f00d42";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Chat,
    Completions,
    Responses,
    Embeddings,
}

/// `{"error":{...}}`, OpenAI's error shape.
pub(crate) fn error(status: http::StatusCode, message: &str) -> Value {
    let (kind, code) = match status.as_u16() {
        401 => ("invalid_request_error", json!("invalid_api_key")),
        403 => ("permission_error", Value::Null),
        404 => ("invalid_request_error", json!("unknown_url")),
        429 => ("requests", json!("rate_limit_exceeded")),
        s if s >= 500 => ("server_error", Value::Null),
        _ => ("invalid_request_error", Value::Null),
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

pub(crate) fn models() -> Value {
    let model = |id: &str, created: u64| json!({"id": id, "object": "model", "created": created, "owned_by": "system"});
    json!({"object": "list", "data": [
        model("gpt-4o-mini", 1_721_172_741),
        model("gpt-4o", 1_715_367_049),
        model("o4-mini", 1_744_225_351),
        model("text-embedding-3-small", 1_705_948_997),
    ]})
}

pub(crate) fn handle(op: Op, req: &Value, mut t: Tokens, no_usage: bool, n: u64) -> Handled {
    let model = format!("{}-2024-07-18", req["model"].as_str().unwrap_or("mock"));
    if op == Op::Embeddings {
        t = Tokens {
            cache_read: 0,
            cache_write: 0,
            cache_write_1h: 0,
            output: 0,
            reasoning: 0,
            ..t
        };
    }
    let stream = op != Op::Embeddings && req["stream"].as_bool() == Some(true);
    let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
    let reported =
        (!no_usage && (!stream || include_usage || op == Op::Responses)).then(|| t.normalized());
    let usage = (!no_usage).then_some(t);
    let reply = match (op, stream) {
        (Op::Embeddings, _) => Reply::Json(embeddings(req, &model, &t, no_usage)),
        (Op::Responses, false) => Reply::Json(responses::response(n, &model, &t, usage, true)),
        (Op::Responses, true) => Reply::Stream(responses::stream(n, &model, &t, usage)),
        (_, false) => Reply::Json(completion(op, n, &model, &t, usage)),
        (_, true) => Reply::Stream(chunks(op, n, &model, &t, include_usage, usage)),
    };
    Handled { reply, reported }
}

fn chat_usage(t: &Tokens) -> Value {
    let prompt = t.total_input();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": t.output,
        "total_tokens": prompt + t.output,
        "prompt_tokens_details": {"cached_tokens": t.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": t.reasoning, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    })
}

fn finish(t: &Tokens) -> &'static str {
    if t.hit_max {
        "length"
    } else {
        "stop"
    }
}

fn completion(op: Op, n: u64, model: &str, t: &Tokens, usage: Option<Tokens>) -> Value {
    let (id, object, choice) = if op == Op::Chat {
        let message = json!({"role": "assistant", "content": t.text(), "refusal": null,
            "annotations": []});
        let choice = json!({"index": 0, "message": message, "logprobs": null,
            "finish_reason": finish(t)});
        (format!("chatcmpl-mock{n}"), "chat.completion", choice)
    } else {
        let choice = json!({"text": t.text(), "index": 0, "logprobs": null,
            "finish_reason": finish(t)});
        (format!("cmpl-mock{n}"), "text_completion", choice)
    };
    let mut body = json!({"id": id, "object": object, "created": CREATED, "model": model,
        "choices": [choice], "service_tier": "default", "system_fingerprint": FINGERPRINT});
    if let Some(u) = usage {
        body["usage"] = chat_usage(&u);
    }
    body
}

/// Chat or completions chunks, then `[DONE]`. With `include_usage` every
/// chunk carries `"usage": null` and a last `choices: []` chunk the usage.
fn chunks(
    op: Op,
    n: u64,
    model: &str,
    t: &Tokens,
    include_usage: bool,
    usage: Option<Tokens>,
) -> Vec<Piece> {
    let chunk = |choices: Value| {
        let mut c = if op == Op::Chat {
            json!({"id": format!("chatcmpl-mock{n}"), "object": "chat.completion.chunk",
                "created": CREATED, "model": model, "service_tier": "default",
                "system_fingerprint": FINGERPRINT, "choices": choices})
        } else {
            json!({"id": format!("cmpl-mock{n}"), "object": "text_completion",
                "created": CREATED, "choices": choices, "model": model,
                "system_fingerprint": FINGERPRINT})
        };
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let choice = |text: &str, finish: Option<&str>| {
        if op == Op::Chat {
            let delta = match (text, finish) {
                (_, Some(_)) => json!({}),
                ("", None) => json!({"role": "assistant", "content": "", "refusal": null}),
                _ => json!({"content": text}),
            };
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
        } else {
            json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}])
        }
    };
    let mut out = Vec::with_capacity(t.chunks() + 4);
    if op == Op::Chat {
        out.push(Piece::event(None, &chunk(choice("", None)), false));
    }
    for _ in 0..t.chunks() {
        out.push(Piece::event(None, &chunk(choice(CHUNK, None)), true));
    }
    out.push(Piece::event(
        None,
        &chunk(choice("", Some(finish(t)))),
        false,
    ));
    if let (true, Some(u)) = (include_usage, usage) {
        let mut last = chunk(json!([]));
        last["usage"] = chat_usage(&u);
        out.push(Piece::event(None, &last, false));
    }
    out.push(Piece::done());
    out
}

fn embeddings(req: &Value, model: &str, t: &Tokens, no_usage: bool) -> Value {
    let inputs = match &req["input"] {
        Value::Array(items) if items.iter().all(Value::is_number) => 1,
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| {
            let v: Vec<f64> = (0..8)
                .map(|j| ((i * 8 + j) % 17) as f64 / 16.0 - 0.5)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    let mut body = json!({"object": "list", "data": data, "model": model});
    if !no_usage {
        body["usage"] =
            json!({"prompt_tokens": t.uncached_input, "total_tokens": t.uncached_input});
    }
    body
}
