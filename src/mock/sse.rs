//! The mock's response body: a whole buffer, or server-sent events that a
//! producer task pushes through a bounded channel, one body frame per event,
//! so they leave as they are produced (with delays and injected failures).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;
use tokio::sync::mpsc;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Events in flight between the producer and the connection. Small: the
/// producer waits (backpressure) rather than buffering a whole stream.
const CHANNEL_BOUND: usize = 8;

/// One SSE event to send; `content` marks the events that carry generated
/// text (the ones `x-mock-delay-ms` and `x-mock-fail-after` count).
pub(crate) struct Piece {
    pub(crate) bytes: Bytes,
    pub(crate) content: bool,
}

impl Piece {
    /// `event: NAME` (when given) and `data: JSON`, then the blank line.
    pub(crate) fn event(name: Option<&str>, data: &Value, content: bool) -> Self {
        let mut s = String::new();
        if let Some(name) = name {
            s.push_str("event: ");
            s.push_str(name);
            s.push('\n');
        }
        s.push_str("data: ");
        s.push_str(&data.to_string());
        s.push_str("\n\n");
        Piece {
            bytes: Bytes::from(s),
            content,
        }
    }

    /// The OpenAI end-of-stream sentinel.
    pub(crate) fn done() -> Self {
        Piece {
            bytes: Bytes::from_static(b"data: [DONE]\n\n"),
            content: false,
        }
    }
}

/// The error a `x-mock-fail-after` stream ends with.
#[derive(Debug)]
struct InjectedFailure;

impl std::fmt::Display for InjectedFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock: stream aborted by x-mock-fail-after")
    }
}

impl std::error::Error for InjectedFailure {}

pub(crate) enum MockBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Result<Bytes, BoxError>>),
}

impl MockBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        MockBody::Full(Some(bytes.into()))
    }

    /// Starts a task that sends `pieces` one frame each. Before every content
    /// piece it sleeps `delay`; with `fail_after = Some(n)` it stops right
    /// after the n-th content piece (or after the last one, if there are
    /// fewer) and ends the body with an error: no terminal event, no usage.
    pub(crate) fn stream(pieces: Vec<Piece>, delay: Duration, fail_after: Option<usize>) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_BOUND);
        let pieces = match fail_after {
            Some(n) => cut_after_content(pieces, n),
            None => pieces,
        };
        tokio::spawn(async move {
            for piece in pieces {
                if piece.content && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if tx.send(Ok(piece.bytes)).await.is_err() {
                    return; // the client went away
                }
            }
            if fail_after.is_some() {
                // Let hyper flush what was sent: an error aborts the
                // connection and would discard its write buffer.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err(Box::new(InjectedFailure) as BoxError)).await;
            }
        });
        MockBody::Channel(rx)
    }
}

/// Keeps the pieces up to and including the n-th content piece (everything up
/// to the last content piece when there are fewer than n).
fn cut_after_content(mut pieces: Vec<Piece>, n: usize) -> Vec<Piece> {
    let contents: Vec<usize> = pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| p.content)
        .map(|(i, _)| i)
        .collect();
    let keep = match (n, contents.get(n.wrapping_sub(1)), contents.last()) {
        (0, _, _) => contents.first().copied().unwrap_or(pieces.len()),
        (_, Some(&i), _) => i + 1,
        (_, None, Some(&last)) => last + 1,
        (_, None, None) => pieces.len(),
    };
    pieces.truncate(keep);
    pieces
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Channel(_) => SizeHint::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kinds: &str) -> Vec<Piece> {
        kinds
            .chars()
            .map(|c| Piece {
                bytes: Bytes::from(c.to_string()),
                content: c == 'c',
            })
            .collect()
    }

    fn shape(pieces: &[Piece]) -> String {
        pieces
            .iter()
            .map(|p| String::from_utf8_lossy(&p.bytes).into_owned())
            .collect()
    }

    #[test]
    fn cut_keeps_the_first_n_content_pieces() {
        assert_eq!(shape(&cut_after_content(plan("ssccces"), 0)), "ss");
        assert_eq!(shape(&cut_after_content(plan("ssccces"), 2)), "sscc");
        assert_eq!(shape(&cut_after_content(plan("ssccces"), 9)), "ssccc");
        assert_eq!(shape(&cut_after_content(plan("ss"), 1)), "ss");
    }
}
