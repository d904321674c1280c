//! Substring finders, built once: building a `memmem::Finder` costs more
//! than searching a whole request or SSE event with it (measured: about 1 µs
//! a call when they were built per search).

use std::sync::LazyLock;

use memchr::memmem::{Finder, FinderRev};

macro_rules! needles {
    ($($name:ident = $bytes:expr;)*) => {
        $(pub static $name: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new($bytes));)*
    };
}

needles! {
    USAGE_MEMBER = b"\"usage\":";
    USAGE_NULL = b"\"usage\":null";
    TYPE_MEMBER = b"\"type\":";
    STREAM_OPTIONS = b"\"stream_options\"";
    INCLUDE_USAGE_KEY = b"\"include_usage\"";
    URL_KEY = b"\"url\"";
    FILE_ID_KEY = b"\"file_id\"";
    FILE_URL_KEY = b"\"file_url\"";
    IMAGE_URL_KEY = b"\"image_url\"";
    FILE_DATA_KEY = b"\"file_data\"";
    BASE64_STRING = b"\"base64\"";
    MAX_COMPLETION_TOKENS_KEY = b"\"max_completion_tokens\"";
    MAX_TOKENS_KEY = b"\"max_tokens\"";
    MAX_OUTPUT_TOKENS_KEY = b"\"max_output_tokens\"";
}

/// Where `finder`'s needle starts in `haystack`, left to right, without
/// overlaps (as `Finder::find_iter`, which copies the searcher, a few
/// hundred bytes, on every call).
pub fn positions<'h>(
    finder: &'h Finder<'static>,
    haystack: &'h [u8],
) -> impl Iterator<Item = usize> + 'h {
    let step = finder.needle().len().max(1);
    let mut from = 0;
    std::iter::from_fn(move || {
        let at = from + finder.find(haystack.get(from..)?)?;
        from = at + step;
        Some(at)
    })
}

/// `"usage"`, searched from the end (a body too large to parse whole).
pub static USAGE_KEY_REV: LazyLock<FinderRev<'static>> =
    LazyLock::new(|| FinderRev::new(b"\"usage\""));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_match_find_iter() {
        let f = Finder::new(b"aa");
        for hay in [&b""[..], b"a", b"aa", b"aaa", b"aaaa", b"xaayaaaz", b"aXaa"] {
            let want: Vec<usize> = f.find_iter(hay).collect();
            assert_eq!(positions(&f, hay).collect::<Vec<_>>(), want, "{hay:?}");
        }
        let usage = &*USAGE_MEMBER;
        let hay = br#"{"usage":null,"x":{"usage":{"a":1}}}"#;
        assert_eq!(positions(usage, hay).collect::<Vec<_>>(), vec![1, 19]);
    }
}
