//! The OTLP sink: events as OTLP logs and metrics over gRPC or HTTP/protobuf,
//! built on the official protobuf definitions (opentelemetry-proto) with our
//! own acknowledged loop: the cursor moves only on an OK export response.
//! (opentelemetry-rust's batch exporters drop on overflow; this never does.)
//!
//! gRPC is spoken directly over hyper's HTTP/2 client: a unary call is a
//! POST of one length-prefixed message, answered with `grpc-status`.

pub mod convert;

use std::path::PathBuf;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::Message;

use super::{dead_letter, BoxFuture, Delivered, Sink, SinkError};
use crate::config::{OtlpProtocol, Secret, SinkConfig, SinkKind};
use crate::proxy::client::HttpClient;
use crate::spool::Batch;

pub struct OtlpSink {
    name: String,
    endpoint: http::Uri,
    protocol: OtlpProtocol,
    headers: Vec<(http::HeaderName, Secret)>,
    timeout: Duration,
    tenant_attributes: bool,
    client: HttpClient,
    dead_letter: PathBuf,
    /// The batch (by its end in the spool) whose logs the receiver took
    /// while its metrics export failed: the retry sends the metrics only,
    /// not the logs again.
    logs_taken: Option<u64>,
}

/// What an export attempt came to.
enum Answer {
    Ok,
    /// Accepted, but the receiver rejected `rejected` of its items (OTLP
    /// `partial_success`). Rejected items must not be sent again, and the
    /// answer does not say which they were.
    Partial {
        rejected: i64,
        message: String,
    },
    Retry(String),
    Refused(String),
}

/// The answer to an OK export: [`Answer::Partial`] when its
/// `partial_success` names rejected items. An empty or undecodable answer
/// is full success (OTLP lets a receiver send an empty body).
fn partial_success(kind: &str, msg: &[u8]) -> Answer {
    let partial = if kind == "logs" {
        ExportLogsServiceResponse::decode(msg)
            .ok()
            .and_then(|r| r.partial_success)
            .map(|p| (p.rejected_log_records, p.error_message))
    } else {
        ExportMetricsServiceResponse::decode(msg)
            .ok()
            .and_then(|r| r.partial_success)
            .map(|p| (p.rejected_data_points, p.error_message))
    };
    match partial {
        Some((rejected, message)) if rejected > 0 => Answer::Partial { rejected, message },
        Some((_, message)) if !message.is_empty() => {
            tracing::warn!(
                kind,
                message,
                "OTLP receiver accepted an export with a warning"
            );
            Answer::Ok
        }
        _ => Answer::Ok,
    }
}

/// The message of a unary gRPC answer (flag 0, big-endian length, message).
fn grpc_message(body: &[u8]) -> &[u8] {
    let Some((&0, rest)) = body.split_first() else {
        return &[];
    };
    let Some((len, msg)) = rest.split_first_chunk::<4>() else {
        return &[];
    };
    msg.get(..u32::from_be_bytes(*len) as usize).unwrap_or(&[])
}

impl OtlpSink {
    pub fn new(cfg: &SinkConfig, data_dir: &std::path::Path) -> OtlpSink {
        let SinkKind::Otlp {
            endpoint,
            protocol,
            headers,
            timeout,
            tenant_attributes,
        } = &cfg.kind
        else {
            unreachable!("built from an otlp sink config")
        };
        OtlpSink {
            name: cfg.name.clone(),
            endpoint: endpoint.clone(),
            protocol: *protocol,
            headers: headers.clone(),
            timeout: *timeout,
            tenant_attributes: *tenant_attributes,
            client: crate::proxy::client::build(
                Duration::from_secs(10),
                *protocol == OtlpProtocol::Grpc,
            ),
            dead_letter: data_dir
                .join("deadletter")
                .join(format!("{}.jsonl", cfg.name)),
            logs_taken: None,
        }
    }

    fn url(&self, path: &str) -> http::Uri {
        let base = self.endpoint.to_string();
        format!("{}{path}", base.trim_end_matches('/'))
            .parse()
            .expect("endpoint + path is a URI")
    }

    async fn export(&self, kind: &str, msg: Vec<u8>) -> Answer {
        let (url, body, ct) = match self.protocol {
            OtlpProtocol::Grpc => {
                let mut framed = BytesMut::with_capacity(msg.len() + 5);
                framed.put_u8(0);
                framed.put_u32(msg.len() as u32);
                framed.put_slice(&msg);
                let path = format!(
                    "/opentelemetry.proto.collector.{kind}.v1.{}Service/Export",
                    if kind == "logs" { "Logs" } else { "Metrics" }
                );
                (self.url(&path), framed.freeze(), "application/grpc")
            }
            OtlpProtocol::HttpProtobuf => (
                self.url(&format!("/v1/{kind}")),
                Bytes::from(msg),
                "application/x-protobuf",
            ),
        };
        let mut req = http::Request::post(url).header(http::header::CONTENT_TYPE, ct);
        if self.protocol == OtlpProtocol::Grpc {
            req = req.header(http::header::TE, "trailers");
        }
        for (name, value) in &self.headers {
            let mut v = http::HeaderValue::from_str(&value.0).expect("validated");
            v.set_sensitive(true);
            req = req.header(name, v);
        }
        let req = req.body(Full::new(body)).expect("a valid request");
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("connection: {e}"))?;
            let (parts, body) = resp.into_parts();
            let collected = http_body_util::Limited::new(body, 1 << 20)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            let trailers = collected.trailers().cloned().unwrap_or_default();
            Ok::<_, String>((parts, trailers, collected.to_bytes()))
        };
        let (parts, trailers, body) = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => return Answer::Retry("timed out".into()),
            Ok(Err(e)) => return Answer::Retry(e),
            Ok(Ok(x)) => x,
        };
        let status = parts.status.as_u16();
        match self.protocol {
            OtlpProtocol::HttpProtobuf => match status {
                200..=299 => partial_success(kind, &body),
                // A 404 is a signal the receiver has no pipeline for (a
                // logs-only collector answers metrics so): not retried.
                s if s != 404 && super::retry_http_status(s) => {
                    Answer::Retry(format!("HTTP {status}"))
                }
                _ => Answer::Refused(format!("HTTP {status}")),
            },
            OtlpProtocol::Grpc => {
                if status != 200 {
                    return Answer::Retry(format!("HTTP {status}"));
                }
                let code = trailers
                    .get("grpc-status")
                    .or_else(|| parts.headers.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u32>().ok());
                let message = trailers
                    .get("grpc-message")
                    .or_else(|| parts.headers.get("grpc-message"))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                match code {
                    Some(0) => partial_success(kind, grpc_message(&body)),
                    Some(c) if super::retry_grpc_status(c) => {
                        Answer::Retry(format!("grpc-status {c}: {message}"))
                    }
                    Some(c) => Answer::Refused(format!("grpc-status {c}: {message}")),
                    None => Answer::Retry("no grpc-status".into()),
                }
            }
        }
    }

    async fn deliver_batch(&mut self, batch: &Batch) -> Result<Delivered, SinkError> {
        let events = convert::parse(&batch.lines);
        if events.is_empty() {
            return Ok(Delivered::default());
        }
        let mut exports = Vec::with_capacity(2);
        if self.logs_taken != Some(batch.end) {
            exports.push(("logs", convert::logs(&events).encode_to_vec()));
        }
        if let Some(m) = convert::metrics(&events, self.tenant_attributes) {
            exports.push(("metrics", m.encode_to_vec()));
        }
        let mut dead_lettered = 0;
        for (kind, msg) in exports {
            match self.export(kind, msg).await {
                Answer::Ok if kind == "logs" => self.logs_taken = Some(batch.end),
                Answer::Ok => {}
                Answer::Partial { rejected, message } if kind == "logs" => {
                    // Never dropped silently, never sent again: the batch
                    // goes to the dead-letter file, flagged, since the
                    // answer does not say which records were rejected.
                    dead_letter(
                        &self.dead_letter,
                        &self.name,
                        &batch.lines,
                        &format!(
                            "logs: partial success, the receiver rejected {rejected} of {} records \
                             ({message}); it accepted the others, so match by event id before replaying",
                            events.len()
                        ),
                    )?;
                    dead_lettered = batch.lines.len();
                }
                Answer::Partial { rejected, message } => {
                    // Metrics are derived from the events, which are in the logs.
                    tracing::warn!(
                        sink = %self.name,
                        kind,
                        rejected,
                        message,
                        "OTLP receiver rejected some data points"
                    );
                }
                Answer::Retry(reason) | Answer::Refused(reason) if dead_lettered > 0 => {
                    // The logs were partly accepted and the batch is in the
                    // dead-letter file: retrying would send them again, so a
                    // failed metrics export (derived from those events) is
                    // only logged.
                    tracing::warn!(
                        sink = %self.name,
                        kind,
                        reason,
                        "OTLP export failed for a batch whose logs were partly accepted; not sent again"
                    );
                }
                Answer::Refused(reason) if kind == "metrics" => {
                    // The events are in the logs, which were taken; metrics
                    // are derived from them (a logs-only receiver refuses
                    // them every time): not set aside, not retried.
                    tracing::warn!(
                        sink = %self.name,
                        reason,
                        "OTLP receiver refused the metrics export; the logs were taken"
                    );
                }
                Answer::Retry(reason) => {
                    return Err(SinkError::Retry {
                        reason: format!("{kind}: {reason}"),
                        after: None,
                    })
                }
                Answer::Refused(reason) => {
                    dead_letter(
                        &self.dead_letter,
                        &self.name,
                        &batch.lines,
                        &format!("{kind}: {reason}"),
                    )?;
                    return Ok(Delivered {
                        sink_offset: None,
                        dead_lettered: batch.lines.len(),
                    });
                }
            }
        }
        Ok(Delivered {
            sink_offset: None,
            dead_lettered,
        })
    }
}

impl Sink for OtlpSink {
    fn start(&mut self, _saved: Option<u64>) -> BoxFuture<'_, Result<Option<u64>, SinkError>> {
        Box::pin(async { Ok(None) })
    }

    fn deliver<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<Delivered, SinkError>> {
        Box::pin(self.deliver_batch(batch))
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsPartialSuccess;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsPartialSuccess;

    use super::*;

    fn logs(rejected: i64, message: &str) -> Vec<u8> {
        ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess {
                rejected_log_records: rejected,
                error_message: message.into(),
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn partial_success_is_read_from_the_answer() {
        assert!(matches!(
            partial_success("logs", &logs(2, "too long")),
            Answer::Partial { rejected: 2, ref message } if message == "too long"
        ));
        // No rejection (a warning only), an empty body, or one that does not
        // decode: full success.
        assert!(matches!(
            partial_success("logs", &logs(0, "slow down")),
            Answer::Ok
        ));
        assert!(matches!(partial_success("logs", b""), Answer::Ok));
        assert!(matches!(
            partial_success("logs", b"{\"ok\":true}"),
            Answer::Ok
        ));
        let metrics = ExportMetricsServiceResponse {
            partial_success: Some(ExportMetricsPartialSuccess {
                rejected_data_points: 3,
                error_message: String::new(),
            }),
        }
        .encode_to_vec();
        assert!(matches!(
            partial_success("metrics", &metrics),
            Answer::Partial { rejected: 3, .. }
        ));
    }

    #[test]
    fn grpc_message_is_unframed_or_empty() {
        let msg = logs(1, "x");
        let mut framed = vec![0];
        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        framed.extend_from_slice(&msg);
        assert_eq!(grpc_message(&framed), &msg[..]);
        // Compressed, truncated, or too short to frame anything.
        framed[0] = 1;
        assert_eq!(grpc_message(&framed), b"");
        framed[0] = 0;
        assert_eq!(grpc_message(&framed[..framed.len() - 1]), b"");
        assert_eq!(grpc_message(&[0, 0, 0]), b"");
        assert_eq!(grpc_message(b""), b"");
    }
}
