//! A structural scan of a JSON object: the raw values of chosen top-level
//! members, without deserialising the rest.
//!
//! A response body is mostly text the meter does not need (choices, content,
//! tool calls). Deserialising it whole cost about 13,000 instructions a call
//! (serde checks and matches every key, validates every string); this scan
//! only finds string, object and array boundaries, and the few members the
//! meter wants are then deserialised from their own slices.

/// The raw value of each top-level member of the object in `json` whose key
/// is in `keys` (same order; `None` when absent; the last one wins when a
/// key repeats; keys are compared as written, escapes included). `None`
/// overall when `json` is not a single object at the structural level. The
/// scan is more lenient than a parser: it does not tell `}` from `]` when
/// matching brackets, nor check scalars; on valid JSON both agree.
pub fn top_level<'a, const N: usize>(
    json: &'a [u8],
    keys: [&[u8]; N],
) -> Option<[Option<&'a [u8]>; N]> {
    let mut found = [None; N];
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b'}') {
        return (skip_ws(json, i + 1) == json.len()).then_some(found);
    }
    loop {
        if json.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(json, i)?;
        let key = &json[i + 1..key_end - 1];
        i = skip_ws(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(json, i + 1);
        let end = value_end(json, start)?;
        if let Some(k) = keys.iter().position(|k| *k == key) {
            found[k] = Some(&json[start..end]);
        }
        i = skip_ws(json, end);
        match json.get(i) {
            Some(b',') => i = skip_ws(json, i + 1),
            Some(b'}') => {
                return (skip_ws(json, i + 1) == json.len()).then_some(found);
            }
            _ => return None,
        }
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while json
        .get(i)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// `json[i]` is an opening quote; returns the index just past the closing one.
/// (Vectorised: a plain byte loop measured 50% more instructions over a
/// chat completion.)
fn string_end(json: &[u8], i: usize) -> Option<usize> {
    let mut at = i + 1;
    loop {
        at += memchr::memchr2(b'"', b'\\', json.get(at..)?)?;
        if json[at] == b'"' {
            return Some(at + 1);
        }
        // An escape: skip the backslash and the character it escapes.
        at += 2;
    }
}

/// The index just past the value starting at `i`.
fn value_end(json: &[u8], i: usize) -> Option<usize> {
    match *json.get(i)? {
        b'"' => string_end(json, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut at = i;
            while at < json.len() {
                match json[at] {
                    b'"' => {
                        at = string_end(json, at)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at + 1);
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
            None
        }
        _ => {
            // A number, true, false or null: up to the next delimiter.
            let n = json[i..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(json.len() - i);
            (n > 0).then_some(i + n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::top_level;

    #[test]
    fn finds_top_level_members_only() {
        let json = br#" { "id": "x\"usage\": {", "choices": [{"message": {"usage": 1, "model": "inner"}}],
            "model" : "gpt-4o-mini", "n": -1.5e3, "ok": true, "usage": {"prompt_tokens": 3, "nested": [1, {"a": "}"}]} } "#;
        let [model, usage, missing] = top_level(json, [b"model", b"usage", b"nope"]).unwrap();
        assert_eq!(model, Some(&br#""gpt-4o-mini""#[..]));
        assert_eq!(
            usage,
            Some(&br#"{"prompt_tokens": 3, "nested": [1, {"a": "}"}]}"#[..])
        );
        assert_eq!(missing, None);
    }

    #[test]
    fn malformed_objects_are_refused() {
        for bad in [
            &br#"{"a": 1"#[..],
            br#"{"a" 1}"#,
            br#"{"a": "unterminated}"#,
            br#"[1, 2]"#,
            br#"{"a": 1} trailing"#,
            br#"{"a": {"b": [1, 2}"#,
            b"",
        ] {
            assert!(
                top_level(bad, [b"a"]).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(top_level(b"{}", [b"a"]), Some([None]));
    }
}

/// A non-negative integer or `null`/absent; `Err` for anything else (the
/// caller then falls back to serde, which decides).
fn count(v: Option<&[u8]>) -> Result<Option<u64>, ()> {
    match v {
        None | Some(b"null") => Ok(None),
        Some(d) if !d.is_empty() && d.iter().all(u8::is_ascii_digit) => std::str::from_utf8(d)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or(()),
        Some(_) => Err(()),
    }
}

fn details(v: Option<&[u8]>) -> Result<Option<super::usage::Details>, ()> {
    match v {
        None | Some(b"null") => Ok(None),
        Some(obj) => {
            let [cached, reasoning] =
                top_level(obj, [b"cached_tokens", b"reasoning_tokens"]).ok_or(())?;
            Ok(Some(super::usage::Details {
                cached_tokens: count(cached)?,
                reasoning_tokens: count(reasoning)?,
            }))
        }
    }
}

/// A usage object read member by member (plain integers, the shape every
/// provider sends); `None` when it is anything else, for serde to decide.
pub fn raw_usage(u: &[u8]) -> Option<super::usage::RawUsage> {
    let [pt, ct, ptd, ctd, it, ot, itd, otd, cw, cr] = top_level(
        u,
        [
            b"prompt_tokens",
            b"completion_tokens",
            b"prompt_tokens_details",
            b"completion_tokens_details",
            b"input_tokens",
            b"output_tokens",
            b"input_tokens_details",
            b"output_tokens_details",
            b"cache_creation_input_tokens",
            b"cache_read_input_tokens",
        ],
    )?;
    let usage = || -> Result<super::usage::RawUsage, ()> {
        Ok(super::usage::RawUsage {
            prompt_tokens: count(pt)?,
            completion_tokens: count(ct)?,
            prompt_tokens_details: details(ptd)?,
            completion_tokens_details: details(ctd)?,
            input_tokens: count(it)?,
            output_tokens: count(ot)?,
            input_tokens_details: details(itd)?,
            output_tokens_details: details(otd)?,
            cache_creation_input_tokens: count(cw)?,
            cache_read_input_tokens: count(cr)?,
        })
    };
    usage().ok()
}

#[cfg(test)]
mod usage_tests {
    #[test]
    fn reads_usage_like_serde_does() {
        let u = br#"{"prompt_tokens": 31, "completion_tokens": 18, "total_tokens": 49,
            "prompt_tokens_details": {"cached_tokens": 7, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 4}, "input_tokens": null}"#;
        let fast = super::raw_usage(u).unwrap();
        let slow: super::super::usage::RawUsage = serde_json::from_slice(u).unwrap();
        assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
        assert_eq!(fast.prompt_tokens_details.unwrap().cached_tokens, Some(7));
        // Not a plain integer: left to serde.
        assert!(super::raw_usage(br#"{"prompt_tokens": 3.0}"#).is_none());
        assert!(super::raw_usage(br#"{"prompt_tokens": "3"}"#).is_none());
        assert!(super::raw_usage(br#"{"prompt_tokens": -3}"#).is_none());
        assert!(super::raw_usage(br#"{"prompt_tokens": 18446744073709551616}"#).is_none());
        let max =
            super::raw_usage(br#"{"prompt_tokens": 18446744073709551615, "output_tokens": 0}"#)
                .unwrap();
        assert_eq!(max.prompt_tokens, Some(u64::MAX));
        assert_eq!(max.output_tokens, Some(0));
    }
}
