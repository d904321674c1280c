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
            ($($f:ident),*) => { $( if later.$f.is_some() { self.$f = later.$f; } )* };
        }
        take!(
            prompt_tokens,
            completion_tokens,
            prompt_tokens_details,
            completion_tokens_details,
            input_tokens,
            output_tokens,
            input_tokens_details,
            output_tokens_details,
            cache_creation_input_tokens,
            cache_read_input_tokens,
            cache_creation
        );
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
