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
    URL_KEY = b"\"url\"";
    FILE_ID_KEY = b"\"file_id\"";
    FILE_URL_KEY = b"\"file_url\"";
}

/// `"usage"`, searched from the end (a body too large to parse whole).
pub static USAGE_KEY_REV: LazyLock<FinderRev<'static>> =
    LazyLock::new(|| FinderRev::new(b"\"usage\""));
