//! Header hygiene: hop-by-hop headers (RFC 9110 §7.6.1) never cross the
//! proxy, client credentials and tollgate headers never reach the upstream,
//! and the upstream's key is injected from config.

use http::header::{self, HeaderMap, HeaderName};

use crate::config::Upstream;

const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP) {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

/// Prepares client headers for the upstream: no hop-by-hop, no client
/// credential of any kind, no tollgate or tenancy header, the upstream key.
pub fn upstream_request_headers(
    h: &mut HeaderMap,
    upstream: &Upstream,
    tenancy_header: Option<&HeaderName>,
    metered: bool,
) {
    strip_hop_by_hop(h);
    h.remove(header::HOST);
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::AUTHORIZATION);
    h.remove("x-api-key");
    h.remove("api-key");
    h.remove(header::COOKIE);
    if let Some(t) = tenancy_header {
        h.remove(t);
    }
    let tollgate: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-tollgate-"))
        .cloned()
        .collect();
    for k in tollgate {
        h.remove(k);
    }
    if metered {
        // The meter reads the body: ask for it uncompressed.
        h.insert(
            header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
    }
    if let Some((name, value)) = &upstream.credential {
        if let Ok(mut v) = http::HeaderValue::from_str(&value.0) {
            v.set_sensitive(true);
            h.insert(name.clone(), v);
        }
    }
}

/// Prepares upstream response headers for the client.
pub fn client_response_headers(h: &mut HeaderMap, upstream: &Upstream) {
    strip_hop_by_hop(h);
    if let Some((name, _)) = &upstream.credential {
        // An upstream that echoed its key must not hand it to the client.
        h.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret-hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-stay", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-stay"));
    }
}
