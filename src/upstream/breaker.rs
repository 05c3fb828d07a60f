//! A circuit breaker per upstream: after `failure_threshold` consecutive
//! failures (connect errors, timeouts, 502/503/504) requests are shed with
//! 503 for `open_for`; then one probe is let through, and its outcome closes
//! or re-opens the circuit. Lock-free: two atomics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::CircuitBreakerConfig;

/// Shared breaker state for one upstream.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    threshold: u32,
    open_for: Duration,
    epoch: Instant,
    failures: AtomicU32,
    /// Millis since `epoch` until which the circuit is open; 0 = closed.
    open_until: AtomicU64,
}

/// The breaker's verdict for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Closed,
    /// This request is the half-open probe.
    Probe,
    /// Open: shed.
    Open,
}

impl CircuitBreaker {
    /// A closed breaker (threshold 0 disables it).
    pub fn new(cfg: &CircuitBreakerConfig) -> Self {
        CircuitBreaker {
            inner: Arc::new(Inner {
                threshold: cfg.failure_threshold,
                open_for: cfg.open_for,
                epoch: Instant::now(),
                failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a request may go to the upstream now.
    pub fn admit(&self) -> Admission {
        if self.inner.threshold == 0 {
            return Admission::Closed;
        }
        let until = self.inner.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Closed;
        }
        let now = self.now_ms();
        if now < until {
            return Admission::Open;
        }
        // Open period over: exactly one caller wins the probe by pushing the
        // deadline forward; the others keep being shed until it reports.
        let next = now + duration_ms(self.inner.open_for);
        match self.inner.open_until.compare_exchange(
            until,
            next,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Admission::Probe,
            Err(_) => Admission::Open,
        }
    }

    /// Records a successful exchange: the circuit closes.
    pub fn success(&self) {
        // Read first: on the usual success nothing changes, and a store would
        // pull the shared cache line away from the other workers every time.
        if self.inner.failures.load(Ordering::Acquire) != 0 {
            self.inner.failures.store(0, Ordering::Release);
        }
        if self.inner.open_until.load(Ordering::Acquire) != 0 {
            self.inner.open_until.store(0, Ordering::Release);
        }
    }

    /// Records a failure; opens the circuit at the threshold (or when a probe failed).
    pub fn failure(&self, was_probe: bool) {
        if self.inner.threshold == 0 {
            return;
        }
        let failures = self.inner.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if was_probe || failures >= self.inner.threshold {
            let until = self.now_ms() + duration_ms(self.inner.open_for);
            self.inner.open_until.store(until.max(1), Ordering::Release);
            if !was_probe && failures == self.inner.threshold {
                tracing::warn!(failures, open_for = ?self.inner.open_for, "Zuora is failing: circuit opened");
            }
        }
    }

    /// Whether the circuit is currently open.
    pub fn is_open(&self) -> bool {
        let until = self.inner.open_until.load(Ordering::Acquire);
        until != 0 && self.now_ms() < until
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(&CircuitBreakerConfig {
            failure_threshold: threshold,
            open_for: Duration::from_millis(open_ms),
        })
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let b = breaker(3, 10_000);
        b.failure(false);
        b.failure(false);
        assert_eq!(b.admit(), Admission::Closed);
        b.failure(false);
        assert_eq!(b.admit(), Admission::Open);
    }

    #[test]
    fn success_resets_the_count() {
        let b = breaker(2, 10_000);
        b.failure(false);
        b.success();
        b.failure(false);
        assert_eq!(b.admit(), Admission::Closed);
    }

    #[test]
    fn one_probe_after_the_open_period_then_close_or_reopen() {
        let b = breaker(1, 30);
        b.failure(false);
        assert_eq!(b.admit(), Admission::Open);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.admit(), Admission::Open, "only one probe at a time");
        b.failure(true);
        assert!(b.is_open());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Admission::Probe);
        b.success();
        assert_eq!(b.admit(), Admission::Closed);
    }

    #[test]
    fn threshold_zero_disables() {
        let b = breaker(0, 10);
        for _ in 0..100 {
            b.failure(false);
        }
        assert_eq!(b.admit(), Admission::Closed);
    }
}
