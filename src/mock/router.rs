//! One request: route, auth, the `x-mock-*` controls, the provider handler,
//! the log entry, and the response with its request id.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::control::{Controls, Usage};
use super::log::{LogEntry, State};
use super::sse::{MockBody, Piece};
use super::{anthropic, openai};

const MAX_BODY_BYTES: usize = 32 << 20;

/// What a route handler produced: the body, and the usage it reported.
pub(crate) struct Handled {
    pub(crate) reply: Reply,
    pub(crate) reported: Option<Usage>,
}

pub(crate) enum Reply {
    Json(Value),
    Stream(Vec<Piece>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    OpenAi(openai::Op),
    Models,
    Messages,
}

fn route(method: &Method, path: &str) -> Option<Route> {
    use openai::Op;
    match (method, path) {
        (&Method::POST, "/v1/chat/completions") => Some(Route::OpenAi(Op::Chat)),
        (&Method::POST, "/v1/completions") => Some(Route::OpenAi(Op::Completions)),
        (&Method::POST, "/v1/responses") => Some(Route::OpenAi(Op::Responses)),
        (&Method::POST, "/v1/embeddings") => Some(Route::OpenAi(Op::Embeddings)),
        (&Method::POST, "/v1/messages") => Some(Route::Messages),
        (&Method::GET, "/v1/models") => Some(Route::Models),
        _ => None,
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/__mock/requests") => {
            return Ok(reply(
                StatusCode::OK,
                None,
                Reply::Json(state.log_json()),
                None,
            ));
        }
        (&Method::DELETE, "/__mock/requests") => {
            state.clear();
            return Ok(reply(StatusCode::OK, None, Reply::Json(json!([])), None));
        }
        _ => {}
    }
    let controls = Controls::from_headers(&parts.headers);
    let route = route(&parts.method, &path);
    let anthropic = route == Some(Route::Messages);
    let n = state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let id_header = if anthropic {
        "request-id"
    } else {
        "x-request-id"
    };
    let request_id = format!("req_{n}");
    let body = Limited::new(body, MAX_BODY_BYTES).collect().await;
    let body = body.map(|b| b.to_bytes());
    let (status, mut handled) = match (&body, route) {
        (Err(_), _) => fail(
            anthropic,
            StatusCode::BAD_REQUEST,
            "could not read the body",
        ),
        (Ok(_), None) => {
            let msg = format!("Invalid URL ({} {path})", parts.method);
            fail(false, StatusCode::NOT_FOUND, &msg)
        }
        (Ok(bytes), Some(route)) => dispatch(&state, &parts.headers, &controls, route, bytes, n),
    };
    state.record(LogEntry {
        path,
        query: parts.uri.query().map(str::to_owned),
        method: parts.method.to_string(),
        request_id: request_id.clone(),
        authorization: header(&parts.headers, "authorization"),
        x_api_key: header(&parts.headers, "x-api-key"),
        headers: parts
            .headers
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect(),
        body_bytes: body.as_ref().map_or(0, |b| b.len()),
        usage: match (&handled.reply, controls.fail_after) {
            (Reply::Stream(_), Some(_)) => None,
            _ => handled.reported,
        },
    });
    if !controls.first_byte_delay.is_zero() {
        tokio::time::sleep(controls.first_byte_delay).await;
    }
    if controls.leak_body {
        let credential = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .or_else(|| parts.headers.get("x-api-key"));
        if let Some(v) = credential {
            leak_into(&mut handled.reply, v.as_bytes());
        }
    }
    let id = Some((id_header, request_id));
    let mut res = reply(status, id, handled.reply, Some(&controls));
    if controls.leak_headers {
        let h = res.headers_mut();
        for name in [http::header::AUTHORIZATION, "x-api-key".parse().unwrap()] {
            if let Some(v) = parts.headers.get(&name) {
                // Under its own name and others, as a reflecting gateway
                // might (a cookie, a redirect).
                let cookie = [b"s=".as_slice(), v.as_bytes()].concat();
                if let Ok(c) = http::HeaderValue::from_bytes(&cookie) {
                    h.append(http::header::SET_COOKIE, c);
                }
                let echo = format!("x-echo-{name}");
                h.insert(
                    http::HeaderName::from_bytes(echo.as_bytes()).unwrap(),
                    v.clone(),
                );
                h.insert(name, v.clone());
            }
        }
        h.insert(http::header::CONNECTION, "x-upstream-hop".parse().unwrap());
        h.insert("x-upstream-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
    }
    Ok(res)
}

/// Puts `credential` into the reply (`x-mock-leak-body`): a JSON field, or an
/// SSE comment first, cut in two frames in the middle (the second half waits
/// for `x-mock-delay-ms` as a content piece does, so the halves arrive apart).
fn leak_into(reply: &mut Reply, credential: &[u8]) {
    match reply {
        Reply::Json(v) => {
            if let Some(o) = v.as_object_mut() {
                let text = String::from_utf8_lossy(credential).into_owned();
                o.insert("echo".into(), Value::String(text));
            }
        }
        Reply::Stream(pieces) => {
            let comment = [b": echo ".as_slice(), credential, b"\n\n"].concat();
            let (a, b) = comment.split_at(comment.len() - credential.len() / 2 - 2);
            for (i, part) in [a, b].into_iter().enumerate() {
                pieces.insert(
                    i,
                    Piece {
                        bytes: bytes::Bytes::copy_from_slice(part),
                        content: i == 1,
                    },
                );
            }
        }
    }
}

/// Auth, forced status, JSON parsing, then the route's handler.
fn dispatch(
    state: &State,
    headers: &HeaderMap,
    controls: &Controls,
    route: Route,
    body: &[u8],
    n: u64,
) -> (StatusCode, Handled) {
    let anthropic = route == Route::Messages;
    if let Some(key) = &state.expect_key {
        let ok = if anthropic {
            header(headers, "x-api-key").as_deref() == Some(key.as_str())
        } else {
            header(headers, "authorization") == Some(format!("Bearer {key}"))
        };
        if !ok {
            let msg = if anthropic {
                "invalid x-api-key"
            } else {
                "Incorrect API key provided."
            };
            return fail(anthropic, StatusCode::UNAUTHORIZED, msg);
        }
    }
    if let Some(status) = controls.status {
        return fail(anthropic, status, "mock: status forced by x-mock-status");
    }
    if route == Route::Models {
        return ok(Reply::Json(openai::models()));
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) | Err(_) => {
            let msg = "We could not parse the JSON body of your request.";
            return fail(anthropic, StatusCode::BAD_REQUEST, msg);
        }
    };
    let tokens = controls.tokens(body.len(), &request, !anthropic);
    let handled = match route {
        Route::OpenAi(op) => openai::handle(op, &request, tokens, controls.no_usage, n),
        Route::Messages | Route::Models => {
            anthropic::handle(&request, tokens, controls.no_usage, n)
        }
    };
    (StatusCode::OK, handled)
}

fn ok(reply: Reply) -> (StatusCode, Handled) {
    let handled = Handled {
        reply,
        reported: None,
    };
    (StatusCode::OK, handled)
}

fn fail(anthropic: bool, status: StatusCode, message: &str) -> (StatusCode, Handled) {
    let body = if anthropic {
        anthropic::error(status, message)
    } else {
        openai::error(status, message)
    };
    let handled = Handled {
        reply: Reply::Json(body),
        reported: None,
    };
    (status, handled)
}

fn reply(
    status: StatusCode,
    id: Option<(&'static str, String)>,
    reply: Reply,
    controls: Option<&Controls>,
) -> Response<MockBody> {
    let gzip = controls.is_some_and(|c| c.gzip);
    let (content_type, body) = match reply {
        Reply::Json(v) if gzip => {
            let pieces = vec![Piece {
                bytes: v.to_string().into(),
                content: false,
            }];
            let coded: Vec<u8> = gzipped(pieces)
                .iter()
                .flat_map(|p| p.bytes.to_vec())
                .collect();
            let frames = coded
                .chunks(16)
                .map(|c| Piece {
                    bytes: bytes::Bytes::copy_from_slice(c),
                    content: false,
                })
                .collect();
            (
                "application/json",
                MockBody::stream(frames, Duration::ZERO, None),
            )
        }
        Reply::Stream(pieces) if gzip => {
            let (delay, fail_after) =
                controls.map_or((Duration::ZERO, None), |c| (c.delay, c.fail_after));
            let pieces = gzipped(pieces);
            (
                "text/event-stream",
                MockBody::stream(pieces, delay, fail_after),
            )
        }
        Reply::Json(v) => ("application/json", MockBody::full(v.to_string())),
        Reply::Stream(pieces) => {
            let (delay, fail_after) =
                controls.map_or((Duration::ZERO, None), |c| (c.delay, c.fail_after));
            (
                "text/event-stream",
                MockBody::stream(pieces, delay, fail_after),
            )
        }
    };
    let mut res = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type);
    if content_type == "text/event-stream" {
        res = res.header(http::header::CACHE_CONTROL, "no-cache");
    }
    if let Some((name, value)) = id {
        res = res.header(name, value);
    }
    if gzip {
        res = res.header(http::header::CONTENT_ENCODING, "gzip");
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        res = res.header(http::header::RETRY_AFTER, "1");
    }
    res.body(body)
        .unwrap_or_else(|_| Response::new(MockBody::full("")))
}

/// The pieces gzip-compressed as a streaming server does it: flushed after
/// each, so each still arrives whole in its frame; the gzip trailer is a
/// last piece of its own (cut with the stream by `x-mock-fail-after`).
fn gzipped(pieces: Vec<Piece>) -> Vec<Piece> {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut out: Vec<Piece> = pieces
        .into_iter()
        .map(|p| {
            z.write_all(&p.bytes).expect("writes to a Vec");
            z.flush().expect("writes to a Vec");
            Piece {
                bytes: std::mem::take(z.get_mut()).into(),
                content: p.content,
            }
        })
        .collect();
    out.push(Piece {
        bytes: z.finish().expect("writes to a Vec").into(),
        content: false,
    });
    out
}
