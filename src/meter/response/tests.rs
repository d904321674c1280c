//! Every parser runs over every golden fixture in `tests/fixtures/`, whole,
//! split at every byte position, and in 1-byte and 7-byte reads.

use super::*;
use std::path::Path;

struct Fixture {
    name: String,
    body: Vec<u8>,
    format: Format,
    provider: Provider,
    op: Operation,
    expected: serde_json::Value,
}

fn fixtures() -> Vec<Fixture> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = Vec::new();
    for dir in ["openai", "anthropic"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let format = if name.ends_with(".sse") {
                Format::Sse
            } else if name.ends_with(".json") && !name.ends_with(".expected.json") {
                Format::Json
            } else {
                continue;
            };
            let stem = name.rsplit_once('.').unwrap().0;
            let expected: serde_json::Value = serde_json::from_slice(
                &std::fs::read(path.with_file_name(format!("{stem}.expected.json"))).unwrap(),
            )
            .unwrap();
            let provider = match expected["provider"].as_str().unwrap() {
                "openai" => Provider::OpenAi,
                _ => Provider::Anthropic,
            };
            let op = match expected["operation"].as_str().unwrap() {
                "chat" => Operation::Chat,
                "completions" => Operation::Completions,
                "responses" => Operation::Responses,
                "embeddings" => Operation::Embeddings,
                _ => Operation::Messages,
            };
            out.push(Fixture {
                name: format!("{dir}/{name}"),
                body: std::fs::read(&path).unwrap(),
                format,
                provider,
                op,
                expected,
            });
        }
    }
    assert!(out.len() >= 19, "fixtures missing: {}", out.len());
    out
}

struct Run {
    usage: Option<Usage>,
    model: Option<String>,
    complete: bool,
    text: String,
    out: Vec<u8>,
}

fn run(f: &Fixture, chunks: &[&[u8]], strip: bool) -> Run {
    run_coded(f, chunks, strip, Coding::Identity)
}

fn run_coded(f: &Fixture, chunks: &[&[u8]], strip: bool, coding: Coding) -> Run {
    let mut m = ResponseMeter::new(f.provider, f.op, f.format, strip).decoding(coding);
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&m.feed(Bytes::copy_from_slice(c)));
    }
    out.extend_from_slice(&m.finish());
    Run {
        usage: m.usage(),
        model: m.response_model.clone(),
        complete: m.complete,
        text: m.generated_text().0,
        out,
    }
}

fn check(f: &Fixture, r: &Run, how: &str) {
    let want_usage: Option<Usage> = serde_json::from_value(f.expected["usage"].clone()).unwrap();
    assert_eq!(r.usage, want_usage, "{} usage ({how})", f.name);
    assert_eq!(
        r.model.as_deref(),
        f.expected["response_model"].as_str(),
        "{} model ({how})",
        f.name
    );
    assert_eq!(
        r.complete,
        f.expected["complete"].as_bool().unwrap(),
        "{} complete ({how})",
        f.name
    );
    let want_text = f.expected["text"].as_str().unwrap();
    if f.format == Format::Sse {
        // Estimation also counts tool arguments, which the fixture's `text` leaves out.
        assert!(
            r.text.contains(want_text),
            "{} text ({how}): {:?}",
            f.name,
            r.text
        );
        if !f.name.contains("tool") {
            assert_eq!(r.text, want_text, "{} text ({how})", f.name);
        }
    }
}

#[test]
fn every_fixture_every_split() {
    for f in fixtures() {
        let b = &f.body[..];
        let whole = run(&f, &[b], false);
        check(&f, &whole, "whole");
        assert_eq!(
            whole.out, b,
            "{}: passthrough must not change bytes",
            f.name
        );
        for i in 0..=b.len() {
            check(
                &f,
                &run(&f, &[&b[..i], &b[i..]], false),
                &format!("split at {i}"),
            );
        }
        for n in [1, 7] {
            let chunks: Vec<&[u8]> = b.chunks(n).collect();
            check(&f, &run(&f, &chunks, false), &format!("{n}-byte reads"));
        }
    }
}

/// Every fixture gzip-compressed, read in small pieces: the same usage,
/// model and text, and the client's bytes untouched (even where strip
/// mode was asked for: a compressed body cannot be rewritten).
#[test]
fn every_fixture_through_gzip() {
    use std::io::Write;
    for f in fixtures() {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&f.body).unwrap();
        let coded = z.finish().unwrap();
        for n in [1, 7, 4096] {
            let chunks: Vec<&[u8]> = coded.chunks(n).collect();
            for strip in [false, true] {
                let r = run_coded(&f, &chunks, strip, Coding::Gzip);
                check(&f, &r, &format!("gzip, {n}-byte reads"));
                assert_eq!(
                    r.out, coded,
                    "{}: the coded body must pass unchanged",
                    f.name
                );
            }
        }
    }
}

#[test]
fn strip_mode_meters_the_same_and_hides_usage() {
    for f in fixtures().into_iter().filter(|f| {
        f.format == Format::Sse && matches!(f.op, Operation::Chat | Operation::Completions)
    }) {
        let b = &f.body[..];
        let whole = run(&f, &[b], true);
        check(&f, &whole, "strip whole");
        let text = String::from_utf8(whole.out.clone()).unwrap();
        assert!(
            !text.contains("\"usage\""),
            "{}: usage leaked to client:\n{text}",
            f.name
        );
        assert!(!text.contains("\"choices\":[]"), "{}", f.name);
        for n in [1, 3, 64] {
            let chunks: Vec<&[u8]> = b.chunks(n).collect();
            let r = run(&f, &chunks, true);
            check(&f, &r, &format!("strip {n}-byte reads"));
            assert_eq!(r.out, whole.out, "{}: output depends on framing", f.name);
        }
        // What remains is exactly the upstream's events minus the usage parts.
        let mut want = BytesMut::new();
        remove_usage_null(b, &mut want);
        let want = String::from_utf8(want.to_vec()).unwrap();
        for line in text.lines() {
            assert!(want.contains(line), "{}: unexpected line {line}", f.name);
        }
    }
}

#[test]
fn removes_usage_null_members() {
    let mut out = BytesMut::new();
    remove_usage_null(br#"data: {"a":1,"usage":null}"#, &mut out);
    assert_eq!(&out[..], br#"data: {"a":1}"#);
    let mut out = BytesMut::new();
    remove_usage_null(br#"data: {"usage":null,"a":1}"#, &mut out);
    assert_eq!(&out[..], br#"data: {"a":1}"#);
}

#[test]
fn detects_usage_objects_only() {
    assert!(has_usage_object(br#"{"usage": {"a":1}}"#));
    assert!(!has_usage_object(br#"{"usage":null}"#));
    // The top-level member ending the chunk is what counts; nested ones and
    // trailing whitespace do not fool the shortcut.
    assert!(!has_usage_object(b"{\"a\":1,\"usage\":null}\n"));
    assert!(has_usage_object(
        br#"{"x":{"usage":{"a":1}},"usage":{"b":2}}"#
    ));
    assert!(has_usage_object(br#"{"usage":{"a":1},"x":{"usage":null}}"#));
    assert!(has_usage_object(
        br#"{"usage":{"a":1},"y":[{"usage":null}]}"#
    ));
    // A key ending in an escaped quote is not the usage member; an escaped
    // backslash before a real quote is.
    assert!(has_usage_object(br#"{"usage":{"a":1},"x\"usage":null}"#));
    assert!(!has_usage_object(br#"{"x\\":1,"usage":null}"#));
    assert!(has_usage_object(br#"{"usage":{"a":1},"x\\\"usage":null}"#));
}

/// Bodies past `MAX_JSON_BYTES` keep only their head and tail (a large
/// embeddings batch held whole cost its full size per call): usage and
/// model still come out, from the tail or the head.
#[test]
fn large_bodies_are_metered_from_head_and_tail_in_bounded_memory() {
    let floats = "0.0123456789,".repeat(MAX_JSON_BYTES / 12 + 1000);
    let embeddings = format!(
        r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[{floats}0.5]}}],"model":"text-embedding-3-small","usage":{{"prompt_tokens":1234,"total_tokens":1234}}}}"#
    );
    let chat = format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":9,"completion_tokens":1500000,"total_tokens":1500009}}}}"#,
        "ab ".repeat(MAX_JSON_BYTES / 3 + 1000)
    );
    // The Responses API echoes client-chosen `user` and `metadata` after
    // `usage`: decoys there must not stand in for the top-level members.
    let responses = format!(
        r#"{{"id":"resp_1","object":"response","model":"gpt-4.1-2025-04-14","output":[{{"type":"message","content":[{{"type":"output_text","text":"{}"}}]}}],"usage":{{"input_tokens":900000,"output_tokens":5000,"total_tokens":905000}},"user":"usage","metadata":{{"usage":"{{}}","model":"gpt-4o-mini","note":"\"usage\":{{\"input_tokens\":0}}"}}}}"#,
        "ab ".repeat(MAX_JSON_BYTES / 3 + 1000)
    );
    for (body, op, model, input, output) in [
        (
            &responses,
            Operation::Responses,
            "gpt-4.1-2025-04-14",
            900_000,
            5000,
        ),
        (
            &embeddings,
            Operation::Embeddings,
            "text-embedding-3-small",
            1234,
            0,
        ),
        (
            &chat,
            Operation::Chat,
            "gpt-4o-mini-2024-07-18",
            9,
            1_500_000,
        ),
    ] {
        assert!(body.len() > MAX_JSON_BYTES);
        let mut m = ResponseMeter::new(Provider::OpenAi, op, Format::Json, false);
        let mut held = 0;
        for c in body.as_bytes().chunks(64 << 10) {
            m.feed(Bytes::copy_from_slice(c));
            held = held.max(m.json.len() + m.json_first.len());
        }
        m.finish();
        assert!(held <= MAX_JSON_BYTES + (64 << 10), "held {held} bytes");
        assert_eq!(m.response_model.as_deref(), Some(model));
        let u = m.usage().expect("usage from the tail");
        assert_eq!((u.input_tokens, u.output_tokens), (input, output));
    }
}

/// A body past `MAX_JSON_BYTES` without usage has no kept text to estimate
/// from: the whole of it counts at four bytes a token (it counted as 0).
#[test]
fn a_large_body_without_usage_is_estimated_from_its_length() {
    let body = format!(
        r#"{{"id":"chatcmpl-1","model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}}}}]}}"#,
        "ab ".repeat(MAX_JSON_BYTES / 3 + 1000)
    );
    let mut m = ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Json, false);
    for c in body.as_bytes().chunks(64 << 10) {
        m.feed(Bytes::copy_from_slice(c));
    }
    m.finish();
    assert!(m.usage().is_none());
    assert_eq!(m.generated_text().1, body.len() as u64);
}

/// A body without usage is estimated from its text however it is laid
/// out: OpenAI pretty-prints non-streamed bodies, and a line-by-line read
/// found no text in them (0 output tokens).
#[test]
fn pretty_printed_bodies_without_usage_are_estimated_from_their_text() {
    let compact = r#"{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Four score and seven years ago"},"finish_reason":"stop"}]}"#;
    let pretty =
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(compact).unwrap())
            .unwrap();
    for body in [compact.to_string(), pretty] {
        let mut m = ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Json, false);
        m.feed(Bytes::from(body.clone()));
        m.finish();
        assert!(m.usage().is_none());
        let (text, _) = m.generated_text();
        assert!(
            text.starts_with("Four score and seven years ago"),
            "{body}: {text:?}"
        );
    }
}

#[test]
fn content_types_are_case_insensitive() {
    let f = |ct: &str| Format::from_content_type(Some(&http::HeaderValue::from_str(ct).unwrap()));
    assert_eq!(f("Text/Event-Stream; charset=utf-8"), Format::Sse);
    assert_eq!(f("Application/JSON"), Format::Json);
    assert_eq!(f("application/problem+JSON"), Format::Json);
    assert_eq!(f("text/plain"), Format::Opaque);
    assert_eq!(Format::from_content_type(None), Format::Opaque);
}

/// Strip mode with events larger than a read: one held across many reads
/// comes out whole (without its `"usage":null`); one past the event bound
/// ends stripping, and the stream passes through as it came, still metered.
#[test]
fn strip_mode_holds_large_events_and_lets_oversized_ones_through() {
    let chunk = |content: &str| {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}],\"usage\":null}}\n\n"
        )
    };
    let usage = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n";
    for (big, stripped) in [
        (2 << 20, true),
        (super::super::sse::MAX_EVENT_BYTES + 1, false),
    ] {
        let body = format!(
            "{}{}{usage}data: [DONE]\n\n",
            chunk("a"),
            chunk(&"x".repeat(big))
        );
        let mut m = ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Sse, true);
        let mut out = Vec::new();
        for c in body.as_bytes().chunks(16 << 10) {
            out.extend_from_slice(&m.feed(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&m.finish());
        let out = String::from_utf8(out).unwrap();
        let u = m.usage().expect("usage metered");
        assert_eq!((u.input_tokens, u.output_tokens), (5, 7));
        if stripped {
            assert!(!out.contains("\"usage\""), "usage shown to the client");
            assert!(out.contains(&"x".repeat(big)));
            assert!(out.ends_with("data: [DONE]\n\n"));
        } else {
            // The first event went out stripped before the large one came.
            let first = chunk("a").replace(",\"usage\":null", "");
            assert_eq!(out, format!("{first}{}", &body[chunk("a").len()..]));
        }
    }
}

/// Compressed bodies are read through gzip or deflate in pieces of any
/// size; a coding the meter cannot read, or a body broken in its coding,
/// leaves usage to the estimate (and never fails the call).
#[test]
fn compressed_bodies_are_read_through_their_coding() {
    use std::io::Write;
    let json = br#"{"id":"c","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(json).unwrap();
    let gz = gz.finish().unwrap();
    let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    zl.write_all(json).unwrap();
    let zl = zl.finish().unwrap();
    let header = |lines: &[&'static str]| {
        let values: Vec<_> = lines
            .iter()
            .map(|v| http::HeaderValue::from_static(v))
            .collect();
        Coding::from_headers(&values)
    };
    assert_eq!(header(&[]), Coding::Identity);
    assert_eq!(header(&["identity"]), Coding::Identity);
    assert_eq!(header(&[" GZip "]), Coding::Gzip);
    assert_eq!(header(&["x-gzip"]), Coding::Gzip);
    assert_eq!(header(&["deflate"]), Coding::Deflate);
    assert_eq!(header(&["identity, gzip"]), Coding::Gzip);
    assert_eq!(header(&["identity", "gzip"]), Coding::Gzip);
    assert_eq!(header(&["br"]), Coding::Unreadable);
    assert_eq!(header(&["gzip, br"]), Coding::Unreadable);
    assert_eq!(header(&["gzip", "gzip"]), Coding::Unreadable);
    let meter = |coding, body: &[u8], piece: usize| {
        let m = ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Json, false);
        let mut m = m.decoding(coding);
        for c in body.chunks(piece) {
            // The client's bytes are the coded ones, unchanged.
            assert_eq!(&m.feed(Bytes::copy_from_slice(c))[..], c);
        }
        m.finish();
        m
    };
    for piece in [1, 3, 1000] {
        for (coding, body) in [(Coding::Gzip, &gz), (Coding::Deflate, &zl)] {
            let m = meter(coding, body, piece);
            let u = m.usage().expect("usage read through the coding");
            assert_eq!((u.input_tokens, u.output_tokens), (11, 3));
            assert_eq!(m.response_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        }
    }
    // Raw deflate under `deflate`, and a gzip body of two members.
    let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    raw.write_all(json).unwrap();
    let raw = raw.finish().unwrap();
    let (a, b) = json.split_at(40);
    let mut two = Vec::new();
    for part in [a, b] {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(part).unwrap();
        two.extend(z.finish().unwrap());
    }
    for piece in [1, 5, 1000] {
        for (coding, body) in [(Coding::Deflate, &raw), (Coding::Gzip, &two)] {
            let u = meter(coding, body, piece).usage().expect("read through");
            assert_eq!((u.input_tokens, u.output_tokens), (11, 3));
        }
    }
    let mut broken = gz.clone();
    broken[12] ^= 0xff;
    broken.truncate(broken.len() - 9);
    assert!(meter(Coding::Gzip, &broken, 7).usage().is_none());
    assert!(meter(Coding::Unreadable, &gz, 7).usage().is_none());
    // Not gzip at all (an upstream mislabelling a plain body).
    assert!(meter(Coding::Gzip, json, 7).usage().is_none());
}

/// The meter sees each frame's plain bytes when the frame comes, not with
/// the next one: a compressed stream's last frame (usage, `[DONE]`) is
/// read before it goes out, and a stream cut after it (the client gone,
/// the upstream reset: no `finish`) keeps its usage.
#[test]
fn a_compressed_stream_is_read_frame_by_frame() {
    use std::io::Write;
    for f in fixtures().into_iter().filter(|f| f.format == Format::Sse) {
        // As a streaming server compresses: flushed after every event.
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut frames = Vec::new();
        for event in f.body.split_inclusive(|&b| b == b'\n') {
            z.write_all(event).unwrap();
            z.flush().unwrap();
            frames.push(std::mem::take(z.get_mut()));
        }
        let mut m = ResponseMeter::new(f.provider, f.op, f.format, false).decoding(Coding::Gzip);
        for frame in frames {
            m.feed(Bytes::from(frame));
        }
        let want: Option<Usage> = serde_json::from_value(f.expected["usage"].clone()).unwrap();
        assert_eq!(m.usage(), want, "{}: usage before the end", f.name);
        assert_eq!(
            m.complete,
            f.expected["complete"].as_bool().unwrap(),
            "{}: complete before the end",
            f.name
        );
    }
}

/// A decompression bomb: the meter stops reading past 64 MiB of plain
/// bytes, the client still gets every coded byte.
#[test]
fn decoding_stops_past_its_budget() {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&vec![b' '; 1 << 20]).unwrap();
    let member = z.finish().unwrap();
    let bomb = member.repeat(80); // 80 MiB of spaces, multi-member
    let mut m = ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Json, false)
        .decoding(Coding::Gzip);
    let mut out = 0;
    for c in bomb.chunks(16 << 10) {
        out += m.feed(Bytes::copy_from_slice(c)).len();
    }
    m.finish();
    assert_eq!(out, bomb.len());
    assert!(m.decoder.is_none(), "still decoding");
    assert!(
        (64 << 20..(64 << 20) + (5 << 20)).contains(&m.plain_read),
        "{} plain bytes read",
        m.plain_read
    );
    assert!(m.usage().is_none());
}

/// A JSON body that stopped before its end is read when the call ends: a
/// whole object (the framing's end lost, the answer all there) gives the
/// provider's usage; a body cut inside is estimated from the bytes that came
/// (it was 0 output tokens either way).
#[test]
fn a_json_body_cut_short_is_read_for_usage_or_estimated_from_what_came() {
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/openai/chat_reasoning_cached.json"
    ))
    .unwrap();
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/openai/chat_reasoning_cached.expected.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut m = ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Json, false);
    for c in fixture.chunks(50) {
        m.feed(Bytes::copy_from_slice(c));
    }
    m.cut_short();
    let u = m.usage().expect("the whole object was there");
    assert!(m.complete);
    assert_eq!(
        u.output_tokens,
        expected["usage"]["output_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u.input_tokens,
        expected["usage"]["input_tokens"].as_u64().unwrap()
    );

    let cut = &fixture[..fixture.len() / 2];
    let mut m = ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Json, false);
    m.feed(Bytes::copy_from_slice(cut));
    m.cut_short();
    assert!(m.usage().is_none());
    assert!(!m.complete);
    assert_eq!(m.generated_text().1, cut.len() as u64);
}

/// A long stream cut short, past the kept text's cap: the rest counts by
/// its generated text, not by its events' bytes (about 300 a one-token
/// chunk, which made 20,000 chunks some 550,000 tokens).
#[test]
fn a_long_stream_past_the_text_cap_counts_its_text_not_its_framing() {
    let chunk = |i: usize| {
        format!(
            "data: {{\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1732390000,\
             \"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\
             \"delta\":{{\"content\":\"{}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n",
            if i.is_multiple_of(2) { "ab" } else { "cd" }
        )
    };
    let n = 2 * MAX_TEXT_BYTES / chunk(0).len();
    let mut m = ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Sse, false);
    for i in 0..n {
        m.feed(Bytes::from(chunk(i)));
    }
    m.cut_short();
    assert!(m.usage().is_none() && !m.complete);
    let (text, overflow) = m.generated_text();
    assert!(overflow > 0, "the cap was not reached");
    // Two bytes of text a chunk, whether kept or past the cap.
    assert_eq!(text.len() as u64 + overflow, 2 * n as u64);
}

/// An empty `model` (Azure's first chunk, with only its content filter
/// results) is no model: the stream's real one is recorded.
#[test]
fn an_empty_model_is_no_model() {
    let body = concat!(
        "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[]}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
        "data: [DONE]\n\n",
    );
    let mut m = ResponseMeter::new(Provider::OpenAi, Operation::Chat, Format::Sse, false);
    m.feed(Bytes::from_static(body.as_bytes()));
    m.finish();
    assert_eq!(m.response_model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert!(m.complete);
}

/// A Responses stream whose final event is past the SSE size cap (an
/// image generated inline, base64 in `output`) still gives the provider's
/// usage and model: read from the event's kept head and tail, member by
/// member (decoys in the image's text and in the echoed `metadata` are
/// not taken). Before, the event was dropped and the call estimated from
/// its deltas.
#[test]
fn a_final_responses_event_past_the_cap_is_read_from_its_ends() {
    let image = "iVBORw0KGgo".repeat(super::super::sse::MAX_EVENT_BYTES / 11 + 1000);
    let completed = |order_last: bool| {
        let response = format!(
            r#"{{"id":"resp_1","object":"response","status":"completed","instructions":"say \"usage\"","model":"gpt-4.1-2025-04-14","output":[{{"type":"image_generation_call","id":"ig_1","status":"completed","result":"{image}","note":"\"usage\":{{\"input_tokens\":1}}"}}],"tools":[{{"type":"image_generation"}}],"usage":{{"input_tokens":2048,"input_tokens_details":{{"cached_tokens":1024}},"output_tokens":4160,"output_tokens_details":{{"reasoning_tokens":64}},"total_tokens":6208}},"user":null,"metadata":{{"usage":"{{}}","model":"decoy"}}}}"#
        );
        if order_last {
            format!(r#"{{"type":"response.completed","sequence_number":9,"response":{response}}}"#)
        } else {
            format!(r#"{{"type":"response.completed","response":{response},"sequence_number":9}}"#)
        }
    };
    for (order_last, named, eol) in [
        (true, true, "\n"),
        (false, true, "\r\n"),
        (false, false, "\n"),
    ] {
        let event = if named {
            "event: response.completed"
        } else {
            ""
        };
        let mut body = format!(
            "event: response.created{eol}data: {{\"type\":\"response.created\",\"response\":{{\"model\":\"gpt-4.1-2025-04-14\",\"usage\":null}}}}{eol}{eol}event: response.output_text.delta{eol}data: {{\"type\":\"response.output_text.delta\",\"delta\":\"Here\"}}{eol}{eol}"
        );
        if named {
            body.push_str(event);
            body.push_str(eol);
        }
        body.push_str("data: ");
        body.push_str(&completed(order_last));
        body.push_str(eol);
        body.push_str(eol);
        assert!(body.len() > super::super::sse::MAX_EVENT_BYTES);
        for split in [64 << 10, 1 << 20, body.len()] {
            let mut m =
                ResponseMeter::new(Provider::OpenAi, Operation::Responses, Format::Sse, false);
            for c in body.as_bytes().chunks(split) {
                m.feed(Bytes::copy_from_slice(c));
            }
            m.finish();
            let how = format!("last {order_last}, named {named}, split {split}");
            let u = m.usage().expect(&how);
            assert_eq!(
                (
                    u.input_tokens,
                    u.cache_read_input_tokens,
                    u.output_tokens,
                    u.reasoning_output_tokens
                ),
                (2048, 1024, 4160, 64),
                "{how}"
            );
            assert_eq!(m.response_model.as_deref(), Some("gpt-4.1-2025-04-14"));
            assert!(m.complete, "{how}");
            assert!(!m.stream_cut(), "{how}");
        }
    }
    // A final event that is not the Responses shape (no open `response`):
    // nothing is taken from it.
    let body = format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"x\":\"{image}\",\"usage\":{{\"input_tokens\":1,\"output_tokens\":1}}}}\n\n"
    );
    let mut m = ResponseMeter::new(Provider::OpenAi, Operation::Responses, Format::Sse, false);
    m.feed(Bytes::from(body));
    m.finish();
    assert!(m.usage().is_none());
}
