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
}

/// What an export attempt came to.
enum Answer {
    Ok,
    Retry(String),
    Refused(String),
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
            Ok::<_, String>((parts, trailers))
        };
        let (parts, trailers) = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => return Answer::Retry("timed out".into()),
            Ok(Err(e)) => return Answer::Retry(e),
            Ok(Ok(x)) => x,
        };
        let status = parts.status.as_u16();
        match self.protocol {
            OtlpProtocol::HttpProtobuf => match status {
                200..=299 => Answer::Ok,
                408 | 429 | 500..=599 => Answer::Retry(format!("HTTP {status}")),
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
                    Some(0) => Answer::Ok,
                    // CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
                    // ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS: retryable.
                    Some(c @ (1 | 4 | 8 | 10 | 11 | 14 | 15)) => {
                        Answer::Retry(format!("grpc-status {c}: {message}"))
                    }
                    Some(c) => Answer::Refused(format!("grpc-status {c}: {message}")),
                    None => Answer::Retry("no grpc-status".into()),
                }
            }
        }
    }

    async fn deliver_batch(&self, batch: &Batch) -> Result<Delivered, SinkError> {
        let events = convert::parse(&batch.lines);
        if events.is_empty() {
            return Ok(Delivered::default());
        }
        let mut exports = vec![("logs", convert::logs(&events).encode_to_vec())];
        if let Some(m) = convert::metrics(&events, self.tenant_attributes) {
            exports.push(("metrics", m.encode_to_vec()));
        }
        for (kind, msg) in exports {
            match self.export(kind, msg).await {
                Answer::Ok => {}
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
                        batch,
                        &format!("{kind}: {reason}"),
                    )?;
                    return Ok(Delivered {
                        sink_offset: None,
                        dead_lettered: batch.lines.len(),
                    });
                }
            }
        }
        Ok(Delivered::default())
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
