//! The ledger: spend and credits per tenant per UTC day, plus all-time totals.
//!
//! Windows are computed from it, not kept as counters that roll over: a
//! `day` window is today's entry, a `month` window the sum of this month's
//! days, `total` the all-time sums. Rollover is therefore exact at UTC
//! boundaries, and a reload that changes a tenant's window needs no
//! migration. Days older than [`KEEP_DAYS`] are pruned.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};

use crate::config::Window;

/// Enough for the longest calendar month plus slack.
pub const KEEP_DAYS: i64 = 40;
/// How long an outcome event's idempotency key is remembered.
pub const KEEP_KEYS_DAYS: i64 = 7;

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
    /// Outcome idempotency keys, `tenant\u{0}key` -> unix seconds first seen.
    #[serde(default)]
    pub outcome_keys: HashMap<String, i64>,
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
                        (s + d.spent, c + d.credits)
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
        t.days.entry(utc_date(at)).or_default().spent += amount;
        t.total_spent += amount;
    }

    pub fn credit(&mut self, tenant: &str, amount: Decimal, at: OffsetDateTime) {
        let t = self.tenant_mut(tenant);
        t.days.entry(utc_date(at)).or_default().credits += amount;
        t.total_credits += amount;
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

    /// Records an outcome key; false if it was already there.
    pub fn remember_key(&mut self, tenant: &str, key: &str, at: OffsetDateTime) -> bool {
        let k = format!("{tenant}\u{0}{key}");
        match self.outcome_keys.entry(k) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(at.unix_timestamp());
                true
            }
        }
    }

    pub fn knows_key(&self, tenant: &str, key: &str) -> bool {
        self.outcome_keys
            .contains_key(&format!("{tenant}\u{0}{key}"))
    }

    /// Drops days and keys too old to matter.
    pub fn prune(&mut self, now: OffsetDateTime) {
        let oldest = utc_date(now) - time::Duration::days(KEEP_DAYS);
        for t in self.tenants.values_mut() {
            t.days = t.days.split_off(&oldest);
        }
        let cutoff = now.unix_timestamp() - KEEP_KEYS_DAYS * 86_400;
        self.outcome_keys.retain(|_, at| *at >= cutoff);
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
        assert!(l.remember_key("a", "k", datetime!(2026-03-01 00:00 UTC)));
        assert!(!l.remember_key("a", "k", datetime!(2026-03-01 00:01 UTC)));
        l.prune(datetime!(2026-03-02 00:00 UTC));
        assert_eq!(l.tenant("a").unwrap().days.len(), 1);
        assert_eq!(l.tenant("a").unwrap().total_spent, d("2"));
        assert!(l.knows_key("a", "k"));
        l.prune(datetime!(2026-03-20 00:00 UTC));
        assert!(!l.knows_key("a", "k"));
    }
}
