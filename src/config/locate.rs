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
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let close = after.find(']')?;
            let idx: usize = after[..close].parse().ok()?;
            rest = after[close + 1..].trim_start_matches('.');
            let item = value?.get_ref().as_array()?.get(idx)?;
            span = Some(item.span());
            table = item.get_ref().as_table();
            value = Some(item);
            continue;
        }
        let t = table?;
        // Longest key that matches at a segment boundary: model names contain dots.
        let (key_len, item) = t
            .iter()
            .filter_map(|(k, v)| {
                let k = k.get_ref().as_ref();
                let tail = rest.strip_prefix(k)?;
                (tail.is_empty() || tail.starts_with('.') || tail.starts_with('['))
                    .then_some((k.len(), v))
            })
            .max_by_key(|(len, _)| *len)?;
        rest = rest[key_len..].trim_start_matches('.');
        span = Some(item.span());
        table = item.get_ref().as_table();
        value = Some(item);
    }
    span
}
