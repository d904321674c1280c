//! The file sink: appends event lines to a JSONL file. The file's length is
//! saved with the cursor, so after a crash the sink cuts off a batch it wrote
//! but had not committed and writes it again: no duplicate, no gap.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::{BoxFuture, Delivered, Sink, SinkError};
use crate::spool::Batch;

pub struct FileSink {
    path: PathBuf,
    file: Option<Arc<std::fs::File>>,
    len: u64,
}

impl FileSink {
    pub fn new(path: PathBuf) -> FileSink {
        FileSink {
            path,
            file: None,
            len: 0,
        }
    }

    async fn open(&mut self, saved: Option<u64>) -> Result<(), SinkError> {
        // Errors name the file: a wrong mount path should say which.
        let at = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display()))
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(at)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(at)?;
        let on_disk = file.metadata().map_err(at)?.len();
        self.len = match saved {
            // Written after the last commit: it will be written again.
            Some(saved) if saved < on_disk => {
                file.set_len(saved).map_err(at)?;
                tracing::info!(path = %self.path.display(), cut_bytes = on_disk - saved, "file sink: removed lines written after the last commit");
                saved
            }
            // Shorter than we left it: rotated or truncated by someone else.
            _ => on_disk,
        };
        self.file = Some(Arc::new(file));
        Ok(())
    }
}

impl Sink for FileSink {
    fn sync(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async {
            // No open file: the last write failed and so did the reopen, so
            // what it wrote is not known to be on disk.
            let f = self.file.clone().ok_or_else(|| {
                std::io::Error::other(format!("{}: not open", self.path.display()))
            })?;
            blocking(move || f.sync_data()).await?;
            Ok(())
        })
    }

    fn start(&mut self, saved: Option<u64>) -> BoxFuture<'_, Result<Option<u64>, SinkError>> {
        Box::pin(async move {
            // If the open fails, the next delivery reopens at `saved`.
            self.file = None;
            if let Some(saved) = saved {
                self.len = saved;
            }
            self.open(saved).await?;
            Ok(Some(self.len))
        })
    }

    fn deliver<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<Delivered, SinkError>> {
        Box::pin(async move {
            if self.file.is_none() {
                // After a failed write (and a failed reopen), cut back to
                // what was delivered: a torn batch would stay in the file.
                self.open(Some(self.len)).await?;
            }
            let file = self.file.clone().expect("opened above");
            let mut buf = Vec::with_capacity(batch.bytes());
            for line in &batch.lines {
                buf.extend_from_slice(line);
            }
            let len = buf.len() as u64;
            // One `write` on a blocking thread for the whole batch.
            if let Err(e) = blocking(move || (&*file).write_all(&buf)).await {
                // Reopen next time, cutting back to the committed length.
                self.file = None;
                let _ = self.open(Some(self.len)).await;
                return Err(e.into());
            }
            self.len += len;
            Ok(Delivered {
                sink_offset: Some(self.len),
                dead_lettered: 0,
            })
        })
    }
}

async fn blocking(f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> std::io::Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn batch(lines: &[&'static str]) -> Batch {
        Batch {
            lines: lines
                .iter()
                .map(|l| Bytes::from_static(l.as_bytes()))
                .collect(),
            end: 0,
        }
    }

    /// A write failed and so did the reopen right after it: the next
    /// delivery still cuts the file back to the last delivered length.
    #[tokio::test]
    async fn a_retry_after_a_failed_reopen_cuts_the_torn_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut sink = FileSink::new(path.clone());
        assert_eq!(sink.start(None).await.unwrap(), Some(0));
        sink.deliver(&batch(&["{\"a\":1}\n"])).await.unwrap();
        // What the failure left: a torn line, and no open file.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"b\":"))
            .unwrap();
        sink.file = None;
        sink.deliver(&batch(&["{\"b\":2}\n"])).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n"
        );
    }

    /// With no open file (a write failed and so did the reopen) nothing is
    /// known to be on disk: the sync fails, so the cursor does not move
    /// past the batches written through the old handle.
    #[tokio::test]
    async fn a_sync_with_no_open_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(dir.path().join("events.jsonl"));
        sink.start(None).await.unwrap();
        sink.deliver(&batch(&["{\"a\":1}\n"])).await.unwrap();
        sink.sync().await.unwrap();
        sink.file = None;
        assert!(sink.sync().await.is_err());
    }
}
