//! The benchmark's second floor: a plain reverse proxy built from Tollgate's
//! own parts (the accept loop and per-core worker runtimes of
//! `tollgate::server`, the upstream pool of `tollgate::proxy::pool`, the
//! request body read whole, hop-by-hop headers removed both ways, as any
//! proxy must) and nothing else: no tenant lookup, metering, limits or
//! events. Tollgate's distance from nginx-as-proxy splits into
//! this floor's (the HTTP stack) and Tollgate's distance from it (its own
//! per-call work).
//!
//!     cargo run --release --example hyper_proxy -- 127.0.0.1:8081 http://127.0.0.1:8080

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tollgate::proxy::headers::strip_hop_by_hop;
use tollgate::proxy::pool;

/// jemalloc's per-thread caches: fewer instructions a call than glibc's
/// malloc for the dozens of small allocations a proxied call makes.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The upstream body, handing its connection back to the pool once read.
struct Released {
    inner: Incoming,
    conn: Option<pool::Returner>,
}

impl Body for Released {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) => {
                this.conn = None;
                false
            }
            Poll::Pending => false,
        };
        if ended {
            if let Some(conn) = this.conn.take() {
                conn.release();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn forward(
    req: Request<Incoming>,
    scheme: &http::uri::Scheme,
    authority: &http::uri::Authority,
) -> Response<tollgate::server::Body> {
    let (mut parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    parts.uri = parts
        .uri
        .path_and_query()
        .cloned()
        .map_or_else(|| Uri::from_static("/"), Uri::from);
    strip_hop_by_hop(&mut parts.headers);
    let req = Request::from_parts(parts, Full::new(body));
    match pool::send_to(req, scheme, authority, Duration::from_secs(5), &mut false).await {
        Ok((mut resp, conn)) => {
            strip_hop_by_hop(resp.headers_mut());
            resp.map(|inner| Released { inner, conn }.map_err(Into::into).boxed_unsync())
        }
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<tollgate::server::Body> {
    let mut resp = Response::new(tollgate::server::full(Bytes::new()));
    *resp.status_mut() = code;
    resp
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: hyper_proxy LISTEN_ADDR UPSTREAM_URL");
    };
    let upstream: Uri = upstream.parse()?;
    let (scheme, authority) = pool::origin_of(&upstream)
        .map(|(s, a)| (s.clone(), a.clone()))
        .ok_or_else(|| anyhow::anyhow!("the upstream URL needs a scheme and a host"))?;
    let origin: &'static _ = Box::leak(Box::new((scheme, authority)));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            let (_shutdown, shutdown) = tokio::sync::watch::channel(false);
            let (_force, force) = tokio::sync::watch::channel(false);
            let stop = tollgate::server::Stop {
                shutdown,
                force,
                grace: Duration::from_secs(1),
            };
            let handler = move |req| forward(req, &origin.0, &origin.1);
            let limits = tollgate::server::ConnLimits {
                max: 10_000,
                header_read_timeout: Duration::from_secs(30),
                write_timeout: Duration::from_secs(60),
            };
            tollgate::server::serve(listener, handler, stop, workers, limits).await;
            Ok(())
        })
}
