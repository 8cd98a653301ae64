//! Time as the caller tells it.
//!
//! A [`Timestamp`] counts microseconds from an epoch the caller picks (the
//! daemon: the `Instant` it started at; a simulation: zero). We use a plain
//! integer rather than `std::time::Instant` because an `Instant` can only be
//! obtained by reading the clock: a simulation or a replayed trace could not
//! construct one without doing exactly what this crate promises never to do.
//! A `u64` of microseconds is exact (no float drift), totally ordered, cheap to
//! log and replay, and lasts 584 000 years. Microseconds rather than
//! milliseconds because an 8 KiB chunk crosses a 3 GB/s loopback in ~3 µs:
//! a simulation at millisecond resolution would quantize away the very
//! effects (pipelining, rate limits) it exists to show.

use std::fmt;
use std::ops::{Add, AddAssign};
use std::time::Duration;

/// Microseconds since a caller-chosen epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub fn from_micros(micros: u64) -> Self {
        Timestamp(micros)
    }

    pub fn from_millis(millis: u64) -> Self {
        Timestamp(millis.saturating_mul(1000))
    }

    pub fn as_micros(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self`; zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_micros(d)))
    }
}

/// A duration in whole microseconds (rounded down), saturating.
pub fn duration_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self.saturating_add(d)
    }
}

impl AddAssign<Duration> for Timestamp {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t+{}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_millis(1500);
        assert_eq!(t.as_micros(), 1_500_000);
        assert_eq!(t + Duration::from_millis(1), Timestamp(1_501_000));
        assert_eq!(
            Timestamp(5).saturating_duration_since(Timestamp(9)),
            Duration::ZERO
        );
        assert_eq!(Timestamp(u64::MAX - 1) + Duration::MAX, Timestamp(u64::MAX));
        assert_eq!(format!("{t:?}"), "t+1.500000s");
    }
}
