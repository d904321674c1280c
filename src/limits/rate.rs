//! Rate limits with governor's GCRA, per tenant: requests per minute, and
//! tokens per minute charged with the input estimate up front and corrected
//! after the call (actual input above the estimate, plus the output) by a
//! debt that the tenant's next admissions pay first. One admission charges at
//! most a minute's quota (the bucket holds no more); the rest of the debt is
//! carried to the next, so a call that used an hour's tokens holds the tenant
//! back for about an hour.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::RateLimit;

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

struct TenantLimits<C: Clock> {
    config: RateLimit,
    requests: Option<Limiter<C>>,
    tokens: Option<Limiter<C>>,
    /// Tokens used but not yet charged. Never negative: nothing is banked
    /// as credit, which the bucket's own refill would pay twice.
    token_balance: i64,
}

/// Why a call was rate limited, and the figures for the headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    pub kind: LimitKind,
    pub retry_after: Duration,
    pub limit_requests: Option<u32>,
    pub limit_tokens: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
}

/// What a call was charged, for the correction after it.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokenCharge {
    pub estimated_input: u64,
}

/// Remaining capacity after an admitted call, for response headers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Remaining {
    pub requests: Option<u32>,
    pub tokens: Option<u32>,
}

pub struct RateLimits<C: Clock + Clone = MonotonicClock> {
    clock: C,
    tenants: Mutex<crate::FastMap<String, TenantLimits<C>>>,
}

impl Default for RateLimits<MonotonicClock> {
    fn default() -> Self {
        RateLimits::with_clock(MonotonicClock)
    }
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).expect("at least 1"))
}

impl<C: Clock + Clone> RateLimits<C> {
    pub fn with_clock(clock: C) -> Self {
        RateLimits {
            clock,
            tenants: Mutex::new(Default::default()),
        }
    }

    /// Admits one request estimated at `input_tokens`, or says how long to wait.
    pub fn admit(
        &self,
        tenant: &str,
        config: &RateLimit,
        input_tokens: u64,
    ) -> Result<(TokenCharge, Remaining), RateLimited> {
        let mut tenants = self.tenants.lock().unwrap();
        // The key is allocated only the first time a tenant is seen.
        if !tenants.contains_key(tenant) {
            tenants.insert(tenant.to_string(), self.build(config));
        }
        let t = tenants.get_mut(tenant).expect("just made");
        if t.config != *config {
            // The config changed on reload: start fresh with the new quota.
            *t = self.build(config);
        }
        let limited = |kind, until: governor::NotUntil<C::Instant>| RateLimited {
            kind,
            retry_after: until.wait_time_from(self.clock.now()),
            limit_requests: config.requests_per_minute,
            limit_tokens: config.tokens_per_minute,
        };
        // Tokens first (a refusal there must not spend a request), then requests.
        let mut remaining = Remaining::default();
        let total = t.token_balance.saturating_add(tokens_i64(input_tokens));
        let mut charged = 0;
        // A call that brings no tokens and owes none (a tool call, an
        // unmetered route) is not charged: governor charges at least 1,
        // which such calls paid for good (500 tool calls a minute took half
        // of a 1,000-token quota) or, banked as credit, without bound.
        if let (Some(limiter), Some(tpm), true) = (&t.tokens, config.tokens_per_minute, total > 0) {
            // At most the bucket's size now; the rest stays owed.
            let n = total.clamp(1, i64::from(tpm)) as u32;
            match limiter.check_n(NonZeroU32::new(n).expect("at least 1")) {
                Ok(Ok(state)) => remaining.tokens = Some(state.remaining_burst_capacity()),
                Ok(Err(until)) => return Err(limited(LimitKind::Tokens, until)),
                Err(_) => unreachable!("n is clamped to the burst size"),
            }
            charged = i64::from(n);
        }
        if let Some(limiter) = &t.requests {
            match limiter.check() {
                Ok(state) => remaining.requests = Some(state.remaining_burst_capacity()),
                Err(until) => {
                    // governor cannot refund: what was charged above pays the
                    // balance owed, down to nothing; it is not banked as
                    // credit (retries refused for requests would bank the
                    // token bucket, minute after minute).
                    t.token_balance = (t.token_balance - charged).max(0);
                    return Err(limited(LimitKind::Requests, until));
                }
            }
        }
        if t.tokens.is_some() {
            // At most `total` was charged.
            t.token_balance = total - charged;
        }
        Ok((
            TokenCharge {
                estimated_input: input_tokens,
            },
            remaining,
        ))
    }

    /// After the call: charge what the estimate did not cover.
    pub fn correct(&self, tenant: &str, charge: TokenCharge, input: u64, output: u64) {
        let mut tenants = self.tenants.lock().unwrap();
        if let Some(t) = tenants.get_mut(tenant) {
            if t.tokens.is_some() {
                let more = input
                    .saturating_sub(charge.estimated_input)
                    .saturating_add(output);
                t.token_balance = t.token_balance.saturating_add(tokens_i64(more));
            }
        }
    }

    fn build(&self, config: &RateLimit) -> TenantLimits<C> {
        let limiter = |n: u32| {
            RateLimiter::direct_with_clock(per_minute(n), self.clock.clone())
                .with_middleware::<StateInformationMiddleware>()
        };
        TenantLimits {
            config: *config,
            requests: config.requests_per_minute.map(limiter),
            tokens: config.tokens_per_minute.map(limiter),
            token_balance: 0,
        }
    }
}

fn tokens_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    /// Limits on a clock the test moves, and the tenant's config.
    fn setup(
        requests_per_minute: Option<u32>,
        tokens_per_minute: Option<u32>,
    ) -> (FakeRelativeClock, RateLimits<FakeRelativeClock>, RateLimit) {
        let clock = FakeRelativeClock::default();
        let cfg = RateLimit {
            requests_per_minute,
            tokens_per_minute,
        };
        (clock.clone(), RateLimits::with_clock(clock), cfg)
    }

    #[test]
    fn requests_per_minute_reject_at_the_right_call_and_refill() {
        let (clock, limits, cfg) = setup(Some(3), None);
        for _ in 0..3 {
            limits.admit("t", &cfg, 0).unwrap();
        }
        let e = limits.admit("t", &cfg, 0).unwrap_err();
        assert_eq!(e.kind, LimitKind::Requests);
        assert_eq!(e.retry_after, Duration::from_secs(20));
        // Another tenant is unaffected.
        limits.admit("u", &cfg, 0).unwrap();
        clock.advance(Duration::from_secs(20));
        limits.admit("t", &cfg, 0).unwrap();
        assert!(limits.admit("t", &cfg, 0).is_err());
    }

    #[test]
    fn tokens_per_minute_charge_estimate_then_actual() {
        let (clock, limits, cfg) = setup(None, Some(1000));
        let (charge, rem) = limits.admit("t", &cfg, 100).unwrap();
        assert_eq!(rem.tokens, Some(900));
        // The call used 150 input and 500 output: 550 more are owed.
        limits.correct("t", charge, 150, 500);
        // 900 - 550 = 350 left: 300 fits, 400 would not.
        let e = limits.admit("t", &cfg, 400).unwrap_err();
        assert_eq!(e.kind, LimitKind::Tokens);
        assert!(e.retry_after > Duration::ZERO);
        let (_, rem) = limits.admit("t", &cfg, 300).unwrap();
        assert_eq!(rem.tokens, Some(50));
        clock.advance(Duration::from_secs(60));
        limits.admit("t", &cfg, 1000).unwrap();
    }

    /// A call that used far more than a minute's tokens is paid for over the
    /// minutes that follow, a bucketful at a time: none of it is forgiven.
    #[test]
    fn a_debt_above_a_minutes_quota_is_carried_not_forgiven() {
        let (clock, limits, cfg) = setup(None, Some(1000));
        let (charge, _) = limits.admit("t", &cfg, 10).unwrap();
        // 5,000 output tokens: five minutes' worth.
        limits.correct("t", charge, 10, 5000);
        clock.advance(Duration::from_secs(60));
        // Each admission pays a full bucket while the debt lasts: half a
        // minute's refill is not enough.
        for _ in 0..4 {
            limits.admit("t", &cfg, 10).unwrap();
            clock.advance(Duration::from_secs(30));
            let e = limits.admit("t", &cfg, 10).unwrap_err();
            assert_eq!(e.kind, LimitKind::Tokens);
            clock.advance(Duration::from_secs(30));
        }
        // The fifth pays the last full bucket (5,050 owed with the calls'
        // own 10s, 5,000 paid): after it a small call fits in half a minute.
        limits.admit("t", &cfg, 10).unwrap();
        clock.advance(Duration::from_secs(30));
        limits.admit("t", &cfg, 10).unwrap();
    }

    /// A request the request limit refuses does not pay the token debt twice
    /// (its retries would then be refused for tokens they never used).
    #[test]
    fn a_request_refused_for_requests_does_not_pay_the_token_debt_twice() {
        let (_, limits, cfg) = setup(Some(1), Some(1000));
        let (charge, _) = limits.admit("t", &cfg, 0).unwrap();
        limits.correct("t", charge, 0, 400);
        for _ in 0..5 {
            let e = limits.admit("t", &cfg, 0).unwrap_err();
            assert_eq!(e.kind, LimitKind::Requests);
        }
    }

    /// What requests refused for requests were charged is not banked as
    /// token credit: retrying while limited cannot store up capacity.
    #[test]
    fn refusals_do_not_bank_token_credit() {
        let (clock, limits, cfg) = setup(Some(1), Some(1000));
        limits.admit("t", &cfg, 0).unwrap();
        for _ in 0..100 {
            limits.admit("t", &cfg, 0).unwrap_err();
        }
        clock.advance(Duration::from_secs(60));
        // A full bucket, and no more: the refused ones' 100 were not banked.
        let (_, rem) = limits.admit("t", &cfg, 1000).unwrap();
        assert_eq!(rem.tokens, Some(0));
    }

    /// Calls that bring no tokens and owe none (tool calls, unmetered
    /// routes) are not charged: they neither bank credit (after thousands
    /// of them a minute's quota is still all a burst gets) nor use the
    /// quota up (before, each paid 1 for good).
    #[test]
    fn zero_token_calls_neither_bank_nor_use_token_quota() {
        let (clock, limits, cfg) = setup(None, Some(1000));
        for _ in 0..5000 {
            let (charge, _) = limits.admit("t", &cfg, 0).unwrap();
            limits.correct("t", charge, 0, 0);
            clock.advance(Duration::from_millis(60));
        }
        clock.advance(Duration::from_secs(60));
        limits.admit("t", &cfg, 1000).unwrap();
        let e = limits.admit("t", &cfg, 1000).unwrap_err();
        assert_eq!(e.kind, LimitKind::Tokens);
        clock.advance(Duration::from_secs(60));
        for _ in 0..500 {
            limits.admit("t", &cfg, 0).unwrap();
        }
        let (_, rem) = limits.admit("t", &cfg, 1000).unwrap();
        assert_eq!(rem.tokens, Some(0));
    }
}
