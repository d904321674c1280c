//! Rate limits with governor's GCRA, per tenant: requests per minute, and
//! tokens per minute charged with the input estimate up front and corrected
//! after the call (actual input above the estimate, plus the output) by a
//! debt that the tenant's next admission pays first.

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
    /// Tokens used beyond what was charged up front.
    token_debt: u64,
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
        let charge = input_tokens + t.token_debt;
        if let (Some(limiter), Some(tpm)) = (&t.tokens, config.tokens_per_minute) {
            let n = NonZeroU32::new(charge.clamp(1, u64::from(tpm)) as u32).expect("at least 1");
            match limiter.check_n(n) {
                Ok(Ok(state)) => remaining.tokens = Some(state.remaining_burst_capacity()),
                Ok(Err(until)) => return Err(limited(LimitKind::Tokens, until)),
                Err(_) => unreachable!("n is clamped to the burst size"),
            }
        }
        if let Some(limiter) = &t.requests {
            match limiter.check() {
                Ok(state) => remaining.requests = Some(state.remaining_burst_capacity()),
                Err(until) => {
                    // Give back nothing: governor cannot refund, so the tokens
                    // charged above stay charged; the request is refused.
                    return Err(limited(LimitKind::Requests, until));
                }
            }
        }
        t.token_debt = 0;
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
                t.token_debt += input.saturating_sub(charge.estimated_input) + output;
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
            token_debt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn requests_per_minute_reject_at_the_right_call_and_refill() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(clock.clone());
        let cfg = RateLimit {
            requests_per_minute: Some(3),
            tokens_per_minute: None,
        };
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
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(clock.clone());
        let cfg = RateLimit {
            requests_per_minute: None,
            tokens_per_minute: Some(1000),
        };
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
}
