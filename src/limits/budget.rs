//! Budgets: reserve the worst case before a call, settle the actual cost
//! after. The store is a trait shaped around those operations (not get/set),
//! so a store shared by replicas can implement it atomically later; this is
//! the embedded one.

use std::sync::Mutex;

use rust_decimal::Decimal;
use time::OffsetDateTime;

use super::ledger::{window_start, Ledger};
use crate::config::Budget;

/// Money held for one call until it settles.
#[derive(Debug)]
pub struct Reservation {
    pub tenant: String,
    pub amount: Decimal,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("budget exceeded: {needed} needed, {remaining} remaining of {limit}")]
pub struct BudgetExceeded {
    pub needed: Decimal,
    pub remaining: Decimal,
    pub limit: Decimal,
}

/// A tenant's budget as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetStatus {
    pub spent: Decimal,
    pub reserved: Decimal,
    pub credits: Decimal,
    /// `limit + credits - spent - reserved`, never below zero.
    pub remaining: Decimal,
    pub window_start: Option<OffsetDateTime>,
}

pub trait BudgetStore: Send + Sync {
    /// Holds `amount` for a call, or refuses if spent + reserved + amount
    /// would pass the limit (plus credits) of the window containing `now`.
    fn reserve(
        &self,
        tenant: &str,
        budget: &Budget,
        amount: Decimal,
        now: OffsetDateTime,
    ) -> Result<Reservation, BudgetExceeded>;
    /// Replaces a reservation by the actual cost, recorded at `at`.
    fn settle(&self, reservation: Reservation, actual: Decimal, at: OffsetDateTime);
    /// Raises the tenant's balance (prepaid top-up).
    fn credit(&self, tenant: &str, amount: Decimal, at: OffsetDateTime);
    fn status(&self, tenant: &str, budget: &Budget, now: OffsetDateTime) -> BudgetStatus;
    /// Spend without a reservation (tenants without a budget, replay).
    fn record(&self, tenant: &str, amount: Decimal, at: OffsetDateTime);
}

/// The embedded store: the ledger and outstanding reservations behind one
/// mutex, held only for arithmetic (never across an await).
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    ledger: Ledger,
    reserved: crate::FastMap<String, Decimal>,
}

impl MemoryStore {
    pub fn with_ledger(ledger: Ledger) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                ledger,
                reserved: Default::default(),
            }),
        }
    }

    /// Runs `f` on the ledger (outcome keys live there too).
    pub fn with<T>(&self, f: impl FnOnce(&mut Ledger) -> T) -> T {
        f(&mut self.inner.lock().unwrap().ledger)
    }
}

/// `limit + credits - spent - reserved`. Saturating: money from config,
/// credits and usage is bounded where it comes in, but a sum of many must
/// not panic while the store's lock is held (it would poison the lock for
/// every tenant).
fn available(limit: Decimal, credits: Decimal, spent: Decimal, reserved: Decimal) -> Decimal {
    limit
        .saturating_add(credits)
        .saturating_sub(spent)
        .saturating_sub(reserved)
}

impl Inner {
    fn status(&self, tenant: &str, budget: &Budget, now: OffsetDateTime) -> BudgetStatus {
        let (spent, credits) = self
            .ledger
            .tenant(tenant)
            .map(|t| t.window(budget.window, now))
            .unwrap_or_default();
        let reserved = self.reserved.get(tenant).copied().unwrap_or_default();
        BudgetStatus {
            spent,
            reserved,
            credits,
            remaining: available(budget.limit, credits, spent, reserved).max(Decimal::ZERO),
            window_start: window_start(budget.window, now),
        }
    }
}

impl BudgetStore for MemoryStore {
    fn reserve(
        &self,
        tenant: &str,
        budget: &Budget,
        amount: Decimal,
        now: OffsetDateTime,
    ) -> Result<Reservation, BudgetExceeded> {
        let mut inner = self.inner.lock().unwrap();
        let s = inner.status(tenant, budget, now);
        let available = available(budget.limit, s.credits, s.spent, s.reserved);
        if amount > available {
            return Err(BudgetExceeded {
                needed: amount,
                remaining: available.max(Decimal::ZERO),
                limit: budget.limit.saturating_add(s.credits),
            });
        }
        // Entries stay once made (one per tenant of the config): no key
        // allocated per call.
        match inner.reserved.get_mut(tenant) {
            Some(held) => *held = held.saturating_add(amount),
            None => {
                inner.reserved.insert(tenant.to_string(), amount);
            }
        }
        Ok(Reservation {
            tenant: tenant.to_string(),
            amount,
        })
    }

    fn settle(&self, r: Reservation, actual: Decimal, at: OffsetDateTime) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(held) = inner.reserved.get_mut(&r.tenant) {
            *held = held.saturating_sub(r.amount);
        }
        inner.ledger.spend(&r.tenant, actual, at);
    }

    fn credit(&self, tenant: &str, amount: Decimal, at: OffsetDateTime) {
        self.inner.lock().unwrap().ledger.credit(tenant, amount, at);
    }

    fn status(&self, tenant: &str, budget: &Budget, now: OffsetDateTime) -> BudgetStatus {
        self.inner.lock().unwrap().status(tenant, budget, now)
    }

    fn record(&self, tenant: &str, amount: Decimal, at: OffsetDateTime) {
        self.inner.lock().unwrap().ledger.spend(tenant, amount, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Window;
    use std::sync::Arc;
    use time::macros::datetime;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    /// Sums of money near `Decimal`'s bound saturate instead of panicking
    /// with the store's lock held (which poisoned it for every tenant).
    #[test]
    fn huge_sums_saturate_and_leave_the_store_usable() {
        let store = MemoryStore::default();
        let budget = Budget {
            limit: crate::config::MAX_MONEY,
            window: Window::Month,
        };
        let now = datetime!(2026-11-23 12:00 UTC);
        for _ in 0..3 {
            store.credit("t", Decimal::MAX, now);
            store.record("t", Decimal::MAX, now);
        }
        let s = store.status("t", &budget, now);
        assert_eq!((s.credits, s.spent), (Decimal::MAX, Decimal::MAX));
        assert!(store.reserve("t", &budget, d("1"), now).is_err());
        let r = store.reserve("u", &budget, d("1"), now).unwrap();
        store.settle(r, Decimal::MAX, now);
        assert_eq!(store.status("u", &budget, now).remaining, Decimal::ZERO);
        assert!(store.reserve("v", &budget, d("1"), now).is_ok());
    }

    #[test]
    fn concurrent_reservations_never_pass_the_limit() {
        let store = Arc::new(MemoryStore::default());
        let budget = Budget {
            limit: d("0.30"),
            window: Window::Total,
        };
        let now = datetime!(2026-11-23 12:00 UTC);
        let handles: Vec<_> = (0..30)
            .map(|_| {
                let (store, budget) = (store.clone(), budget.clone());
                std::thread::spawn(move || store.reserve("t", &budget, d("0.1"), now).ok())
            })
            .collect();
        let held: Vec<_> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(held.len(), 3);
        assert_eq!(store.status("t", &budget, now).remaining, d("0"));
        // Settling for less frees the rest.
        for r in held {
            store.settle(r, d("0.05"), now);
        }
        let s = store.status("t", &budget, now);
        assert_eq!(
            (s.spent, s.reserved, s.remaining),
            (d("0.15"), d("0"), d("0.15"))
        );
        // A credit raises a prepaid balance.
        store.credit("t", d("1"), now);
        assert_eq!(store.status("t", &budget, now).remaining, d("1.15"));
    }

    #[test]
    fn daily_budget_resets_at_midnight_utc() {
        let store = MemoryStore::default();
        let budget = Budget {
            limit: d("1"),
            window: Window::Day,
        };
        let late = datetime!(2026-11-23 23:59:59 UTC);
        let r = store.reserve("t", &budget, d("1"), late).unwrap();
        store.settle(r, d("1"), late);
        assert!(store.reserve("t", &budget, d("0.01"), late).is_err());
        let next = datetime!(2026-11-24 00:00:00 UTC);
        assert!(store.reserve("t", &budget, d("1"), next).is_ok());
    }
}
