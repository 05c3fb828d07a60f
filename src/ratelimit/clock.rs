//! Time sources for the local limiter: the real monotonic clock, and a
//! manual clock tests advance by hand (governor's fake clock, so refill
//! timing is tested exactly, without sleeping).

use std::fmt;
use std::time::{Duration, Instant};

use governor::clock::FakeRelativeClock;

/// A monotonic time source, in nanoseconds since an arbitrary origin.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Nanoseconds since this clock's origin; never decreases.
    fn now_nanos(&self) -> u64;
}

/// The process's monotonic clock (`Instant`).
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_nanos(&self) -> u64 {
        // u64 nanoseconds last 584 years of uptime.
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that only moves when told to (tests, benches): governor's
/// [`FakeRelativeClock`], read in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    fake: FakeRelativeClock,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by` (saturating at `u64::MAX` nanoseconds).
    pub fn advance(&self, by: Duration) {
        let left = u64::MAX - self.now_nanos();
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX).min(left);
        self.fake.advance(Duration::from_nanos(by));
    }

    /// The governor clock behind this one (shares its time): for driving
    /// governor's own limiters in step with it.
    pub fn governor_clock(&self) -> FakeRelativeClock {
        self.fake.clone()
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        governor::clock::Clock::now(&self.fake).as_u64()
    }
}
