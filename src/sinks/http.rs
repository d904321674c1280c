//! The HTTP sink: batches POSTed as a JSON array of the events, unchanged
//! (`application/cloudevents-batch+json`, as OpenMeter ingests them, or
//! `application/json`). Retries with backoff on connection errors, 408, 429
//! (honouring `retry-after`) and 5xx; a batch refused as too large (413) is
//! sent again in halves; any other 4xx would fail forever, so that batch
//! goes to a dead-letter file with the reason and delivery goes on.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::{dead_letter, BoxFuture, Delivered, Sink, SinkError};
use crate::config::{HttpFormat, Secret};
use crate::proxy::client::HttpClient;
use crate::spool::Batch;

pub struct HttpSink {
    pub name: String,
    pub url: http::Uri,
    pub format: HttpFormat,
    pub headers: Vec<(http::HeaderName, Secret)>,
    pub gzip: bool,
    pub timeout: Duration,
    pub client: HttpClient,
    pub dead_letter: PathBuf,
}

/// `[` + the event lines joined by `,` + `]`: no re-serialising.
pub fn json_array(lines: &[Bytes]) -> Vec<u8> {
    let bytes: usize = lines.iter().map(Bytes::len).sum();
    let mut body = Vec::with_capacity(bytes + 2);
    body.push(b'[');
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(line.strip_suffix(b"\n").unwrap_or(line));
    }
    body.push(b']');
    body
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(body)?;
    enc.finish()
}

/// Seconds from a `retry-after` header (delta-seconds form).
fn retry_after(h: &http::HeaderMap) -> Option<Duration> {
    h.get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// What a receiver said to one POST that is not to be retried.
enum Answer {
    Taken,
    /// 413: the batch is too large; its halves may not be.
    TooLarge(String),
    /// Any other answer about the batch.
    Refused(String),
}

impl HttpSink {
    /// Posts the batch. A receiver that refuses it as too large (413, say
    /// past nginx's `client_max_body_size`; a batch can pass
    /// `batch_max_bytes` by up to one event, and a backlog fills every
    /// batch) gets it in halves, in order, down to single events; only what
    /// it refuses otherwise, or alone, is set aside in the dead-letter
    /// file, once every part has an answer: a retry (a later part's 503)
    /// sends the whole batch again, so parts set aside earlier would be
    /// written twice. Parts already taken are sent again then too (the
    /// events' ids let the receiver drop them).
    async fn deliver_all(&self, batch: &Batch) -> Result<Delivered, SinkError> {
        let lines = &batch.lines[..];
        // The parts still to post, as ranges of the batch, in its order.
        let mut parts = std::collections::VecDeque::new();
        parts.push_back(0..lines.len());
        let mut refused = Vec::new();
        while let Some(part) = parts.pop_front() {
            match self.post(&lines[part.clone()]).await? {
                Answer::Taken => {}
                Answer::TooLarge(_) if part.len() > 1 => {
                    let mid = part.start + part.len() / 2;
                    parts.push_front(mid..part.end);
                    parts.push_front(part.start..mid);
                }
                Answer::TooLarge(reason) | Answer::Refused(reason) => refused.push((part, reason)),
            }
        }
        let mut dead_lettered = 0;
        for (part, reason) in refused {
            dead_letter(&self.dead_letter, &self.name, &lines[part.clone()], &reason)?;
            dead_lettered += part.len();
        }
        Ok(Delivered {
            sink_offset: None,
            dead_lettered,
        })
    }

    async fn post(&self, lines: &[Bytes]) -> Result<Answer, SinkError> {
        let mut body = json_array(lines);
        let mut req = http::Request::post(self.url.clone());
        let ct = match self.format {
            HttpFormat::CloudEvents => "application/cloudevents-batch+json",
            HttpFormat::Json => "application/json",
        };
        req = req.header(http::header::CONTENT_TYPE, ct);
        if self.gzip {
            body = gzip(&body)?;
            req = req.header(http::header::CONTENT_ENCODING, "gzip");
        }
        for (name, value) in &self.headers {
            let mut v = http::HeaderValue::from_str(&value.0).expect("validated");
            v.set_sensitive(true);
            req = req.header(name, v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let send = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| SinkError::Retry {
                    reason: format!("connection: {e}"),
                    after: None,
                })?;
            let status = resp.status();
            let after = retry_after(resp.headers());
            // Read a little of the body for the reason; never the whole of it.
            let text = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Ok::<_, SinkError>((status, after, text))
        };
        let (status, after, text) =
            tokio::time::timeout(self.timeout, send)
                .await
                .map_err(|_| SinkError::Retry {
                    reason: "timed out".into(),
                    after: None,
                })??;
        let snippet = String::from_utf8_lossy(&text[..text.len().min(500)]).into_owned();
        let reason = || format!("HTTP {status}: {snippet}");
        match status.as_u16() {
            200..=299 => Ok(Answer::Taken),
            s if super::retry_http_status(s) => Err(SinkError::Retry {
                reason: reason(),
                after,
            }),
            413 => Ok(Answer::TooLarge(reason())),
            _ => Ok(Answer::Refused(reason())),
        }
    }
}

impl Sink for HttpSink {
    fn start(&mut self, _saved: Option<u64>) -> BoxFuture<'_, Result<Option<u64>, SinkError>> {
        Box::pin(async { Ok(None) })
    }

    fn deliver<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<Delivered, SinkError>> {
        Box::pin(self.deliver_all(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_joins_lines_unchanged() {
        let b = Batch {
            lines: vec![
                Bytes::from_static(b"{\"a\":1}\n"),
                Bytes::from_static(b"{\"b\":2}\n"),
            ],
            end: 0,
        };
        assert_eq!(json_array(&b.lines), b"[{\"a\":1},{\"b\":2}]");
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
    }
}
