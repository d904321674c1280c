//! A sink's cursor: the spool position it has delivered up to, and for sinks
//! that write a file, that file's length at that point (so a restart can cut
//! off a batch written but not committed, and never duplicate a line).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub position: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_offset: Option<u64>,
}

fn path(dir: &Path, sink: &str) -> PathBuf {
    dir.join("cursors").join(format!("{sink}.json"))
}

pub fn load(dir: &Path, sink: &str) -> std::io::Result<Option<Cursor>> {
    match std::fs::read(path(dir, sink)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the cursor atomically and durably.
pub fn store(dir: &Path, sink: &str, cursor: &Cursor) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(cursor).expect("cursor serializes");
    super::replace_file(&path(dir, sink), &bytes)
}
