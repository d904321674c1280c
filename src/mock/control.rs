//! The `x-mock-*` control headers and the deterministic token counts they
//! produce.

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::Value;

/// Output tokens when the request sets no `x-mock-output-tokens`.
const DEFAULT_OUTPUT_TOKENS: u64 = 8;

/// Every generated content chunk is this text: one token in o200k/cl100k.
pub(crate) const CHUNK: &str = " hello";

/// What the request's `x-mock-*` headers ask for.
#[derive(Debug, Default)]
pub(crate) struct Controls {
    pub(crate) delay: Duration,
    pub(crate) first_byte_delay: Duration,
    pub(crate) fail_after: Option<usize>,
    pub(crate) status: Option<StatusCode>,
    pub(crate) no_usage: bool,
    /// Misbehave in the response head: echo the credentials the request
    /// carried, and add hop-by-hop headers (for the proxy's hygiene tests).
    pub(crate) leak_headers: bool,
    /// Misbehave in the body: echo the request's credential in it (a JSON
    /// field `echo`, or an SSE comment before the first event, split over
    /// two frames in the middle of the key).
    pub(crate) leak_body: bool,
    /// Answer gzip-compressed whatever `accept-encoding` says (as an
    /// upstream ignoring `identity` would), in many small frames.
    pub(crate) gzip: bool,
    cached: u64,
    cache_write: u64,
    /// Of `cache_write`, the part kept an hour.
    cache_write_1h: u64,
    reasoning: u64,
    output: Option<u64>,
}

impl Controls {
    pub(crate) fn from_headers(h: &HeaderMap) -> Self {
        let num = |name: &str| -> Option<u64> { h.get(name)?.to_str().ok()?.trim().parse().ok() };
        let ms = |name: &str| Duration::from_millis(num(name).unwrap_or(0));
        Controls {
            delay: ms("x-mock-delay-ms"),
            first_byte_delay: ms("x-mock-first-byte-delay-ms"),
            fail_after: num("x-mock-fail-after").map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            status: num("x-mock-status")
                .and_then(|n| StatusCode::from_u16(u16::try_from(n).ok()?).ok())
                .filter(|s| s.is_client_error() || s.is_server_error()),
            no_usage: h
                .get("x-mock-no-usage")
                .is_some_and(|v| matches!(v.as_bytes(), b"1" | b"true")),
            leak_headers: h
                .get("x-mock-leak-headers")
                .is_some_and(|v| matches!(v.as_bytes(), b"1" | b"true")),
            leak_body: h
                .get("x-mock-leak-body")
                .is_some_and(|v| matches!(v.as_bytes(), b"1" | b"true")),
            gzip: h
                .get("x-mock-gzip")
                .is_some_and(|v| matches!(v.as_bytes(), b"1" | b"true")),
            cached: num("x-mock-cached-tokens").unwrap_or(0),
            cache_write: num("x-mock-cache-write-tokens").unwrap_or(0),
            cache_write_1h: num("x-mock-cache-write-1h-tokens").unwrap_or(0),
            reasoning: num("x-mock-reasoning-tokens").unwrap_or(0),
            output: num("x-mock-output-tokens"),
        }
    }

    /// The token counts for a request body of `body_len` bytes. `openai`
    /// selects which control headers apply: reasoning is OpenAI-only and
    /// cache writes Anthropic-only.
    pub(crate) fn tokens(&self, body_len: usize, request: &Value, openai: bool) -> Tokens {
        let max = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| request.get(k).and_then(Value::as_u64));
        let wanted = self.output.unwrap_or(DEFAULT_OUTPUT_TOKENS);
        let output = max.map_or(wanted, |m| wanted.min(m));
        let reasoning = if openai {
            self.reasoning.min(output)
        } else {
            0
        };
        Tokens {
            uncached_input: (body_len as u64).div_ceil(4),
            cache_read: self.cached,
            cache_write: if openai { 0 } else { self.cache_write },
            cache_write_1h: if openai {
                0
            } else {
                self.cache_write_1h.min(self.cache_write)
            },
            output,
            reasoning,
            hit_max: output < wanted,
        }
    }
}

/// The counts one mock response reports, in provider terms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tokens {
    /// `ceil(body bytes / 4)`: input that is neither a cache read nor write.
    pub(crate) uncached_input: u64,
    pub(crate) cache_read: u64,
    pub(crate) cache_write: u64,
    /// Of `cache_write`, the part kept an hour.
    pub(crate) cache_write_1h: u64,
    /// All output, reasoning included.
    pub(crate) output: u64,
    pub(crate) reasoning: u64,
    /// The request's max-tokens limit cut the output short.
    pub(crate) hit_max: bool,
}

impl Tokens {
    /// Content chunks (`CHUNK` each): the non-reasoning output.
    pub(crate) fn chunks(&self) -> usize {
        usize::try_from(self.output - self.reasoning).unwrap_or(usize::MAX)
    }

    pub(crate) fn text(&self) -> String {
        CHUNK.repeat(self.chunks())
    }

    /// Input as the OpenTelemetry rule counts it: cache reads and writes included.
    pub(crate) fn total_input(&self) -> u64 {
        self.uncached_input + self.cache_read + self.cache_write
    }

    pub(crate) fn normalized(&self) -> Usage {
        Usage {
            input_tokens: self.total_input(),
            cache_read_input_tokens: self.cache_read,
            cache_write_input_tokens: self.cache_write,
            cache_write_1h_input_tokens: self.cache_write_1h,
            output_tokens: self.output,
            reasoning_output_tokens: self.reasoning,
        }
    }
}

/// Normalized usage, the same keys as `tests/fixtures/*/X.expected.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Usage {
    pub(crate) input_tokens: u64,
    pub(crate) cache_read_input_tokens: u64,
    pub(crate) cache_write_input_tokens: u64,
    pub(crate) cache_write_1h_input_tokens: u64,
    pub(crate) output_tokens: u64,
    pub(crate) reasoning_output_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_is_capped_by_the_request_limit() {
        let mut h = HeaderMap::new();
        h.insert("x-mock-output-tokens", "20".parse().unwrap());
        h.insert("x-mock-reasoning-tokens", "5".parse().unwrap());
        let c = Controls::from_headers(&h);
        let t = c.tokens(9, &json!({"max_completion_tokens": 12}), true);
        assert_eq!(
            (t.uncached_input, t.output, t.reasoning, t.chunks()),
            (3, 12, 5, 7)
        );
        assert!(t.hit_max);
        let t = c.tokens(8, &json!({}), false);
        assert_eq!(
            (t.uncached_input, t.output, t.reasoning, t.chunks()),
            (2, 20, 0, 20)
        );
    }
}
