//! Budget state across restarts: a snapshot of the ledger at a spool
//! position, plus the spool events after it.
//!
//! The keeper is a reader of the spool like a sink (cursor `_state`): it
//! folds every event into its own copy of the ledger and, now and then,
//! writes `state/ledger.json` (atomically) with the position it covers,
//! then commits its cursor so older segments can go. On start the snapshot
//! is loaded and the events after its position replayed: each event counted
//! once, whether the last run stopped cleanly or was killed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::ledger::Ledger;
use crate::spool::{Spool, SpoolError};

/// The spool cursor of the state keeper.
pub const CURSOR: &str = "_state";
const EVERY: Duration = Duration::from_secs(1);

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
    let snap: Snapshot = match std::fs::read(path(data_dir)) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| SpoolError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
        Err(e) => return Err(e.into()),
    };
    let mut ledger = snap.ledger;
    let mut reader = spool.reader_at(CURSOR, snap.position)?;
    loop {
        let batch = reader.try_batch(4096, 8 << 20).await?;
        if batch.lines.is_empty() {
            break;
        }
        for line in &batch.lines {
            apply(&mut ledger, line);
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

/// Folds one spool line into the ledger.
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
        }
        "outcome" => {
            if let Some(k) = d.idempotency_key {
                ledger.remember_key(&d.tenant, &k, at);
            }
        }
        _ => {}
    }
}

fn store(data_dir: &Path, snap: &Snapshot) -> std::io::Result<()> {
    let p = path(data_dir);
    std::fs::create_dir_all(p.parent().expect("has a parent"))?;
    let tmp = p.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(snap).expect("ledger serializes"))?;
    f.sync_data()?;
    std::fs::rename(&tmp, &p)
}

/// Keeps the snapshot current until `shutdown`, then writes a last one.
pub async fn keep(
    data_dir: PathBuf,
    spool: Arc<Spool>,
    mut ledger: Ledger,
    position: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reader = match spool.reader_at(CURSOR, position) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "state keeper cannot read the spool");
            return;
        }
    };
    let mut saved = position;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            _ = crate::server::stopped(&mut shutdown) => true,
        };
        loop {
            match reader.try_batch(4096, 8 << 20).await {
                Ok(b) if b.lines.is_empty() => break,
                Ok(b) => b.lines.iter().for_each(|l| apply(&mut ledger, l)),
                Err(e) => {
                    tracing::error!(error = %e, "state keeper read failed");
                    break;
                }
            }
        }
        let position = reader.position();
        if position != saved {
            ledger.prune(OffsetDateTime::now_utc());
            let snap = Snapshot { position, ledger };
            let dir = data_dir.clone();
            let result = tokio::task::spawn_blocking(move || store(&dir, &snap).map(|_| snap))
                .await
                .expect("snapshot write does not panic");
            match result {
                Ok(snap) => {
                    ledger = snap.ledger;
                    saved = position;
                    if let Err(e) = reader.commit(position, None) {
                        tracing::error!(error = %e, "state keeper cannot commit its cursor");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot write the budget snapshot");
                    return;
                }
            }
        }
        if stop {
            return;
        }
    }
}
