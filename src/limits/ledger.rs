//! The ledger: spend and credits per tenant per UTC day, plus all-time totals.
//!
//! Windows are computed from it, not kept as counters that roll over: a
//! `day` window is today's entry, a `month` window the sum of this month's
//! days, `total` the all-time sums. Rollover is therefore exact at UTC
//! boundaries, and a reload that changes a tenant's window needs no
//! migration. Days older than [`KEEP_DAYS`] are pruned.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use time::{Date, OffsetDateTime};

use crate::config::Window;

/// Enough for the longest calendar month plus slack.
pub const KEEP_DAYS: i64 = 40;
/// How long an outcome event's idempotency key is remembered.
pub const KEEP_KEYS_DAYS: i64 = 7;
/// The most outcome idempotency keys remembered; past it the oldest eighth
/// is forgotten. About 40 bytes each in memory and 50 in the snapshot.
pub const MAX_OUTCOME_KEYS: usize = 100_000;
const _: () = assert!(MAX_OUTCOME_KEYS >= 8);

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Day {
    pub spent: Decimal,
    pub credits: Decimal,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct TenantLedger {
    /// Keyed by the UTC date, `YYYY-MM-DD` sorts chronologically.
    pub days: BTreeMap<Date, Day>,
    pub total_spent: Decimal,
    pub total_credits: Decimal,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ledger {
    pub tenants: crate::FastMap<String, TenantLedger>,
    #[serde(default)]
    outcome_keys: OutcomeKeys,
}

/// Which call an idempotency key belongs to: the same key may name an
/// outcome and a credit of one tenant without either hiding the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Outcome,
    Credit,
}

/// Idempotency keys (outcome events' and credits'), each held as a 128-bit
/// digest of `tenant\0key` (a credit's with a 0xFF byte before it, which no
/// UTF-8 tenant id starts with) with the unix second it was first seen: a fixed size
/// whatever the key's length, and no key text kept. At most
/// [`MAX_OUTCOME_KEYS`]. In the snapshot, 32 hex digits each; snapshots
/// from before the digests (`tenant\0key` itself) are read as well.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OutcomeKeys(HashMap<u128, i64>);

/// What remembering an outcome key did.
#[derive(Debug, PartialEq, Eq)]
pub enum Remembered {
    /// Already known: the outcome is a duplicate.
    Duplicate,
    /// Taken by an outcome still being recorded (see [`Ledger::begin_key`]).
    Pending,
    /// New; `forgot` older keys were forgotten to keep the count capped.
    Fresh { forgot: usize },
}

/// The first-seen time of a key whose outcome is still being recorded.
const PENDING: i64 = i64::MAX;

impl OutcomeKeys {
    fn digest(tenant_and_key: &[&[u8]]) -> u128 {
        let mut h = Sha256::new();
        for part in tenant_and_key {
            h.update(part);
        }
        let d = h.finalize();
        u128::from_be_bytes(d[..16].try_into().expect("32 bytes"))
    }

    fn of(kind: KeyKind, tenant: &str, key: &str) -> u128 {
        let (tenant, key) = (tenant.as_bytes(), key.as_bytes());
        match kind {
            KeyKind::Outcome => OutcomeKeys::digest(&[tenant, b"\0", key]),
            KeyKind::Credit => OutcomeKeys::digest(&[b"\xff", tenant, b"\0", key]),
        }
    }

    fn insert(&mut self, d: u128, at: i64) -> Remembered {
        match self.0.entry(d) {
            std::collections::hash_map::Entry::Occupied(o) if *o.get() == PENDING => {
                return Remembered::Pending
            }
            std::collections::hash_map::Entry::Occupied(_) => return Remembered::Duplicate,
            std::collections::hash_map::Entry::Vacant(v) => v.insert(at),
        };
        if self.0.len() <= MAX_OUTCOME_KEYS {
            return Remembered::Fresh { forgot: 0 };
        }
        Remembered::Fresh {
            forgot: self.forget_oldest(MAX_OUTCOME_KEYS - MAX_OUTCOME_KEYS / 8, Some(d)),
        }
    }

    /// Forgets the oldest keys by first-seen time (ties by digest, so
    /// exactly enough) until `to` are left, never `keep`; returns how many.
    fn forget_oldest(&mut self, to: usize, keep: Option<u128>) -> usize {
        let forgot = self.0.len().saturating_sub(to);
        if forgot == 0 {
            return 0;
        }
        let mut others: Vec<(i64, u128)> = self
            .0
            .iter()
            .filter(|(k, _)| Some(**k) != keep)
            .map(|(k, t)| (*t, *k))
            .collect();
        let (_, &mut newest_forgotten, _) = others.select_nth_unstable(forgot - 1);
        self.0
            .retain(|k, t| Some(*k) == keep || (*t, *k) > newest_forgotten);
        forgot
    }
}

impl Serialize for OutcomeKeys {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(d, t)| (format!("{d:032x}"), t)))
    }
}

impl<'de> Deserialize<'de> for OutcomeKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = HashMap::<String, i64>::deserialize(d)?;
        let mut keys = HashMap::with_capacity(raw.len());
        for (k, t) in raw {
            let digest = if k.contains('\0') {
                // Written before the digests: `tenant\0key` itself.
                OutcomeKeys::digest(&[k.as_bytes()])
            } else if k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit()) {
                u128::from_str_radix(&k, 16).expect("32 hex digits")
            } else {
                return Err(serde::de::Error::custom(format!(
                    "outcome key {k:?} is not 32 hex digits"
                )));
            };
            keys.insert(digest, t);
        }
        // A snapshot from before the cap can hold millions: down to it at
        // once, not an eighth at each new key.
        let mut keys = OutcomeKeys(keys);
        keys.forget_oldest(MAX_OUTCOME_KEYS, None);
        Ok(keys)
    }
}

/// Start of the window containing `now` (UTC), or `None` for `total`.
pub fn window_start(window: Window, now: OffsetDateTime) -> Option<OffsetDateTime> {
    let d = now.to_offset(time::UtcOffset::UTC).date();
    let start = match window {
        Window::Day => d,
        Window::Month => d.replace_day(1).expect("day 1 exists"),
        Window::Total => return None,
    };
    Some(start.midnight().assume_utc())
}

impl TenantLedger {
    /// Spend and credits in the window containing `now`.
    pub fn window(&self, window: Window, now: OffsetDateTime) -> (Decimal, Decimal) {
        match window_start(window, now) {
            None => (self.total_spent, self.total_credits),
            Some(start) => {
                let from = start.date();
                let to = now.to_offset(time::UtcOffset::UTC).date();
                self.days
                    .range(from..=to)
                    .fold((Decimal::ZERO, Decimal::ZERO), |(s, c), (_, d)| {
                        (s.saturating_add(d.spent), c.saturating_add(d.credits))
                    })
            }
        }
    }
}

impl Ledger {
    pub fn spend(&mut self, tenant: &str, amount: Decimal, at: OffsetDateTime) {
        if amount.is_zero() {
            return;
        }
        let t = self.tenant_mut(tenant);
        // Saturating, as every sum of money in the limits (see `budget`).
        let day = t.days.entry(utc_date(at)).or_default();
        day.spent = day.spent.saturating_add(amount);
        t.total_spent = t.total_spent.saturating_add(amount);
    }

    pub fn credit(&mut self, tenant: &str, amount: Decimal, at: OffsetDateTime) {
        let t = self.tenant_mut(tenant);
        let day = t.days.entry(utc_date(at)).or_default();
        day.credits = day.credits.saturating_add(amount);
        t.total_credits = t.total_credits.saturating_add(amount);
    }

    pub fn tenant(&self, tenant: &str) -> Option<&TenantLedger> {
        self.tenants.get(tenant)
    }

    /// The tenant's entry, made on first use (its key allocated only then).
    fn tenant_mut(&mut self, tenant: &str) -> &mut TenantLedger {
        if !self.tenants.contains_key(tenant) {
            self.tenants
                .insert(tenant.to_string(), TenantLedger::default());
        }
        self.tenants.get_mut(tenant).expect("just made")
    }

    /// Records an outcome key (forgetting the oldest past
    /// [`MAX_OUTCOME_KEYS`]).
    pub fn remember_key(
        &mut self,
        kind: KeyKind,
        tenant: &str,
        key: &str,
        at: OffsetDateTime,
    ) -> Remembered {
        self.outcome_keys
            .insert(OutcomeKeys::of(kind, tenant, key), at.unix_timestamp())
    }

    /// [`Ledger::remember_key`] for an outcome about to be recorded: the key
    /// is held as pending (a concurrent request with it is told so, not that
    /// it is a duplicate: the first may still fail) until
    /// [`Ledger::confirm_key`], or [`Ledger::forget_key`] if the outcome was
    /// not recorded. Pending keys are the newest, never forgotten first.
    pub fn begin_key(&mut self, kind: KeyKind, tenant: &str, key: &str) -> Remembered {
        self.outcome_keys
            .insert(OutcomeKeys::of(kind, tenant, key), PENDING)
    }

    /// The outcome of a pending key was recorded at `at`.
    pub fn confirm_key(&mut self, kind: KeyKind, tenant: &str, key: &str, at: OffsetDateTime) {
        if let Some(t) = self
            .outcome_keys
            .0
            .get_mut(&OutcomeKeys::of(kind, tenant, key))
        {
            *t = at.unix_timestamp();
        }
    }

    pub fn knows_key(&self, kind: KeyKind, tenant: &str, key: &str) -> bool {
        self.outcome_keys
            .0
            .contains_key(&OutcomeKeys::of(kind, tenant, key))
    }

    /// Forgets a key whose outcome was not recorded after all.
    pub fn forget_key(&mut self, kind: KeyKind, tenant: &str, key: &str) {
        self.outcome_keys
            .0
            .remove(&OutcomeKeys::of(kind, tenant, key));
    }

    /// Drops days and keys too old to matter.
    pub fn prune(&mut self, now: OffsetDateTime) {
        let oldest = utc_date(now) - time::Duration::days(KEEP_DAYS);
        for t in self.tenants.values_mut() {
            t.days = t.days.split_off(&oldest);
        }
        let cutoff = now.unix_timestamp() - KEEP_KEYS_DAYS * 86_400;
        self.outcome_keys.0.retain(|_, at| *at >= cutoff);
    }
}

fn utc_date(t: OffsetDateTime) -> Date {
    t.to_offset(time::UtcOffset::UTC).date()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    /// A key being recorded is pending, not a duplicate: the first request
    /// may still fail, and a client told "duplicate" would not retry.
    #[test]
    fn a_pending_key_is_not_a_duplicate_until_confirmed() {
        let mut l = Ledger::default();
        let at = datetime!(2026-11-23 12:00 UTC);
        assert_eq!(
            l.begin_key(KeyKind::Outcome, "t", "k"),
            Remembered::Fresh { forgot: 0 }
        );
        assert_eq!(l.begin_key(KeyKind::Outcome, "t", "k"), Remembered::Pending);
        // The first failed: forgotten, the retry is fresh.
        l.forget_key(KeyKind::Outcome, "t", "k");
        assert_eq!(
            l.begin_key(KeyKind::Outcome, "t", "k"),
            Remembered::Fresh { forgot: 0 }
        );
        l.confirm_key(KeyKind::Outcome, "t", "k", at);
        assert_eq!(
            l.begin_key(KeyKind::Outcome, "t", "k"),
            Remembered::Duplicate
        );
        // Confirmed keys age out as remembered ones do.
        l.prune(at + time::Duration::days(KEEP_KEYS_DAYS + 1));
        assert!(!l.knows_key(KeyKind::Outcome, "t", "k"));
        // A pending key is never pruned.
        l.begin_key(KeyKind::Outcome, "t", "p");
        l.prune(at + time::Duration::days(KEEP_KEYS_DAYS + 1));
        assert_eq!(l.begin_key(KeyKind::Outcome, "t", "p"), Remembered::Pending);
    }

    /// One key can name an outcome and a credit of a tenant: neither is a
    /// duplicate of the other.
    #[test]
    fn outcome_and_credit_keys_are_apart() {
        let mut l = Ledger::default();
        let at = datetime!(2026-11-23 12:00 UTC);
        l.remember_key(KeyKind::Outcome, "t", "k", at);
        assert!(!l.knows_key(KeyKind::Credit, "t", "k"));
        assert_eq!(
            l.remember_key(KeyKind::Credit, "t", "k", at),
            Remembered::Fresh { forgot: 0 }
        );
        assert_eq!(
            l.remember_key(KeyKind::Credit, "t", "k", at),
            Remembered::Duplicate
        );
        l.forget_key(KeyKind::Outcome, "t", "k");
        assert!(l.knows_key(KeyKind::Credit, "t", "k"));
        // Kept through a snapshot as the outcome keys are.
        let back: Ledger = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert!(back.knows_key(KeyKind::Credit, "t", "k"));
        assert!(!back.knows_key(KeyKind::Outcome, "t", "k"));
    }

    #[test]
    fn windows_roll_exactly_at_utc_boundaries() {
        let mut l = Ledger::default();
        l.spend("a", d("1.5"), datetime!(2026-10-31 23:59:59.999 UTC));
        l.spend("a", d("2"), datetime!(2026-11-01 00:00:00 UTC));
        l.credit("a", d("10"), datetime!(2026-11-01 00:00:01 UTC));
        let t = l.tenant("a").unwrap();
        // Just before midnight: only October.
        let before = datetime!(2026-10-31 23:59:59.999 UTC);
        assert_eq!(t.window(Window::Day, before), (d("1.5"), d("0")));
        assert_eq!(t.window(Window::Month, before), (d("1.5"), d("0")));
        // From midnight: November only.
        let after = datetime!(2026-11-01 00:00:00 UTC);
        assert_eq!(t.window(Window::Day, after).0, d("2"));
        assert_eq!(
            t.window(Window::Month, datetime!(2026-11-30 23:59:59 UTC))
                .0,
            d("2")
        );
        assert_eq!(
            t.window(Window::Day, datetime!(2026-11-02 00:00:00 UTC)).0,
            d("0")
        );
        assert_eq!(
            t.window(Window::Month, datetime!(2026-12-01 00:00:00 UTC))
                .0,
            d("0")
        );
        assert_eq!(t.window(Window::Total, after), (d("3.5"), d("10")));
        // Another offset, same instant: windows are UTC.
        let local = datetime!(2026-11-01 01:00:00 +02:00);
        assert_eq!(t.window(Window::Day, local).0, d("1.5"));
    }

    #[test]
    fn prune_keeps_a_month_and_recent_keys() {
        let mut l = Ledger::default();
        l.spend("a", d("1"), datetime!(2026-01-01 00:00 UTC));
        l.spend("a", d("1"), datetime!(2026-03-01 00:00 UTC));
        assert_eq!(
            l.remember_key(KeyKind::Outcome, "a", "k", datetime!(2026-03-01 00:00 UTC)),
            Remembered::Fresh { forgot: 0 }
        );
        assert_eq!(
            l.remember_key(KeyKind::Outcome, "a", "k", datetime!(2026-03-01 00:01 UTC)),
            Remembered::Duplicate
        );
        l.prune(datetime!(2026-03-02 00:00 UTC));
        assert_eq!(l.tenant("a").unwrap().days.len(), 1);
        assert_eq!(l.tenant("a").unwrap().total_spent, d("2"));
        assert!(l.knows_key(KeyKind::Outcome, "a", "k"));
        l.prune(datetime!(2026-03-20 00:00 UTC));
        assert!(!l.knows_key(KeyKind::Outcome, "a", "k"));
    }

    #[test]
    fn outcome_keys_are_capped_by_forgetting_the_oldest() {
        let mut l = Ledger::default();
        let t0 = datetime!(2026-03-01 00:00 UTC);
        let at = |i: usize| t0 + time::Duration::seconds(i as i64);
        for i in 0..MAX_OUTCOME_KEYS {
            assert_eq!(
                l.remember_key(KeyKind::Outcome, "a", &i.to_string(), at(i)),
                Remembered::Fresh { forgot: 0 }
            );
        }
        let newest = MAX_OUTCOME_KEYS.to_string();
        // Down to seven eighths of the cap: the eighth plus the one added.
        let forgot = MAX_OUTCOME_KEYS / 8 + 1;
        assert_eq!(
            l.remember_key(KeyKind::Outcome, "a", &newest, at(MAX_OUTCOME_KEYS)),
            Remembered::Fresh { forgot }
        );
        assert_eq!(l.outcome_keys.0.len(), MAX_OUTCOME_KEYS + 1 - forgot);
        // Exactly the oldest went: the first-seen times decide.
        assert!(!l.knows_key(KeyKind::Outcome, "a", "0"));
        assert!(!l.knows_key(KeyKind::Outcome, "a", &(forgot - 1).to_string()));
        assert!(l.knows_key(KeyKind::Outcome, "a", &forgot.to_string()));
        assert!(l.knows_key(KeyKind::Outcome, "a", &newest));
        // Keys are per tenant.
        assert!(!l.knows_key(KeyKind::Outcome, "b", &newest));
    }

    #[test]
    fn the_key_just_added_is_never_the_one_forgotten() {
        // Every key first seen in the same second: ties go by digest, and
        // the newest has the smallest, first in line but for the rule.
        let mut keys = OutcomeKeys::default();
        for d in 1..=MAX_OUTCOME_KEYS as u128 {
            keys.insert(d, 7);
        }
        // Down to seven eighths of the cap: the eighth plus the one added.
        let forgot = MAX_OUTCOME_KEYS / 8 + 1;
        assert_eq!(keys.insert(0, 7), Remembered::Fresh { forgot });
        assert!(keys.0.contains_key(&0));
        assert!(!keys.0.contains_key(&1) && !keys.0.contains_key(&(forgot as u128)));
        assert!(keys.0.contains_key(&(forgot as u128 + 1)));
    }

    #[test]
    fn snapshots_hold_digests_and_old_ones_still_load() {
        let mut l = Ledger::default();
        let at = datetime!(2026-03-01 00:00 UTC);
        l.remember_key(KeyKind::Outcome, "acme", "order-1", at);
        let json = serde_json::to_string(&l).unwrap();
        assert!(!json.contains("order-1"), "{json}");
        let back: Ledger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
        // A snapshot from before the digests kept `tenant\0key` itself.
        let old = r#"{"tenants":{},"outcome_keys":{"acme\u0000order-1":1772323200}}"#;
        let old: Ledger = serde_json::from_str(old).unwrap();
        assert!(old.knows_key(KeyKind::Outcome, "acme", "order-1"));
        assert_eq!(old, l);
        // One from before the cap, over it: the oldest are forgotten at load.
        let many: serde_json::Map<String, serde_json::Value> = (0..MAX_OUTCOME_KEYS + 10)
            .map(|i| (format!("acme\u{0}k{i}"), serde_json::json!(i)))
            .collect();
        let many = serde_json::json!({"tenants": {}, "outcome_keys": many}).to_string();
        let many: Ledger = serde_json::from_str(&many).unwrap();
        assert_eq!(many.outcome_keys.0.len(), MAX_OUTCOME_KEYS);
        assert!(
            !many.knows_key(KeyKind::Outcome, "acme", "k9")
                && many.knows_key(KeyKind::Outcome, "acme", "k10")
        );
        let bad = r#"{"tenants":{},"outcome_keys":{"xyz":1}}"#;
        let err = serde_json::from_str::<Ledger>(bad).unwrap_err().to_string();
        assert!(err.contains("32 hex digits"), "{err}");
    }
}
