//! Token estimation with tiktoken-rs.
//!
//! The BPE tables are large (o200k_base takes ~170 ms and about 42 MB of
//! RSS to load, cl100k_base about 20 MB more), so they are loaded lazily,
//! the first time an estimate is needed, and shared through tiktoken-rs's
//! process-wide singletons. Callers run estimates on a
//! blocking thread (`estimate_blocking`) so the async workers never wait on a
//! table load.

use tiktoken_rs::CoreBPE;

/// Which BPE a model family uses. Models we do not know (Anthropic's, tool
/// APIs) are estimated with o200k_base: not their tokenizer, but close.
fn bpe_for(model: &str) -> &'static CoreBPE {
    let legacy = model.starts_with("gpt-4-")
        || model == "gpt-4"
        || model.starts_with("gpt-3.5")
        || model.starts_with("text-embedding-");
    if legacy && !model.starts_with("gpt-4o") {
        tiktoken_rs::cl100k_base_singleton()
    } else {
        tiktoken_rs::o200k_base_singleton()
    }
}

/// Number of tokens in `text` for `model`. May load a table: call from a
/// blocking context.
pub fn count(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    bpe_for(model).encode_with_special_tokens(text).len() as u64
}

/// Runs `f` on tokio's blocking pool when inside a runtime, inline otherwise.
/// `None` if it did not finish (it panicked, or the runtime is shutting
/// down): the caller falls back (a byte-length estimate for an event, a
/// refusal at admission) rather than lose the call's event or its budget
/// settlement.
pub async fn estimate_blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => match tokio::task::spawn_blocking(f).await {
            Ok(v) => Some(v),
            Err(e) => {
                // Not the error itself: a panic's message could quote text.
                let how = if e.is_panic() {
                    "panicked"
                } else {
                    "was cancelled"
                };
                tracing::error!("token estimate {how}; falling back to a bound from byte lengths");
                None
            }
        },
        Err(_) => Some(f()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_estimate_is_none_not_a_panic() {
        assert_eq!(estimate_blocking(|| 7).await, Some(7));
        let failed = estimate_blocking(|| -> u64 { panic!("tokenizer broke") }).await;
        assert_eq!(failed, None);
    }

    #[test]
    fn counts_mock_words_as_one_token_each() {
        assert_eq!(count("gpt-4o-mini", " hello hello hello"), 3);
        assert_eq!(count("gpt-3.5-turbo", " hello hello"), 2);
        assert_eq!(count("claude-sonnet-4-5", ""), 0);
    }
}
