//! The fake upstream behind `tollgate mock`: OpenAI and Anthropic routes that
//! answer in the providers' real JSON and SSE shapes with deterministic usage,
//! steered per request by `x-mock-*` headers, plus a request log at
//! `/__mock/requests` for tests to inspect.
//!
//! Usage rule: input before cache = ceil(request body bytes / 4); cache read =
//! `x-mock-cached-tokens`; cache write = `x-mock-cache-write-tokens`
//! (Anthropic); reasoning = `x-mock-reasoning-tokens` (OpenAI, part of the
//! output); output = `x-mock-output-tokens` (default 8) capped by the
//! request's `max_tokens` / `max_completion_tokens` / `max_output_tokens`.
//! The text is `" hello"` once per non-reasoning output token.

mod anthropic;
mod control;
mod log;
mod openai;
mod responses;
mod router;
mod sse;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// `created` / `created_at` in every body: fixed, so output is deterministic.
const CREATED: u64 = 1_751_980_462;
/// How long `serve` waits for open connections after `shutdown` resolves.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves the mock on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let expect_key = std::env::var("TOLLGATE_MOCK_EXPECT_KEY").ok();
    serve_with(listener, shutdown, expect_key).await
}

/// `serve` with the expected key passed in, so tests need not touch the env.
async fn serve_with(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    expect_key: Option<String>,
) -> std::io::Result<()> {
    let state = Arc::new(log::State::new(expect_key));
    let builder = auto::Builder::new(TokioExecutor::new());
    let (stop_tx, stop_rx) = watch::channel(());
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Usually EMFILE; back off instead of spinning.
                        tracing::warn!(%error, "mock: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (builder, state, mut stop) = (builder.clone(), state.clone(), stop_rx.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req| router::handle(state.clone(), req));
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        res = conn.as_mut() => {
                            if let Err(error) = res {
                                tracing::debug!(%error, "mock: connection ended");
                            }
                        }
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    drop(stop_tx); // wakes every connection's `stop.changed()`
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
    Ok(())
}
