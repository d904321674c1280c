//! An incremental, bounded Server-Sent Events decoder.
//!
//! Bytes arrive in arbitrary frames: events split across reads, multi-byte
//! UTF-8 split across frames, `\n`, `\r\n` or `\r` line endings. Complete lines
//! are parsed straight from the frame; only a partial line is copied, into a
//! buffer that is reused and capped, so decoding allocates nothing per frame
//! in the steady state and a hostile upstream cannot grow memory without bound.

/// Longest line or event data we keep; longer ones are dropped and counted.
pub const MAX_EVENT_BYTES: usize = 8 << 20;

/// Of an event past `MAX_EVENT_BYTES`, the first bytes of its data and the
/// last ones are kept: a Responses API stream's final event can carry
/// images (base64) past the cap, with the model near its start and the
/// usage near its end.
pub const CLIP_HEAD_BYTES: usize = 64 << 10;
pub const CLIP_TAIL_BYTES: usize = 1 << 20;

/// An event's data, as `on_event` gets it.
pub type OnEvent<'a> = dyn FnMut(&[u8], &[u8], Option<&[u8]>) + 'a;

#[derive(Default)]
pub struct SseDecoder {
    /// The partial line carried over from the previous frame.
    line: Vec<u8>,
    /// `event:` of the event being assembled.
    event: Vec<u8>,
    /// `data:` lines of the event being assembled, joined by `\n`.
    data: Vec<u8>,
    has_data: bool,
    /// The previous frame ended in `\r`: a leading `\n` belongs to it.
    after_cr: bool,
    /// The current line or event passed `MAX_EVENT_BYTES`.
    overflow: bool,
    pub overflowed_events: u64,
    /// The event past the cap: its data's first and last bytes.
    clip: Option<Clip>,
    /// In a line past the cap, whose bytes were not kept: its end is no
    /// blank line, even when it comes first in a frame.
    long_line: bool,
}

/// Bytes `from..to` (cut to what there is) of `pieces` laid end to end.
fn range(pieces: &[&[u8]], from: usize, to: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    for p in pieces {
        let (lo, hi) = (from.clamp(at, at + p.len()), to.clamp(at, at + p.len()));
        out.extend_from_slice(&p[lo - at..hi - at]);
        at += p.len();
    }
    out
}

#[derive(Default)]
struct Clip {
    head: Vec<u8>,
    tail: Vec<u8>,
    /// Its line ended: later lines of the event are not kept.
    done: bool,
}

impl Clip {
    /// The line (or data) that went past the cap, in pieces; `None` when it
    /// is not event data. `ended`: nothing more of it is to come.
    fn start(pieces: &[&[u8]], line: bool, ended: bool) -> Option<Clip> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        let skip = if line {
            let field = range(pieces, 0, 6);
            let rest = field.strip_prefix(b"data:")?;
            5 + usize::from(rest.first() == Some(&b' '))
        } else {
            0
        };
        Some(Clip {
            head: range(pieces, skip, skip + CLIP_HEAD_BYTES),
            tail: range(pieces, len.saturating_sub(CLIP_TAIL_BYTES).max(skip), len),
            done: ended,
        })
    }

    /// Appends to the tail, which never holds more than twice
    /// `CLIP_TAIL_BYTES` (a copy of the last ones now and then, not a copy
    /// per frame).
    fn more(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        let bytes = &bytes[bytes.len().saturating_sub(CLIP_TAIL_BYTES)..];
        if self.tail.capacity() < 2 * CLIP_TAIL_BYTES {
            self.tail
                .reserve_exact(2 * CLIP_TAIL_BYTES - self.tail.len());
        }
        if self.tail.len() + bytes.len() > 2 * CLIP_TAIL_BYTES {
            let cut = self.tail.len() + bytes.len() - CLIP_TAIL_BYTES;
            self.tail.drain(..cut.min(self.tail.len()));
        }
        self.tail.extend_from_slice(bytes);
    }

    fn tail(&self) -> &[u8] {
        &self.tail[self.tail.len().saturating_sub(CLIP_TAIL_BYTES)..]
    }
}

impl SseDecoder {
    /// Feeds one frame; calls `on_event(event_name, data, None)` for each
    /// complete event in it, and `on_event(event_name, head, Some(tail))`
    /// for one past `MAX_EVENT_BYTES` (the first `CLIP_HEAD_BYTES` and last
    /// `CLIP_TAIL_BYTES` of its data: of the one line that went past the
    /// cap on its own, or else of the lines up to the one that took their
    /// sum past it; later lines of the event are not kept).
    pub fn feed(&mut self, mut chunk: &[u8], on_event: &mut OnEvent<'_>) {
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while !chunk.is_empty() {
            match memchr::memchr2(b'\n', b'\r', chunk) {
                Some(i) => {
                    if let Some(n) = self.single_data_event(chunk, i, on_event) {
                        chunk = &chunk[n..];
                        continue;
                    }
                    if chunk[i] == b'\r' {
                        if i + 1 < chunk.len() {
                            if chunk[i + 1] == b'\n' {
                                self.end_line(&chunk[..i], on_event);
                                chunk = &chunk[i + 2..];
                                continue;
                            }
                        } else {
                            self.after_cr = true;
                        }
                    }
                    self.end_line(&chunk[..i], on_event);
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.push_partial(chunk);
                    break;
                }
            }
        }
    }

    /// The common event, one `data:` line and a blank line, both whole in
    /// `chunk` (the line ends at `eol`): handed over from the chunk without
    /// being copied. Returns the bytes consumed, or `None` for the general
    /// path.
    fn single_data_event(
        &mut self,
        chunk: &[u8],
        eol: usize,
        on_event: &mut OnEvent<'_>,
    ) -> Option<usize> {
        if !self.line.is_empty() || self.has_data || self.overflow {
            return None;
        }
        let end = match &chunk[eol..] {
            [b'\n', b'\n', ..] => eol + 2,
            [b'\r', b'\n', b'\r', b'\n', ..] => eol + 4,
            _ => return None,
        };
        let value = chunk[..eol].strip_prefix(b"data:")?;
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if value.len() + 1 > MAX_EVENT_BYTES {
            return None;
        }
        on_event(&self.event, value, None);
        self.event.clear();
        Some(end)
    }

    fn push_partial(&mut self, bytes: &[u8]) {
        if self.overflow {
            self.long_line = true;
            if let Some(c) = &mut self.clip {
                c.more(bytes);
            }
        } else if self.line.len() + bytes.len() > MAX_EVENT_BYTES {
            self.overflow = true;
            self.long_line = true;
            self.clip = Clip::start(&[&self.line, bytes], true, false);
            self.line.clear();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, tail: &[u8], on_event: &mut OnEvent<'_>) {
        if std::mem::take(&mut self.long_line) {
            // The end of a line past the cap (its start was not kept).
            if let Some(c) = &mut self.clip {
                c.more(tail);
                c.done = true;
            }
        } else if self.line.is_empty() {
            self.process_line(tail, on_event);
        } else {
            let mut line = std::mem::take(&mut self.line);
            if line.len() + tail.len() > MAX_EVENT_BYTES {
                self.overflow = true;
                self.clip = Clip::start(&[&line, tail], true, true);
            } else {
                line.extend_from_slice(tail);
                self.process_line(&line, on_event);
            }
            line.clear();
            self.line = line;
        }
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut OnEvent<'_>) {
        if line.is_empty() {
            if self.overflow {
                self.overflowed_events += 1;
                if let Some(c) = self.clip.take() {
                    on_event(&self.event, &c.head, Some(c.tail()));
                }
            } else if self.has_data {
                on_event(&self.event, &self.data, None);
            }
            self.overflow = false;
            self.has_data = false;
            self.event.clear();
            self.data.clear();
            return;
        }
        // A later line of an event past the cap (the one that crossed it
        // ended in `end_line`), or a comment.
        if self.overflow || line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    self.overflow = true;
                    let sep: &[u8] = if self.has_data { b"\n" } else { b"" };
                    self.clip = Clip::start(&[&self.data, sep, value], false, true);
                    return;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            _ => {}
        }
    }
}

/// End of the first complete event in `buf` (just past its blank line). A
/// lone trailing `\r` does not count, as a `\n` may follow in the next frame.
pub fn first_event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    // The buffer starts at the start of a line.
    let mut prev_eol = true;
    loop {
        let eol = i + memchr::memchr2(b'\n', b'\r', &buf[i..])?;
        if eol > i {
            prev_eol = false;
        }
        let eol_len = match (buf[eol], buf.get(eol + 1)) {
            (b'\n', _) => 1,
            (_, Some(b'\n')) => 2,
            (_, Some(_)) => 1,
            (_, None) => return None,
        };
        i = eol + eol_len;
        if prev_eol {
            return Some(i);
        }
        prev_eol = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Vec<(String, String)> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for chunk in input.chunks(split.max(1)) {
            d.feed(chunk, &mut |e, data, clipped| {
                assert!(clipped.is_none());
                out.push((
                    String::from_utf8(e.to_vec()).unwrap(),
                    String::from_utf8(data.to_vec()).unwrap(),
                ))
            });
        }
        out
    }

    #[test]
    fn line_endings_and_splits() {
        let want = vec![
            ("".to_string(), "{\"a\":1}".to_string()),
            ("ping".to_string(), "x\ny".to_string()),
        ];
        for input in [
            &b"data: {\"a\":1}\n\n: comment\nevent: ping\ndata: x\ndata: y\n\n"[..],
            b"data: {\"a\":1}\r\n\r\n: comment\r\nevent: ping\r\ndata: x\r\ndata: y\r\n\r\n",
            b"data: {\"a\":1}\r\revent: ping\rdata: x\rdata: y\r\r",
        ] {
            for split in 1..=input.len() {
                assert_eq!(decode_all(input, split), want, "split {split}");
            }
        }
    }

    #[test]
    fn whole_single_line_events_match_split_ones() {
        // Named and unnamed, LF and CRLF, a comment between: the whole-chunk
        // path (no copy) and every split give the same events.
        let want = vec![
            ("e".to_string(), "1".to_string()),
            ("".to_string(), "2".to_string()),
            ("".to_string(), "".to_string()),
            ("f".to_string(), "x:y".to_string()),
            ("".to_string(), "3".to_string()),
        ];
        for input in [
            &b"event: e\ndata: 1\n\ndata:2\n\n: c\ndata\n\nevent: f\ndata: x:y\n\ndata: 3\n\n"[..],
            b"event: e\r\ndata: 1\r\n\r\ndata:2\r\n\r\n: c\r\ndata\r\n\r\nevent: f\r\ndata: x:y\r\n\r\ndata: 3\r\n\r\n",
        ] {
            for split in 1..=input.len() {
                assert_eq!(decode_all(input, split), want, "split {split}");
            }
        }
    }

    #[test]
    fn oversized_events_are_dropped_not_buffered() {
        let mut big = b"data: ".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_EVENT_BYTES + (5 << 20)));
        big.extend_from_slice(b"\n\ndata: ok\n\n");
        let mut d = SseDecoder::default();
        let mut seen = Vec::new();
        for chunk in big.chunks(64 * 1024) {
            d.feed(chunk, &mut |_, data, clipped| {
                if clipped.is_none() {
                    seen.push(data.to_vec())
                }
            });
            assert!(d.line.capacity() <= MAX_EVENT_BYTES + 64 * 1024);
            let kept = d.clip.as_ref().map_or(0, |c| c.tail.capacity());
            assert!(kept <= 2 * CLIP_TAIL_BYTES, "{kept}");
        }
        assert_eq!(seen, vec![b"ok".to_vec()]);
        assert_eq!(d.overflowed_events, 1);
    }

    /// An event past the cap still hands over its data's first and last
    /// bytes, however it is framed: one line whole or split at any size,
    /// CRLF, or data over many lines.
    #[test]
    fn oversized_events_keep_their_head_and_tail() {
        let body: Vec<u8> = (0..MAX_EVENT_BYTES + 300_000)
            .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36])
            .collect();
        let want_head = &body[..CLIP_HEAD_BYTES];
        let want_tail = &body[body.len() - CLIP_TAIL_BYTES..];
        let one_line = |eol: &[u8]| {
            let mut v = b"event: big".to_vec();
            v.extend_from_slice(eol);
            v.extend_from_slice(b"data: ");
            v.extend_from_slice(&body);
            v.extend_from_slice(eol);
            v.extend_from_slice(eol);
            v.extend_from_slice(b"data: after");
            v.extend_from_slice(eol);
            v.extend_from_slice(eol);
            v
        };
        for (input, splits) in [
            (one_line(b"\n"), &[usize::MAX, 64 * 1024, 1_000_003][..]),
            (one_line(b"\r\n"), &[usize::MAX, 16 * 1024 + 1][..]),
        ] {
            for &split in splits {
                let mut d = SseDecoder::default();
                let mut got = Vec::new();
                for chunk in input.chunks(split.min(input.len())) {
                    d.feed(chunk, &mut |name, data, clipped| {
                        got.push((name.to_vec(), data.to_vec(), clipped.map(<[u8]>::to_vec)))
                    });
                }
                assert_eq!(got.len(), 2, "split {split}");
                let (name, head, tail) = &got[0];
                assert_eq!(&name[..], b"big");
                assert!(head[..] == *want_head, "split {split}");
                assert!(tail.as_deref() == Some(want_tail), "split {split}");
                assert_eq!(got[1], (Vec::new(), b"after".to_vec(), None));
                assert_eq!(d.overflowed_events, 1);
            }
        }
        // A frame that starts with the long line's end: no blank line (a
        // later line of the event is no event of its own).
        let mut input = b"data: ".to_vec();
        input.extend_from_slice(&body);
        let cut = input.len();
        input.extend_from_slice(b"\ndata: more\n\ndata: after\n\n");
        let mut d = SseDecoder::default();
        let mut got = Vec::new();
        for chunk in [&input[..cut], &input[cut..]] {
            d.feed(chunk, &mut |_, data, clipped| {
                got.push((data.len(), clipped.map(<[u8]>::to_vec)))
            });
        }
        assert_eq!(
            got.len(),
            2,
            "{:?}",
            got.iter().map(|g| g.0).collect::<Vec<_>>()
        );
        assert!(got[0].1.as_deref() == Some(want_tail));
        assert_eq!(got[1], (5, None));
        // Data over many lines, past the cap on a later one: joined by
        // `\n` as a whole event's would be.
        let half = MAX_EVENT_BYTES / 2 + 1;
        let mut input = b"data: ".to_vec();
        input.extend_from_slice(&body[..half]);
        input.extend_from_slice(b"\ndata: ");
        input.extend_from_slice(&body[half..]);
        input.extend_from_slice(b"\n\n");
        let mut d = SseDecoder::default();
        let mut got = Vec::new();
        d.feed(&input, &mut |_, data, clipped| {
            got.push((data.to_vec(), clipped.map(<[u8]>::to_vec)))
        });
        let mut joined = body[..half].to_vec();
        joined.push(b'\n');
        joined.extend_from_slice(&body[half..]);
        assert_eq!(got.len(), 1);
        assert!(got[0].0[..] == joined[..CLIP_HEAD_BYTES]);
        assert!(got[0].1.as_deref() == Some(&joined[joined.len() - CLIP_TAIL_BYTES..]));
        // A comment line past the cap is no event.
        let mut input = b": ".to_vec();
        input.extend_from_slice(&body);
        input.extend_from_slice(b"\n\n");
        let mut d = SseDecoder::default();
        d.feed(&input, &mut |_, _, _| panic!("a comment is not an event"));
    }

    #[test]
    fn first_event() {
        assert_eq!(first_event_end(b"data: a\n\ndata: b\n\n"), Some(9));
        assert_eq!(first_event_end(b"data: a\r\n\r\ndata"), Some(11));
        assert_eq!(first_event_end(b"data: a\r\r"), None);
        assert_eq!(first_event_end(b"data: a\r\rx"), Some(9));
        assert_eq!(first_event_end(b"data: a\r\n\r"), None);
        assert_eq!(first_event_end(b"data: a\n"), None);
        assert_eq!(first_event_end(b"\ndata: a\n"), Some(1));
    }
}
