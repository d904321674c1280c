//! The worst case a call reserves (DESIGN §7), part by part: each of these
//! left out would let a call spend past what it reserved.

use super::*;

const CONFIG: &str = r#"
[[upstreams]]
name = "openai"
prefix = "/openai"
url = "http://127.0.0.1:9"
provider = "openai"

[models."gpt-4o-mini"]
input = "0.15"
output = "0.60"
max_output_tokens = 1000

[pricing]
url_item_tokens = 500

[[tenants]]
id = "acme"
budget = { limit = "LIMIT", window = "total" }
"#;

fn policy(limit: &str) -> Policy {
    crate::config::parse(&CONFIG.replace("LIMIT", limit), "t.toml", &|_| None).unwrap()
}

fn with_ask<T>(p: &Policy, body: &str, f: impl FnOnce(&Ask<'_>) -> T) -> T {
    with_op_ask(p, Operation::Chat, body, f)
}

fn with_op_ask<T>(p: &Policy, op: Operation, body: &str, f: impl FnOnce(&Ask<'_>) -> T) -> T {
    let body = Bytes::from(body.to_string());
    let info = RequestInfo::parse(&body, op).unwrap();
    let ask = Ask {
        policy: p,
        tenant: &p.tenants["acme"],
        upstream: &p.upstreams[0],
        op,
        info: &info,
        body: &body,
    };
    f(&ask)
}

fn usd(input: u64, output: u64) -> Decimal {
    (Decimal::from(input) * Decimal::new(15, 2) + Decimal::from(output) * Decimal::new(60, 2))
        / MILLION
}

/// The worst case as admission computes it, the request model's price
/// looked up.
fn worst_case(a: &Ask<'_>, input: u64) -> Decimal {
    super::worst_case(a, request_price(a), input)
}

#[test]
fn output_is_the_request_cap_else_the_model_default_times_the_choices() {
    let p = policy("1");
    for (body, output) in [
        (
            r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[]}"#,
            100,
        ),
        (
            r#"{"model":"gpt-4o-mini","max_tokens":100,"n":5,"messages":[]}"#,
            500,
        ),
        (r#"{"model":"gpt-4o-mini","messages":[]}"#, 1000),
        (r#"{"model":"gpt-4o-mini","n":3,"messages":[]}"#, 3000),
        (r#"{"model":"gpt-4o-mini","prompt":"x","best_of":4}"#, 4000),
        (
            r#"{"model":"gpt-4o-mini-2024-07-18","max_tokens":7,"messages":[]}"#,
            7,
        ),
    ] {
        let got = with_ask(&p, body, |a| worst_case(a, 0));
        assert_eq!(got, usd(0, output), "{body}");
    }
}

/// A cap in a field the route's API does not read (`max_output_tokens` on
/// chat) caps nothing at an upstream that ignores unknown fields: the
/// call reserves the model's own cap, and that cap is sent.
#[test]
fn a_cap_in_another_routes_field_is_not_trusted() {
    let p = policy("1");
    for (op, body) in [
        (
            Operation::Chat,
            r#"{"model":"gpt-4o-mini","max_output_tokens":1,"messages":[]}"#,
        ),
        (
            Operation::Responses,
            r#"{"model":"gpt-4o-mini","max_tokens":1,"input":"x"}"#,
        ),
    ] {
        let (got, cap) = with_op_ask(&p, op, body, |a| {
            (worst_case(a, 0), output_cap(a, request_price(a)))
        });
        assert_eq!((got, cap), (usd(0, 1000), Some(1000)), "{op:?}");
    }
}

/// The test config plus a dearer dated model (2.50 / 10, at most 2,000
/// output tokens).
fn with_dated_gpt4o() -> Policy {
    let config = CONFIG.replace("LIMIT", "1").replace(
        "[pricing]",
        "[models.\"gpt-4o-2024-08-06\"]\ninput = \"2.50\"\noutput = \"10\"\nmax_output_tokens = 2000\n\n[pricing]",
    );
    crate::config::parse(&config, "t.toml", &|_| None).unwrap()
}

/// A request model with no price of its own may still be answered as a
/// priced one (an alias answered as a dated snapshot), and settling prices
/// the response model: it reserves as the dearest configured model.
#[test]
fn an_unpriced_request_model_reserves_as_the_dearest_configured_model() {
    let p = with_dated_gpt4o();
    let dearest =
        (Decimal::from(100) * Decimal::new(250, 2) + Decimal::from(2000) * Decimal::TEN) / MILLION;
    for model in ["gpt-4o", "o1-pro", "chatgpt-4o-latest"] {
        let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
        let got = with_ask(&p, &body, |a| worst_case(a, 100));
        assert_eq!(got, dearest, "{model}");
        // And what settling would charge if the upstream answered with the
        // dated model fits in it.
        let price = p.price(model, "gpt-4o-2024-08-06").unwrap();
        assert!(with_ask(&p, &body, |a| worst_case_at(a, price, 100)) <= got);
    }
    // A route that is not metered (no model, no tokens) reserves nothing.
    let got = with_ask(&p, r#"{"messages":[]}"#, |a| {
        let mut a = Ask { ..*a };
        a.op = Operation::Other;
        worst_case(&a, 100)
    });
    assert_eq!(got, Decimal::ZERO);
    // The request's own cap still bounds the output.
    let got = with_ask(
        &p,
        r#"{"model":"gpt-4o","max_tokens":10,"messages":[]}"#,
        |a| worst_case(a, 0),
    );
    assert_eq!(got, Decimal::from(10) * Decimal::TEN / MILLION);
}

/// The output cap sent with a request that names none: the model's; an
/// unpriced model's is the smallest configured (so whichever model prices
/// the response stays within its own worst case); none where the request
/// names one, or where the route has no cap field.
#[test]
fn the_output_cap_sent_is_the_one_reserved() {
    let p = with_dated_gpt4o();
    let cap = |body: &str, op| {
        with_ask(&p, body, |a| {
            let a = Ask { op, ..*a };
            output_cap(&a, request_price(&a))
        })
    };
    let chat = Operation::Chat;
    assert_eq!(
        cap(r#"{"model":"gpt-4o-2024-08-06","messages":[]}"#, chat),
        Some(2000)
    );
    assert_eq!(cap(r#"{"model":"gpt-4o","messages":[]}"#, chat), Some(1000));
    assert_eq!(
        cap(r#"{"model":"gpt-4o","max_tokens":9,"messages":[]}"#, chat),
        None
    );
    assert_eq!(
        cap(
            r#"{"model":"gpt-4o-mini","input":"x"}"#,
            Operation::Responses
        ),
        Some(1000)
    );
    assert_eq!(
        cap(
            r#"{"model":"gpt-4o-mini","input":"x"}"#,
            Operation::Embeddings
        ),
        None
    );
}

#[test]
fn input_is_the_body_bytes_plus_an_allowance_per_item_by_reference() {
    let p = policy("1");
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/a.png"}},{"type":"file","file":{"file_id":"f1"}}]}]}"#;
    let got = with_ask(&p, body, input_bound);
    assert_eq!(got, body.len() as u64 + 2 * 500);
    let body = r#"{"model":"gpt-4o-mini","input":"hi","previous_response_id":"r1"}"#;
    let got = with_ask(&p, body, |a| {
        let mut a = Ask { ..*a };
        a.op = Operation::Responses;
        input_bound(&a) + stored_context(&a)
    });
    assert_eq!(got, body.len() as u64 + 128_000);
    // The Responses API's image by URL is a string `image_url`; chat's is
    // an object whose `url` is counted (not twice).
    for (body, items) in [
        (
            r#"{"model":"gpt-4o-mini","input":[{"role":"user","content":[{"type":"input_image","image_url" : "https://x/a.png"}]}]}"#,
            1,
        ),
        (
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/a.png"}}]}]}"#,
            1,
        ),
    ] {
        let got = with_ask(&p, body, input_bound);
        assert_eq!(got, body.len() as u64 + items * 500, "{body}");
    }
    // Inline files are items too: billed by pixels or pages, not by their
    // base64 text, which can be far shorter (a 1092x1092 one-bit PNG is
    // about 270 characters and some 1,590 tokens).
    for (op, body, items) in [
        (
            Operation::Messages,
            r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo"}},{"type":"document","source":{"type": "base64","media_type":"application/pdf","data":"JVBERi0"}}]}]}"#,
            2,
        ),
        (
            Operation::Chat,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"filename":"a.pdf","file_data":"data:application/pdf;base64,JVBERi0"}}]}]}"#,
            1,
        ),
        (
            Operation::Responses,
            r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_file","filename":"a.pdf","file_data":"data:application/pdf;base64,JVBERi0"}]}]}"#,
            1,
        ),
        // Not a file: an embedding's encoding, and the word in text.
        (
            Operation::Embeddings,
            r#"{"model":"m","input":"say \"base64\"","encoding_format":"base64"}"#,
            0,
        ),
    ] {
        let got = with_op_ask(&p, op, body, input_bound);
        assert_eq!(got, body.len() as u64 + items * 500, "{body}");
    }
}

/// The token count that refines a refused byte bound counts what the model
/// reads and the byte bound covers: token ids given as numbers, the
/// property names of tool schemas; an inline image is an item, not text.
#[test]
fn the_refining_count_counts_token_ids_schema_keys_and_inline_images() {
    use crate::meter::request::input_text;
    let ids = input_text(br#"{"model":"text-embedding-3-small","input":[[1,2,3],[4,5]]}"#);
    assert_eq!(ids.token_ids, 5);
    let ids = input_text(br#"{"model":"gpt-3.5-turbo-instruct","prompt":[10,11,12]}"#);
    assert_eq!(ids.token_ids, 3);
    let name = "hello_".repeat(50);
    let tools = format!(
        r#"{{"model":"gpt-4o-mini","messages":[],"tools":[{{"type":"function","function":{{"name":"f","parameters":{{"type":"object","properties":{{"{name}":{{"type":"string"}}}}}}}}}}]}}"#
    );
    let t = input_text(tools.as_bytes());
    assert!(t.text.contains(&name), "{}", t.text);
    assert!(t.text.contains("properties"));
    // Text that only looks like an inline image is text.
    let t = input_text(br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"text","text":"data:image/png;base64,QUJDQUJD"}]}]}"#);
    assert_eq!((t.by_reference, t.text.contains("QUJDQUJD")), (0, true));
    let b64 = "QUJD".repeat(5000);
    for body in [
        format!(
            r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{b64}"}}}}]}}]}}"#
        ),
        format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{b64}"}}}}]}}]}}"#
        ),
    ] {
        let t = input_text(body.as_bytes());
        assert_eq!(
            (t.by_reference, t.text.len() < 100),
            (1, true),
            "{}",
            t.text.len()
        );
    }
}

/// The byte bound refuses, the token count admits: a long text of short
/// words is far fewer tokens than bytes.
#[tokio::test]
async fn a_call_the_byte_bound_refuses_is_admitted_on_its_token_count() {
    let text = "hello ".repeat(2000);
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":10,"messages":[{{"role":"user","content":"{text}"}}]}}"#
    );
    // About 2,000 tokens counted (" hello" is one), 12,000 bytes bound.
    let limit = (usd(2100, 10) * Decimal::new(15, 1))
        .normalize()
        .to_string();
    let p = policy(&limit);
    let limits = Limits::new(MemoryStore::default());
    let body = Bytes::from(body);
    let info = RequestInfo::parse(&body, Operation::Chat).unwrap();
    let ask = |info| Ask {
        policy: &p,
        tenant: &p.tenants["acme"],
        upstream: &p.upstreams[0],
        op: Operation::Chat,
        info,
        body: &body,
    };
    assert!(worst_case(&ask(&info), input_bound(&ask(&info))) > limit.parse().unwrap());
    let now = OffsetDateTime::now_utc();
    let admitted = limits.admit(ask(&info), now).await;
    assert!(admitted.is_ok(), "{:?}", admitted.err());
    // A second one does not fit beside it.
    assert!(matches!(
        limits.admit(ask(&info), now).await,
        Err(Refusal::Budget(_))
    ));
}

/// Input can be all cache writes, and a cache write kept an hour can be
/// the dearest input rate (Anthropic: 2x input against 1.25x for five
/// minutes): the reservation prices every input token at the dearest.
#[test]
fn input_is_reserved_at_the_dearest_input_rate() {
    let config = CONFIG.replace("LIMIT", "1").replace(
        "max_output_tokens = 1000",
        "max_output_tokens = 1000\ncache_write_input = \"0.1875\"\ncache_write_1h_input = \"0.30\"",
    );
    let p = crate::config::parse(&config, "t.toml", &|_| None).unwrap();
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let got = with_ask(&p, body, |a| worst_case(a, 100));
    let want = (Decimal::from(100) * Decimal::new(30, 2)
        + Decimal::from(1000) * Decimal::new(60, 2))
        / MILLION;
    assert_eq!(got, want);
    // Settling 100 input tokens all written for an hour fits in it.
    let price = &p.models["gpt-4o-mini"];
    let u = crate::event::Usage {
        input_tokens: 100,
        cache_write_input_tokens: 100,
        cache_write_1h_input_tokens: 100,
        output_tokens: 1000,
        ..Default::default()
    };
    assert_eq!(crate::meter::price::cost(price, &u), want);
}
