//! The request log behind `/__mock/requests`: the last `LOG_CAPACITY`
//! requests, oldest first.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{json, Value};

use super::control::Usage;

/// Requests kept; older ones fall off the front.
const LOG_CAPACITY: usize = 1000;

/// Shared by every connection of one `serve`.
pub(crate) struct State {
    /// The last request number handed out; ids are `req_<n>`.
    pub(crate) next_id: AtomicU64,
    log: Mutex<VecDeque<LogEntry>>,
    /// `TOLLGATE_MOCK_EXPECT_KEY`: when set, the only accepted credential.
    pub(crate) expect_key: Option<String>,
}

/// One `/__mock/requests` entry.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LogEntry {
    pub(crate) path: String,
    /// The query as received, if any.
    pub(crate) query: Option<String>,
    pub(crate) method: String,
    pub(crate) request_id: String,
    pub(crate) authorization: Option<String>,
    pub(crate) x_api_key: Option<String>,
    pub(crate) headers: Vec<String>,
    pub(crate) body_bytes: usize,
    /// The normalized usage the response reported in full, or null (errors,
    /// streams without a usage chunk, `x-mock-no-usage`, `x-mock-fail-after`).
    pub(crate) usage: Option<Usage>,
}

impl State {
    pub(crate) fn new(expect_key: Option<String>) -> Self {
        State {
            next_id: AtomicU64::new(0),
            log: Mutex::new(VecDeque::with_capacity(64)),
            expect_key,
        }
    }

    pub(crate) fn record(&self, entry: LogEntry) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(entry);
    }

    pub(crate) fn log_json(&self) -> Value {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        json!(log.iter().collect::<Vec<_>>())
    }

    pub(crate) fn clear(&self) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> LogEntry {
        LogEntry {
            path: "/v1/models".into(),
            query: None,
            method: "GET".into(),
            request_id: format!("req_{n}"),
            authorization: None,
            x_api_key: None,
            headers: Vec::new(),
            body_bytes: 0,
            usage: None,
        }
    }

    #[test]
    fn the_log_keeps_the_last_thousand() {
        let state = State::new(None);
        for n in 1..=LOG_CAPACITY + 5 {
            state.record(entry(n));
        }
        let log = state.log_json();
        assert_eq!(log.as_array().map(Vec::len), Some(LOG_CAPACITY));
        assert_eq!(log[0]["request_id"], "req_6");
        state.clear();
        assert_eq!(state.log_json(), json!([]));
    }
}
