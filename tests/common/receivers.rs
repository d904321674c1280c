//! In-process test receivers for the sinks, on 127.0.0.1 ephemeral ports:
//!
//! - [`HttpReceiver`]: an OpenMeter-style ingest that records every POST
//!   (headers, the decoded JSON array, gunzipped when `content-encoding:
//!   gzip`) and fails on demand ([`HttpReceiver::fail_next`],
//!   [`HttpReceiver::always`]). "Not listening at all" is a [`down_port`],
//!   bound but refusing connections, that a receiver takes over later
//!   ([`HttpReceiver::start_on`]).
//! - [`OtlpReceiver`]: an OTLP collector on the official protobuf messages
//!   (opentelemetry-proto), speaking gRPC over h2c and HTTP/protobuf, that
//!   records the decoded export requests.
//!
//! Both stop (and drop every open connection) when dropped.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

type Body = BoxBody<Bytes, Infallible>;

/// A 127.0.0.1 port that refuses connections (bound, not listening) for a
/// receiver that is down now and started on it later with
/// [`HttpReceiver::start_on`]. Held from the start, so no other process can
/// take the port in between.
pub struct DownPort {
    socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

pub fn down_port() -> DownPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().unwrap();
    DownPort { socket, addr }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

/// Accepts connections on `listener` and serves each (HTTP/1.1 or h2c by
/// prior knowledge) with `handle`, until the returned task is aborted; the
/// connections live in the task's `JoinSet`, so they go with it.
fn serve<F, Fut>(listener: TcpListener, handle: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            conns.spawn(async move {
                let svc = service_fn(move |req| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(handle(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            // Reap finished connections.
            while conns.try_join_next().is_some() {}
        }
    })
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn poll<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// HTTP (OpenMeter-style) receiver

/// One POST the HTTP receiver got.
#[derive(Clone, Debug)]
pub struct Posted {
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    /// The body as received (possibly gzip).
    pub raw: Bytes,
    /// The body's JSON array (after gunzip); empty when it was not one.
    pub events: Vec<serde_json::Value>,
    /// Whether the body decoded as a JSON array.
    pub valid: bool,
    /// What the receiver answered.
    pub status: u16,
}

#[derive(Default)]
struct HttpState {
    posts: Vec<Posted>,
    /// Answers for the next requests, in order: (status, retry-after).
    script: VecDeque<(u16, Option<u64>)>,
    /// Answer every request (after the script) with this status.
    always: Option<u16>,
    /// Wait this long before answering.
    delay: Duration,
    /// Answer 413 to a batch of more events than this.
    max_events: Option<usize>,
}

pub struct HttpReceiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<HttpState>>,
    task: JoinHandle<()>,
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpReceiver {
    pub async fn start() -> HttpReceiver {
        Self::start_on(down_port()).await
    }

    /// Starts listening on a port that refused connections until now.
    pub async fn start_on(port: DownPort) -> HttpReceiver {
        let addr = port.addr;
        let listener = port
            .socket
            .listen(1024)
            .unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
        let state = Arc::new(Mutex::new(HttpState::default()));
        let st = state.clone();
        let task = serve(listener, move |req| Self::handle(st.clone(), req));
        HttpReceiver { addr, state, task }
    }

    /// The URL of the ingest endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/api/v1/events", self.addr)
    }

    /// Fails the next `n` requests with `status` (and `retry-after` seconds).
    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<u64>) {
        let mut s = self.state.lock().unwrap();
        for _ in 0..n {
            s.script.push_back((status, retry_after));
        }
    }

    /// Answers every request with `status` from now on (`None`: accept).
    pub fn always(&self, status: Option<u16>) {
        self.state.lock().unwrap().always = status;
    }

    /// Answers 413 to any batch of more than `n` events from now on (a
    /// body size limit; `None`: no limit).
    pub fn max_events(&self, n: Option<usize>) {
        self.state.lock().unwrap().max_events = n;
    }

    /// Answers every request only after `delay` (a slow receiver).
    pub fn delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// Every POST so far, accepted or not.
    pub fn posts(&self) -> Vec<Posted> {
        self.state.lock().unwrap().posts.clone()
    }

    /// Events of the batches the receiver accepted (2xx), in arrival order.
    pub fn accepted(&self) -> Vec<serde_json::Value> {
        self.state
            .lock()
            .unwrap()
            .posts
            .iter()
            .filter(|p| (200..300).contains(&p.status))
            .flat_map(|p| p.events.clone())
            .collect()
    }

    async fn handle(state: Arc<Mutex<HttpState>>, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let raw = match body.collect().await {
            Ok(c) => c.to_bytes(),
            Err(_) => return full(StatusCode::BAD_REQUEST, "unreadable body"),
        };
        let gzipped = parts
            .headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let decoded = if gzipped {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .ok()
                .map(|_| out)
        } else {
            Some(raw.to_vec())
        };
        let parsed: Option<Vec<serde_json::Value>> =
            decoded.and_then(|d| serde_json::from_slice(&d).ok());
        let valid = parsed.is_some() && parts.method == http::Method::POST;
        let (status, retry_after, delay) = {
            let mut s = state.lock().unwrap();
            let events = parsed.as_ref().map_or(0, Vec::len);
            let (status, retry_after) = if !valid {
                (400, None)
            } else if s.max_events.is_some_and(|m| events > m) {
                (413, None)
            } else if let Some(next) = s.script.pop_front() {
                next
            } else if let Some(st) = s.always {
                (st, None)
            } else {
                (204, None)
            };
            s.posts.push(Posted {
                at: Instant::now(),
                path: parts.uri.path().to_string(),
                headers: parts.headers,
                raw,
                events: parsed.unwrap_or_default(),
                valid,
                status,
            });
            (status, retry_after, s.delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut resp = full(
            StatusCode::from_u16(status).unwrap(),
            if status < 300 {
                String::new()
            } else {
                format!("{{\"title\":\"receiver says {status}\"}}")
            },
        );
        if let Some(ra) = retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, ra.to_string().parse().unwrap());
        }
        resp
    }
}

// ---------------------------------------------------------------------------
// OTLP receiver

pub const GRPC_LOGS: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
pub const GRPC_METRICS: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// One export request the OTLP receiver got (decoded or not).
#[derive(Clone, Debug)]
pub struct OtlpCall {
    pub path: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    /// Decoded as the message its path calls for.
    pub ok: bool,
}

#[derive(Default)]
struct OtlpState {
    calls: Vec<OtlpCall>,
    logs: Vec<ExportLogsServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    /// Log records to report rejected in each answer (`partial_success`).
    reject_logs: Option<(i64, String)>,
    /// Metrics exports still to answer with a retryable failure.
    fail_metrics: usize,
    /// Answer metrics exports as a logs-only collector does (HTTP 404,
    /// `grpc-status` 12 UNIMPLEMENTED); they are still recorded.
    refuse_metrics: bool,
}

impl OtlpState {
    /// Whether to fail this metrics export (counting it down).
    fn failing_metrics(&mut self) -> bool {
        match self.fail_metrics {
            0 => false,
            usize::MAX => true,
            _ => {
                self.fail_metrics -= 1;
                true
            }
        }
    }

    /// The answer to a logs export, with a partial success when asked.
    fn logs_answer(&self) -> Vec<u8> {
        ExportLogsServiceResponse {
            partial_success: self.reject_logs.as_ref().map(|(n, message)| {
                ExportLogsPartialSuccess {
                    rejected_log_records: *n,
                    error_message: message.clone(),
                }
            }),
        }
        .encode_to_vec()
    }
}

pub struct OtlpReceiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<OtlpState>>,
    task: JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// gRPC message framing: compressed flag 0, u32 big-endian length, message.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.len() + 5);
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// The one message of a unary gRPC request body.
fn grpc_unframe(body: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
    (rest.len() - 4 == len).then(|| &rest[4..])
}

/// A gRPC answer: 200, `application/grpc`, the framed message, then the
/// `grpc-status` trailer.
fn grpc_answer(msg: Option<Vec<u8>>, status: u32, message: &str) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status.to_string().parse().unwrap());
    if !message.is_empty() {
        trailers.insert("grpc-message", message.parse().unwrap());
    }
    let mut frames = Vec::new();
    if let Some(m) = msg {
        frames.push(Ok::<_, Infallible>(Frame::data(grpc_frame(&m))));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/grpc".parse().unwrap(),
    );
    r
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(OtlpState::default()));
        let st = state.clone();
        let task = serve(listener, move |req| Self::handle(st.clone(), req));
        OtlpReceiver { addr, state, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> Vec<OtlpCall> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn logs(&self) -> Vec<ExportLogsServiceRequest> {
        self.state.lock().unwrap().logs.clone()
    }

    pub fn metrics(&self) -> Vec<ExportMetricsServiceRequest> {
        self.state.lock().unwrap().metrics.clone()
    }

    /// From now on, every logs answer says `n` records were rejected.
    pub fn reject_logs(&self, n: i64, message: &str) {
        self.state.lock().unwrap().reject_logs = Some((n, message.to_string()));
    }

    /// From now on, metrics exports fail as an unavailable collector's do
    /// (HTTP 503, `grpc-status` 14); they are still recorded.
    pub fn fail_metrics(&self) {
        self.fail_metrics_next(usize::MAX);
    }

    /// From now on, metrics exports are refused as by a collector with a
    /// logs pipeline only (HTTP 404, `grpc-status` 12).
    pub fn refuse_metrics(&self) {
        self.state.lock().unwrap().refuse_metrics = true;
    }

    /// The next `n` metrics exports fail as in [`OtlpReceiver::fail_metrics`].
    pub fn fail_metrics_next(&self, n: usize) {
        self.state.lock().unwrap().fail_metrics = n;
    }

    async fn handle(state: Arc<Mutex<OtlpState>>, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let body = body.collect().await.map(|c| c.to_bytes()).ok();
        let ct = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut s = state.lock().unwrap();
        let mut record = |ok: bool| {
            s.calls.push(OtlpCall {
                path: path.clone(),
                version: parts.version,
                headers: parts.headers.clone(),
                ok,
            })
        };
        let grpc = path == GRPC_LOGS || path == GRPC_METRICS;
        if grpc {
            let msg = body.as_deref().and_then(grpc_unframe);
            let ok = ct.starts_with("application/grpc") && msg.is_some();
            let answer = if !ok {
                record(false);
                grpc_answer(None, 3, "bad request framing or content-type")
            } else if path == GRPC_LOGS {
                match ExportLogsServiceRequest::decode(msg.unwrap()) {
                    Ok(m) => {
                        record(true);
                        s.logs.push(m);
                        grpc_answer(Some(s.logs_answer()), 0, "")
                    }
                    Err(_) => {
                        record(false);
                        grpc_answer(None, 3, "undecodable ExportLogsServiceRequest")
                    }
                }
            } else {
                match ExportMetricsServiceRequest::decode(msg.unwrap()) {
                    Ok(m) => {
                        record(true);
                        s.metrics.push(m);
                        if s.refuse_metrics {
                            grpc_answer(None, 12, "unknown service")
                        } else if s.failing_metrics() {
                            grpc_answer(None, 14, "unavailable")
                        } else {
                            grpc_answer(
                                Some(ExportMetricsServiceResponse::default().encode_to_vec()),
                                0,
                                "",
                            )
                        }
                    }
                    Err(_) => {
                        record(false);
                        grpc_answer(None, 3, "undecodable ExportMetricsServiceRequest")
                    }
                }
            };
            return answer;
        }
        let (Some(body), true) = (body, ct.starts_with("application/x-protobuf")) else {
            record(false);
            return full(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "want application/x-protobuf",
            );
        };
        let answer = match path.as_str() {
            "/v1/logs" => ExportLogsServiceRequest::decode(body).map(|m| {
                s.logs.push(m);
                s.logs_answer()
            }),
            "/v1/metrics" => ExportMetricsServiceRequest::decode(body).map(|m| {
                s.metrics.push(m);
                ExportMetricsServiceResponse::default().encode_to_vec()
            }),
            _ => {
                s.calls.push(OtlpCall {
                    path: path.clone(),
                    version: parts.version,
                    headers: parts.headers.clone(),
                    ok: false,
                });
                return full(StatusCode::NOT_FOUND, "no such OTLP path");
            }
        };
        let ok = answer.is_ok();
        let metrics_export = path == "/v1/metrics";
        s.calls.push(OtlpCall {
            path,
            version: parts.version,
            headers: parts.headers,
            ok,
        });
        match answer {
            Ok(_) if metrics_export && s.refuse_metrics => {
                full(StatusCode::NOT_FOUND, "no metrics pipeline")
            }
            Ok(_) if metrics_export && s.failing_metrics() => {
                full(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            Ok(bytes) => {
                let mut r = full(StatusCode::OK, bytes);
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    "application/x-protobuf".parse().unwrap(),
                );
                r
            }
            Err(_) => full(StatusCode::BAD_REQUEST, "undecodable export request"),
        }
    }
}
