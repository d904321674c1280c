//! Header hygiene: hop-by-hop headers (RFC 9110 §7.6.1) never cross the
//! proxy, client credentials and tollgate headers never reach the upstream,
//! and the upstream's key is injected from config.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Upstream;

/// Hop-by-hop headers. Compared as `HeaderName`s: a standard header is an
/// enum, so most comparisons never look at bytes.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Client credentials (the API-key headers of OpenAI and Anthropic, Azure,
/// Azure API Management and Google), headers the upstream sets itself, and
/// OpenAI's organization and project selectors (with the operator's key, a
/// tenant would pick which of the operator's organizations or projects pays).
static NOT_FORWARDED: [HeaderName; 10] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::AUTHORIZATION,
    header::COOKIE,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("ocp-apim-subscription-key"),
    HeaderName::from_static("x-goog-api-key"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
];

/// Query parameters that carry credentials (Google's and Azure API
/// Management's `key` and `subscription-key`, and the usual API-key and
/// OAuth names), matched on the decoded name, ignoring ASCII case.
const CREDENTIAL_PARAMS: [&str; 6] = [
    "key",
    "api-key",
    "api_key",
    "apikey",
    "subscription-key",
    "access_token",
];

/// The client's query without credential parameters (see
/// [`CREDENTIAL_PARAMS`]); the others are kept byte for byte, in order.
/// Borrowed when there is nothing to remove; `None` when nothing is left.
pub fn query_without_credentials(query: &str) -> Option<std::borrow::Cow<'_, str>> {
    let listed = |name: &str| {
        CREDENTIAL_PARAMS
            .iter()
            .any(|c| name.eq_ignore_ascii_case(c))
    };
    let is_credential = |param: &str| {
        let name = param.split('=').next().unwrap_or_default();
        if name.contains(['%', '+']) {
            let name = name.replace('+', " ");
            listed(&percent_encoding::percent_decode_str(&name).decode_utf8_lossy())
        } else {
            listed(name)
        }
    };
    if !query.split('&').any(is_credential) {
        return Some(std::borrow::Cow::Borrowed(query));
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !is_credential(p)).collect();
    (!kept.is_empty()).then(|| std::borrow::Cow::Owned(kept.join("&")))
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Client headers that never reach the upstream (besides hop-by-hop ones).
fn not_forwarded(name: &HeaderName, tenancy_header: Option<&HeaderName>) -> bool {
    NOT_FORWARDED.contains(name)
        || name.as_str().starts_with("x-tollgate-")
        || tenancy_header == Some(name)
}

/// Removes hop-by-hop headers, those named by `Connection`, and those
/// `also` picks. `Connection` goes first, with the headers it names (looked
/// up by name, nothing allocated); then one pass over the remaining names
/// (nothing is allocated when there is nothing to remove, the common case).
fn strip(h: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    match h.get_all(header::CONNECTION).iter().count() {
        0 => {}
        // The usual single line: taken out without collecting anything.
        1 => {
            if let Some(v) = h.remove(header::CONNECTION) {
                remove_named(h, &v);
            }
        }
        _ => {
            let values: Vec<http::HeaderValue> = match h.entry(header::CONNECTION) {
                header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
                header::Entry::Vacant(_) => Vec::new(),
            };
            for v in &values {
                remove_named(h, v);
            }
        }
    }
    let doomed: Vec<HeaderName> = h
        .keys()
        .filter(|k| is_hop_by_hop(k) || also(k))
        .cloned()
        .collect();
    for n in doomed {
        h.remove(n);
    }
}

/// Removes the headers a `Connection` value names (looked up by name: an
/// invalid one matches nothing).
fn remove_named(h: &mut HeaderMap, connection: &http::HeaderValue) {
    for name in connection.to_str().into_iter().flat_map(|v| v.split(',')) {
        h.remove(name.trim());
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    strip(h, |_| false);
}

/// Prepares client headers for the upstream: no hop-by-hop, no client
/// credential of any kind, no tollgate or tenancy header, the upstream key.
pub fn upstream_request_headers(
    h: &mut HeaderMap,
    upstream: &Upstream,
    tenancy_header: Option<&HeaderName>,
    metered: bool,
) {
    strip(h, |k| not_forwarded(k, tenancy_header));
    if metered || upstream.key_finder.is_some() {
        // The meter reads the body, and `MaskKey` searches it for the
        // upstream key: ask for it uncompressed.
        h.insert(
            header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
    }
    if let Some((name, value)) = &upstream.credential {
        h.insert(name.clone(), value.clone());
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme in
/// any case (RFC 9110 §11.1).
pub fn bearer(v: &http::HeaderValue) -> Option<&str> {
    let (scheme, token) = v.to_str().ok()?.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Prepares the upstream response's head for the client.
pub fn client_response_head(parts: &mut http::response::Parts, upstream: &Upstream) {
    client_response_headers(&mut parts.headers, upstream);
    // The client's connection has its own version: an HTTP/1.0 upstream's
    // passed on made hyper answer an HTTP/1.1 client in HTTP/1.0, closing
    // the connection after every call (hyper lowers it again for an
    // HTTP/1.0 client, and HTTP/2 ignores it).
    parts.version = http::Version::HTTP_11;
    // hyper passes an HTTP/1.1 reason phrase on as it came
    // (`401 invalid key sk-…`).
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if let (Some(key), Some(reason)) = (&upstream.key_finder, reason) {
        if key.find(reason.as_bytes()).is_some() {
            tracing::warn!("upstream reason phrase held the upstream key: removed");
            parts.extensions.remove::<hyper::ext::ReasonPhrase>();
        }
    }
}

/// Prepares upstream response headers for the client.
fn client_response_headers(h: &mut HeaderMap, upstream: &Upstream) {
    strip_hop_by_hop(h);
    if let Some((name, _)) = &upstream.credential {
        // An upstream that echoed its key must not hand it to the client:
        // not under the header's own name, nor inside any other header
        // (`set-cookie`, `location`, `www-authenticate`, `x-echo-…`).
        h.remove(name);
    }
    if let Some(key) = &upstream.key_finder {
        strip_containing(h, key, "header");
    }
    let mut locations = h.get_all(header::LOCATION).iter();
    if let Some(v) = locations.next() {
        // More than one is ambiguous (clients join or pick): none is kept.
        let one = locations.next().is_none();
        match client_location(v.as_bytes(), upstream).filter(|_| one) {
            Some(Some(mapped)) => {
                h.insert(header::LOCATION, mapped);
            }
            Some(None) => {}
            None => {
                tracing::warn!(
                    upstream = %upstream.name,
                    "upstream response pointed outside the upstream (location): removed"
                );
                h.remove(header::LOCATION);
            }
        }
    }
}

/// A URI's port, or its scheme's default (80, 443).
fn port_or_default(uri: &http::Uri) -> Option<u16> {
    uri.port_u16().or(match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => Some(443),
        Some(s) if s.eq_ignore_ascii_case("http") => Some(80),
        _ => None,
    })
}

/// An upstream `Location` as the client must see it: under the upstream's
/// origin and base path, mapped back under the route's prefix (as nginx's
/// `proxy_redirect` does), `Some(Some(..))`; relative to the request (no
/// scheme, no leading `/`), unchanged, `Some(None)`; anywhere else, `None`
/// (removed). Passed on as it came, an SDK following the redirect (the
/// OpenAI and Anthropic SDKs do) would leave the proxy and send the
/// tenant's own key to the upstream or a third host.
fn client_location(v: &[u8], upstream: &Upstream) -> Option<Option<HeaderValue>> {
    let v = std::str::from_utf8(v).ok()?;
    // WHATWG URL parsers (browsers, Node's fetch) read `\` as `/` and drop
    // tabs and leading spaces: `\\evil.example/x` or `\t//evil.example/x`
    // would pass as relative here and resolve to another host there.
    if v.starts_with(' ') || v.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return None;
    }
    // RFC 3986 §3.1: a scheme is a letter, then letters, digits, `+-.`.
    let scheme_end = v
        .find(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
        .filter(|&i| i > 0 && v.as_bytes()[0].is_ascii_alphabetic() && v[i..].starts_with(':'));
    let path = if let Some(i) = scheme_end {
        let uri: http::Uri = v.parse().ok()?;
        let same_origin = uri.scheme() == upstream.url.scheme()
            && uri
                .host()
                .zip(upstream.url.host())
                .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
            && port_or_default(&uri) == port_or_default(&upstream.url)
            && uri.authority().is_some_and(|a| !a.as_str().contains('@'));
        if !same_origin {
            return None;
        }
        let authority = uri.authority()?.as_str();
        &v[i + 3 + authority.len()..]
    } else if v.starts_with("//") {
        return None;
    } else if v.starts_with('/') {
        v
    } else {
        // A path relative to the request, which stays under the prefix.
        return Some(None);
    };
    let base = upstream.url.path().trim_end_matches('/');
    let rest = path.strip_prefix(base)?;
    if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        return None;
    }
    let mapped = format!("{}{}", upstream.prefix, rest);
    Some(Some(HeaderValue::from_str(&mapped).ok()?))
}

/// Removes every header (or trailer: `what`) with a value that contains the key.
pub(super) fn strip_containing(h: &mut HeaderMap, key: &memchr::memmem::Finder<'_>, what: &str) {
    let leaking: Vec<HeaderName> = h
        .iter()
        .filter(|(_, v)| key.find(v.as_bytes()).is_some())
        .map(|(k, _)| k.clone())
        .collect();
    for name in leaking {
        tracing::warn!(%name, what, "upstream response field held the upstream key: removed");
        h.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_map_back_under_the_prefix_or_are_removed() {
        let mut upstream = Upstream::with_key("sk-UPSTREAM-0123456789");
        upstream.url = "https://api.example.com/v1".parse().unwrap();
        for (from, to) in [
            // Under the upstream's origin and base path: back under the prefix.
            (
                "https://api.example.com/v1/files/f1",
                Some("/openai/files/f1"),
            ),
            ("https://API.example.com/v1?x=1", Some("/openai?x=1")),
            ("/v1/files/f1?p=2", Some("/openai/files/f1?p=2")),
            ("/v1", Some("/openai")),
            // Relative to the request: unchanged (still under the prefix).
            ("files/f1", Some("files/f1")),
            ("../files", Some("../files")),
            // Anywhere else: removed.
            ("https://evil.example.net/v1/x", None),
            ("http://api.example.com/v1/x", None),
            ("https://api.example.com:8443/v1/x", None),
            ("https://api.example.com:443/v1/x", Some("/openai/x")),
            ("https://user@api.example.com/v1/x", None),
            ("\\\\evil.example.net/x", None),
            ("\\/evil.example.net/x", None),
            ("/\\evil.example.net/x", None),
            ("\t//evil.example.net/x", None),
            (" //evil.example.net/x", None),
            ("https://api.example.com/v2/x", None),
            ("https://api.example.com/v1x", None),
            ("/v2/x", None),
            ("//evil.example.net/v1/x", None),
            ("javascript:alert(1)", None),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, from.parse().unwrap());
            client_response_headers(&mut h, &upstream);
            let got = h.get(header::LOCATION).map(|v| v.to_str().unwrap());
            assert_eq!(got, to, "{from:?}");
        }
        // Two are ambiguous: neither stays.
        let mut h = HeaderMap::new();
        h.append(header::LOCATION, "files/f1".parse().unwrap());
        h.append(
            header::LOCATION,
            "https://evil.example.net/".parse().unwrap(),
        );
        client_response_headers(&mut h, &upstream);
        assert!(!h.contains_key(header::LOCATION), "{h:?}");
    }

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

    #[test]
    fn headers_echoing_the_upstream_key_are_removed() {
        let key = "sk-UPSTREAM-0123456789";
        let mut h = HeaderMap::new();
        h.insert("set-cookie", format!("s={key}; Path=/").parse().unwrap());
        h.insert("location", format!("https://x/?k={key}").parse().unwrap());
        h.append("x-echo", "harmless".parse().unwrap());
        h.append("x-echo", format!("Bearer {key}").parse().unwrap());
        h.insert("x-request-id", "req_1".parse().unwrap());
        let upstream = Upstream::with_key(key);
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.headers = h;
        let reason = hyper::ext::ReasonPhrase::try_from(format!("bad key {key}")).unwrap();
        parts.extensions.insert(reason);
        client_response_head(&mut parts, &upstream);
        let left: Vec<&str> = parts.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-request-id"]);
        assert!(parts.extensions.get::<hyper::ext::ReasonPhrase>().is_none());
        // A reason phrase without the key is passed on as it came.
        let reason = hyper::ext::ReasonPhrase::try_from(&b"Too Early-ish"[..]).unwrap();
        parts.extensions.insert(reason);
        client_response_head(&mut parts, &upstream);
        assert!(parts.extensions.get::<hyper::ext::ReasonPhrase>().is_some());
        // Its body is searched for the key: asked for uncompressed, metered
        // route or not.
        let mut out = HeaderMap::new();
        out.insert(header::ACCEPT_ENCODING, "gzip, br".parse().unwrap());
        upstream_request_headers(&mut out, &upstream, None, false);
        assert_eq!(out[header::ACCEPT_ENCODING], "identity");
        let keyless = Upstream {
            key_finder: None,
            ..upstream
        };
        let mut out = HeaderMap::new();
        out.insert(header::ACCEPT_ENCODING, "gzip".parse().unwrap());
        upstream_request_headers(&mut out, &keyless, None, false);
        assert_eq!(out[header::ACCEPT_ENCODING], "gzip");
    }

    #[test]
    fn every_connection_line_is_honoured() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "X-One".parse().unwrap());
        h.append(
            header::CONNECTION,
            "x-two , close,, not a name".parse().unwrap(),
        );
        h.insert("x-one", "1".parse().unwrap());
        h.insert("x-two", "1".parse().unwrap());
        h.insert("x-stay", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-stay"]);
    }

    #[test]
    fn credentials_and_own_headers_are_not_forwarded() {
        let tenancy = HeaderName::from_static("x-tenant");
        let mut h = HeaderMap::new();
        for name in [
            "connection",
            "keep-alive",
            "proxy-authenticate",
            "proxy-authorization",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "host",
            "content-length",
            "authorization",
            "cookie",
            "x-api-key",
            "api-key",
            "ocp-apim-subscription-key",
            "x-goog-api-key",
            "x-tollgate-debug",
            "x-tenant",
            "content-type",
            "x-keep-me",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
        }
        strip(&mut h, |k| not_forwarded(k, Some(&tenancy)));
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("content-type") && h.contains_key("x-keep-me"));
    }
}
