//! `MaskKey`: the upstream key masked in response bodies. An upstream that
//! echoes its request (a debugging endpoint, an error quoting the
//! credential) would otherwise hand the operator's key to the tenant.
//!
//! Each occurrence of the key's bytes is overwritten with `*`, byte for
//! byte, so the body keeps its length (and its `content-length`). A key
//! split across frames is caught by holding back the end of a frame that
//! could begin it (at most the key's length less one byte) until the next
//! frame or the end. Only a frame that ends in a prefix of the key is held,
//! so an SSE event ending its frame never waits: keys hold no newline. A
//! held start of the key (8 bytes or more) that ends the body is masked too;
//! a truncated echo elsewhere is not. Trailers holding the key are removed.
//! The upstream is asked for `identity`; a body compressed anyway cannot be
//! searched, and is passed on unwrapped with a WARN ([`MaskKey::new`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};

use crate::config::{Upstream, MIN_SEARCHED_KEY};
use crate::meter::response::Coding;

pub struct MaskKey<B> {
    inner: B,
    /// Its `key_finder` is set (see [`MaskKey::new`]).
    upstream: Arc<Upstream>,
    /// The end of the last frame, held: it may begin the key.
    tail: Bytes,
    /// Trailers to send after `tail`.
    trailers: Option<Frame<Bytes>>,
    ended: bool,
    warned: bool,
}

impl<B> MaskKey<B> {
    /// `Err(inner)`, nothing to mask, when the upstream has no key to look
    /// for, or when the body is compressed (`headers`: the response's), as
    /// an upstream asked for `identity` may answer anyway: the key cannot be
    /// found in it, which is logged at WARN.
    pub fn new(
        inner: B,
        upstream: Arc<Upstream>,
        headers: &http::HeaderMap,
    ) -> Result<MaskKey<B>, B> {
        if upstream.key_finder.is_none() {
            return Err(inner);
        }
        // Read as the meter reads it: codings are case-insensitive, and
        // `Identity`, an empty value or `identity, identity` are all plain.
        let coding = Coding::from_headers(headers.get_all(http::header::CONTENT_ENCODING));
        if coding != Coding::Identity {
            tracing::warn!(upstream = %upstream.name, "upstream answered compressed though asked for identity: its body is not searched for the upstream key");
            return Err(inner);
        }
        Ok(MaskKey {
            inner,
            upstream,
            tail: Bytes::new(),
            trailers: None,
            ended: false,
            warned: false,
        })
    }

    fn finder(&self) -> &memchr::memmem::Finder<'static> {
        self.upstream.key_finder.as_ref().expect("checked in new")
    }

    /// Masks the key in `tail` + `data`; returns what can go out now.
    fn mask(&mut self, data: Bytes) -> Bytes {
        let finder = self.finder();
        let key = finder.needle();
        let mut buf = if self.tail.is_empty() {
            data
        } else {
            let mut joined = BytesMut::with_capacity(self.tail.len() + data.len());
            joined.extend_from_slice(&self.tail);
            joined.extend_from_slice(&data);
            joined.freeze()
        };
        let hit = finder.find(&buf);
        if let Some(first) = hit {
            let mut masked = BytesMut::from(&buf[..]);
            let mut at = first;
            loop {
                masked[at..at + key.len()].fill(b'*');
                at += key.len();
                match finder.find(&masked[at..]) {
                    Some(i) => at += i,
                    None => break,
                }
            }
            buf = masked.freeze();
        }
        let held = prefix_at_end(&buf, key);
        if hit.is_some() {
            self.masked();
        }
        self.tail = buf.split_off(buf.len() - held);
        buf
    }

    /// The held tail, at the end of the body: no key can follow it, so a
    /// start of the key long enough to matter is masked.
    fn last_tail(&mut self) -> Bytes {
        let tail = std::mem::take(&mut self.tail);
        if tail.len() < MIN_SEARCHED_KEY {
            return tail;
        }
        self.masked();
        Bytes::from(vec![b'*'; tail.len()])
    }

    fn masked(&mut self) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(upstream = %self.upstream.name, "upstream response body held the upstream key: masked");
        }
    }
}

/// The length of the longest end of `buf` that is a proper prefix of `key`.
fn prefix_at_end(buf: &[u8], key: &[u8]) -> usize {
    let Some(&first) = key.first() else {
        return 0;
    };
    let end = &buf[buf.len().saturating_sub(key.len() - 1)..];
    memchr::memchr_iter(first, end)
        .find(|&i| key.starts_with(&end[i..]))
        .map_or(0, |i| end.len() - i)
}

impl<B> Body for MaskKey<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(t) = this.trailers.take() {
                return Poll::Ready(Some(Ok(t)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                // A broken body: what is held (a start of the key, or
                // bytes that look like one) is dropped.
                Some(Err(e)) => {
                    this.tail = Bytes::new();
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.ended = true;
                    if this.tail.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(this.last_tail()))));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let out = this.mask(data);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Err(frame) => {
                    // A frame is data or trailers.
                    let Ok(mut t) = frame.into_trailers() else {
                        continue;
                    };
                    super::headers::strip_containing(&mut t, this.finder(), "trailer");
                    let frame = Frame::trailers(t);
                    if this.tail.is_empty() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    this.trailers = Some(frame);
                    return Poll::Ready(Some(Ok(Frame::data(this.last_tail()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.tail.is_empty()
            && self.trailers.is_none()
            && (self.ended || self.inner.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const KEY: &str = "sk-UPSTREAM-0123456789";

    /// An upstream with `KEY`, searched for or (`searched: false`) not.
    fn upstream(searched: bool) -> Arc<Upstream> {
        let with = Upstream::with_key(KEY);
        Arc::new(Upstream {
            key_finder: with.key_finder.filter(|_| searched),
            ..with
        })
    }

    /// Response headers of an uncompressed body.
    fn plain() -> http::HeaderMap {
        http::HeaderMap::new()
    }

    /// A body of these frames, then these trailers.
    fn body(
        frames: Vec<Vec<u8>>,
        trailers: Option<http::HeaderMap>,
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let mut all: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = frames
            .into_iter()
            .map(|f| Ok(Frame::data(Bytes::from(f))))
            .collect();
        all.extend(trailers.map(|t| Ok(Frame::trailers(t))));
        http_body_util::StreamBody::new(futures_util::stream::iter(all))
    }

    /// The frames the client gets, then the trailers.
    async fn masked(
        frames: Vec<Vec<u8>>,
        trailers: Option<http::HeaderMap>,
    ) -> (Vec<Bytes>, Option<http::HeaderMap>) {
        let mut b = MaskKey::new(body(frames, trailers), upstream(true), &plain())
            .unwrap_or_else(|_| panic!());
        let mut out = Vec::new();
        let mut trailers = None;
        while let Some(f) = b.frame().await {
            match f.unwrap().into_data() {
                Ok(d) => out.push(d),
                Err(t) => trailers = t.into_trailers().ok(),
            }
        }
        assert!(b.is_end_stream());
        (out, trailers)
    }

    #[tokio::test]
    async fn the_key_is_masked_wherever_the_frames_split_it() {
        let text = format!(r#"{{"echo":"Bearer {KEY}","again":"{KEY}","x":"sk-"}}"#);
        let want = text.replace(KEY, &"*".repeat(KEY.len()));
        for cut in 0..=text.len() {
            for second in cut..=text.len() {
                let frames = vec![
                    text.as_bytes()[..cut].to_vec(),
                    text.as_bytes()[cut..second].to_vec(),
                    text.as_bytes()[second..].to_vec(),
                ];
                let (out, _) = masked(frames, None).await;
                let got: Vec<u8> = out.concat();
                assert_eq!(
                    String::from_utf8(got).unwrap(),
                    want,
                    "cut at {cut}, {second}"
                );
            }
        }
    }

    #[tokio::test]
    async fn frames_that_cannot_begin_the_key_pass_at_once_and_unchanged() {
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\" s\"}}]}\n\n".to_vec();
        let (out, _) = masked(vec![sse.clone(), sse.clone()], None).await;
        assert_eq!(out, [Bytes::from(sse.clone()), Bytes::from(sse)]);
        // A frame ending in what may begin the key holds exactly that back.
        let (out, _) = masked(vec![b"abc sk-UP".to_vec(), b"PER".to_vec()], None).await;
        assert_eq!(out, [Bytes::from("abc "), Bytes::from("sk-UPPER")]);
        assert_eq!(
            prefix_at_end(b"xx sk-UPSTREAM-012345678", KEY.as_bytes()),
            21
        );
        assert_eq!(prefix_at_end(b"s", KEY.as_bytes()), 1);
        assert_eq!(prefix_at_end(b"", KEY.as_bytes()), 0);
        assert_eq!(prefix_at_end(b"sk-x", KEY.as_bytes()), 0);
    }

    #[tokio::test]
    async fn a_held_end_goes_out_before_the_trailers_and_leaking_trailers_go() {
        let mut t = http::HeaderMap::new();
        t.insert("x-echo", format!("Bearer {KEY}").parse().unwrap());
        t.insert("x-checksum", "abc".parse().unwrap());
        let (out, trailers) = masked(vec![b"ok sk-UP".to_vec()], Some(t)).await;
        assert_eq!(out, [Bytes::from("ok "), Bytes::from("sk-UP")]);
        // A start of the key of 8 bytes or more ending the body is masked.
        let (out, _) = masked(vec![b"cut: sk-UPSTR".to_vec()], None).await;
        assert_eq!(out, [Bytes::from("cut: "), Bytes::from("********")]);
        let trailers = trailers.unwrap();
        assert_eq!(trailers.len(), 1);
        assert_eq!(trailers["x-checksum"], "abc");
    }

    #[tokio::test]
    async fn an_error_drops_what_is_held_and_ends_the_body() {
        let frames: Vec<Result<Frame<Bytes>, &'static str>> =
            vec![Ok(Frame::data(Bytes::from("a sk-UP"))), Err("reset")];
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut b = MaskKey::new(inner, upstream(true), &plain()).unwrap_or_else(|_| panic!());
        assert_eq!(b.frame().await.unwrap().unwrap().into_data().unwrap(), "a ");
        assert_eq!(b.frame().await.unwrap().unwrap_err(), "reset");
        assert!(b.frame().await.is_none());
        assert!(b.is_end_stream());
    }

    #[test]
    fn an_upstream_without_a_key_gets_no_wrapper() {
        assert!(MaskKey::new(body(vec![], None), upstream(false), &plain()).is_err());
    }

    /// A body compressed though `identity` was asked for cannot be searched.
    #[test]
    fn a_compressed_body_gets_no_wrapper() {
        let mut gzip = http::HeaderMap::new();
        gzip.insert(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert!(MaskKey::new(body(vec![], None), upstream(true), &gzip).is_err());
        // Plain however it is spelled (codings are case-insensitive): the
        // key is looked for.
        for plain in ["identity", "Identity", "IDENTITY", "", "identity, identity"] {
            let mut identity = http::HeaderMap::new();
            identity.insert(http::header::CONTENT_ENCODING, plain.parse().unwrap());
            assert!(
                MaskKey::new(body(vec![], None), upstream(true), &identity).is_ok(),
                "{plain:?}"
            );
        }
    }
}
