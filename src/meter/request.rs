//! What the proxy needs from a request body: the model, whether it streams,
//! the output cap, and (lazily, only when an estimate is needed) its text.
//! The body is parsed once into a borrowed struct; it is only re-written when
//! `stream_options.include_usage` must be injected.

use bytes::Bytes;
use memchr::memmem::Finder;
use serde::Deserialize;

use crate::config::Provider;

/// The metered operation a request is, from provider, method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Messages,
    /// Any other route of an LLM upstream: forwarded, metered as a call.
    Other,
    /// A generic (tool) upstream: one call each.
    ToolCall,
}

impl Operation {
    /// Classifies leniently, on the path as a server might read it (see
    /// [`route_key`]), while the raw path is what is forwarded: another
    /// spelling of a metered route must not pass as `Other`, unbudgeted.
    pub fn classify(provider: Provider, method: &http::Method, path: &str) -> Operation {
        if provider == Provider::Generic {
            return Operation::ToolCall;
        }
        if method != http::Method::POST {
            return Operation::Other;
        }
        let path = route_key(path.split('?').next().unwrap_or(""));
        let path = path.as_ref();
        match provider {
            Provider::OpenAi if path.ends_with("/chat/completions") => Operation::Chat,
            Provider::OpenAi if path.ends_with("/completions") => Operation::Completions,
            Provider::OpenAi if path.ends_with("/responses") => Operation::Responses,
            Provider::OpenAi if path.ends_with("/embeddings") => Operation::Embeddings,
            Provider::Anthropic if path.ends_with("/messages") => Operation::Messages,
            _ => Operation::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::Completions => "completions",
            Operation::Responses => "responses",
            Operation::Embeddings => "embeddings",
            Operation::Messages => "messages",
            Operation::Other => "other",
            Operation::ToolCall => "tool_call",
        }
    }

    /// Operations whose body is JSON the proxy reads (400 when malformed).
    pub fn is_metered(self) -> bool {
        !matches!(self, Operation::Other | Operation::ToolCall)
    }
}

/// Whether a POST path to an LLM upstream could be read as another route by
/// the upstream's front end, in a way [`route_key`] does not follow: a `\`
/// (some servers take it for `/`), a malformed escape, or an escape of a
/// character that splits or ends a path (`/`, `\`, `;`, `?`, `#`), of `%`
/// itself (decoded twice, `%252F` is `/`) or of a control character:
/// `chat%2Fcompletions` decoded by the upstream would be a chat call metered
/// as `other`. Other escapes (`%3A`, `%40`, UTF-8) name nothing else.
pub fn ambiguous_path(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("");
    let b = path.as_bytes();
    b.iter().enumerate().any(|(i, &c)| match c {
        b'\\' => true,
        b'%' => escape_at(b, i).is_none_or(|c| b"/\\;?#%".contains(&c) || c.is_ascii_control()),
        _ => false,
    })
}

/// Whether a path has a `..` segment, written plainly or with escapes
/// (`%2e%2e`, `..%2f`, `..\\`, `..;x`): joined to the upstream's base path, it
/// would climb out of it on an upstream that resolves dot segments.
pub fn climbs(path: &str) -> bool {
    let b = path.as_bytes();
    let mut seg_dots = Some(0u8);
    let mut i = 0;
    while i <= b.len() {
        let (c, step) = match b.get(i) {
            None => (b'/', 1),
            Some(b'%') => match escape_at(b, i) {
                Some(c) => (c, 3),
                None => (b'%', 1),
            },
            Some(&c) => (c, 1),
        };
        match c {
            b'/' | b'\\' => {
                if seg_dots == Some(2) {
                    return true;
                }
                seg_dots = Some(0);
            }
            b'.' => seg_dots = seg_dots.map(|n| n.saturating_add(1)),
            // `..;x` is `..` with a parameter to some servers.
            b';' if seg_dots == Some(2) => return true,
            _ => seg_dots = None,
        }
        i += step;
    }
    false
}

/// The byte the `%XX` escape at `b[i]` stands for; `None` if there is none.
fn escape_at(b: &[u8], i: usize) -> Option<u8> {
    let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
    if b.get(i) != Some(&b'%') {
        return None;
    }
    Some((hex(i + 1)? * 16 + hex(i + 2)?) as u8)
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~".contains(&c)
}

/// The path as servers commonly read it: percent-encoded unreserved
/// characters decoded, `;` parameters, empty and `.` segments dropped, `..`
/// applied, ASCII lowercased, no trailing `/`. Borrowed when there is
/// nothing to change (the usual case).
fn route_key(path: &str) -> std::borrow::Cow<'_, str> {
    let plain = !path.bytes().any(|b| matches!(b, b'%' | b';' | b'A'..=b'Z'))
        && !path.contains("//")
        && !path.contains("/.");
    if plain {
        return path.trim_end_matches('/').into();
    }
    let decoded: Vec<u8> = {
        let b = path.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if let Some(c) = escape_at(b, i).filter(|c| is_unreserved(*c)) {
                out.push(c);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    };
    let decoded = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
    let mut segs: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            seg => segs.push(seg),
        }
    }
    let mut key = String::with_capacity(decoded.len() + 1);
    for seg in segs {
        key.push('/');
        key.push_str(seg);
    }
    key.into()
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Fields {
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    n: Option<u64>,
    best_of: Option<u64>,
    stream_options: Option<StreamOptions>,
    previous_response_id: Option<serde::de::IgnoredAny>,
    conversation: Option<serde::de::IgnoredAny>,
    prompt: Option<serde::de::IgnoredAny>,
    background: Option<bool>,
}

/// The facts of a metered request.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    /// The output cap the request names, for one choice.
    pub max_output_tokens: Option<u64>,
    /// Choices generated (and billed): `n`, or the legacy `best_of`; at least 1.
    pub choices: u64,
    /// Names context the provider keeps (`previous_response_id`,
    /// `conversation`): input the body's bytes do not bound.
    pub stored_context: bool,
    /// Has a `prompt`: a stored prompt on the Responses API (on legacy
    /// completions it is the text itself).
    pub prompt: bool,
    /// `background: true` (Responses API): answered at once, its output
    /// fetched later.
    pub background: bool,
    /// The client asked for the usage chunk itself (OpenAI streams).
    pub client_wants_usage: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("request body is not valid JSON for this route: {0}")]
pub struct MalformedJson(#[from] serde_json::Error);

impl RequestInfo {
    /// `op`: the route, which names the output cap's field.
    pub fn parse(body: &[u8], op: Operation) -> Result<RequestInfo, MalformedJson> {
        // serde would also take a struct from an array of its fields.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(MalformedJson(serde::de::Error::custom(
                "expected a JSON object",
            )));
        }
        let f: Fields = serde_json::from_slice(body)?;
        // Only the field the route's API reads: another (`max_output_tokens`
        // on chat) is ignored by upstreams that take unknown fields, which
        // then write up to their own default, so it caps nothing and the
        // reservation must not trust it. Chat reads both of its names.
        let cap = match op {
            Operation::Chat => f.max_completion_tokens.max(f.max_tokens),
            Operation::Completions | Operation::Messages => f.max_tokens,
            Operation::Responses => f.max_output_tokens,
            Operation::Embeddings | Operation::Other | Operation::ToolCall => None,
        };
        Ok(RequestInfo {
            model: f.model,
            stream: f.stream.unwrap_or(false),
            max_output_tokens: cap,
            choices: f.n.max(f.best_of).unwrap_or(1).max(1),
            stored_context: f.previous_response_id.is_some() || f.conversation.is_some(),
            prompt: f.prompt.is_some(),
            background: f.background.unwrap_or(false),
            client_wants_usage: f
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }
}

/// For an OpenAI chat or completions stream that did not ask for usage,
/// returns the body with `stream_options.include_usage = true`. Spliced
/// into the bytes as sent: every other byte, key order included, stays
/// (OpenAI's structured outputs generate a schema's properties in the
/// order written, so a re-serialised body, its keys sorted, changed what
/// the model wrote).
pub fn inject_include_usage(body: &Bytes) -> Result<Bytes, MalformedJson> {
    use super::needles::{INCLUDE_USAGE_KEY, STREAM_OPTIONS};
    let options = member(body, &STREAM_OPTIONS)?;
    Ok(match options {
        Some(o) if o.first() == Some(&b'{') => {
            let include = member(o, &INCLUDE_USAGE_KEY)?;
            let o_set = set_member(o, include, INCLUDE_USAGE_KEY.needle(), b"true");
            splice(body, span(body, o), &o_set)
        }
        // Absent, `null` or not an object.
        _ => set_member(
            body,
            options,
            STREAM_OPTIONS.needle(),
            br#"{"include_usage":true}"#,
        ),
    })
}

/// The request's output cap field on an OpenAI route, quoted, as a finder:
/// chat's `max_completion_tokens` (which reasoning models require, and
/// which counts their reasoning, as `output_tokens` does), legacy
/// completions' `max_tokens`, the Responses API's `max_output_tokens`.
pub fn output_cap_field(op: Operation) -> Option<&'static Finder<'static>> {
    use super::needles::{MAX_COMPLETION_TOKENS_KEY, MAX_OUTPUT_TOKENS_KEY, MAX_TOKENS_KEY};
    match op {
        Operation::Chat => Some(&MAX_COMPLETION_TOKENS_KEY),
        Operation::Completions => Some(&MAX_TOKENS_KEY),
        Operation::Responses => Some(&MAX_OUTPUT_TOKENS_KEY),
        _ => None,
    }
}

/// Returns the body with `field: cap` added (`field`: from
/// [`output_cap_field`]): a request that named no output cap gets the one
/// its budget reservation assumed. A member the body has (say
/// `"max_tokens": null`) gets the value, so the key is never doubled;
/// either way the rest of the body stays byte for byte.
pub fn add_output_cap(
    body: &Bytes,
    field: &Finder<'static>,
    cap: u64,
) -> Result<Bytes, MalformedJson> {
    let found = member(body, field)?;
    let mut digits = itoa::Buffer::new();
    Ok(set_member(
        body,
        found,
        field.needle(),
        digits.format(cap).as_bytes(),
    ))
}

/// The value of the top-level member of `object` (a body that
/// [`RequestInfo::parse`] accepted, or a member of one: a JSON object,
/// which the scan, more lenient, reads too) named by `key` (quoted, as the
/// finder finds it). An object whose bytes hold the name nowhere (the usual
/// case) is not scanned.
fn member<'a>(object: &'a [u8], key: &Finder<'_>) -> Result<Option<&'a [u8]>, MalformedJson> {
    if key.find(object).is_none() {
        return Ok(None);
    }
    let quoted = key.needle();
    let [value] = super::json_scan::top_level(object, [&quoted[1..quoted.len() - 1]])
        .ok_or_else(|| MalformedJson(serde::de::Error::custom("expected a JSON object")))?;
    Ok(value)
}

/// `object` with its member `key` (quoted) set to `value`: `found`, its
/// value from [`member`], replaced in place, or else the member added last.
fn set_member(object: &[u8], found: Option<&[u8]>, key: &[u8], value: &[u8]) -> Bytes {
    match found {
        Some(v) => splice(object, span(object, v), value),
        None => append_member(object, key, value),
    }
}

/// Where `part`, a slice of `whole`, lies in it.
fn span(whole: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// `body` with the bytes at `at` replaced by `with`.
fn splice(body: &[u8], at: std::ops::Range<usize>, with: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(body.len() - at.len() + with.len());
    out.extend_from_slice(&body[..at.start]);
    out.extend_from_slice(with);
    out.extend_from_slice(&body[at.end..]);
    Bytes::from(out)
}

/// `object` (the bytes of one JSON object, nothing after its closing
/// brace but whitespace) with the member `key` (quoted): `value` added
/// last.
fn append_member(object: &[u8], key: &[u8], value: &[u8]) -> Bytes {
    let close = object
        .iter()
        .rposition(|&b| b == b'}')
        .expect("a JSON object ends in '}'");
    let empty = object[..close]
        .iter()
        .rev()
        .find(|b| !b.is_ascii_whitespace())
        == Some(&b'{');
    let mut out = Vec::with_capacity(object.len() + key.len() + value.len() + 2);
    out.extend_from_slice(&object[..close]);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(key);
    out.push(b':');
    out.extend_from_slice(value);
    out.extend_from_slice(&object[close..]);
    Bytes::from(out)
}

/// The text of a request that the model reads, for token estimation, plus the
/// number of messages (each costs a few tokens of framing), of items passed
/// by reference (image or file URLs, inline images), which text cannot
/// bound, and of token ids given as numbers.
pub struct InputText {
    pub text: String,
    pub messages: u64,
    pub by_reference: u64,
    /// Tokens given as ids (`"input": [[1, 2]]`, `"prompt": [1, 2]`): one each.
    pub token_ids: u64,
}

impl InputText {
    /// The input tokens: the text counted for `model`, the token ids, the
    /// per-message framing, and `per_item` for each item by reference.
    pub fn tokens(&self, model: &str, per_item: u64) -> u64 {
        super::tokens::count(model, &self.text)
            + self.token_ids
            + self.by_reference * per_item
            + 3 * self.messages
            + 3
    }
}

/// Collects every string value except identifiers the model does not read,
/// and the keys of tool and output schemas (property names are read).
pub fn input_text(body: &[u8]) -> InputText {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let mut out = InputText {
        text: String::new(),
        messages: 0,
        by_reference: 0,
        token_ids: 0,
    };
    if let Some(m) = v.get("messages").and_then(|m| m.as_array()) {
        out.messages = m.len() as u64;
    }
    if let Some(m) = v.get("input").and_then(|m| m.as_array()) {
        out.messages += m.len() as u64;
    }
    for key in ["input", "prompt"] {
        if let Some(ids) = v.get(key) {
            out.token_ids += token_ids(ids);
        }
    }
    walk(&v, None, false, &mut out);
    out
}

/// The numbers in an array (or arrays of arrays) of token ids.
fn token_ids(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| match x {
                serde_json::Value::Number(_) => 1,
                serde_json::Value::Array(_) => token_ids(x),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// `schema`: inside a tool's or an output format's JSON schema, where keys
/// and every value are text the model reads.
fn walk(v: &serde_json::Value, key: Option<&str>, schema: bool, out: &mut InputText) {
    const SKIP: &[&str] = &[
        "model",
        "role",
        "type",
        "id",
        "tool_call_id",
        "user",
        "service_tier",
        "reasoning_effort",
        "encoding_format",
        "detail",
        "media_type",
        "previous_response_id",
    ];
    match v {
        serde_json::Value::String(s) => match key {
            // An inline image is billed by its size in pixels, not by its
            // base64 text (about 0.7 tokens a character): as an item.
            Some("url" | "image_url" | "file_data" | "image") if s.starts_with("data:image/") => {
                out.by_reference += 1
            }
            Some("url" | "image_url" | "file_id" | "file_url") if !s.starts_with("data:") => {
                out.by_reference += 1
            }
            Some(k) if !schema && SKIP.contains(&k) => {}
            _ => {
                out.text.push_str(s);
                out.text.push('\n');
            }
        },
        serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, key, schema, out)),
        serde_json::Value::Object(o) => {
            // Anthropic's inline image: `{"type": "base64", "media_type":
            // "image/png", "data": "…"}`.
            let image = |o: &serde_json::Map<String, serde_json::Value>| {
                o.get("type").and_then(|t| t.as_str()) == Some("base64")
                    && o.get("media_type")
                        .and_then(|t| t.as_str())
                        .is_some_and(|t| t.starts_with("image/"))
            };
            if !schema && image(o) {
                out.by_reference += 1;
                return;
            }
            for (k, x) in o {
                let inner =
                    schema || matches!(k.as_str(), "parameters" | "input_schema" | "schema");
                if schema {
                    out.text.push_str(k);
                    out.text.push('\n');
                }
                walk(x, Some(k), inner, out);
            }
        }
        serde_json::Value::Number(n) if schema => {
            out.text.push_str(&n.to_string());
            out.text.push('\n');
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_spellings_of_a_metered_route_are_metered() {
        use http::Method;
        let c = |path| Operation::classify(Provider::OpenAi, &Method::POST, path);
        for path in [
            "/v1/chat/completion%73",
            "/v1/chat/completion%73?x=1",
            "/v1/chat/completions;",
            "/v1/chat/completions;x=1/",
            "/v1/chat/completions/.",
            "/v1/chat//completions",
            "/v1/chat/./completions",
            "/v1/x/../chat/completions",
            "/v1/Chat/Completions",
            "/v1/%63hat/completions",
        ] {
            assert_eq!(c(path), Operation::Chat, "{path}");
        }
        assert_eq!(c("/v1/chat/completions/.."), Operation::Other);
        assert_eq!(c("/v1/chat%2Fcompletions"), Operation::Other);
        assert_eq!(c("/v1/%"), Operation::Other);
        assert_eq!(c("/v1/embeddings%"), Operation::Other);
        assert_eq!(c("/v1/embedding%7"), Operation::Other);
        assert_eq!(
            Operation::classify(Provider::Anthropic, &Method::POST, "/v1/Messages/"),
            Operation::Messages
        );
        assert!(matches!(
            route_key("/v1/chat/completions/"),
            std::borrow::Cow::Borrowed("/v1/chat/completions")
        ));
    }

    #[test]
    fn escapes_that_could_name_another_route_are_ambiguous() {
        for path in [
            "/v1/chat%2Fcompletions",
            "/v1/chat%2fcompletions",
            "/v1/chat\\completions",
            "/v1/chat%5Ccompletions",
            "/v1/chat/completions%3B",
            "/v1/chat%252Fcompletions",
            "/v1/chat/completions%00",
            "/v1/chat/completions%",
            "/v1/chat/completions%2",
            "/v1/chat/completions%zz",
        ] {
            assert!(ambiguous_path(path), "{path}");
        }
        for path in [
            "/v1/chat/completions",
            "/v1/fine_tuning/jobs/ft%3Agpt-4o%40x/cancel",
            "/v1/%C3%A9",
            "/v1/chat/completions%20",
            "/v1/chat/completion%73",
            "/v1/threads/thread_AbC/runs",
            "/v1/chat/completions?q=%2F",
            "/v1/é",
        ] {
            assert!(!ambiguous_path(path), "{path}");
        }
    }

    #[test]
    fn dot_dot_segments_climb_however_written() {
        for path in [
            "/..",
            "/../x",
            "/v1/../../x",
            "/v1/%2e%2e/x",
            "/v1/%2E%2e",
            "/v1/.%2e/x",
            "/v1/..%2fx",
            "/v1/..%5Cx",
            "/v1/..\\x",
            "/v1/..;x/y",
        ] {
            assert!(climbs(path), "{path}");
        }
        for path in [
            "/v1/chat/completions",
            "/v1/./x",
            "/v1/.../x",
            "/v1/..x/y",
            "/v1/x../y",
            "/v1/a.b/c",
            "/v1/%2e",
            "/v1/files/file-..",
            "/",
        ] {
            assert!(!climbs(path), "{path}");
        }
    }

    #[test]
    fn classifies_routes() {
        use http::Method;
        let c = |p, m: &Method, path| Operation::classify(p, m, path);
        assert_eq!(
            c(Provider::OpenAi, &Method::POST, "/v1/chat/completions"),
            Operation::Chat
        );
        assert_eq!(
            c(Provider::OpenAi, &Method::POST, "/v1/completions"),
            Operation::Completions
        );
        assert_eq!(
            c(Provider::OpenAi, &Method::POST, "/responses"),
            Operation::Responses
        );
        assert_eq!(
            c(Provider::OpenAi, &Method::GET, "/v1/responses"),
            Operation::Other
        );
        assert_eq!(
            c(Provider::OpenAi, &Method::POST, "/v1/embeddings?x=1"),
            Operation::Embeddings
        );
        assert_eq!(
            c(Provider::Anthropic, &Method::POST, "/v1/messages"),
            Operation::Messages
        );
        assert_eq!(
            c(
                Provider::Anthropic,
                &Method::POST,
                "/v1/messages/count_tokens"
            ),
            Operation::Other
        );
        assert_eq!(
            c(Provider::Generic, &Method::GET, "/q"),
            Operation::ToolCall
        );
    }

    #[test]
    fn reads_fields() {
        let chat = Operation::Chat;
        let r = RequestInfo::parse(
            br#"{"model":"gpt-4o","stream":true,"max_tokens":10,"n":3,"stream_options":{"include_usage":true}}"#,
            chat,
        )
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("gpt-4o"));
        assert!(r.stream && r.client_wants_usage);
        assert_eq!((r.max_output_tokens, r.choices), (Some(10), 3));
        let r = RequestInfo::parse(br#"{"prompt":"x","n":2,"best_of":5}"#, chat).unwrap();
        assert_eq!((r.max_output_tokens, r.choices), (None, 5));
        assert!(RequestInfo::parse(b"{\"model\":", chat).is_err());
        assert!(RequestInfo::parse(b"[1]", chat).is_err());
        // An array of the fields' values is not an object (serde takes it
        // for a struct; injecting usage into it panicked).
        assert!(RequestInfo::parse(
            br#" ["gpt-4o-mini",true,null,null,null,null,null,null]"#,
            chat
        )
        .is_err());
    }

    /// The output cap is read only from the field the route's API reads:
    /// an upstream that ignores unknown fields writes up to its own
    /// default past any other, so another caps nothing.
    #[test]
    fn the_output_cap_is_the_routes_own_field() {
        use Operation::*;
        let body = br#"{"max_completion_tokens":5,"max_tokens":7,"max_output_tokens":9}"#;
        for (op, want) in [
            (Chat, Some(7)),
            (Completions, Some(7)),
            (Messages, Some(7)),
            (Responses, Some(9)),
            (Embeddings, None),
        ] {
            let got = RequestInfo::parse(body, op).unwrap().max_output_tokens;
            assert_eq!(got, want, "{op:?}");
        }
        for (op, body) in [
            (Chat, &br#"{"max_output_tokens":1}"#[..]),
            (
                Completions,
                br#"{"max_completion_tokens":1,"max_output_tokens":1}"#,
            ),
            (Messages, br#"{"max_output_tokens":1}"#),
            (Responses, br#"{"max_tokens":1,"max_completion_tokens":1}"#),
        ] {
            let got = RequestInfo::parse(body, op).unwrap().max_output_tokens;
            assert_eq!(got, None, "{op:?}");
        }
        let chat = |b: &[u8]| RequestInfo::parse(b, Chat).unwrap().max_output_tokens;
        assert_eq!(chat(br#"{"max_completion_tokens":5}"#), Some(5));
        assert_eq!(chat(br#"{"max_tokens":5}"#), Some(5));
    }

    #[test]
    fn adds_an_output_cap_once() {
        let parse = |b: Bytes| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        let b = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        let field = |op| output_cap_field(op).unwrap();
        let out = add_output_cap(&b, field(Operation::Chat), 16384).unwrap();
        assert_eq!(
            &out[..],
            br#"{"model":"m","messages":[],"max_completion_tokens":16384}"#
        );
        assert_eq!(
            RequestInfo::parse(&out, Operation::Chat)
                .unwrap()
                .max_output_tokens,
            Some(16384)
        );
        // Present as null: set, not added a second time.
        let b = Bytes::from_static(br#"{"prompt":"x","max_tokens":null}"#);
        let out = add_output_cap(&b, field(Operation::Completions), 7).unwrap();
        assert_eq!(
            parse(out),
            serde_json::json!({"prompt": "x", "max_tokens": 7})
        );
        // The name inside a string only: still one key.
        let b = Bytes::from_static(br#"{"input":"say \"max_output_tokens\""}"#);
        let out = add_output_cap(&b, field(Operation::Responses), 9).unwrap();
        assert_eq!(parse(out)["max_output_tokens"], 9);
        let out = add_output_cap(
            &Bytes::from_static(b"{ }"),
            field(Operation::Completions),
            1,
        )
        .unwrap();
        assert_eq!(&out[..], br#"{ "max_tokens":1}"#);
        // A member the body has gets the value in place; the rest of the
        // body stays byte for byte, key order included.
        let b = Bytes::from_static(br#"{"z":1,"max_completion_tokens": null ,"a":{"y":1,"b":2}}"#);
        let out = add_output_cap(&b, field(Operation::Chat), 5).unwrap();
        assert_eq!(
            &out[..],
            br#"{"z":1,"max_completion_tokens": 5 ,"a":{"y":1,"b":2}}"#
        );
    }

    #[test]
    fn injects_include_usage() {
        let b = Bytes::from_static(br#"{"model":"m","stream":true} "#);
        let out = inject_include_usage(&b).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");

        let b = Bytes::from_static(br#"{"model":"m","stream_options":{"include_usage":false}}"#);
        let v: serde_json::Value =
            serde_json::from_slice(&inject_include_usage(&b).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);

        let b = Bytes::from_static(b"{}");
        let v: serde_json::Value =
            serde_json::from_slice(&inject_include_usage(&b).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    /// Spliced into the body as sent, whatever `stream_options` holds:
    /// every other byte stays, key order included (structured outputs
    /// generate a schema's properties in the order written; a
    /// re-serialised body had its keys sorted).
    #[test]
    fn include_usage_is_spliced_in_keeping_every_other_byte() {
        let schema = r#""response_format":{"type":"json_schema","json_schema":{"schema":{"properties":{"reasoning":{"type":"string"},"answer":{"type":"string"}}}}}"#;
        for (options, want) in [
            (
                r#""stream_options":{"include_obfuscation":false}"#,
                r#""stream_options":{"include_obfuscation":false,"include_usage":true}"#,
            ),
            (
                r#""stream_options": { }"#,
                r#""stream_options": { "include_usage":true}"#,
            ),
            (
                r#""stream_options":null"#,
                r#""stream_options":{"include_usage":true}"#,
            ),
            (
                r#""stream_options":{"include_usage":false, "x":1}"#,
                r#""stream_options":{"include_usage":true, "x":1}"#,
            ),
        ] {
            let body = format!(r#"{{"model":"m", "stream":true,{schema},{options},"z":[1.50,2]}}"#);
            let out = inject_include_usage(&Bytes::from(body)).unwrap();
            let want = format!(r#"{{"model":"m", "stream":true,{schema},{want},"z":[1.50,2]}}"#);
            assert_eq!(std::str::from_utf8(&out).unwrap(), want);
        }
        // The name only inside a string: a member added at the end.
        let b = Bytes::from_static(br#"{"z":2,"a":"\"stream_options\""}"#);
        let out = inject_include_usage(&b).unwrap();
        assert_eq!(
            &out[..],
            br#"{"z":2,"a":"\"stream_options\"","stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn input_text_skips_ids_and_counts_urls() {
        let t = input_text(
            br#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"What is this?"},
            {"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
        );
        assert_eq!(t.text, "Be brief.\nWhat is this?\n");
        assert_eq!(t.messages, 2);
        assert_eq!(t.by_reference, 1);
    }
}
