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

/// A spool of 1 MiB segments and bound, refusing when full, never synced.
fn open(dir: &std::path::Path, sinks: &[String]) -> Arc<Spool> {
    Spool::open(dir, policy(1 << 20, 1 << 20, WhenFull::Reject), sinks).unwrap()
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
        spool.append(line(i), Flush::Batch).await.unwrap();
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
        r.commit(b.end, None).await.unwrap();
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
        let spool = open(dir.path(), &sinks);
        for i in 0..10 {
            spool.append(line(i), Flush::Batch).await.unwrap();
        }
        let mut r = spool.reader("a").unwrap();
        let b = next(&mut r, 4, 1 << 20).await.unwrap();
        r.commit(b.end, Some(123)).await.unwrap();
        spool.close().await;
    }
    // A crash mid-write leaves half a line.
    let seg = segments::path(dir.path(), 0);
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, b"{\"n\":10,\"pa").unwrap();
    drop(f);

    let spool = open(dir.path(), &sinks);
    let mut r = spool.reader("a").unwrap();
    assert_eq!(r.sink_offset(), Some(123));
    let b = next(&mut r, 100, 1 << 20).await.unwrap();
    assert_eq!(b.lines.len(), 6);
    assert_eq!(&b.lines[0][..], &line(4)[..]);
    spool.append(line(10), Flush::Batch).await.unwrap();
    let b = next(&mut r, 100, 1 << 20).await.unwrap();
    assert_eq!(&b.lines[..], &[bytes::Bytes::from(line(10))]);
    spool.close().await;
}

/// A power loss kept less of the spool than a sink had committed (its cursor
/// is synced at each commit, the spool only every interval). The cursor is
/// saved back at the end at once: after new lines reuse those positions, a
/// second restart before the sink commits again starts at the first new
/// line, not inside one.
#[tokio::test]
async fn a_cursor_past_the_recovered_end_is_saved_back_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec!["s".to_string()];
    let line_len = line(0).len() as u64;
    {
        let spool = open(dir.path(), &sinks);
        for i in 0..10 {
            spool.append(line(i), Flush::Batch).await.unwrap();
        }
        let mut r = spool.reader("s").unwrap();
        let b = next(&mut r, 100, 1 << 20).await.unwrap();
        assert_eq!(b.lines.len(), 10);
        r.commit(b.end, Some(777)).await.unwrap();
        spool.close().await;
    }
    // The power loss: only five lines reached the disk.
    let seg = segments::path(dir.path(), 0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(5 * line_len)
        .unwrap();
    {
        let spool = open(dir.path(), &sinks);
        assert_eq!(spool.reader("s").unwrap().position(), 5 * line_len);
        for i in 100..110 {
            spool.append(line(i), Flush::Batch).await.unwrap();
        }
        spool.close().await;
    }
    let spool = open(dir.path(), &sinks);
    let mut r = spool.reader("s").unwrap();
    assert_eq!(r.position(), 5 * line_len);
    // The file sink's own offset is kept: what it wrote stays written.
    assert_eq!(r.sink_offset(), Some(777));
    let b = next(&mut r, 100, 1 << 20).await.unwrap();
    assert_eq!(
        b.lines.iter().map(|l| l.to_vec()).collect::<Vec<_>>(),
        (100..110).map(line).collect::<Vec<_>>()
    );
    spool.close().await;
}

#[tokio::test]
async fn full_spool_rejects_or_drops_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec!["slow".to_string()];
    let spool = Spool::open(dir.path(), policy(8192, 2048, WhenFull::Reject), &sinks).unwrap();
    for i in 0..200 {
        spool.append(line(i), Flush::Batch).await.unwrap();
    }
    assert!(matches!(
        spool.check_capacity(),
        Err(SpoolError::Full { .. })
    ));
    spool.close().await;

    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), policy(8192, 2048, WhenFull::DropOldest), &sinks).unwrap();
    for i in 0..200 {
        spool.append(line(i), Flush::Batch).await.unwrap();
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

#[tokio::test]
async fn drop_oldest_waits_for_the_followers_commit() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec!["slow".to_string(), "_state".to_string()];
    let spool = Spool::open(dir.path(), policy(8192, 2048, WhenFull::DropOldest), &sinks).unwrap();
    spool.follow("_state", Duration::from_secs(10));
    for i in 0..200 {
        spool.append(line(i), Flush::Batch).await.unwrap();
    }
    // The follower's snapshot covers nothing yet: a restart would replay
    // the whole log, so nothing goes, and the follower is asked to commit.
    spool.check_capacity().unwrap();
    assert_eq!(spool.stats.dropped_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(spool.disk_bytes(), spool.end());
    tokio::time::timeout(Duration::from_secs(1), spool.commit_wanted())
        .await
        .expect("the follower is asked to commit");
    // It commits half-way: segments before that point may go, not after.
    let half = spool.end() / 2;
    let cursor = |position| Cursor {
        position,
        sink_offset: None,
    };
    spool.commit("_state", cursor(half)).unwrap();
    spool.check_capacity().unwrap();
    let start = spool.end() - spool.disk_bytes();
    assert!(start > 0 && start <= half, "start {start}, half {half}");
    // Caught up: the spool is bounded again.
    spool.commit("_state", cursor(spool.end())).unwrap();
    spool.check_capacity().unwrap();
    assert!(spool.backlog_bytes() < 8192);
    spool.close().await;

    // A follower that is alive but had nothing to commit for a while still
    // holds the spool back; one that shows no sign of life does not.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), policy(8192, 2048, WhenFull::DropOldest), &sinks).unwrap();
    spool.follow("_state", Duration::from_millis(200));
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        spool.follower_alive();
    }
    for i in 0..200 {
        spool.append(line(i), Flush::Batch).await.unwrap();
    }
    spool.check_capacity().unwrap();
    assert_eq!(spool.stats.dropped_bytes.load(Ordering::Relaxed), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    spool.check_capacity().unwrap();
    assert!(spool.backlog_bytes() < 8192);
    spool.close().await;
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused_while_the_first_lives() {
    let dir = tempfile::tempdir().unwrap();
    let policy = || policy(1 << 20, 1 << 20, WhenFull::Reject);
    let first = Spool::open(dir.path(), policy(), &[]).unwrap();
    match Spool::open(dir.path(), policy(), &[]) {
        Err(SpoolError::InUse(d)) => assert_eq!(d, dir.path()),
        other => panic!("expected InUse, got {:?}", other.map(|_| ())),
    }
    first.close().await;
    drop(first);
    Spool::open(dir.path(), policy(), &[])
        .unwrap()
        .close()
        .await;
}

/// Everything written to the log so far, as lines.
fn written_lines(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for s in segments::list(dir).unwrap() {
        all.extend(std::fs::read(segments::path(dir, s.start)).unwrap());
    }
    all.split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn appends_in_one_scheduler_pass_share_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), &[]);
    let appends: Vec<_> = (0..10)
        .map(|i| spool.append(line(i), Flush::Batch))
        .collect();
    let ends: Vec<u64> = futures_util::future::join_all(appends)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        spool.stats.writes.load(Ordering::Relaxed),
        1,
        "one write for the pass"
    );
    // Each append learns where its own line ends.
    let mut at = 0;
    for (i, end) in ends.iter().enumerate() {
        at += line(i).len() as u64;
        assert_eq!(*end, at);
    }
    assert_eq!(
        written_lines(dir.path()),
        (0..10).map(line).collect::<Vec<_>>()
    );
    // `Flush::Now` writes at once, taking along what is pending.
    let pending = spool.append(line(10), Flush::Batch);
    let now = spool.append(line(11), Flush::Now);
    assert_eq!(spool.stats.writes.load(Ordering::Relaxed), 2);
    assert!(futures_util::FutureExt::now_or_never(now).unwrap().is_ok());
    assert!(futures_util::FutureExt::now_or_never(pending)
        .unwrap()
        .is_ok());
    spool.close().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_append_is_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), &[]);
    // The caller goes away before the write: the scheduled flush writes it.
    drop(spool.append(line(1), Flush::Batch));
    tokio::task::yield_now().await;
    assert_eq!(written_lines(dir.path()), vec![line(1)]);
    // Closing writes what is still pending, before the flush task runs.
    drop(spool.append(line(2), Flush::Batch));
    spool.close().await;
    assert_eq!(written_lines(dir.path()), vec![line(1), line(2)]);
}

#[test]
fn a_flush_whose_runtime_shuts_down_still_writes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let spool = rt.block_on(async {
        let spool = open(dir.path(), &[]);
        drop(spool.append(line(7), Flush::Batch));
        spool
    });
    // The flush task never ran; dropping the runtime drops it, and that writes.
    assert!(written_lines(dir.path()).is_empty());
    drop(rt);
    assert_eq!(written_lines(dir.path()), vec![line(7)]);
    drop(spool);
}

#[tokio::test(flavor = "current_thread")]
async fn notes_cover_exactly_the_written_log() {
    use crate::limits::state::Note;
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), &[]);
    // Not following: nothing is kept.
    spool.append(line(0), Flush::Now).await.unwrap();
    assert!(spool.take_notes().is_none());
    spool.follow("_state", std::time::Duration::from_secs(10));
    let at = time::OffsetDateTime::now_utc();
    let spend = |amount: &str| {
        Some(Note::Spend {
            tenant: "t".into(),
            amount: amount.parse().unwrap(),
            at,
        })
    };
    let amounts = |notes: Vec<Note>| -> Vec<String> {
        notes
            .into_iter()
            .map(|n| match n {
                Note::Spend { amount, .. } => amount.to_string(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let l = |i: usize| line(i).len() as u64;
    spool
        .append_noted(line(1), spend("1.5"), Flush::Now)
        .await
        .unwrap();
    let pending = spool.append_noted(line(2), spend("2"), Flush::Batch);
    // Queued but not written: neither past the end nor among the notes.
    let (end, notes) = spool.take_notes().unwrap();
    assert_eq!(end, l(0) + l(1));
    assert_eq!(amounts(notes), ["1.5"]);
    pending.await.unwrap();
    // A line without a note adds none; each note is handed out once.
    spool.append(line(3), Flush::Now).await.unwrap();
    let (end, notes) = spool.take_notes().unwrap();
    assert_eq!(end, l(0) + l(1) + l(2) + l(3));
    assert_eq!(amounts(notes), ["2"]);
    assert_eq!(spool.take_notes().unwrap().1.len(), 0);
    spool.close().await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_append_after_close_is_refused_and_counted_lost() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), &[]);
    spool.close().await;
    let r = spool.append(line(1), Flush::Batch).await;
    assert!(matches!(r, Err(SpoolError::Closed)), "{r:?}");
    assert_eq!(spool.stats.lost_events.get(), 1);
    assert!(written_lines(dir.path()).is_empty());
}

/// `fsync = "always"` acknowledges an event only once it is on disk: a
/// failed sync fails the append, counts the event lost and refuses calls
/// for a moment, as a failed write does (it acknowledged the event).
#[tokio::test(flavor = "current_thread")]
async fn with_fsync_always_a_failed_sync_fails_the_append() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = policy(1 << 20, 1 << 20, WhenFull::Reject);
    p.fsync = Fsync::Always;
    use crate::limits::state::Note;
    let spool = Spool::open(dir.path(), p, &["a".to_string()]).unwrap();
    spool.follow("_state", std::time::Duration::from_secs(10));
    let note = |amount: &str| Note::Spend {
        tenant: "t".into(),
        amount: amount.parse().unwrap(),
        at: crate::event::event_instant(time::OffsetDateTime::now_utc()),
    };
    spool
        .append_noted(line(0), Some(note("1")), Flush::Batch)
        .await
        .unwrap();
    spool.log.fail_syncs.store(true, Ordering::Relaxed);
    let r = spool
        .append_noted(line(1), Some(note("2")), Flush::Batch)
        .await;
    assert!(r.is_err(), "acknowledged an event whose sync failed: {r:?}");
    assert_eq!(spool.stats.lost_events.get(), 1);
    assert!(spool.refuses_calls());
    spool.log.fail_syncs.store(false, Ordering::Relaxed);
    spool
        .append_noted(line(2), Some(note("3")), Flush::Batch)
        .await
        .unwrap();
    assert!(!spool.refuses_calls());
    // The lost event is gone: no sink reads it, and the state keeper never
    // counts it (a credit answered 503 took effect at the next restart).
    let mut r = spool.reader("a").unwrap();
    let b = next(&mut r, 64, 1 << 20).await.unwrap();
    assert_eq!(b.lines, [line(0), line(2)]);
    let (_, notes) = spool.take_notes().unwrap();
    let amounts: Vec<String> = notes
        .into_iter()
        .map(|n| match n {
            Note::Spend { amount, .. } => amount.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(amounts, ["1", "3"]);
    spool.close().await;
}

/// Appends line 0 and waits until the group-commit thread has taken it and
/// stopped at `hold` (held by the caller): the queue behind it then fills
/// in order, whenever the writer thread gets to run.
fn stall_writer(spool: &Spool) {
    drop(spool.append(line(0), Flush::Batch));
    let started = std::time::Instant::now();
    while spool.log.taken.load(Ordering::Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "writer never took line 0"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `fsync = "always"` on a disk that stalls: once the queue is full and
/// `WAITING_MAX` appends wait for room, new calls are refused (the waiting
/// appends stay bounded), and every waiting event is still written, in
/// order, when the disk moves again, though its callers went away.
#[tokio::test(flavor = "current_thread")]
// The lock stands for the stalled disk: only the writer thread waits on it.
#[allow(clippy::await_holding_lock)]
async fn with_fsync_always_a_stalled_disk_refuses_calls_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = policy(1 << 26, 1 << 26, WhenFull::Reject);
    p.fsync = Fsync::Always;
    let spool = Spool::open(dir.path(), p, &[]).unwrap();
    let held = spool.log.hold.lock().unwrap();
    stall_writer(&spool);
    let mut n = 1;
    while n < 4 * QUEUE && spool.check_capacity().is_ok() {
        drop(spool.append(line(n), Flush::Batch));
        n += 1;
    }
    // Line 0 with the writer, a full queue, WAITING_MAX waiting.
    assert_eq!(
        n,
        1 + QUEUE + WAITING_MAX,
        "calls admitted while the disk stalled"
    );
    assert!(matches!(spool.check_capacity(), Err(SpoolError::Behind(_))));
    assert!(spool.refuses_calls());
    assert!(!spool.has_room_for_refusals());
    // The waiting appends run (and wait) before the disk moves again.
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(held);
    let started = std::time::Instant::now();
    while spool.waiting.load(Ordering::Relaxed) > 0 || written_lines(dir.path()).len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not all written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        written_lines(dir.path()),
        (0..n).map(line).collect::<Vec<_>>()
    );
    assert_eq!(spool.stats.lost_events.get(), 0);
    assert!(spool.check_capacity().is_ok());
    spool.close().await;
}

/// Appends still waiting for room in the queue when the spool's runtime
/// shuts down are counted lost, not dropped silently.
#[test]
fn appends_waiting_when_the_runtime_shuts_down_are_counted_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = policy(1 << 26, 1 << 26, WhenFull::Reject);
    p.fsync = Fsync::Always;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let spool = rt.block_on(async { Spool::open(dir.path(), p, &[]).unwrap() });
    let held = spool.log.hold.lock().unwrap();
    rt.block_on(async { stall_writer(&spool) });
    let mut n = 1;
    rt.block_on(async {
        while spool.waiting.load(Ordering::Relaxed) < 10 {
            drop(spool.append(line(n), Flush::Batch));
            n += 1;
        }
    });
    assert_eq!(spool.stats.lost_events.get(), 0);
    drop(rt);
    assert_eq!(spool.waiting.load(Ordering::Relaxed), 0);
    assert_eq!(spool.stats.lost_events.get(), 10);
    drop(held);
    let started = std::time::Instant::now();
    while written_lines(dir.path()).len() < n - 10 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "queued lines not written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        written_lines(dir.path()),
        (0..n - 10).map(line).collect::<Vec<_>>()
    );
}

/// After a failed write calls are refused; past the hold the spool probes
/// the disk, and admits calls again only once it takes a write. Before,
/// the hold's end alone let every call through: with the disk still full,
/// all those admitted until one failed its write again lost their events.
#[tokio::test(flavor = "current_thread")]
async fn calls_stay_refused_until_the_disk_takes_a_write_again() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec!["a".to_string()];
    let spool = open(dir.path(), &sinks);
    let past_hold = |spool: &Spool| {
        let at = unix_ms() - FAILED_HOLD_MS - 1;
        spool.stats.failed_at_ms.store(at, Ordering::Relaxed);
    };
    // The probe runs on a thread of its own: refused until it succeeds.
    let admitted_within = |spool: &Spool, limit: Duration| {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if spool.check_capacity().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    };
    spool.log.fail_writes.store(true, Ordering::Relaxed);
    assert!(spool.append(line(0), Flush::Batch).await.is_err());
    assert!(spool.check_capacity().is_err());
    // The hold is over, the disk still refuses: the probe fails, and
    // calls stay refused.
    past_hold(&spool);
    assert!(spool.refuses_calls());
    assert!(!admitted_within(&spool, Duration::from_millis(300)));
    spool.log.fail_writes.store(false, Ordering::Relaxed);
    assert!(
        spool.check_capacity().is_err(),
        "held again after the failed probe"
    );
    // Past the hold, the probe's write succeeds: admitted.
    past_hold(&spool);
    assert!(admitted_within(&spool, Duration::from_secs(5)));
    assert!(!spool.refuses_calls());
    spool.append(line(1), Flush::Batch).await.unwrap();
    assert_eq!(written_lines(dir.path()), [line(1)]);
    // The probe leaves no file behind.
    assert!(!dir.path().join("probe").exists());
}

/// Under `fsync = "always"` a failed sync fails writes, so the probe syncs
/// its block too: a disk whose syncs fail is not taken for a good one.
#[tokio::test(flavor = "current_thread")]
async fn the_probe_syncs_under_always() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = policy(1 << 20, 1 << 20, WhenFull::Reject);
    p.fsync = Fsync::Always;
    let spool = Spool::open(dir.path(), p, &["a".to_string()]).unwrap();
    spool.log.fail_syncs.store(true, Ordering::Relaxed);
    assert!(spool.log.probe().is_err());
    spool.log.fail_syncs.store(false, Ordering::Relaxed);
    assert!(spool.log.probe().is_ok());
    // Under "never" the probe does not sync.
    let other = tempfile::tempdir().unwrap();
    let spool = open(other.path(), &["a".to_string()]);
    spool.log.fail_syncs.store(true, Ordering::Relaxed);
    assert!(spool.log.probe().is_ok());
}

/// A failed write whose bytes cannot be cut back stops appends until the
/// cut succeeds: a line written after the leftover would sit at a file
/// offset other than its log position (readers would read from the wrong
/// place) and a restart would read the leftover glued to it.
#[tokio::test(flavor = "current_thread")]
async fn appends_wait_for_a_failed_write_to_be_cut_back() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec!["a".to_string()];
    let spool = open(dir.path(), &sinks);
    spool.append(line(0), Flush::Batch).await.unwrap();
    spool.log.fail_writes.store(true, Ordering::Relaxed);
    spool.log.fail_cuts.store(true, Ordering::Relaxed);
    assert!(spool.append(line(1), Flush::Batch).await.is_err());
    spool.log.fail_writes.store(false, Ordering::Relaxed);
    // The disk takes writes again but the cut still fails: refused, not
    // written after half of line 1.
    assert!(spool.append(line(2), Flush::Batch).await.is_err());
    assert_eq!(spool.stats.lost_events.get(), 2);
    // Calls stay refused past the hold after a failed write while the cut
    // is pending (admitted, their events would be lost), and the probe
    // and admission retry the cut themselves: a spool refusing calls gets
    // no writes to retry it with.
    spool.stats.failed_at_ms.store(0, Ordering::Relaxed);
    assert!(spool.refuses_calls());
    assert!(spool.check_capacity().is_err());
    spool.log.fail_cuts.store(false, Ordering::Relaxed);
    assert!(!spool.refuses_calls());
    assert!(spool.check_capacity().is_ok());
    let end = spool.append(line(3), Flush::Batch).await.unwrap();
    assert_eq!(end, (line(0).len() + line(3).len()) as u64);
    assert_eq!(written_lines(dir.path()), [line(0), line(3)]);
    let mut r = spool.reader("a").unwrap();
    let b = next(&mut r, 64, 1 << 20).await.unwrap();
    assert_eq!(b.lines, [line(0), line(3)]);
    spool.close().await;
    drop((r, spool));
    // And after a restart.
    let spool = open(dir.path(), &sinks);
    let mut r = spool.reader("a").unwrap();
    let b = next(&mut r, 64, 1 << 20).await.unwrap();
    assert_eq!(b.lines, [line(0), line(3)]);
    spool.close().await;
}

/// A reader takes only what the writer published. Bytes of a write that is
/// failing are in the file until it cuts them back; delivered, they would
/// be events counted lost, and the cursor would land inside the lines
/// written over them next.
#[tokio::test(flavor = "current_thread")]
async fn readers_stop_at_the_published_end() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec!["a".to_string()];
    let spool = open(dir.path(), &sinks);
    spool.append(line(0), Flush::Batch).await.unwrap();
    let seg = segments::list(dir.path()).unwrap()[0].start;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(segments::path(dir.path(), seg))
        .unwrap();
    std::io::Write::write_all(&mut f, &line(1)).unwrap();
    let mut r = spool.reader("a").unwrap();
    let b = next(&mut r, 64, 1 << 20).await.unwrap();
    assert_eq!(b.lines, [line(0)]);
    assert_eq!(b.end, line(0).len() as u64);
    spool.close().await;
}

/// After a power loss with `fsync = "interval"`, an older segment can end
/// short or in a torn line (its tail, never synced) while its successor
/// starts where it would have ended. Readers deliver what survived and step
/// over the gap; they used to stop there for good, and the spool filled.
#[tokio::test(flavor = "current_thread")]
async fn a_torn_older_segment_after_a_power_loss_does_not_stall_readers() {
    for tail in [&line(1)[..10], &[0u8; 30][..], &[][..]] {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (line(0), line(1), line(2));
        let mut s0 = a.clone();
        s0.extend_from_slice(tail);
        std::fs::write(segments::path(dir.path(), 0), &s0).unwrap();
        let nominal_end = (a.len() + b.len()) as u64;
        std::fs::write(segments::path(dir.path(), nominal_end), &c).unwrap();
        let sinks = vec!["a".to_string()];
        let spool = open(dir.path(), &sinks);
        let mut r = spool.reader("a").unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let wait = std::time::Duration::from_secs(2);
            let b = tokio::time::timeout(wait, next(&mut r, 64, 1 << 20))
                .await
                .expect("the reader stalled at the torn segment")
                .unwrap();
            seen.extend(b.lines.iter().map(|l| l.to_vec()));
            r.commit(b.end, None).await.unwrap();
        }
        assert_eq!(seen, vec![a, c]);
        spool.close().await;
    }
}

/// Gaps that touch (a segment a power loss cut to nothing between two
/// others) are one: a reader steps over them at once, and the budget
/// replay, which reads until a read moves nothing, reaches the end.
#[tokio::test(flavor = "current_thread")]
async fn touching_gaps_are_stepped_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (line(0), line(1), line(2));
    let l = |x: &Vec<u8>| x.len() as u64;
    // A holds a (b was lost), B is empty (its one line was lost), C holds c.
    std::fs::write(segments::path(dir.path(), 0), &a).unwrap();
    std::fs::write(segments::path(dir.path(), l(&a) + l(&b)), b"").unwrap();
    std::fs::write(segments::path(dir.path(), l(&a) + 2 * l(&b)), &c).unwrap();
    assert_eq!(
        segments::gaps(&segments::list(dir.path()).unwrap()),
        [(l(&a), l(&a) + 2 * l(&b))]
    );
    let sinks = vec!["_state".to_string()];
    let spool = open(dir.path(), &sinks);
    let mut r = spool.reader_at("_state", 0).unwrap();
    let mut seen = Vec::new();
    loop {
        let before = r.position();
        let batch = r.try_batch(64, 1 << 20).await.unwrap();
        seen.extend(batch.lines.iter().map(|l| l.to_vec()));
        if batch.lines.is_empty() && r.position() == before {
            break;
        }
    }
    assert_eq!(seen, vec![a, c]);
    assert_eq!(r.position(), spool.end());
    // A snapshot ahead of what recovery kept starts at the end.
    assert_eq!(
        spool.reader_at("_state", 1 << 30).unwrap().position(),
        spool.end()
    );
    spool.close().await;
}
