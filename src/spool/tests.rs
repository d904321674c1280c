use super::*;
use crate::config::{Fsync, SpoolPolicy, WhenFull};

fn policy(max_bytes: u64, segment_bytes: u64, when_full: WhenFull) -> SpoolPolicy {
    SpoolPolicy {
        max_bytes,
        when_full,
        fsync: Fsync::Never,
        segment_bytes,
    }
}

/// Waits for events, then reads them.
async fn next(r: &mut Reader, max_events: usize, max_bytes: usize) -> Result<Batch, SpoolError> {
    r.wait_data().await?;
    r.try_batch(max_events, max_bytes).await
}

fn line(i: usize) -> Vec<u8> {
    format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(40)).into_bytes()
}

#[tokio::test]
async fn appends_read_back_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec!["a".to_string()];
    let spool = Spool::open(dir.path(), policy(1 << 20, 4096, WhenFull::Reject), &sinks).unwrap();
    for i in 0..300 {
        spool.append(line(i)).await.unwrap();
    }
    assert!(
        segments::list(dir.path()).unwrap().len() > 1,
        "should roll segments"
    );
    let mut r = spool.reader("a").unwrap();
    let mut seen = Vec::new();
    while seen.len() < 300 {
        let b = next(&mut r, 64, 1 << 20).await.unwrap();
        for l in &b.lines {
            seen.push(l.to_vec());
        }
        r.commit(b.end, None).unwrap();
    }
    assert_eq!(seen, (0..300).map(line).collect::<Vec<_>>());
    // Delivered segments are gone, the active one stays.
    assert_eq!(segments::list(dir.path()).unwrap().len(), 1);
    spool.close().await;
}

#[tokio::test]
async fn recovers_torn_tail_and_resumes_from_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec!["a".to_string()];
    {
        let spool = Spool::open(
            dir.path(),
            policy(1 << 20, 1 << 20, WhenFull::Reject),
            &sinks,
        )
        .unwrap();
        for i in 0..10 {
            spool.append(line(i)).await.unwrap();
        }
        let mut r = spool.reader("a").unwrap();
        let b = next(&mut r, 4, 1 << 20).await.unwrap();
        r.commit(b.end, Some(123)).unwrap();
        spool.close().await;
    }
    // A crash mid-write leaves half a line.
    let seg = segments::path(dir.path(), 0);
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, b"{\"n\":10,\"pa").unwrap();
    drop(f);

    let spool = Spool::open(
        dir.path(),
        policy(1 << 20, 1 << 20, WhenFull::Reject),
        &sinks,
    )
    .unwrap();
    let mut r = spool.reader("a").unwrap();
    assert_eq!(r.sink_offset(), Some(123));
    let b = next(&mut r, 100, 1 << 20).await.unwrap();
    assert_eq!(b.lines.len(), 6);
    assert_eq!(&b.lines[0][..], &line(4)[..]);
    spool.append(line(10)).await.unwrap();
    let b = next(&mut r, 100, 1 << 20).await.unwrap();
    assert_eq!(&b.lines[..], &[bytes::Bytes::from(line(10))]);
    spool.close().await;
}

#[tokio::test]
async fn full_spool_rejects_or_drops_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec!["slow".to_string()];
    let spool = Spool::open(dir.path(), policy(8192, 2048, WhenFull::Reject), &sinks).unwrap();
    for i in 0..200 {
        spool.append(line(i)).await.unwrap();
    }
    assert!(matches!(
        spool.check_capacity(),
        Err(SpoolError::Full { .. })
    ));
    spool.close().await;

    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), policy(8192, 2048, WhenFull::DropOldest), &sinks).unwrap();
    for i in 0..200 {
        spool.append(line(i)).await.unwrap();
    }
    spool.check_capacity().unwrap();
    assert!(spool.backlog_bytes() < 8192);
    assert!(spool.stats.dropped_bytes.load(Ordering::Relaxed) > 0);
    // The slow sink resumes at the oldest event still there: the newest survive.
    let mut r = spool.reader("slow").unwrap();
    let b = next(&mut r, 1000, 1 << 20).await.unwrap();
    assert_eq!(b.lines.last().unwrap().to_vec(), line(199));
    spool.close().await;
}
