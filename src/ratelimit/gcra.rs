//! A keyed GCRA (generic cell rate algorithm) limiter on governor's keyed
//! state: [`governor::state::keyed::DashMapStateStore`] holds one atomic
//! theoretical arrival time (TAT) per key, and every decision is one
//! [`StateStore::measure_and_replace`] (governor's compare-and-swap loop on
//! that key's TAT). On top of it this module adds what governor's
//! `RateLimiter::check_key` does not offer and the gateway needs: a read-only
//! *check* (so a request that one limit denies consumes nothing from the
//! route's other limits), a *refund* (for the rare race where a limit admits
//! on check and denies on commit), and the numbers of the `RateLimit-*`
//! headers.
//!
//! The GCRA math is governor's: a request at `now` is admitted iff
//! `max(TAT, now) - now <= tolerance`, where `tolerance = interval × (burst −
//! 1)`; admitting sets `TAT = max(TAT, now) + interval`. Times are nanoseconds
//! of a [`crate::ratelimit::clock::Clock`]. A key whose TAT is in the past is
//! indistinguishable from an absent key, so idle keys are evicted freely
//! (governor's `retain_recent`, from [`KeyedGcra::sweep`]) and a refused
//! request never creates one.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{NotKeyed, StateStore};

use crate::config::RateLimitConfig;

/// The limiter sweeps its idle keys inline when it grows past this many (and
/// then past twice what survived), so memory stays bounded even between sweeps.
const MIN_INLINE_SWEEP: usize = 1024;

/// The GCRA parameters of one limit, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Emission interval `T`: one request per `T` in steady state.
    pub interval: u64,
    /// `T × (burst − 1)`: how far ahead of `now` the TAT may run.
    pub tolerance: u64,
    /// Bucket size (what `RateLimit-Limit` reports).
    pub burst: u32,
}

impl Rate {
    /// The rate of a configured limit.
    pub fn of(limit: &RateLimitConfig) -> Rate {
        Rate::new(limit.emission_interval(), limit.burst)
    }

    /// One request per `interval` (at least 1 ns), bursts of up to `burst` (at least 1).
    pub fn new(interval: Duration, burst: u32) -> Rate {
        let quota = governor::Quota::with_period(interval.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Rate::from_quota(quota)
    }

    /// The rate of a governor quota (same parameters as governor's own GCRA).
    pub fn from_quota(quota: governor::Quota) -> Rate {
        let interval = u64::try_from(quota.replenish_interval().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let burst = quota.burst_size().get();
        Rate {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst - 1)),
            burst,
        }
    }

    /// Decision for a key whose TAT is `tat`, at `now`; `Ok(new TAT)` if admitted.
    fn evaluate(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let base = tat.max(now);
        let ahead = base - now;
        if ahead > self.tolerance {
            Err(Duration::from_nanos(ahead - self.tolerance))
        } else {
            Ok(base.saturating_add(self.interval))
        }
    }

    /// Quota left after an admission that set the TAT to `tat`.
    pub fn quota_after(&self, tat: u64, now: u64) -> Quota {
        let ahead = tat.saturating_sub(now);
        let remaining = if ahead > self.tolerance {
            0
        } else {
            ((self.tolerance - ahead) / self.interval).saturating_add(1)
        };
        Quota {
            limit: self.burst,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX).min(self.burst),
            reset: Duration::from_nanos(ahead),
        }
    }
}

/// What an admitted request leaves of one limit (the `RateLimit-*` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Bucket size.
    pub limit: u32,
    /// Requests that would be admitted right now.
    pub remaining: u32,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

impl Quota {
    /// The more restrictive of two quotas (fewer remaining; then later reset).
    pub fn tighter(self, other: Quota) -> Quota {
        if (other.remaining, std::cmp::Reverse(other.reset))
            < (self.remaining, std::cmp::Reverse(self.reset))
        {
            other
        } else {
            self
        }
    }
}

/// Per-key GCRA state for one limit: governor's dashmap store of TATs. All
/// methods are synchronous; a decision holds one map shard's lock only for a
/// lookup plus governor's compare-and-swap on the key's TAT.
pub struct KeyedGcra {
    rate: Rate,
    store: DashMapStateStore<String>,
    /// Keys created since the last sweep plus the keys that survived it (an
    /// upper estimate of the map's size, kept without touching the shards).
    tracked: AtomicUsize,
    /// `tracked` at which the next inline sweep runs (`usize::MAX` while one runs).
    sweep_at: AtomicUsize,
}

impl std::fmt::Debug for KeyedGcra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedGcra")
            .field("rate", &self.rate)
            .field("keys", &self.len())
            .finish()
    }
}

/// A TAT as governor stores it (`None`: absent, or 0).
fn tat_of(stored: Option<Nanos>) -> u64 {
    stored.map_or(0, Nanos::as_u64)
}

impl KeyedGcra {
    /// An empty limiter (every key starts with a full bucket).
    pub fn new(rate: Rate) -> Self {
        KeyedGcra {
            rate,
            // SipHash (`RandomState`): keys come from callers and path
            // parameters, so the map's hash must resist collision flooding.
            store: DashMapStateStore::default(),
            tracked: AtomicUsize::new(0),
            sweep_at: AtomicUsize::new(MIN_INLINE_SWEEP),
        }
    }

    /// The limit's parameters.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Whether a request for `key` at `now` would be admitted; changes nothing.
    pub fn check(&self, key: &str, now: u64) -> Result<Quota, Duration> {
        // A lookup, never an insertion: an absent key is a full bucket.
        let tat = match self.store.get(key) {
            // The closure reports the TAT it measured as its error, so
            // governor returns it without swapping anything.
            Some(state) => state
                .measure_and_replace(&NotKeyed::NonKey, |t| Err::<(u64, Nanos), u64>(tat_of(t)))
                .unwrap_or_else(|tat| tat),
            None => 0,
        };
        self.rate
            .evaluate(tat, now)
            .map(|new| self.rate.quota_after(new, now))
    }

    /// Admits a request for `key` at `now` (consuming budget) or says how long
    /// until one would be admitted (consuming nothing).
    pub fn admit(&self, key: &str, now: u64) -> Result<Quota, Duration> {
        let rate = self.rate;
        let decide = |stored: Option<Nanos>| {
            rate.evaluate(tat_of(stored), now)
                .map(|new| (rate.quota_after(new, now), Nanos::new(new)))
        };
        if let Some(state) = self.store.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, decide);
        }
        // An absent key is a full bucket, which always admits: only admitted
        // requests create keys. (A concurrent request may have created it
        // since the lookup; governor's keyed store then decides on that state.)
        self.sweep_if_grown(now);
        self.tracked.fetch_add(1, Ordering::Relaxed);
        self.store.measure_and_replace(&key.to_owned(), decide)
    }

    /// Sweeps inline once the map has grown past `sweep_at` (one thread at a time).
    fn sweep_if_grown(&self, now: u64) {
        let at = self.sweep_at.load(Ordering::Relaxed);
        if self.tracked.load(Ordering::Relaxed) >= at
            && self
                .sweep_at
                .compare_exchange(at, usize::MAX, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.sweep(now);
        }
    }

    /// Gives back one admission of `key` (after a later limit refused the request).
    pub fn refund(&self, key: &str) {
        let interval = self.rate.interval;
        if let Some(state) = self.store.get(key) {
            // A TAT moved below `now` means the same as `now` (a full bucket).
            let _ = state.measure_and_replace(&NotKeyed::NonKey, |t| {
                t.map(|t| ((), t.saturating_sub(Nanos::new(interval))))
                    .ok_or(())
            });
        }
    }

    /// Removes keys whose bucket is full again at `now` (their state is the
    /// same as absent) and returns memory; returns how many were removed.
    pub fn sweep(&self, now: u64) -> usize {
        let before = self.store.len();
        // Drops every key whose TAT is at or before `now`.
        ShrinkableKeyedStateStore::retain_recent(&self.store, Nanos::new(now));
        ShrinkableKeyedStateStore::shrink_to_fit(&self.store);
        let after = self.store.len();
        self.tracked.store(after, Ordering::Relaxed);
        self.sweep_at
            .store((after * 2).max(MIN_INLINE_SWEEP), Ordering::Relaxed);
        before.saturating_sub(after)
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }
}

/// Why [`admit_all`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Index (into the slice given) of the limit that refused.
    pub index: usize,
    /// When that limit would admit.
    pub retry_after: Duration,
}

/// Admits a request only if every `(limiter, key)` admits it. A refusal
/// consumes no budget of any limit: all are checked read-only first, then
/// committed in order; if a concurrent request took the last slot of a later
/// limit between check and commit, the earlier commits are refunded.
/// Returns the tightest quota left.
pub fn admit_all<'a, I>(limits: I, now: u64) -> Result<Option<Quota>, Refusal>
where
    I: IntoIterator<Item = (&'a KeyedGcra, &'a str)>,
    I::IntoIter: Clone,
{
    let limits = limits.into_iter();
    let mut rest = limits.clone();
    if let (Some((gcra, key)), None) = (rest.next(), rest.next()) {
        // One limit: a refusal consumes nothing anyway.
        return gcra
            .admit(key, now)
            .map(Some)
            .map_err(|retry_after| Refusal {
                index: 0,
                retry_after,
            });
    }
    for (index, (gcra, key)) in limits.clone().enumerate() {
        gcra.check(key, now)
            .map_err(|retry_after| Refusal { index, retry_after })?;
    }
    let mut tightest: Option<Quota> = None;
    for (index, (gcra, key)) in limits.clone().enumerate() {
        match gcra.admit(key, now) {
            Ok(q) => tightest = Some(tightest.map_or(q, |t| t.tighter(q))),
            Err(retry_after) => {
                for (g, k) in limits.take(index) {
                    g.refund(k);
                }
                return Err(Refusal { index, retry_after });
            }
        }
    }
    Ok(tightest)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ratelimit::clock::{Clock, ManualClock};
    use governor::clock::Clock as _;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn burst_is_admitted_then_one_per_interval() {
        let clock = ManualClock::new();
        let g = KeyedGcra::new(Rate::new(SEC, 3));
        for _ in 0..3 {
            assert!(g.admit("k", clock.now_nanos()).is_ok());
        }
        let wait = g.admit("k", clock.now_nanos()).unwrap_err();
        assert_eq!(wait, SEC);
        clock.advance(Duration::from_millis(999));
        assert_eq!(
            g.admit("k", clock.now_nanos()).unwrap_err(),
            Duration::from_millis(1)
        );
        clock.advance(Duration::from_millis(1));
        assert!(g.admit("k", clock.now_nanos()).is_ok());
        assert!(g.admit("k", clock.now_nanos()).is_err());
    }

    #[test]
    fn bucket_refills_fully_after_burst_intervals() {
        let clock = ManualClock::new();
        let g = KeyedGcra::new(Rate::new(Duration::from_secs(2), 5));
        for _ in 0..5 {
            g.admit("k", clock.now_nanos()).unwrap();
        }
        clock.advance(Duration::from_secs(10));
        let q = g.check("k", clock.now_nanos()).unwrap();
        assert_eq!(q.remaining, 4, "a full bucket admits 5, leaving 4");
        for _ in 0..5 {
            g.admit("k", clock.now_nanos()).unwrap();
        }
        assert!(g.admit("k", clock.now_nanos()).is_err());
    }

    #[test]
    fn quota_reports_remaining_and_reset() {
        let clock = ManualClock::new();
        let g = KeyedGcra::new(Rate::new(Duration::from_secs(12), 5));
        let q = g.admit("k", clock.now_nanos()).unwrap();
        assert_eq!(
            (q.limit, q.remaining, q.reset),
            (5, 4, Duration::from_secs(12))
        );
        let q = g.admit("k", clock.now_nanos()).unwrap();
        assert_eq!((q.remaining, q.reset), (3, Duration::from_secs(24)));
        clock.advance(Duration::from_secs(12));
        let q = g.check("k", clock.now_nanos()).unwrap();
        assert_eq!(
            (q.remaining, q.reset),
            (3, Duration::from_secs(24)),
            "check is what admit would report"
        );
    }

    #[test]
    fn decisions_match_governors_keyed_limiter_on_its_fake_clock() {
        // Same quota, same fake clock: governor's stock limiter and this one
        // admit and refuse the same requests and report the same waits.
        let clock = ManualClock::new();
        let quota = governor::Quota::with_period(Duration::from_millis(300))
            .unwrap()
            .allow_burst(std::num::NonZeroU32::new(4).unwrap());
        let stock = governor::RateLimiter::dashmap_with_clock(quota, clock.governor_clock());
        let ours = KeyedGcra::new(Rate::from_quota(quota));
        let steps = [
            0u64, 0, 0, 0, 0, 0, 100, 200, 0, 0, 299, 1, 0, 900, 0, 0, 0, 0, 0,
        ];
        let mut refused = 0;
        for (i, ms) in steps.into_iter().enumerate() {
            clock.advance(Duration::from_millis(ms));
            for key in ["a".to_owned(), format!("k{}", i % 2)] {
                let theirs = stock
                    .check_key(&key)
                    .map_err(|not_until| not_until.wait_time_from(clock.governor_clock().now()));
                let mine = ours.admit(&key, clock.now_nanos()).map(|_| ());
                assert_eq!(mine, theirs, "step {i}, key {key}");
                refused += usize::from(mine.is_err());
            }
        }
        assert!(refused > 5, "the sequence exercises refusals ({refused})");
    }

    #[test]
    fn refund_gives_back_one_admission_and_creates_no_key() {
        let g = KeyedGcra::new(Rate::new(SEC, 2));
        g.refund("absent");
        assert!(g.is_empty());
        g.admit("k", 0).unwrap();
        g.admit("k", 0).unwrap();
        assert!(g.check("k", 0).is_err());
        g.refund("k");
        assert_eq!(g.check("k", 0).unwrap().remaining, 0);
        g.refund("k");
        g.refund("k");
        assert_eq!(
            g.check("k", 0).unwrap().remaining,
            1,
            "refunds never make the bucket larger than full"
        );
    }

    #[test]
    fn keys_are_independent() {
        let g = KeyedGcra::new(Rate::new(SEC, 1));
        assert!(g.admit("a", 0).is_ok());
        assert!(g.admit("a", 0).is_err());
        assert!(g.admit("b", 0).is_ok());
    }

    #[test]
    fn check_consumes_nothing() {
        let g = KeyedGcra::new(Rate::new(SEC, 1));
        for _ in 0..10 {
            assert!(g.check("k", 0).is_ok());
        }
        assert!(g.admit("k", 0).is_ok());
    }

    #[test]
    fn refused_request_creates_no_key_and_sweep_evicts_idle_keys() {
        let clock = ManualClock::new();
        let g = KeyedGcra::new(Rate::new(SEC, 1));
        for i in 0..100 {
            g.admit(&format!("job-{i}"), clock.now_nanos()).unwrap();
        }
        assert_eq!(g.len(), 100);
        assert_eq!(
            g.sweep(clock.now_nanos()),
            0,
            "buckets still refilling are kept"
        );
        clock.advance(SEC);
        assert_eq!(g.sweep(clock.now_nanos()), 100);
        assert!(g.is_empty());
        // Evicted keys start full again: identical to never having been seen.
        assert!(g.admit("job-1", clock.now_nanos()).is_ok());
    }

    #[test]
    fn idle_keys_are_swept_inline_when_the_map_grows() {
        let g = KeyedGcra::new(Rate::new(Duration::from_millis(1), 1));
        for i in 0..200_000u64 {
            g.admit(&i.to_string(), i * 1_000_000).unwrap();
        }
        // Each key is idle 1 ms after its admission; inline sweeps keep the map small.
        assert!(g.len() <= 2 * MIN_INLINE_SWEEP, "len = {}", g.len());
    }

    #[test]
    fn forty_concurrent_decisions_against_a_budget_of_ten_admit_exactly_ten() {
        let g = Arc::new(KeyedGcra::new(Rate::new(Duration::from_secs(60), 10)));
        let admitted = Arc::new(AtomicU32::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(40));
        let threads: Vec<_> = (0..40)
            .map(|_| {
                let (g, admitted, barrier) = (g.clone(), admitted.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    if g.admit("shared", 5).is_ok() {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn denied_request_consumes_no_budget_of_the_other_limits() {
        let per_caller = KeyedGcra::new(Rate::new(SEC, 2));
        let per_job = KeyedGcra::new(Rate::new(Duration::from_secs(60), 1));
        // Job A's one slot is used; the caller has one of two slots left.
        admit_all([(&per_caller, "alice"), (&per_job, "A")], 0).unwrap();
        for _ in 0..5 {
            let r = admit_all([(&per_caller, "alice"), (&per_job, "A")], 0).unwrap_err();
            assert_eq!(r.index, 1);
            assert_eq!(r.retry_after, Duration::from_secs(60));
        }
        // The refusals above did not touch alice's budget.
        let q = admit_all([(&per_caller, "alice"), (&per_job, "B")], 0)
            .unwrap()
            .unwrap();
        assert_eq!(q.remaining, 0);
        assert!(admit_all([(&per_caller, "alice"), (&per_job, "C")], 0).is_err());
    }

    #[test]
    fn concurrent_multi_limit_decisions_never_overspend_either_limit() {
        // 8 threads × 50 requests against a global limit of 20 and per-thread limits of 5.
        let global = Arc::new(KeyedGcra::new(Rate::new(Duration::from_secs(60), 20)));
        let per = Arc::new(KeyedGcra::new(Rate::new(Duration::from_secs(60), 5)));
        let admitted = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (global, per, admitted) = (global.clone(), per.clone(), admitted.clone());
                std::thread::spawn(move || {
                    let key = format!("t{}", t % 4);
                    for _ in 0..50 {
                        if admit_all([(&*per, key.as_str()), (&*global, "")], 1).is_ok() {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Four per-thread keys × 5 = 20 = the global budget: all of it, no more.
        assert_eq!(admitted.load(Ordering::SeqCst), 20);
        assert!(global.check("", 1).is_err());
    }
}
