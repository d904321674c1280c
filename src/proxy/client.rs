//! Upstream connections: [`connector`] (rustls with the webpki roots, ring
//! provider; HTTP/1.1 and HTTP/2 by ALPN; a connect timeout), used by the
//! proxy path's own pool ([`super::pool`]), and hyper-util's pooled client
//! on top of it for the HTTP and OTLP sinks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Clients per thread (the sinks run on the main runtime), so a pooled
/// connection is driven by the thread that uses it and never outlives its
/// runtime.
#[derive(Default)]
pub struct Clients;

thread_local! {
    static CLIENTS: RefCell<HashMap<Duration, HttpClient>> = RefCell::new(HashMap::new());
}

impl Clients {
    pub fn get(&self, connect_timeout: Duration) -> HttpClient {
        CLIENTS.with(|c| {
            c.borrow_mut()
                .entry(connect_timeout)
                .or_insert_with(|| build(connect_timeout, false))
                .clone()
        })
    }
}

/// A client; `h2_only` speaks HTTP/2 with prior knowledge on plain http://
/// (gRPC) and by ALPN on https://.
pub fn build(connect_timeout: Duration, h2_only: bool) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(h2_only)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector(connect_timeout))
}

/// TCP (no delay, keepalive, the connect timeout), then TLS for https://
/// with ALPN offering HTTP/2 and HTTP/1.1.
pub fn connector(connect_timeout: Duration) -> HttpsConnector<HttpConnector> {
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .expect("ring supports the default protocol versions");
    finish(tls, connect_timeout)
}

/// [`connector`] trusting `roots` instead of the webpki roots (tests).
#[cfg(test)]
pub fn connector_trusting(
    connect_timeout: Duration,
    roots: rustls::RootCertStore,
) -> HttpsConnector<HttpConnector> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    finish(
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls),
        connect_timeout,
    )
}

fn finish(
    tls: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
    connect_timeout: Duration,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    tls.https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}
