//! `MeteredBody`: the response body, wrapped, not buffered.
//!
//! Each frame goes to the client as it arrives; a copy of its bytes feeds the
//! call's [`super::ResponseMeter`]. The call is finished exactly once: when the
//! stream reaches its terminal event or its last byte (before that byte is
//! released, so a served call's event is always in the spool first), when
//! the upstream breaks off, when the deadline passes, or when the client
//! drops the body (then `Call`'s `Drop` finishes it as `client_aborted`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame};

use super::{Call, End};
use crate::spool::Flush;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Scheduler passes [`MeteredBody::prefetch`] waits for a first frame.
const PREFETCH_PASSES: u32 = 3;

/// What the client gets once the event is written.
enum Release {
    Frame(Frame<Bytes>),
    End,
    Error(BoxError),
}

pub struct MeteredBody<B> {
    inner: B,
    inner_done: bool,
    call: Option<Call>,
    /// The event being written; `held` waits for it.
    finishing: Option<super::Finishing>,
    held: VecDeque<Release>,
    done: bool,
    /// Bytes still expected when the response has a `content-length`.
    remaining: Option<u64>,
    /// The client has been told to wait at least once (so the response
    /// head is already out).
    waited: bool,
    /// Polled by the request's own future (see [`MeteredBody::prefetch`]):
    /// the head waits too, so waiting for a batched write splits nothing.
    prefetching: bool,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The upstream connection, handed back to its pool once the body has
    /// been read to its end (dropped otherwise, which closes an HTTP/1.1
    /// one); for HTTP/2, the call's stream place, given back either way.
    conn: Option<crate::proxy::pool::Returner>,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream response exceeded its timeout")]
pub struct BodyTimeout;

impl<B> MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(
        inner: B,
        call: Call,
        content_length: Option<u64>,
        deadline: Pin<Box<tokio::time::Sleep>>,
        conn: Option<crate::proxy::pool::Returner>,
    ) -> Self {
        MeteredBody {
            inner,
            inner_done: false,
            call: Some(call),
            finishing: None,
            held: VecDeque::new(),
            done: false,
            remaining: content_length,
            waited: false,
            prefetching: false,
            deadline,
            conn,
        }
    }

    /// Finishes the call; `release` goes to the client once the event is in
    /// the spool.
    fn finish(&mut self, end: End, release: Release) {
        let Some(mut call) = self.call.take() else {
            self.held.push_back(release);
            return;
        };
        if end == End::Complete {
            if let Some(tail) = call.state().meter.as_mut().map(|m| m.finish()) {
                if !tail.is_empty() {
                    self.held.push_back(Release::Frame(Frame::data(tail)));
                }
            }
        }
        match release {
            // A strip-mode tail goes out after the frame that ended the stream.
            Release::Frame(f) => self.held.push_front(Release::Frame(f)),
            other => self.held.push_back(other),
        }
        // A response whose head has not gone out yet (a whole JSON body in
        // one frame) is written in one go once the event is: writing the
        // event at once keeps it that way. Before the head is handed to
        // hyper (prefetch) the line joins the batch: nothing is split.
        let flush = if self.waited || self.prefetching {
            Flush::Batch
        } else {
            Flush::Now
        };
        self.finishing = Some(call.finish(end, flush));
    }

    /// Reads the first frame before the response head is handed to hyper,
    /// so the head goes out with it. A body that is whole in its first frame
    /// (most JSON answers) is finished here: its event joins the spool's
    /// batched write, and head, body and end leave in one `writev` once the
    /// line is written. A stream sends its first frame as soon as it comes;
    /// the frames after it are passed on as before, one by one.
    ///
    /// The head never waits for the network: when no frame has come after
    /// [`PREFETCH_PASSES`] scheduler passes (time for the upstream
    /// connection's task to hand over bytes it has already read), the head
    /// goes out alone, as a stream whose first event is still to come needs.
    pub async fn prefetch(&mut self) {
        self.prefetching = true;
        let mut passes = 0;
        let first = std::future::poll_fn(|cx| match Pin::new(&mut *self).poll_frame(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            // The event of a body whole in its first frame is being written.
            Poll::Pending if self.finishing.is_some() => Poll::Pending,
            Poll::Pending if passes < PREFETCH_PASSES => {
                passes += 1;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        self.prefetching = false;
        if let Some(first) = first {
            self.held.push_front(match first {
                Some(Ok(f)) => Release::Frame(f),
                Some(Err(e)) => Release::Error(e),
                None => Release::End,
            });
        }
    }

    /// Meters one data frame; returns what to send on (may be empty in strip mode).
    fn meter(&mut self, data: Bytes) -> Bytes {
        let Some(call) = self.call.as_mut() else {
            return data;
        };
        let state = call.state();
        if state.first_byte.is_none() {
            state.first_byte = Some(Instant::now());
        }
        if let Some(r) = self.remaining.as_mut() {
            *r = r.saturating_sub(data.len() as u64);
        }
        match state.meter.as_mut() {
            Some(m) => m.feed(data),
            None => data,
        }
    }

    /// The upstream sent its last byte: its connection can carry the next call.
    fn release_conn(&mut self) {
        if let Some(c) = self.conn.take() {
            c.release();
        }
    }

    /// The upstream body has no more bytes to send.
    fn upstream_done(&self) -> bool {
        self.remaining == Some(0) || self.inner.is_end_stream()
    }

    fn at_end(&self) -> bool {
        self.upstream_done()
            || self
                .call
                .as_ref()
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.meter.as_ref())
                .is_some_and(|m| m.complete)
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(f) = this.finishing.as_mut() {
                if f.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.finishing = None;
            }
            if let Some(r) = this.held.pop_front() {
                return match r {
                    Release::Frame(f) => Poll::Ready(Some(Ok(f))),
                    Release::End => {
                        this.done = true;
                        Poll::Ready(None)
                    }
                    Release::Error(e) => {
                        this.done = true;
                        Poll::Ready(Some(Err(e)))
                    }
                };
            }
            if this.done || this.inner_done {
                return Poll::Ready(None);
            }
            if this.call.is_some() && this.deadline.as_mut().poll(cx).is_ready() {
                this.finish(
                    End::BodyError("upstream_timeout"),
                    Release::Error(Box::new(BodyTimeout)),
                );
                continue;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    this.waited = true;
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let out = this.meter(data);
                            if this.upstream_done() {
                                this.release_conn();
                            }
                            if this.call.is_some() && this.at_end() {
                                this.finish(End::Complete, Release::Frame(Frame::data(out)));
                                continue;
                            }
                            if out.is_empty() {
                                continue;
                            }
                            Frame::data(out)
                        }
                        Err(trailers) => trailers,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.inner_done = true;
                    this.finish(
                        End::BodyError("upstream_body_error"),
                        Release::Error(e.into()),
                    );
                }
                Poll::Ready(None) => {
                    this.inner_done = true;
                    this.release_conn();
                    this.finish(End::Complete, Release::End);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A prefetched error or end may wait in `held` with `done` set.
        self.done && self.held.is_empty()
    }
}
