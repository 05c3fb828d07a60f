//! Rate limiting: named GCRA limits, kept in this process ([`gcra`]) or
//! shared by every replica through Redis ([`redis`]), plus the Zuora holds
//! (after Zuora answers 429, a key's requests are answered locally until its
//! `Retry-After` has passed).
//!
//! The [`LimiterRegistry`] owns all limiter state. It is keyed by the
//! [`RateLimitConfig`] value, so a config reload that leaves a limit's
//! definition unchanged keeps its buckets (a reload never refills them),
//! while a changed definition starts fresh. The request path asks it for the
//! limits of the matched route ([`LimiterRegistry::route_limits`], resolved
//! once per policy snapshot) and for a decision ([`LimiterRegistry::decide`]).
//!
//! A route lists several limits; a request is admitted only if all admit it,
//! and a refused request consumes nothing from any of them (see
//! [`gcra::admit_all`] and the Redis script).

pub mod clock;
pub mod gcra;
pub mod key;
pub mod redis;
#[doc(hidden)]
pub mod testing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use self::clock::{Clock, MonotonicClock};
use self::gcra::{KeyedGcra, Quota, Rate, admit_all};
use self::redis::{RedisLimit, RedisStore, RedisVerdict, StoreError};
use crate::config::{LimitStore, RateLimitConfig, StoreErrorPolicy};
use crate::context::RouteMatch;
use crate::error::GatewayError;
use crate::policy::Policy;

pub use self::gcra::Quota as RateQuota;

/// Longest hold a Zuora `Retry-After` can impose (a bogus value must not
/// lock a key for days).
pub const MAX_UPSTREAM_HOLD: Duration = Duration::from_secs(3600);

/// Hold used when Zuora's 429 carries no usable `Retry-After`.
pub const DEFAULT_UPSTREAM_HOLD: Duration = Duration::from_secs(1);

/// Labels of `gateway_rate_limit_decisions`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// The limit's name.
    pub limit: String,
    /// `admitted`, `limited`, `held`, `store_error_allowed` or `store_error_denied`.
    pub decision: &'static str,
}

/// Labels of the per-limit store counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The limit's name.
    pub limit: String,
}

/// Rate-limit metrics.
#[derive(Clone, Debug, Default)]
pub struct RateLimitMetrics {
    /// Decisions by limit and outcome.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Redis failures (timeouts, connection, bad replies) by limit.
    pub store_errors: Family<LimitLabels, Counter>,
    /// Decisions made by the local fallback limiter because Redis failed.
    pub fallbacks: Family<LimitLabels, Counter>,
}

impl RateLimitMetrics {
    /// Registers the rate-limit metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let m = RateLimitMetrics::default();
        registry.register(
            "gateway_rate_limit_decisions",
            "Rate-limit decisions, by limit and decision",
            m.decisions.clone(),
        );
        registry.register(
            "gateway_rate_limit_store_errors",
            "Rate-limit store (Redis) failures, by limit",
            m.store_errors.clone(),
        );
        registry.register(
            "gateway_rate_limit_fallbacks",
            "Decisions taken by the local fallback limiter while Redis failed, by limit",
            m.fallbacks.clone(),
        );
        m
    }
}

/// One limit's counters, resolved once so a decision allocates nothing.
#[derive(Debug)]
struct LimitCounters {
    admitted: Counter,
    limited: Counter,
    held: Counter,
    error_allowed: Counter,
    error_denied: Counter,
    store_errors: Counter,
    fallbacks: Counter,
}

impl LimitCounters {
    fn new(m: &RateLimitMetrics, limit: &str) -> Self {
        let d = |decision| {
            m.decisions
                .get_or_create(&DecisionLabels {
                    limit: limit.to_owned(),
                    decision,
                })
                .clone()
        };
        let l = LimitLabels {
            limit: limit.to_owned(),
        };
        LimitCounters {
            admitted: d("admitted"),
            limited: d("limited"),
            held: d("held"),
            error_allowed: d("store_error_allowed"),
            error_denied: d("store_error_denied"),
            store_errors: m.store_errors.get_or_create(&l).clone(),
            fallbacks: m.fallbacks.get_or_create(&l).clone(),
        }
    }
}

/// Keys held after a Zuora 429, with the clock time the hold ends.
#[derive(Debug, Default)]
struct Holds {
    map: RwLock<HashMap<String, u64>>,
    /// Entries in `map` (lets the common case skip the lock).
    len: AtomicUsize,
}

impl Holds {
    fn remaining(&self, key: &str, now: u64) -> Option<Duration> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(key)
            .filter(|until| **until > now)
            .map(|until| Duration::from_nanos(until - now))
    }

    fn hold(&self, key: &str, until: u64) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let e = map.entry(key.to_owned()).or_insert(0);
        *e = (*e).max(until);
        self.len.store(map.len(), Ordering::Release);
    }

    fn sweep(&self, now: u64) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, until| *until > now);
        map.shrink_to_fit();
        self.len.store(map.len(), Ordering::Release);
    }
}

/// The state of one configured limit: its buckets (the limiter itself for
/// `store: local`, the fallback for `store: redis`) and its Zuora holds.
#[derive(Debug)]
pub struct Limiter {
    config: RateLimitConfig,
    rate: Rate,
    local: KeyedGcra,
    holds: Holds,
    counters: LimitCounters,
}

impl Limiter {
    fn new(config: RateLimitConfig, metrics: &RateLimitMetrics) -> Self {
        let rate = Rate::of(&config);
        Limiter {
            counters: LimitCounters::new(metrics, &config.name),
            local: KeyedGcra::new(rate),
            holds: Holds::default(),
            rate,
            config,
        }
    }

    /// The limit's definition.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Keys currently tracked locally (limiter or fallback buckets).
    pub fn tracked_keys(&self) -> usize {
        self.local.len()
    }
}

/// A limit of a route, ready for decisions.
#[derive(Debug, Clone)]
pub struct RouteLimit {
    limiter: Arc<Limiter>,
    /// The Redis store, for `store: redis` limits.
    store: Option<Arc<RedisStore>>,
}

impl RouteLimit {
    /// The limit's definition.
    pub fn config(&self) -> &RateLimitConfig {
        &self.limiter.config
    }

    /// Whether decisions for this limit need a Redis round trip.
    pub fn is_shared(&self) -> bool {
        self.store.is_some()
    }
}

/// The limits of every route of one policy.
#[derive(Debug)]
struct Resolved {
    policy: Weak<Policy>,
    routes: Vec<Arc<[RouteLimit]>>,
}

/// All limiter state of the process; see the module docs.
pub struct LimiterRegistry {
    clock: Arc<dyn Clock>,
    metrics: RateLimitMetrics,
    /// Live limiters by definition. Strong references live in `resolved`
    /// (one entry per policy snapshot still in use), so a limiter lives as
    /// long as some policy in use defines it.
    limiters: Mutex<HashMap<RateLimitConfig, Weak<Limiter>>>,
    store: Mutex<Option<Arc<RedisStore>>>,
    resolved: Mutex<Vec<Arc<Resolved>>>,
    /// The most recently used resolution (the fast path).
    current: ArcSwapOption<Resolved>,
}

impl std::fmt::Debug for LimiterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimiterRegistry").finish_non_exhaustive()
    }
}

impl LimiterRegistry {
    /// A registry on the process's monotonic clock.
    pub fn new(metrics: RateLimitMetrics) -> Arc<Self> {
        Self::with_clock(metrics, Arc::new(MonotonicClock::new()))
    }

    /// A registry on `clock` (tests use [`clock::ManualClock`]). Redis-backed
    /// decisions use the Redis server's clock regardless.
    pub fn with_clock(metrics: RateLimitMetrics, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(LimiterRegistry {
            clock,
            metrics,
            limiters: Mutex::new(HashMap::new()),
            store: Mutex::new(None),
            resolved: Mutex::new(Vec::new()),
            current: ArcSwapOption::empty(),
        })
    }

    /// The limits of the matched route, in the route's order.
    pub fn route_limits(&self, route: &RouteMatch) -> Arc<[RouteLimit]> {
        let resolved = self.resolve(&route.policy);
        resolved
            .routes
            .get(route.route)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }

    fn resolve(&self, policy: &Arc<Policy>) -> Arc<Resolved> {
        // Comparing with a `Weak` is ABA-safe: it keeps the allocation alive.
        if let Some(r) = &*self.current.load()
            && std::ptr::eq(r.policy.as_ptr(), Arc::as_ptr(policy))
        {
            return r.clone();
        }
        let mut list = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        let found = list
            .iter()
            .find(|r| std::ptr::eq(r.policy.as_ptr(), Arc::as_ptr(policy)))
            .cloned();
        let r = match found {
            Some(r) => r,
            None => {
                // Build before pruning: limiters of unchanged definitions are
                // still held by the old policy's entry and are reused here.
                let r = Arc::new(self.build(policy));
                list.retain(|old| old.policy.strong_count() > 0);
                list.push(r.clone());
                r
            }
        };
        self.current.store(Some(r.clone()));
        r
    }

    fn build(&self, policy: &Arc<Policy>) -> Resolved {
        let config = &policy.config;
        let store = if config
            .rate_limits
            .values()
            .any(|l| l.store == LimitStore::Redis)
        {
            config.redis.as_ref().map(|rc| {
                let mut cur = self.store.lock().unwrap_or_else(PoisonError::into_inner);
                match &*cur {
                    Some(s) if s.serves(rc) => s.clone(),
                    _ => {
                        let s = Arc::new(RedisStore::new(rc));
                        *cur = Some(s.clone());
                        s
                    }
                }
            })
        } else {
            None
        };
        let mut limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        limiters.retain(|_, l| l.strong_count() > 0);
        let routes = config
            .routes
            .iter()
            .map(|route| {
                route
                    .rate_limits
                    .iter()
                    .filter_map(|name| {
                        // Validation guarantees the name exists.
                        let Some(def) = config.rate_limits.get(name) else {
                            tracing::error!(route = %route.name, limit = %name, "route names an undefined rate limit");
                            return None;
                        };
                        let limiter = match limiters.get(def).and_then(Weak::upgrade) {
                            Some(l) => l,
                            None => {
                                let l = Arc::new(Limiter::new(def.clone(), &self.metrics));
                                limiters.insert(def.clone(), Arc::downgrade(&l));
                                l
                            }
                        };
                        let store = if def.store == LimitStore::Redis { store.clone() } else { None };
                        Some(RouteLimit { limiter, store })
                    })
                    .collect::<Vec<_>>()
                    .into()
            })
            .collect();
        Resolved {
            policy: Arc::downgrade(policy),
            routes,
        }
    }

    fn now(&self) -> u64 {
        self.clock.now_nanos()
    }

    /// Refuses if any key is held after a Zuora 429.
    fn check_holds(
        &self,
        limits: &[RouteLimit],
        keys: &[String],
        now: u64,
    ) -> Result<(), GatewayError> {
        for (l, k) in limits.iter().zip(keys) {
            if let Some(retry_after) = l.limiter.holds.remaining(k, now) {
                l.limiter.counters.held.inc();
                return Err(GatewayError::UpstreamRateLimited { retry_after });
            }
        }
        Ok(())
    }

    /// Decides a request against limits that are all `store: local`
    /// (synchronous; see [`RouteLimit::is_shared`]). `keys[i]` is the
    /// request's key for `limits[i]`. Returns the tightest quota left.
    pub fn decide_local(
        &self,
        limits: &[RouteLimit],
        keys: &[String],
    ) -> Result<Option<Quota>, GatewayError> {
        let now = self.now();
        self.check_holds(limits, keys, now)?;
        self.admit_locally(limits.iter().zip(keys), now)
    }

    fn admit_locally<'a>(
        &self,
        pairs: impl Iterator<Item = (&'a RouteLimit, &'a String)> + Clone,
        now: u64,
    ) -> Result<Option<Quota>, GatewayError> {
        match admit_all(
            pairs.clone().map(|(l, k)| (&l.limiter.local, k.as_str())),
            now,
        ) {
            Ok(q) => {
                for (l, _) in pairs {
                    l.limiter.counters.admitted.inc();
                }
                Ok(q)
            }
            Err(refusal) => {
                let Some((l, _)) = pairs.clone().nth(refusal.index) else {
                    return Err(GatewayError::Internal(
                        "rate limit refusal index out of range".into(),
                    ));
                };
                l.limiter.counters.limited.inc();
                Err(limited(l, refusal.retry_after))
            }
        }
    }

    /// Decides a request against any mix of local and Redis limits.
    ///
    /// Order: Zuora holds; a read-only check of the local limits (a local
    /// refusal never costs a Redis round trip); one atomic Redis decision for
    /// all shared limits; then the local commit. A refusal consumes nothing,
    /// except in one race: a local limit that admitted on check and refuses
    /// on commit after Redis already admitted (the Redis slot is then spent;
    /// the gateway never over-admits).
    pub async fn decide(
        &self,
        limits: &[RouteLimit],
        keys: &[String],
    ) -> Result<Option<Quota>, GatewayError> {
        let Some(store) = limits.iter().find_map(|l| l.store.clone()) else {
            return self.decide_local(limits, keys);
        };
        let now = self.now();
        self.check_holds(limits, keys, now)?;
        for (l, k) in limits.iter().zip(keys).filter(|(l, _)| l.store.is_none()) {
            if let Err(wait) = l.limiter.local.check(k, now) {
                l.limiter.counters.limited.inc();
                return Err(limited(l, wait));
            }
        }
        let shared: Vec<(usize, RedisLimit<'_>)> = limits
            .iter()
            .zip(keys)
            .enumerate()
            .filter(|(_, (l, _))| l.store.is_some())
            .map(|(i, (l, k))| {
                (
                    i,
                    RedisLimit {
                        name: &l.limiter.config.name,
                        key: k,
                        rate: l.limiter.rate,
                    },
                )
            })
            .collect();
        let redis_limits: Vec<RedisLimit<'_>> = shared.iter().map(|(_, r)| *r).collect();
        let mut quota: Option<Quota> = None;
        // Indexes (into `limits`) decided locally: local limits, plus shared ones falling back.
        let mut local_set: Vec<usize> = (0..limits.len())
            .filter(|i| limits[*i].store.is_none())
            .collect();
        match store.decide(&redis_limits).await {
            Ok(RedisVerdict::Admitted(q)) => {
                for (i, _) in &shared {
                    limits[*i].limiter.counters.admitted.inc();
                }
                quota = q;
            }
            Ok(RedisVerdict::Refused(r)) => {
                let l = shared.get(r.index).map(|(i, _)| &limits[*i]);
                let Some(l) = l else {
                    return Err(GatewayError::Internal(
                        "rate limit refusal index out of range".into(),
                    ));
                };
                l.limiter.counters.limited.inc();
                return Err(limited(l, r.retry_after));
            }
            Ok(RedisVerdict::Held { index, retry_after }) => {
                if let Some((i, _)) = shared.get(index) {
                    limits[*i].limiter.counters.held.inc();
                    // Remember locally too: this replica need not ask again.
                    let until = now.saturating_add(nanos(retry_after));
                    limits[*i].limiter.holds.hold(&keys[*i], until);
                }
                return Err(GatewayError::UpstreamRateLimited { retry_after });
            }
            Err(e) => {
                if e != StoreError::Backoff {
                    tracing::warn!(error = %e, "rate-limit store failed; applying on_store_error");
                }
                for (i, _) in &shared {
                    let l = &limits[*i];
                    if e != StoreError::Backoff {
                        l.limiter.counters.store_errors.inc();
                    }
                    if l.limiter.config.on_store_error == StoreErrorPolicy::Deny {
                        l.limiter.counters.error_denied.inc();
                        return Err(GatewayError::LimiterUnavailable);
                    }
                }
                for (i, _) in &shared {
                    let l = &limits[*i];
                    match l.limiter.config.on_store_error {
                        StoreErrorPolicy::Local => {
                            l.limiter.counters.fallbacks.inc();
                            local_set.push(*i);
                        }
                        StoreErrorPolicy::Allow => {
                            l.limiter.counters.error_allowed.inc();
                        }
                        StoreErrorPolicy::Deny => {}
                    }
                }
                local_set.sort_unstable();
            }
        }
        let pairs = local_set.iter().map(|i| (&limits[*i], &keys[*i]));
        let local_quota = self.admit_locally(pairs, self.now())?;
        Ok(match (quota, local_quota) {
            (Some(a), Some(b)) => Some(a.tighter(b)),
            (a, b) => a.or(b),
        })
    }

    /// Zuora answered 429 for a request with these limits and keys: hold each
    /// key for `retry_after` (capped at [`MAX_UPSTREAM_HOLD`]), here and, for
    /// `store: redis` limits, on every replica. Needs a tokio runtime when
    /// any limit is shared (the Redis write runs in the background).
    pub fn hold_upstream(&self, limits: &[RouteLimit], keys: &[String], retry_after: Duration) {
        let retry_after = retry_after.min(MAX_UPSTREAM_HOLD);
        let until = self.now().saturating_add(nanos(retry_after));
        for (l, k) in limits.iter().zip(keys) {
            l.limiter.holds.hold(k, until);
            if let Some(store) = &l.store {
                let (store, name, key) = (store.clone(), l.limiter.config.name.clone(), k.clone());
                let counter = l.limiter.counters.store_errors.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.hold(&name, &key, retry_after).await {
                        if e != StoreError::Backoff {
                            counter.inc();
                        }
                        tracing::warn!(error = %e, limit = %name, "could not share a Zuora hold through the rate-limit store");
                    }
                });
            }
        }
    }

    /// Evicts idle keys (full buckets, ended holds) of every live limiter and
    /// returns memory. [`LimiterRegistry::spawn_sweeper`] runs it periodically.
    pub fn sweep(&self) -> usize {
        let live: Vec<Arc<Limiter>> = {
            let mut limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
            limiters.retain(|_, l| l.strong_count() > 0);
            limiters.values().filter_map(Weak::upgrade).collect()
        };
        let now = self.now();
        live.iter()
            .map(|l| {
                l.holds.sweep(now);
                l.local.sweep(now)
            })
            .sum()
    }

    /// Runs [`LimiterRegistry::sweep`] every `every` until the registry is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(registry) = weak.upgrade() else {
                    break;
                };
                let removed = registry.sweep();
                tracing::debug!(removed, "rate-limit sweep");
            }
        })
    }

    /// The live limiter of `config`, if any policy in use defines it.
    pub fn limiter(&self, config: &RateLimitConfig) -> Option<Arc<Limiter>> {
        let limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        limiters.get(config).and_then(Weak::upgrade)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn limited(l: &RouteLimit, retry_after: Duration) -> GatewayError {
    GatewayError::RateLimited {
        limit: l.limiter.config.name.clone(),
        retry_after,
        quota: Some(l.limiter.rate.burst),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
