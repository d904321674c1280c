//! Usage extraction from a response body as it streams past.
//!
//! [`ResponseMeter::feed`] sees each frame once. JSON bodies are copied into a
//! bounded buffer and parsed at the end; SSE bodies go through the incremental
//! decoder and only the few events that carry a model or usage are parsed.
//! Generated text is kept (bounded, in memory only, never logged or stored) so
//! that a stream cut short can be estimated with tiktoken.
//!
//! When the proxy injected `stream_options.include_usage`, the meter also
//! rewrites the stream so the client sees what it would have seen without the
//! proxy: the usage-only chunk is dropped and `"usage":null` removed.

use bytes::{Bytes, BytesMut};

use super::request::Operation;
use super::sse::SseDecoder;
use super::usage::{Envelope, RawUsage};
use crate::config::Provider;
use crate::event::Usage;

/// Largest JSON body parsed whole; past it only the head and the tail are
/// kept, so a call holds at most about this much (large embeddings bodies
/// held whole made four concurrent calls cost 87 MB).
const MAX_JSON_BYTES: usize = 4 << 20;
const JSON_TAIL_BYTES: usize = 256 << 10;
const JSON_HEAD_BYTES: usize = 64 << 10;
/// Generated-text payloads kept for estimation; past it bytes are counted.
const MAX_TEXT_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Sse,
    Opaque,
}

impl Format {
    pub fn from_content_type(ct: Option<&http::HeaderValue>) -> Format {
        // Media types are case-insensitive (RFC 9110 §8.3.1).
        let ct = ct.map_or(&b""[..], |v| v.as_bytes());
        let starts = |p: &[u8]| ct.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
        if starts(b"text/event-stream") {
            Format::Sse
        } else if starts(b"application/json")
            || ct.windows(5).any(|w| w.eq_ignore_ascii_case(b"+json"))
        {
            Format::Json
        } else {
            Format::Opaque
        }
    }
}

/// The content coding of a response body (RFC 9110 §8.4.1). Tollgate asks
/// metered upstreams for `identity`; one that compresses anyway is read
/// through gzip or deflate, while the client gets the bytes as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    /// Any other coding, or more than one: the meter cannot read the body.
    Unreadable,
}

impl Coding {
    /// The coding of all the `Content-Encoding` field lines together (a
    /// list, in the order applied; `identity` adds nothing).
    pub fn from_headers<'a>(lines: impl IntoIterator<Item = &'a http::HeaderValue>) -> Coding {
        let mut coding = Coding::Identity;
        for item in lines
            .into_iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        {
            let item = item.trim_ascii();
            let is = |name: &[u8]| item.eq_ignore_ascii_case(name);
            if item.is_empty() || is(b"identity") {
                continue;
            }
            coding = match coding {
                Coding::Identity if is(b"gzip") || is(b"x-gzip") => Coding::Gzip,
                Coding::Identity if is(b"deflate") => Coding::Deflate,
                // Unknown, or a second coding on top of the first.
                _ => return Coding::Unreadable,
            };
        }
        coding
    }
}

/// Decompresses a coded body for the meter, a bounded piece at a time.
enum Decoder {
    /// Every member of a multi-member gzip body, as `gzip` allows.
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    /// `deflate` is zlib-wrapped (RFC 9110 §8.4.1.2), but some servers send
    /// raw deflate: the first two bytes tell which.
    Sniffing(Vec<u8>),
    /// Zlib-wrapped or raw, as sniffed.
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
}

impl Decoder {
    /// Coded input per step: deflate expands at most about 1032 to 1, so
    /// one step makes at most about 4 MiB of plain bytes.
    const STEP: usize = 4 << 10;
    /// Plain bytes read at most: past them (a decompression bomb, or a
    /// body far larger than any answer) the meter stops reading.
    const MAX_PLAIN: u64 = 64 << 20;

    fn new(coding: Coding) -> Option<Decoder> {
        match coding {
            Coding::Gzip => Some(Decoder::Gzip(
                flate2::write::MultiGzDecoder::new(Vec::new()),
            )),
            Coding::Deflate => Some(Decoder::Sniffing(Vec::new())),
            Coding::Identity | Coding::Unreadable => None,
        }
    }

    /// Feeds `input`, handing the plain bytes to `out`; false when the
    /// body is not valid in its coding or past `MAX_PLAIN` (the meter reads
    /// no more of it).
    fn decode(&mut self, input: &[u8], plain: &mut u64, out: &mut impl FnMut(Bytes)) -> bool {
        use std::io::Write;
        if let Decoder::Sniffing(head) = self {
            head.extend_from_slice(input);
            if head.len() < 2 {
                return true;
            }
            let head = std::mem::take(head);
            let zlib = head[0] & 0x0f == 8 && u16::from_be_bytes([head[0], head[1]]) % 31 == 0;
            *self = Decoder::Deflate(flate2::write::ZlibDecoder::new_with_decompress(
                Vec::new(),
                flate2::Decompress::new(zlib),
            ));
            return self.decode(&head, plain, out);
        }
        for step in input.chunks(Self::STEP) {
            // Flushed after each step: flate2 keeps the last output of a
            // write inside until the next one, and the meter must see the
            // end of a stream (its usage, `[DONE]`) when its frame comes.
            let written = match self {
                Decoder::Gzip(d) => d.write_all(step).and_then(|()| d.flush()),
                Decoder::Deflate(d) => d.write_all(step).and_then(|()| d.flush()),
                Decoder::Sniffing(_) => Ok(()),
            };
            *plain += self.drain(out);
            if written.is_err() || *plain > Self::MAX_PLAIN {
                return false;
            }
        }
        true
    }

    /// The body ended: the last plain bytes.
    fn finish(&mut self, out: &mut impl FnMut(Bytes)) {
        let _ = match self {
            Decoder::Gzip(d) => d.try_finish(),
            Decoder::Deflate(d) => d.try_finish(),
            Decoder::Sniffing(_) => Ok(()),
        };
        self.drain(out);
    }

    fn drain(&mut self, out: &mut impl FnMut(Bytes)) -> u64 {
        let plain = match self {
            Decoder::Gzip(d) => std::mem::take(d.get_mut()),
            Decoder::Deflate(d) => std::mem::take(d.get_mut()),
            Decoder::Sniffing(_) => Vec::new(),
        };
        let n = plain.len() as u64;
        if n > 0 {
            out(Bytes::from(plain));
        }
        n
    }
}

pub struct ResponseMeter {
    provider: Provider,
    op: Operation,
    format: Format,
    strip_usage: bool,
    sse: SseDecoder,
    /// A JSON body's first frame, kept by reference: a body whole in one
    /// frame (the common case) is parsed without a copy.
    json_first: Bytes,
    json: Vec<u8>,
    json_overflow: bool,
    /// Past `MAX_JSON_BYTES`: the body's first bytes (for `model`).
    json_head: Vec<u8>,
    /// Bytes of JSON body collected (all of them, kept or not).
    json_seen: u64,
    raw_usage: Option<RawUsage>,
    pub response_model: Option<String>,
    /// The stream reached its terminal event.
    pub complete: bool,
    /// The stream carried an error event.
    pub stream_error: bool,
    /// Payloads of generated-text events (JSON, newline separated).
    text: Vec<u8>,
    text_overflow: u64,
    /// Strip mode: bytes of an event not yet complete.
    pending: BytesMut,
    /// A compressed body: what the meter reads it through.
    decoder: Option<Box<Decoder>>,
    /// Plain bytes the decoder has made.
    plain_read: u64,
    /// The decoder stopped (bad data, or past its expansion cap): the rest
    /// of the body is not read.
    gave_up: bool,
}

impl ResponseMeter {
    pub fn new(provider: Provider, op: Operation, format: Format, strip_usage: bool) -> Self {
        ResponseMeter {
            provider,
            op,
            format,
            strip_usage: strip_usage && format == Format::Sse,
            sse: SseDecoder::default(),
            json_first: Bytes::new(),
            json: Vec::new(),
            json_overflow: false,
            json_head: Vec::new(),
            json_seen: 0,
            raw_usage: None,
            response_model: None,
            complete: false,
            stream_error: false,
            text: Vec::new(),
            text_overflow: 0,
            pending: BytesMut::new(),
            decoder: None,
            plain_read: 0,
            gave_up: false,
        }
    }

    /// Reads a body sent in `coding`. A compressed body reaches the client
    /// as it came, so it is not stripped (the usage chunk stays in it); one
    /// the meter cannot decompress is not read at all (usage estimated).
    pub fn decoding(mut self, coding: Coding) -> Self {
        if coding == Coding::Identity {
            return self;
        }
        if coding == Coding::Unreadable {
            self.format = Format::Opaque;
        } else if self.format != Format::Opaque {
            self.decoder = Decoder::new(coding).map(Box::new);
        }
        self.strip_usage = false;
        self
    }

    /// Whether the body is rewritten (its length changes).
    pub fn strips(&self) -> bool {
        self.strip_usage
    }

    /// A stream whose end came without its final event (`[DONE]`,
    /// `message_stop`, `response.completed`): cut short, though the
    /// transport ended cleanly.
    pub fn stream_cut(&self) -> bool {
        // Not when the meter could not read it all: an event past the size
        // cap, or a compressed body it stopped decoding.
        self.format == Format::Sse
            && !self.complete
            && self.sse.overflowed_events == 0
            && !self.gave_up
    }

    pub fn usage(&self) -> Option<Usage> {
        self.raw_usage.as_ref().map(|u| u.normalize(self.provider))
    }

    /// Meters one frame and returns the bytes to send on: the frame itself,
    /// except in strip mode, where only complete, rewritten events go out.
    pub fn feed(&mut self, frame: Bytes) -> Bytes {
        if let Some(mut d) = self.decoder.take() {
            // Not stripped: the plain bytes are only read.
            let mut plain = self.plain_read;
            if d.decode(&frame, &mut plain, &mut |p| {
                self.feed_plain(p);
            }) {
                self.decoder = Some(d);
            } else {
                self.gave_up = true;
                tracing::warn!(
                    plain_bytes = plain,
                    "a compressed response body does not decompress, or expands past 64 MiB: the rest is not read"
                );
            }
            self.plain_read = plain;
            return frame;
        }
        self.feed_plain(frame)
    }

    fn feed_plain(&mut self, frame: Bytes) -> Bytes {
        match self.format {
            Format::Opaque => frame,
            Format::Json => {
                if self.json_first.is_empty()
                    && self.json.is_empty()
                    && frame.len() <= MAX_JSON_BYTES
                {
                    self.json_first = frame.clone();
                } else {
                    let first = std::mem::take(&mut self.json_first);
                    self.collect_json(&first);
                    self.collect_json(&frame);
                }
                frame
            }
            Format::Sse if !self.strip_usage => {
                let mut sse = std::mem::take(&mut self.sse);
                sse.feed(&frame, &mut |name, data, clipped| {
                    self.on_event(name, data, clipped);
                });
                self.sse = sse;
                frame
            }
            Format::Sse => {
                // Events whole in the frame are read from it; only a partial
                // one is carried over (copied) to the next frame.
                if self.pending.is_empty() {
                    return self.take_complete_events(frame, false);
                }
                let scanned = self.pending.len();
                self.pending.extend_from_slice(&frame);
                if self.pending.len() > super::sse::MAX_EVENT_BYTES {
                    return self.stop_stripping();
                }
                // No blank line in the new bytes (nor across the join): the
                // held event is still open. Not rescanning it, nor copying
                // it again, keeps a large event linear (an 8 MiB one cost
                // 1.4 s of CPU, 32 MiB 42 s).
                if !has_blank_line(&self.pending[scanned.saturating_sub(2)..]) {
                    return Bytes::new();
                }
                let input = self.pending.split().freeze();
                self.take_complete_events(input, false)
            }
        }
    }

    /// The body ended: parses a JSON body, releases held bytes.
    pub fn finish(&mut self) -> Bytes {
        if let Some(mut d) = self.decoder.take() {
            d.finish(&mut |plain| {
                self.feed_plain(plain);
            });
        }
        if self.format == Format::Json {
            self.parse_json();
        }
        if self.strip_usage {
            let rest = self.pending.split().freeze();
            self.take_complete_events(rest, true)
        } else {
            Bytes::new()
        }
    }

    /// The body stopped before its end (the upstream broke off, the client
    /// went away). A JSON body is read only at its end: what came is read
    /// now. A whole object (only the framing's end was lost; a non-streamed
    /// answer is generated in full before its head is sent) gives the
    /// provider's usage; otherwise its text, or failing that its bytes at
    /// four a token, are estimated.
    pub fn cut_short(&mut self) {
        if self.format != Format::Json || self.complete {
            return;
        }
        if let Some(mut d) = self.decoder.take() {
            d.finish(&mut |plain| {
                self.feed_plain(plain);
            });
        }
        let json = if self.json.is_empty() {
            &self.json_first[..]
        } else {
            &self.json[..]
        };
        let whole = !self.json_overflow && super::json_scan::top_level(json, [b"usage"]).is_some();
        // (A body whole in its first frame is kept without counting it.)
        let seen = self.json_seen.max(self.json_first.len() as u64);
        self.parse_json();
        if self.raw_usage.is_none() {
            self.complete = false;
            if !whole {
                // Half an object has no text to read.
                self.text.clear();
                self.text_overflow = self.text_overflow.max(seen);
            }
        }
    }

    fn collect_json(&mut self, frame: &[u8]) {
        self.json_seen += frame.len() as u64;
        if !self.json_overflow && self.json.len() + frame.len() > MAX_JSON_BYTES {
            self.json_overflow = true;
            let head = if self.json.is_empty() {
                frame
            } else {
                &self.json
            };
            self.json_head = head[..head.len().min(JSON_HEAD_BYTES)].to_vec();
        }
        self.json.extend_from_slice(frame);
        if self.json_overflow && self.json.len() > 2 * JSON_TAIL_BYTES {
            let cut = self.json.len() - JSON_TAIL_BYTES;
            self.json.drain(..cut);
        }
    }

    fn parse_json(&mut self) {
        let first = std::mem::take(&mut self.json_first);
        let collected = std::mem::take(&mut self.json);
        let json: &[u8] = if collected.is_empty() {
            &first
        } else {
            &collected
        };
        if self.json_overflow {
            // Only the top-level members are taken, walked from either end
            // (usage and, for embeddings, model near the end; model near
            // the start for chat): a `"usage"` inside an echoed `metadata`
            // or `user` must not stand in for the real one.
            use super::json_scan::{head_member, tail_member};
            self.response_model = model_of(tail_member(json, b"model"))
                .or_else(|| model_of(head_member(&self.json_head, b"model")));
            self.raw_usage = usage_of(tail_member(json, b"usage"));
            if self.raw_usage.is_none() {
                // Its text was not kept: the whole body is estimated at
                // four bytes a token, as text past the cap is (it was 0).
                self.text_overflow += self.json_seen;
            }
        } else if let Some([model, usage]) =
            super::json_scan::head_and_tail(json, b"model", b"usage")
                .or_else(|| super::json_scan::top_level(json, [b"model", b"usage"]))
        {
            // Only the two members the meter needs are deserialised.
            if let Some(m) = model_of(model) {
                self.response_model = Some(m);
            }
            self.raw_usage = usage_of(usage);
            if self.raw_usage.is_none() && self.text.len() < MAX_TEXT_BYTES {
                self.text.extend_from_slice(json);
            }
        }
        self.complete = true;
    }

    /// Strip mode: passes on the complete events in `input` (all of it at
    /// the end), dropping the usage-only chunk and `"usage":null` fields; a
    /// partial event waits in `pending` for the next frame.
    fn take_complete_events(&mut self, mut input: Bytes, at_end: bool) -> Bytes {
        let mut out = BytesMut::with_capacity(input.len());
        loop {
            let end = match super::sse::first_event_end(&input) {
                Some(n) => n,
                None if at_end && !input.is_empty() => input.len(),
                None => break,
            };
            let event = input.split_to(end);
            let mut usage_only = false;
            let mut sse = std::mem::take(&mut self.sse);
            sse.feed(&event, &mut |name, data, clipped| {
                usage_only |= self.on_event(name, data, clipped);
            });
            self.sse = sse;
            if !usage_only {
                remove_usage_null(&event, &mut out);
            }
        }
        if !input.is_empty() {
            self.pending.extend_from_slice(&input);
        }
        out.freeze()
    }

    /// An event too large to hold: the rest of the stream passes through
    /// as it comes, metered like any other (the SSE decoder drops the
    /// oversized event, as it does without stripping). The client may then
    /// see a usage chunk it did not ask for; memory stays bounded.
    fn stop_stripping(&mut self) -> Bytes {
        tracing::warn!(
            bytes = self.pending.len(),
            "an SSE event too large to hold: passing the rest of the stream through unstripped"
        );
        self.strip_usage = false;
        let held = self.pending.split().freeze();
        let mut sse = std::mem::take(&mut self.sse);
        sse.feed(&held, &mut |name, data, clipped| {
            self.on_event(name, data, clipped);
        });
        self.sse = sse;
        held
    }

    /// Handles one SSE event; returns true for an OpenAI usage-only chunk.
    /// An event past the size cap comes as its first bytes and its last
    /// (`clipped`): only the Responses API's final events are read from
    /// those.
    fn on_event(&mut self, name: &[u8], data: &[u8], clipped: Option<&[u8]>) -> bool {
        match (self.provider, self.op, clipped) {
            (Provider::OpenAi, Operation::Responses, None) => self.on_responses_event(name, data),
            (Provider::OpenAi, Operation::Responses, Some(tail)) => {
                self.on_clipped_responses_event(name, data, tail)
            }
            (_, _, Some(_)) => {}
            (Provider::Anthropic, _, None) => self.on_anthropic_event(name, data),
            _ => return self.on_openai_chunk(data),
        }
        false
    }

    /// A Responses API final event past the size cap (output items such as
    /// generated images inline): its `response` is the member too large to
    /// keep, so the model is read from the head's start of it and the usage
    /// from the tail's end of it, member by member, never by searching the
    /// text for them.
    fn on_clipped_responses_event(&mut self, name: &[u8], head: &[u8], tail: &[u8]) {
        let name = if name.is_empty() { type_of(head) } else { name };
        if !matches!(
            name,
            b"response.completed" | b"response.incomplete" | b"response.failed"
        ) {
            return;
        }
        use super::json_scan::{head_member, open_member, open_value_tail, tail_member};
        let Some(at) = open_member(head, b"response") else {
            return;
        };
        if let Some(m) = model_of(head_member(&head[at..], b"model")) {
            self.response_model = Some(m);
        }
        if let Some(u) = usage_of(open_value_tail(tail).and_then(|r| tail_member(r, b"usage"))) {
            self.raw_usage = Some(u);
        }
        self.complete = true;
        self.stream_error |= name == b"response.failed";
    }

    fn on_openai_chunk(&mut self, data: &[u8]) -> bool {
        if data == b"[DONE]" {
            self.complete = true;
            return false;
        }
        let carries_usage = has_usage_object(data);
        if self.response_model.is_none() || carries_usage {
            // The structural scan, as for JSON bodies: a chunk is mostly
            // choices the meter does not need.
            let Some([model, usage, choices]) =
                super::json_scan::top_level(data, [b"model", b"usage", b"choices"])
            else {
                return false;
            };
            if self.response_model.is_none() {
                self.response_model = model_of(model);
            }
            if let Some(u) = usage_of(usage) {
                self.raw_usage = Some(u);
                return choices.is_some_and(|c| {
                    c.first() == Some(&b'[')
                        && c[1..].iter().all(|b| b.is_ascii_whitespace() || *b == b']')
                });
            }
        }
        if data.starts_with(b"{\"error\"") {
            self.stream_error = true;
        }
        self.keep_text(data);
        false
    }

    fn on_responses_event(&mut self, name: &[u8], data: &[u8]) {
        let name = if name.is_empty() { type_of(data) } else { name };
        match name {
            b"response.created"
            | b"response.in_progress"
            | b"response.completed"
            | b"response.incomplete"
            | b"response.failed" => {
                let Ok(env) = serde_json::from_slice::<Envelope>(data) else {
                    return;
                };
                if let Some(r) = env.response {
                    if r.model.as_deref().is_some_and(|m| !m.is_empty()) {
                        self.response_model = r.model;
                    }
                    if r.usage.is_some() {
                        self.raw_usage = r.usage;
                    }
                }
                if name != b"response.created" && name != b"response.in_progress" {
                    self.complete = true;
                    self.stream_error |= name == b"response.failed";
                }
            }
            b"error" => self.stream_error = true,
            n if n.ends_with(b".delta") => self.keep_text(data),
            _ => {}
        }
    }

    fn on_anthropic_event(&mut self, name: &[u8], data: &[u8]) {
        let name = if name.is_empty() { type_of(data) } else { name };
        match name {
            b"message_start" | b"message_delta" => {
                let Ok(env) = serde_json::from_slice::<Envelope>(data) else {
                    return;
                };
                let (model, usage) = match env.message {
                    Some(m) => (m.model, m.usage),
                    None => (env.model, env.usage),
                };
                if model.as_deref().is_some_and(|m| !m.is_empty()) {
                    self.response_model = model;
                }
                if let Some(u) = usage {
                    match &mut self.raw_usage {
                        Some(prev) => prev.merge(u),
                        None => self.raw_usage = Some(u),
                    }
                }
            }
            b"content_block_delta" => self.keep_text(data),
            b"message_stop" => self.complete = true,
            b"error" => self.stream_error = true,
            _ => {}
        }
    }

    fn keep_text(&mut self, data: &[u8]) {
        if self.text.capacity() == 0 {
            // A short answer's chunks fit without growing step by step.
            self.text.reserve(4096);
        }
        if self.text.len() + data.len() < MAX_TEXT_BYTES {
            self.text.extend_from_slice(data);
            self.text.push(b'\n');
        } else {
            // Past the cap only the length of the event's generated text is
            // kept: the event itself is mostly framing (ids, model, a
            // `"usage":null`), about 300 bytes for a one-token chunk, which
            // counted at four bytes a token overcharged a long stream cut
            // short by some 25 times.
            self.text_overflow += text_len(data);
        }
    }

    /// The generated text seen so far (for estimation), and the bytes of
    /// payload past the cap, which are estimated at four bytes a token.
    pub fn generated_text(&self) -> (String, u64) {
        // Consecutive JSON values, each over as many lines as it takes (a
        // pretty-printed body, a multi-line `data:` event); one that does
        // not parse is skipped to the next line.
        let mut out = String::new();
        let t = &self.text;
        let mut at = 0;
        while at < t.len() {
            let mut values =
                serde_json::Deserializer::from_slice(&t[at..]).into_iter::<serde_json::Value>();
            match values.next() {
                None => break,
                Some(Ok(v)) => {
                    collect_text(&v, None, &mut out);
                    at += values.byte_offset();
                }
                Some(Err(_)) => match memchr::memchr(b'\n', &t[at..]) {
                    Some(i) => at += i + 1,
                    None => break,
                },
            }
        }
        (out, self.text_overflow)
    }
}

/// The bytes of generated text in one event's data (see [`collect_text`]);
/// all of it when it is not JSON.
fn text_len(data: &[u8]) -> u64 {
    match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) => {
            let mut out = String::new();
            collect_text(&v, None, &mut out);
            out.len() as u64
        }
        Err(_) => data.len() as u64,
    }
}

/// Whether `b` holds two line ends in a row (`\n\n`, `\r\r`, `\n\r`,
/// which covers `\r\n\r\n`): where an SSE event can end.
fn has_blank_line(b: &[u8]) -> bool {
    memchr::memchr2_iter(b'\n', b'\r', b).any(|i| {
        matches!(
            (b[i], b.get(i + 1)),
            (b'\n', Some(b'\n' | b'\r')) | (b'\r', Some(b'\r'))
        )
    })
}

/// A `model` member's string (`None` when absent, null, empty or not a
/// string: Azure's first chunk, carrying only `prompt_filter_results`, says
/// `"model":""`, which kept the stream's real model out of the event).
fn model_of(raw: Option<&[u8]>) -> Option<String> {
    serde_json::from_slice::<Option<String>>(raw?)
        .ok()
        .flatten()
        .filter(|m| !m.is_empty())
}

/// A `usage` member: plain integers are read directly, anything else goes
/// to serde (`None` when absent, null or not a usage object).
fn usage_of(raw: Option<&[u8]>) -> Option<RawUsage> {
    let u = raw.filter(|u| *u != b"null")?;
    super::json_scan::raw_usage(u).or_else(|| serde_json::from_slice(u).ok())
}

/// Strings a model generated: message content, deltas, tool arguments.
fn collect_text(v: &serde_json::Value, key: Option<&str>, out: &mut String) {
    match v {
        serde_json::Value::String(s) => {
            if let Some(
                "content" | "text" | "delta" | "arguments" | "partial_json" | "thinking"
                | "refusal",
            ) = key
            {
                out.push_str(s);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_text(x, key, out)),
        serde_json::Value::Object(o) => {
            // Skip echoed inputs and usage objects.
            for (k, x) in o
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "usage" | "input"))
            {
                collect_text(x, Some(k), out);
            }
        }
        _ => {}
    }
}

/// `"usage":` followed by an object (not `null`).
fn has_usage_object(data: &[u8]) -> bool {
    // A chunk of a stream that asked for usage ends with `"usage":null}`
    // until the last one: its top-level usage is null (the last member wins),
    // so there is nothing to read and no need to search the rest. (Unless
    // that quote is escaped, `\"usage":null}` ending a longer key.)
    const NULL_LAST: &[u8] = b"\"usage\":null}";
    if let Some(before) = data.trim_ascii_end().strip_suffix(NULL_LAST) {
        if !super::json_scan::escapes_next(before) {
            return false;
        }
    }
    super::needles::positions(&super::needles::USAGE_MEMBER, data).any(|at| {
        data[at + 8..]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'{')
    })
}

/// The `"type"` of an event's JSON data, for streams without `event:` lines.
fn type_of(data: &[u8]) -> &[u8] {
    let Some(at) = super::needles::TYPE_MEMBER.find(data) else {
        return b"";
    };
    let rest = &data[at + 7..];
    let Some(open) = rest.iter().position(|&b| b == b'"') else {
        return b"";
    };
    let rest = &rest[open + 1..];
    match memchr::memchr(b'"', rest) {
        Some(close) => &rest[..close],
        None => b"",
    }
}

/// Copies `event` to `out` without the `"usage":null` members OpenAI adds to
/// every chunk once `include_usage` is on.
fn remove_usage_null(event: &[u8], out: &mut BytesMut) {
    let mut rest = event;
    while let Some(at) = super::needles::USAGE_NULL.find(rest) {
        let (mut start, mut end) = (at, at + 12);
        if rest[..start].ends_with(b",") {
            start -= 1;
        } else if rest[end..].starts_with(b",") {
            end += 1;
        }
        out.extend_from_slice(&rest[..start]);
        rest = &rest[end..];
    }
    out.extend_from_slice(rest);
}

#[cfg(test)]
mod tests;
