//! Maps a key path such as `upstreams[1].timeout` or `models.gpt-4.1.input`
//! back to its place in the TOML source, so errors can name the line.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// 1-based line number of a byte offset.
pub fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The span of the value at `path`, or of the deepest ancestor that exists.
pub fn span_of(doc: &Spanned<DeTable<'_>>, path: &str) -> Option<Range<usize>> {
    let mut span = None;
    let mut rest = path;
    let mut table = Some(doc.get_ref());
    let mut value: Option<&Spanned<DeValue<'_>>> = None;
    // Each step that finds nothing stops at the deepest span found so far
    // (a missing key is reported at the table that lacks it).
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let Some(close) = after.find(']') else { break };
            let Ok(idx) = after[..close].parse::<usize>() else {
                break;
            };
            let Some(item) = value
                .and_then(|v| v.get_ref().as_array())
                .and_then(|a| a.get(idx))
            else {
                break;
            };
            rest = after[close + 1..].trim_start_matches('.');
            span = Some(item.span());
            table = item.get_ref().as_table();
            value = Some(item);
            continue;
        }
        let Some(t) = table else { break };
        // Longest key that matches at a segment boundary: model names contain dots.
        let Some((key_len, item)) = t
            .iter()
            .filter_map(|(k, v)| {
                let k = k.get_ref().as_ref();
                let tail = rest.strip_prefix(k)?;
                (tail.is_empty() || tail.starts_with('.') || tail.starts_with('['))
                    .then_some((k.len(), v))
            })
            .max_by_key(|(len, _)| *len)
        else {
            break;
        };
        rest = rest[key_len..].trim_start_matches('.');
        span = Some(item.span());
        table = item.get_ref().as_table();
        value = Some(item);
    }
    span
}
