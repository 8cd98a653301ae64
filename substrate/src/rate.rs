//! Token buckets driven by the caller's clock.
//!
//! A [`TokenBucket`] holds up to `burst` tokens and gains `rate_per_s` tokens
//! per second. It works *in debt*: an action is allowed while the balance is
//! positive, and is then charged in full, which may take the balance below
//! zero. That way a unit of work larger than the burst (a 4 MiB run under a
//! 1 MiB burst) is never starved, and the caller can charge after the fact
//! when the size is only known then (bytes actually written to a socket).
//!
//! Bound: over any interval of length `T`, the total charged is at most
//! `burst + rate_per_s × T + one charge` (the charge that was admitted on the
//! last positive balance). Debt is repaid before anything else is allowed, so
//! a flood only pushes its own next permission further into the future.
//!
//! The balance is kept in token-microseconds (tokens × 10⁶) in an `i128`, so
//! refilling over any number of microseconds is exact and cannot overflow.

use crate::time::Timestamp;

const SCALE: i128 = 1_000_000;

/// A token bucket; see the module docs for the in-debt rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    rate_per_s: u64,
    burst: u64,
    /// Balance in tokens × 10⁶ as of `last`; negative while in debt.
    scaled: i128,
    last: Timestamp,
}

impl TokenBucket {
    /// A full bucket. Both `rate_per_s` and `burst` must be positive
    /// (configuration is validated before it gets here).
    pub fn new(now: Timestamp, rate_per_s: u64, burst: u64) -> Self {
        assert!(
            rate_per_s > 0 && burst > 0,
            "token bucket needs a positive rate and burst"
        );
        TokenBucket {
            rate_per_s,
            burst,
            scaled: i128::from(burst) * SCALE,
            last: now,
        }
    }

    pub fn rate_per_s(&self) -> u64 {
        self.rate_per_s
    }

    /// Brings the balance up to `now`. Time never runs backwards here: an
    /// earlier `now` is treated as `last`.
    pub fn refill(&mut self, now: Timestamp) {
        if now <= self.last {
            return;
        }
        let elapsed_us = i128::from(now.as_micros() - self.last.as_micros());
        let cap = i128::from(self.burst) * SCALE;
        self.scaled = (self.scaled + elapsed_us * i128::from(self.rate_per_s)).min(cap);
        self.last = now;
    }

    /// Whether an action may start now (the balance is positive).
    pub fn is_ready(&mut self, now: Timestamp) -> bool {
        self.refill(now);
        self.scaled > 0
    }

    /// Charges `amount` tokens, possibly going into debt.
    pub fn charge(&mut self, now: Timestamp, amount: u64) {
        self.refill(now);
        self.scaled = self.scaled.saturating_sub(i128::from(amount) * SCALE);
    }

    /// When the balance turns positive again, or `None` if it is positive as
    /// of the last refill.
    pub fn ready_at(&self) -> Option<Timestamp> {
        if self.scaled > 0 {
            return None;
        }
        let needed = -self.scaled + 1;
        let rate = i128::from(self.rate_per_s);
        let wait_us = (needed + rate - 1) / rate;
        let wait_us = u64::try_from(wait_us).unwrap_or(u64::MAX);
        Some(Timestamp(self.last.as_micros().saturating_add(wait_us)))
    }

    /// When the balance turns positive, as of `now`; `None` if it is.
    pub fn ready_at_from(&mut self, now: Timestamp) -> Option<Timestamp> {
        self.refill(now);
        self.ready_at()
    }

    /// Whole tokens as of the last refill (negative while in debt).
    pub fn balance(&self) -> i128 {
        self.scaled / SCALE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debt_is_repaid_at_the_rate() {
        let t0 = Timestamp::ZERO;
        let mut b = TokenBucket::new(t0, 1000, 100);
        assert!(b.is_ready(t0));
        b.charge(t0, 600);
        assert_eq!(b.balance(), -500);
        assert!(!b.is_ready(t0));
        // 500 tokens plus a fraction take just over half a second at 1000/s.
        let at = b.ready_at().unwrap();
        assert_eq!(at, Timestamp(500_001));
        assert!(!b.is_ready(Timestamp(500_000)));
        assert!(b.is_ready(at));
        // Refill never exceeds the burst.
        b.refill(Timestamp::from_millis(10_000));
        assert_eq!(b.balance(), 100);
    }

    #[test]
    fn long_run_rate_is_bounded() {
        // Greedy use for 10 s at 1 MB/s with 64 KiB charges: at most
        // burst + rate × T + one charge.
        let mut b = TokenBucket::new(Timestamp::ZERO, 1_000_000, 100_000);
        let mut now = Timestamp::ZERO;
        let mut total = 0u64;
        while now < Timestamp::from_millis(10_000) {
            if b.is_ready(now) {
                b.charge(now, 65_536);
                total += 65_536;
            } else {
                now = b.ready_at().unwrap();
            }
        }
        assert!(total <= 100_000 + 10_000_000 + 65_536, "{total}");
        assert!(total >= 10_000_000 - 65_536, "{total}");
    }

    #[test]
    fn time_going_backwards_is_ignored() {
        let mut b = TokenBucket::new(Timestamp(1000), 10, 10);
        b.charge(Timestamp(1000), 20);
        b.refill(Timestamp(10));
        assert_eq!(b.balance(), -10);
    }
}
