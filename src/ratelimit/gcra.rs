//! A keyed GCRA (generic cell rate algorithm) limiter over a sharded map of
//! atomics — the same algorithm governor implements, written here because the
//! gateway needs two things governor's keyed limiter does not offer: a
//! read-only *check* (so a request that one limit denies consumes nothing
//! from the route's other limits) and a *refund* (for the rare race where a
//! limit admits on check and denies on commit).
//!
//! State per key is one `u64`: the theoretical arrival time (TAT) in clock
//! nanoseconds. A request at `now` is admitted iff `max(TAT, now) - now <=
//! tolerance`, where `tolerance = interval × (burst − 1)`; admitting sets
//! `TAT = max(TAT, now) + interval`. A key whose TAT is in the past is
//! indistinguishable from an absent key, so idle keys are evicted freely
//! ([`KeyedGcra::sweep`]) and a refused request never creates one.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use crate::config::RateLimitConfig;

/// A shard sweeps its idle keys inline when it grows past this many (and then
/// past twice what survived), so memory stays bounded even between sweeps.
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

    /// One request per `interval`, bursts of up to `burst`.
    pub fn new(interval: Duration, burst: u32) -> Rate {
        let interval = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let burst = burst.max(1);
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

struct Shard {
    map: RwLock<HashMap<String, AtomicU64>>,
    sweep_at: AtomicUsize,
}

/// Per-key GCRA state for one limit. All methods are synchronous and hold a
/// shard lock only for a map lookup plus an atomic operation.
pub struct KeyedGcra {
    rate: Rate,
    shards: Box<[Shard]>,
    seed: u64,
}

/// Multiply-rotate hash over 8-byte words (the shard index only).
fn shard_hash(seed: u64, bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    let mut w = [0u8; 8];
    w[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K);
    h ^ (h >> 32)
}

impl std::fmt::Debug for KeyedGcra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedGcra")
            .field("rate", &self.rate)
            .field("keys", &self.len())
            .finish()
    }
}

impl KeyedGcra {
    /// An empty limiter (every key starts with a full bucket).
    pub fn new(rate: Rate) -> Self {
        let cores = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(4);
        let n = (cores * 4).next_power_of_two().clamp(8, 256);
        let shards = (0..n)
            .map(|_| Shard {
                map: RwLock::new(HashMap::new()),
                sweep_at: AtomicUsize::new(MIN_INLINE_SWEEP),
            })
            .collect();
        KeyedGcra {
            rate,
            shards,
            seed: RandomState::new().hash_one(0u64),
        }
    }

    /// The limit's parameters.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn shard(&self, key: &str) -> &Shard {
        // A cheap keyed hash picks the shard; the shard's map hashes again
        // with SipHash (DoS-resistant). Keys steered into one shard only
        // cost that shard's lock contention. The shard count is a power of two.
        let h = shard_hash(self.seed, key.as_bytes()) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    /// Whether a request for `key` at `now` would be admitted; changes nothing.
    pub fn check(&self, key: &str, now: u64) -> Result<Quota, Duration> {
        let tat = {
            let map = self
                .shard(key)
                .map
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            map.get(key).map_or(0, |t| t.load(Ordering::Acquire))
        };
        self.rate
            .evaluate(tat, now)
            .map(|new| self.rate.quota_after(new, now))
    }

    /// Admits a request for `key` at `now` (consuming budget) or says how long
    /// until one would be admitted (consuming nothing).
    pub fn admit(&self, key: &str, now: u64) -> Result<Quota, Duration> {
        let shard = self.shard(key);
        {
            let map = shard.map.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(tat) = map.get(key) {
                return self.cas(tat, now);
            }
        }
        // Refuse before taking the write lock: a refused request creates no key.
        self.rate.evaluate(0, now)?;
        let mut map = shard.map.write().unwrap_or_else(PoisonError::into_inner);
        if !map.contains_key(key) {
            let at = shard.sweep_at.load(Ordering::Relaxed);
            if map.len() >= at {
                map.retain(|_, tat| tat.load(Ordering::Acquire) > now);
                map.shrink_to_fit();
                shard
                    .sweep_at
                    .store((map.len() * 2).max(MIN_INLINE_SWEEP), Ordering::Relaxed);
            }
            map.insert(key.to_owned(), AtomicU64::new(0));
        }
        match map.get(key) {
            Some(tat) => self.cas(tat, now),
            None => Err(Duration::ZERO),
        }
    }

    fn cas(&self, tat: &AtomicU64, now: u64) -> Result<Quota, Duration> {
        let mut current = tat.load(Ordering::Acquire);
        loop {
            let new = self.rate.evaluate(current, now)?;
            match tat.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(self.rate.quota_after(new, now)),
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back one admission of `key` (after a later limit refused the request).
    pub fn refund(&self, key: &str) {
        let map = self
            .shard(key)
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tat) = map.get(key) {
            let interval = self.rate.interval;
            let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(interval))
            });
        }
    }

    /// Removes keys whose bucket is full again at `now` (their state is the
    /// same as absent) and returns memory; returns how many were removed.
    pub fn sweep(&self, now: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = shard.map.write().unwrap_or_else(PoisonError::into_inner);
            let before = map.len();
            map.retain(|_, tat| tat.load(Ordering::Acquire) > now);
            map.shrink_to_fit();
            removed += before - map.len();
            shard
                .sweep_at
                .store((map.len() * 2).max(MIN_INLINE_SWEEP), Ordering::Relaxed);
        }
        removed
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.map.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    fn shard_hash_spreads_similar_keys() {
        let mut seen = [0usize; 16];
        for i in 0..16_000u32 {
            seen[(shard_hash(7, format!("{i:032x}").as_bytes()) & 15) as usize] += 1;
        }
        assert!(seen.iter().all(|n| (700..1300).contains(n)), "{seen:?}");
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
    fn shards_sweep_inline_when_they_grow() {
        let g = KeyedGcra::new(Rate::new(Duration::from_millis(1), 1));
        for i in 0..200_000u64 {
            g.admit(&i.to_string(), i * 1_000_000).unwrap();
        }
        // Each key is idle 1 ms after its admission; inline sweeps keep the map small.
        assert!(g.len() < 200_000 / 4, "len = {}", g.len());
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
