//! Micro-benchmarks of the hot paths: SSE usage extraction per MB, token
//! estimation per KB, event serialisation per event. `cargo bench`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rust_decimal::Decimal;
use tollgate::config::Provider;
use tollgate::event::{CallData, Event, Outcome, Usage, UsageSource};
use tollgate::meter::{Format, Operation, ResponseMeter};

fn chat_sse(bytes: usize) -> Vec<u8> {
    let chunk = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1751980462,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":" hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#;
    let mut out = Vec::with_capacity(bytes + 512);
    while out.len() < bytes {
        out.extend_from_slice(chunk.as_bytes());
        out.extend_from_slice(b"\n\n");
    }
    out.extend_from_slice(br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1751980462,"model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":31,"completion_tokens":9000,"total_tokens":9031}}"#);
    out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
    out
}

fn sse_extraction(c: &mut Criterion) {
    let body = chat_sse(1 << 20);
    let frames: Vec<Bytes> = body.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
    let mut g = c.benchmark_group("sse_usage_extraction");
    g.throughput(Throughput::Bytes(body.len() as u64));
    for (name, strip) in [("passthrough", false), ("strip_usage", true)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut m =
                    ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Sse, strip);
                for f in &frames {
                    black_box(m.feed(f.clone()));
                }
                black_box(m.finish());
                assert!(m.usage().is_some());
            })
        });
    }
    g.finish();
}

fn token_estimation(c: &mut Criterion) {
    let text = "The customer cannot log in after the password reset and asks for a manual unlock of the account. ".repeat(11);
    let text = &text[..1024];
    tollgate::meter::tokens::count("gpt-4o-mini", "warm up the table");
    let mut g = c.benchmark_group("token_estimation");
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("o200k_1KiB", |b| {
        b.iter(|| tollgate::meter::tokens::count("gpt-4o-mini", black_box(text)))
    });
    g.finish();
}

fn event_serialisation(c: &mut Criterion) {
    let data = CallData {
        schema_version: "1".into(),
        tenant: "acme".into(),
        upstream: "openai".into(),
        provider: "openai".into(),
        operation: "chat".into(),
        request_model: Some("gpt-4o-mini".into()),
        response_model: Some("gpt-4o-mini-2024-07-18".into()),
        request_id: Some("req_0123456789abcdef".into()),
        http_status: 200,
        stream: true,
        outcome: Outcome::Ok,
        usage_source: UsageSource::Provider,
        usage: Usage {
            input_tokens: 1200,
            cache_read_input_tokens: 1024,
            cache_write_input_tokens: 0,
            cache_write_1h_input_tokens: 0,
            output_tokens: 350,
            reasoning_output_tokens: 64,
        },
        calls: 1,
        cost: "0.0002823".parse::<Decimal>().unwrap(),
        currency: "USD".into(),
        price_version: "sha256:0123456789ab".into(),
        unpriced: false,
        duration_ms: 812,
        ttft_ms: Some(95),
        error: None,
    };
    let mut g = c.benchmark_group("event_serialisation");
    g.throughput(Throughput::Elements(1));
    g.bench_function("llm_call_to_line", |b| {
        b.iter(|| {
            black_box(Event::new("tollgate/bench", "llm.call", "acme", black_box(&data)).to_line())
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    sse_extraction,
    token_estimation,
    event_serialisation
);
criterion_main!(benches);
