//! Provider usage objects and their normalisation to the GenAI token rule.

use serde::Deserialize;

use crate::config::Provider;
use crate::event::Usage;

#[derive(Debug, Default, Deserialize)]
pub struct Details {
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
}

/// Anthropic's `cache_creation`: the cache writes by how long they are kept.
#[derive(Debug, Default, Deserialize)]
pub struct CacheCreation {
    pub ephemeral_5m_input_tokens: Option<u64>,
    pub ephemeral_1h_input_tokens: Option<u64>,
}

/// Every usage field any supported API reports; each provider fills some.
#[derive(Debug, Default, Deserialize)]
pub struct RawUsage {
    // OpenAI chat, completions, embeddings
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub prompt_tokens_details: Option<Details>,
    pub completion_tokens_details: Option<Details>,
    // OpenAI responses and Anthropic
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub input_tokens_details: Option<Details>,
    pub output_tokens_details: Option<Details>,
    // Anthropic
    pub cache_creation_input_tokens: Option<u64>,
    pub cache_read_input_tokens: Option<u64>,
    pub cache_creation: Option<CacheCreation>,
}

impl RawUsage {
    /// Anthropic's `message_delta` repeats or updates fields of
    /// `message_start`: fields present in `later` win.
    pub fn merge(&mut self, later: RawUsage) {
        macro_rules! take {
            ($to:expr, $from:expr; $($f:ident),*) => {
                $( if $from.$f.is_some() { $to.$f = $from.$f; } )*
            };
        }
        take!(
            self, later;
            prompt_tokens,
            completion_tokens,
            prompt_tokens_details,
            completion_tokens_details,
            input_tokens,
            output_tokens,
            input_tokens_details,
            output_tokens_details,
            cache_creation_input_tokens,
            cache_read_input_tokens
        );
        // Field by field: a later object naming one lifetime keeps the
        // other's count.
        if let Some(c) = later.cache_creation {
            let mine = self.cache_creation.get_or_insert_with(Default::default);
            take!(mine, c; ephemeral_5m_input_tokens, ephemeral_1h_input_tokens);
        }
    }

    /// Normalises to the GenAI rule: input includes cache reads and writes,
    /// output includes reasoning.
    pub fn normalize(&self, provider: Provider) -> Usage {
        match provider {
            Provider::Anthropic => {
                let read = self.cache_read_input_tokens.unwrap_or(0);
                let write = self.cache_creation_input_tokens.unwrap_or(0);
                // A subset of the writes (`cache_creation_input_tokens` is
                // the sum of both lifetimes); never more than they are.
                let write_1h = self
                    .cache_creation
                    .as_ref()
                    .and_then(|c| c.ephemeral_1h_input_tokens)
                    .unwrap_or(0)
                    .min(write);
                Usage {
                    input_tokens: self
                        .input_tokens
                        .unwrap_or(0)
                        .saturating_add(read)
                        .saturating_add(write),
                    cache_read_input_tokens: read,
                    cache_write_input_tokens: write,
                    cache_write_1h_input_tokens: write_1h,
                    output_tokens: self.output_tokens.unwrap_or(0),
                    reasoning_output_tokens: 0,
                }
            }
            Provider::OpenAi | Provider::Generic => {
                let details =
                    |d: &Option<Details>, f: fn(&Details) -> Option<u64>| d.as_ref().and_then(f);
                Usage {
                    input_tokens: self.prompt_tokens.or(self.input_tokens).unwrap_or(0),
                    cache_read_input_tokens: details(&self.prompt_tokens_details, |d| {
                        d.cached_tokens
                    })
                    .or(details(&self.input_tokens_details, |d| d.cached_tokens))
                    .unwrap_or(0),
                    cache_write_input_tokens: 0,
                    cache_write_1h_input_tokens: 0,
                    output_tokens: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
                    reasoning_output_tokens: details(&self.completion_tokens_details, |d| {
                        d.reasoning_tokens
                    })
                    .or(details(&self.output_tokens_details, |d| d.reasoning_tokens))
                    .unwrap_or(0),
                }
            }
        }
    }
}

/// The parts of a JSON body or SSE event the meter reads; the rest is skipped
/// without allocation. `response` (Responses API events) and `message`
/// (Anthropic `message_start`) nest the same shape.
#[derive(Debug, Default, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub model: Option<String>,
    pub usage: Option<RawUsage>,
    pub response: Option<Box<Envelope>>,
    pub message: Option<Box<Envelope>>,
    pub choices: Option<Vec<serde::de::IgnoredAny>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A later `cache_creation` naming one lifetime keeps the other's
    /// count (a whole-object merge lost the hour-long writes, billing them
    /// at the five-minute rate).
    #[test]
    fn cache_lifetimes_merge_field_by_field() {
        let parse = |s: &str| serde_json::from_str::<RawUsage>(s).unwrap();
        let mut u = parse(
            r#"{"input_tokens":3,"cache_creation_input_tokens":10,
                "cache_creation":{"ephemeral_5m_input_tokens":4,"ephemeral_1h_input_tokens":6}}"#,
        );
        u.merge(parse(
            r#"{"output_tokens":9,"cache_creation":{"ephemeral_5m_input_tokens":4}}"#,
        ));
        let n = u.normalize(Provider::Anthropic);
        assert_eq!(
            (
                n.input_tokens,
                n.cache_write_input_tokens,
                n.cache_write_1h_input_tokens
            ),
            (13, 10, 6)
        );
        assert_eq!(n.output_tokens, 9);
        u.merge(parse(
            r#"{"cache_creation":{"ephemeral_1h_input_tokens":7}}"#,
        ));
        assert_eq!(
            u.normalize(Provider::Anthropic).cache_write_1h_input_tokens,
            7
        );
    }
}
