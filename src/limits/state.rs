//! Budget state across restarts: a snapshot of the ledger at a spool
//! position, plus the spool events after it.
//!
//! Each event's effect on the ledger travels with its line into the spool
//! as a [`Note`]; the spool keeps the notes of the lines it writes, under
//! its write lock. Once a second the keeper takes them together with the
//! log's end (one swap under that lock; also at once when a full spool
//! under `drop_oldest` waits for it), folds them into its own ledger,
//! which then covers exactly the log up to that end, writes
//! `state/ledger.json` atomically and commits its cursor (`_state`) so
//! older segments can go.
//! Nothing re-reads the log while running (that parse was 12% of the
//! instructions of a call). On start the snapshot is loaded and the events
//! after its position are replayed from the spool: each event counted once,
//! whether the last run stopped cleanly or was killed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::ledger::{KeyKind, Ledger};
use crate::spool::{Spool, SpoolError};

/// The spool cursor of the state keeper.
pub const CURSOR: &str = "_state";
const EVERY: Duration = Duration::from_secs(1);
/// A keeper that has shown no sign of life (a commit, or a tick with
/// nothing to commit) for this long no longer holds the spool's
/// `drop_oldest` back (see [`crate::spool::Spool::follow`]).
pub const STALE_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    position: u64,
    ledger: Ledger,
}

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("state").join("ledger.json")
}

/// Loads the snapshot and replays the spool after it.
pub async fn recover(data_dir: &Path, spool: &Arc<Spool>) -> Result<(Ledger, u64), SpoolError> {
    let mut snap: Snapshot = match std::fs::read(path(data_dir)) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| SpoolError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
        Err(e) => return Err(e.into()),
    };
    if snap.position > spool.end() {
        // Taken past what recovery kept (a power loss before the spool's
        // sync). Saved at the end at once, as the sink cursors are (see
        // `Spool::open`): the next lines reuse those positions.
        tracing::warn!(
            snapshot = snap.position,
            end = spool.end(),
            "budget snapshot past the recovered spool end (a power loss); moved back to the end"
        );
        snap.position = spool.end();
        store(data_dir, &snap)?;
    }
    let mut ledger = snap.ledger;
    let mut reader = spool.reader_at(CURSOR, snap.position)?;
    // To the end of the log: an empty read that moved the position (over
    // a gap a power loss left) is not the end; one that moved nothing is.
    loop {
        let before = reader.position();
        let batch = reader.try_batch(4096, 8 << 20).await?;
        for line in &batch.lines {
            apply(&mut ledger, line);
        }
        if batch.lines.is_empty() && reader.position() == before {
            break;
        }
    }
    let position = reader.position();
    ledger.prune(OffsetDateTime::now_utc());
    Ok((ledger, position))
}

/// The few fields of an event the ledger needs, borrowed from the line;
/// everything else is skipped without building a JSON tree.
#[derive(Deserialize)]
struct View<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    time: &'a str,
    #[serde(borrow)]
    data: DataView<'a>,
}

#[derive(Deserialize)]
struct DataView<'a> {
    #[serde(borrow)]
    tenant: std::borrow::Cow<'a, str>,
    #[serde(default)]
    cost: Option<rust_decimal::Decimal>,
    #[serde(default)]
    amount: Option<rust_decimal::Decimal>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// What one event changes in the ledger, handed to the spool with its line.
/// `at` is the event's `time` (milliseconds), so a replay agrees.
#[derive(Debug)]
pub enum Note {
    Spend {
        tenant: String,
        amount: Decimal,
        at: OffsetDateTime,
    },
    Credit {
        tenant: String,
        amount: Decimal,
        at: OffsetDateTime,
        /// The credit's idempotency key, if the admin call gave one.
        key: Option<String>,
    },
    Key {
        tenant: String,
        key: String,
        at: OffsetDateTime,
    },
}

impl Note {
    /// Folds the note into the ledger, as [`apply`] folds its line.
    pub fn apply(&self, ledger: &mut Ledger) {
        match self {
            Note::Spend { tenant, amount, at } => ledger.spend(tenant, *amount, *at),
            Note::Credit {
                tenant,
                amount,
                at,
                key,
            } => {
                ledger.credit(tenant, *amount, *at);
                if let Some(key) = key {
                    ledger.remember_key(KeyKind::Credit, tenant, key, *at);
                }
            }
            Note::Key { tenant, key, at } => {
                ledger.remember_key(KeyKind::Outcome, tenant, key, *at);
            }
        }
    }
}

/// Folds one spool line into the ledger (recovery).
pub fn apply(ledger: &mut Ledger, line: &[u8]) {
    let Ok(v) = serde_json::from_slice::<View<'_>>(line) else {
        tracing::error!("state: unreadable event line in the spool; skipped");
        return;
    };
    let Ok(at) = OffsetDateTime::parse(v.time, &Rfc3339) else {
        return;
    };
    let d = v.data;
    match v.kind {
        "llm.call" | "tool.call" => {
            if let Some(cost) = d.cost {
                ledger.spend(&d.tenant, cost, at);
            }
        }
        "credit" => {
            if let Some(amount) = d.amount {
                ledger.credit(&d.tenant, amount, at);
            }
            if let Some(k) = d.idempotency_key {
                ledger.remember_key(KeyKind::Credit, &d.tenant, &k, at);
            }
        }
        "outcome" => {
            if let Some(k) = d.idempotency_key {
                ledger.remember_key(KeyKind::Outcome, &d.tenant, &k, at);
            }
        }
        _ => {}
    }
}

fn store(data_dir: &Path, snap: &Snapshot) -> std::io::Result<()> {
    let p = path(data_dir);
    std::fs::create_dir_all(p.parent().expect("has a parent"))?;
    let bytes = serde_json::to_vec(snap).expect("ledger serializes");
    crate::spool::replace_file(&p, &bytes)
}

/// Keeps the snapshot current until `shutdown`, then writes a last one.
/// `ledger` covers the spool up to `position`; the spool must be following
/// (see [`crate::spool::Spool::follow`]) since then.
pub async fn keep(
    data_dir: PathBuf,
    spool: Arc<Spool>,
    mut ledger: Ledger,
    position: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut saved = position;
    let mut tick = tokio::time::interval(EVERY);
    // Pruning walks every outcome key: once a minute, not every snapshot.
    let mut pruned = tokio::time::Instant::now();
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            // A full spool waits to drop segments this snapshot would cover.
            _ = spool.commit_wanted() => false,
            _ = crate::server::stopped(&mut shutdown) => true,
        };
        let Some((position, notes)) = spool.take_notes() else {
            // Notes were dropped: this ledger no longer matches the log. The
            // last snapshot stands; a restart replays the spool after it.
            tracing::error!("state keeper: notes lost; budget snapshots stop until a restart");
            return;
        };
        for n in &notes {
            n.apply(&mut ledger);
        }
        if position == saved {
            // Alive with nothing to cover: a full spool need not wait.
            spool.follower_alive();
        } else {
            if pruned.elapsed() >= std::time::Duration::from_secs(60) {
                ledger.prune(OffsetDateTime::now_utc());
                pruned = tokio::time::Instant::now();
            }
            let snap = Snapshot { position, ledger };
            let dir = data_dir.clone();
            let sp = spool.clone();
            // Snapshot, then the cursor it allows: four fsyncs in all, on
            // the blocking pool, off the one-thread main runtime.
            let (snap, stored, committed) = tokio::task::spawn_blocking(move || {
                let stored = store(&dir, &snap);
                let cursor = crate::spool::Cursor {
                    position: snap.position,
                    sink_offset: None,
                };
                let committed = stored.is_ok().then(|| sp.commit(CURSOR, cursor));
                (snap, stored, committed)
            })
            .await
            .expect("snapshot write does not panic");
            ledger = snap.ledger;
            match (stored, committed) {
                (Err(e), _) => {
                    tracing::error!(error = %e, "cannot write the budget snapshot; retrying");
                }
                (Ok(()), committed) => {
                    saved = position;
                    if let Some(Err(e)) = committed {
                        tracing::error!(error = %e, "state keeper cannot commit its cursor");
                    }
                }
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Fsync, SpoolPolicy, WhenFull};
    use crate::spool::Flush;

    /// Replaying the spool restores a credit's amount and its key, and an
    /// outcome's key, each under its own kind.
    #[test]
    fn replay_restores_credit_and_outcome_keys() {
        let mut ledger = Ledger::default();
        let credit = r#"{"type":"credit","time":"2026-11-23T20:00:00.123Z","data":{"tenant":"acme","amount":"25","currency":"USD","reason":"","idempotency_key":"topup-1"}}"#;
        let outcome = r#"{"type":"outcome","time":"2026-11-23T20:00:01Z","data":{"tenant":"acme","name":"x","quantity":"1","idempotency_key":"o-1"}}"#;
        apply(&mut ledger, credit.as_bytes());
        apply(&mut ledger, outcome.as_bytes());
        assert_eq!(
            ledger.tenant("acme").unwrap().total_credits,
            Decimal::from(25)
        );
        assert!(ledger.knows_key(KeyKind::Credit, "acme", "topup-1"));
        assert!(!ledger.knows_key(KeyKind::Outcome, "acme", "topup-1"));
        assert!(ledger.knows_key(KeyKind::Outcome, "acme", "o-1"));
        assert!(!ledger.knows_key(KeyKind::Credit, "acme", "o-1"));
    }

    fn spend_line(cost: &str) -> Vec<u8> {
        format!(
            "{{\"type\":\"llm.call\",\"time\":\"2026-11-24T10:00:00Z\",\"data\":{{\"tenant\":\"t\",\"cost\":\"{cost}\"}}}}\n"
        )
        .into_bytes()
    }

    fn open(dir: &Path) -> Arc<Spool> {
        let policy = SpoolPolicy {
            max_bytes: 1 << 20,
            when_full: WhenFull::Reject,
            fsync: Fsync::Never,
            segment_bytes: 1 << 20,
        };
        Spool::open(&dir.join("spool"), policy, &[CURSOR.to_string()]).unwrap()
    }

    fn total(ledger: &Ledger) -> Decimal {
        let at = OffsetDateTime::parse("2026-11-24T12:00:00Z", &Rfc3339).unwrap();
        ledger.tenant("t").map_or(Decimal::ZERO, |t| {
            t.window(crate::config::Window::Total, at).0
        })
    }

    /// A snapshot taken past what a power loss left of the spool is saved
    /// back at the end when recovered: the lines appended next reuse those
    /// positions, and a second restart before the next snapshot replays
    /// them all, from the start of the first.
    #[tokio::test]
    async fn a_snapshot_past_the_recovered_end_is_saved_back_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        for _ in 0..3 {
            spool.append(spend_line("1"), Flush::Batch).await.unwrap();
        }
        let end = spool.end();
        spool.close().await;
        drop(spool);
        // The snapshot covers two more lines than the disk kept.
        let mut ledger = Ledger::default();
        let at = OffsetDateTime::parse("2026-11-24T10:00:00Z", &Rfc3339).unwrap();
        ledger.spend("t", Decimal::from(5), at);
        let past = end + 2 * spend_line("1").len() as u64;
        store(
            dir.path(),
            &Snapshot {
                position: past,
                ledger,
            },
        )
        .unwrap();

        let spool = open(dir.path());
        let (ledger, position) = recover(dir.path(), &spool).await.unwrap();
        assert_eq!((total(&ledger), position), (Decimal::from(5), end));
        // New lines, then a restart with no snapshot after them.
        spool
            .append(spend_line("0.25"), Flush::Batch)
            .await
            .unwrap();
        spool.append(spend_line("0.5"), Flush::Batch).await.unwrap();
        spool.close().await;
        drop(spool);

        let spool = open(dir.path());
        let (ledger, _) = recover(dir.path(), &spool).await.unwrap();
        assert_eq!(total(&ledger), Decimal::new(575, 2));
        spool.close().await;
    }
}
