//! An incremental, bounded Server-Sent Events decoder.
//!
//! Bytes arrive in arbitrary frames: events split across reads, multi-byte
//! UTF-8 split across frames, `\n`, `\r\n` or `\r` line endings. Complete lines
//! are parsed straight from the frame; only a partial line is copied, into a
//! buffer that is reused and capped, so decoding allocates nothing per frame
//! in the steady state and a hostile upstream cannot grow memory without bound.

/// Longest line or event data we keep; longer ones are dropped and counted.
pub const MAX_EVENT_BYTES: usize = 8 << 20;

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
}

impl SseDecoder {
    /// Feeds one frame; calls `on_event(event_name, data)` for each complete
    /// event in it.
    pub fn feed(&mut self, mut chunk: &[u8], on_event: &mut dyn FnMut(&[u8], &[u8])) {
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
        on_event: &mut dyn FnMut(&[u8], &[u8]),
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
        on_event(&self.event, value);
        self.event.clear();
        Some(end)
    }

    fn push_partial(&mut self, bytes: &[u8]) {
        if self.line.len() + bytes.len() > MAX_EVENT_BYTES {
            self.overflow = true;
            self.line.clear();
        } else if !self.overflow {
            self.line.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, tail: &[u8], on_event: &mut dyn FnMut(&[u8], &[u8])) {
        if self.line.is_empty() {
            self.process_line(tail, on_event);
        } else {
            let mut line = std::mem::take(&mut self.line);
            if line.len() + tail.len() > MAX_EVENT_BYTES {
                self.overflow = true;
            } else {
                line.extend_from_slice(tail);
                self.process_line(&line, on_event);
            }
            line.clear();
            self.line = line;
        }
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut dyn FnMut(&[u8], &[u8])) {
        if line.is_empty() {
            if self.overflow {
                self.overflowed_events += 1;
            } else if self.has_data {
                on_event(&self.event, &self.data);
            }
            self.overflow = false;
            self.has_data = false;
            self.event.clear();
            self.data.clear();
            return;
        }
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
            d.feed(chunk, &mut |e, data| {
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
        big.extend(std::iter::repeat_n(b'x', MAX_EVENT_BYTES + 10));
        big.extend_from_slice(b"\n\ndata: ok\n\n");
        let mut d = SseDecoder::default();
        let mut seen = Vec::new();
        for chunk in big.chunks(64 * 1024) {
            d.feed(chunk, &mut |_, data| seen.push(data.to_vec()));
            assert!(d.line.capacity() <= MAX_EVENT_BYTES + 64 * 1024);
        }
        assert_eq!(seen, vec![b"ok".to_vec()]);
        assert_eq!(d.overflowed_events, 1);
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
