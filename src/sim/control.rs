//! [`SimControl`]: the simulator's shared state and its test-side remote control.
//!
//! Everything is behind atomics or short-lived `std::sync::Mutex` guards that are never held
//! across an `.await`, so every method takes `&self` and is safe to call from any thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use super::SimOptions;
use super::jobs::JobStore;
use super::oauth::{Credentials, TokenStore};

/// How many requests [`SimControl::requests`] keeps.
const REQUEST_LOG_CAPACITY: usize = 1_000;
/// Zuora's default concurrency limit per tenant.
const CONCURRENCY_LIMIT: u64 = 40;
/// Zuora's per-minute API quota for a Production tenant.
const RATE_LIMIT_PER_MINUTE: u64 = 50_000;

/// One request as the simulator received it (`/v1/**` and `/oauth/token`).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The request method.
    pub method: Method,
    /// Path and query, as sent.
    pub path_and_query: String,
    /// All request headers, `Authorization` included (this is test-only inspection).
    pub headers: HeaderMap,
    /// The body as received on the wire.
    pub body: Bytes,
    /// The body after gzip decoding when `Content-Encoding: gzip`; otherwise (or when decoding
    /// failed) the same as `body`.
    pub decoded_body: Bytes,
    /// The token of an `Authorization: Bearer …` header, if any.
    pub bearer_token: Option<String>,
}

/// A job's state as the simulator sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSnapshot {
    /// The 32-character job id.
    pub id: String,
    /// `Pending`, `Processing`, `Completed`, `Failed`, `Canceled`, `Stopping` or `Stopped`.
    pub status: String,
    /// `RatePlanCharge` or `OrderLineItem`.
    pub job_type: String,
}

/// What an injected `/v1` answer looks like.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Injection {
    pub(crate) status: StatusCode,
    pub(crate) retry_after: Option<u64>,
}

/// The values for the `ratelimit-remaining` and `ratelimit-reset` headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateWindowState {
    pub(crate) remaining: u64,
    pub(crate) reset_secs: u64,
}

/// Shared simulator state; the test-side remote control of a running simulator.
///
/// Get it from [`SimHandle::control`](super::SimHandle::control).
pub struct SimControl {
    fixed_answer: bool,
    pub(crate) credentials: Credentials,
    pub(crate) tokens: TokenStore,
    pub(crate) jobs: JobStore,

    token_ttl_nanos: AtomicU64,
    token_endpoint_down: AtomicBool,
    token_latency_nanos: AtomicU64,
    /// 0: off; n + 1: rate limited with `Retry-After: n`.
    token_rate_limited: AtomicU64,
    latency_nanos: AtomicU64,
    inject_left: AtomicUsize,
    injection: Mutex<Injection>,

    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    api_requests: AtomicU64,
    expired_token_requests: AtomicU64,
    unauthorized_requests: AtomicU64,

    log: Mutex<VecDeque<RecordedRequest>>,

    started: Instant,
    /// The current minute window (high 32 bits) and its request count (low 32 bits).
    rate_window: AtomicU64,
    in_flight: AtomicU64,
}

impl std::fmt::Debug for SimControl {
    // Counters only: the state holds tokens and recorded bodies.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimControl")
            .field("fixed_answer", &self.fixed_answer)
            .field("token_requests", &self.token_requests())
            .field("tokens_issued", &self.tokens_issued())
            .field("api_requests", &self.api_requests())
            .finish_non_exhaustive()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Locks, ignoring poisoning: every critical section leaves the data consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SimControl {
    pub(crate) fn new(opts: &SimOptions) -> Self {
        Self {
            fixed_answer: opts.fixed_answer,
            credentials: Credentials::new(opts.client_id.clone(), opts.client_secret.clone()),
            tokens: TokenStore::default(),
            jobs: JobStore::seeded(),
            token_ttl_nanos: AtomicU64::new(nanos(opts.token_ttl)),
            token_endpoint_down: AtomicBool::new(false),
            token_latency_nanos: AtomicU64::new(0),
            token_rate_limited: AtomicU64::new(0),
            latency_nanos: AtomicU64::new(0),
            inject_left: AtomicUsize::new(0),
            injection: Mutex::new(Injection {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                retry_after: None,
            }),
            token_requests: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
            api_requests: AtomicU64::new(0),
            expired_token_requests: AtomicU64::new(0),
            unauthorized_requests: AtomicU64::new(0),
            log: Mutex::new(VecDeque::with_capacity(REQUEST_LOG_CAPACITY)),
            started: Instant::now(),
            rate_window: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }

    // ---- knobs ------------------------------------------------------------------------------

    /// Lifetime of tokens issued from now on (already issued tokens keep theirs).
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.token_ttl_nanos.store(nanos(ttl), Ordering::Relaxed);
    }

    /// `true`: `/oauth/token` answers 503 with a Zuora error body (category 61).
    pub fn set_token_endpoint_down(&self, down: bool) {
        self.token_endpoint_down.store(down, Ordering::Relaxed);
    }

    /// Delay before `/oauth/token` answers (any outcome).
    pub fn set_token_latency(&self, d: Duration) {
        self.token_latency_nanos.store(nanos(d), Ordering::Relaxed);
    }

    /// `Some(n)`: `/oauth/token` answers 429 with `Retry-After: n` (category 70); `None`: off.
    /// "Down" wins over "rate limited" when both are on.
    pub fn set_token_rate_limited(&self, retry_after: Option<u64>) {
        let encoded = retry_after.map_or(0, |n| n.saturating_add(1));
        self.token_rate_limited.store(encoded, Ordering::Relaxed);
    }

    /// Makes every token issued so far invalid (401 `90000011`); later tokens are fine.
    pub fn revoke_all_tokens(&self) {
        self.tokens.revoke_all();
    }

    /// Delay before any `/v1` request is answered (applied before the token check).
    pub fn set_latency(&self, d: Duration) {
        self.latency_nanos.store(nanos(d), Ordering::Relaxed);
    }

    /// The next `count` authenticated `/v1` requests get `status` with a Zuora error body
    /// (category 70 for 429, 60 for 500, 61 for 502/503/504, …) and `Retry-After` when given.
    /// Replaces any earlier injection; `count == 0` cancels it. A status outside 100..=999
    /// becomes 500.
    pub fn inject_status(&self, status: u16, count: usize, retry_after: Option<u64>) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        *lock(&self.injection) = Injection {
            status,
            retry_after,
        };
        self.inject_left.store(count, Ordering::Release);
    }

    // ---- counters and inspection -------------------------------------------------------------

    /// `/oauth/token` requests received (all outcomes).
    pub fn token_requests(&self) -> u64 {
        self.token_requests.load(Ordering::Relaxed)
    }

    /// Tokens issued.
    pub fn tokens_issued(&self) -> u64 {
        self.tokens_issued.load(Ordering::Relaxed)
    }

    /// `/v1` requests received (all outcomes).
    pub fn api_requests(&self) -> u64 {
        self.api_requests.load(Ordering::Relaxed)
    }

    /// `/v1` requests that carried a token this simulator issued but that had expired.
    pub fn expired_token_requests(&self) -> u64 {
        self.expired_token_requests.load(Ordering::Relaxed)
    }

    /// `/v1` requests answered 401.
    pub fn unauthorized_requests(&self) -> u64 {
        self.unauthorized_requests.load(Ordering::Relaxed)
    }

    /// The last 1,000 `/v1` and `/oauth/token` requests, oldest first. Empty in bench mode
    /// (`fixed_answer`), which records nothing.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.log).iter().cloned().collect()
    }

    /// Forgets the recorded requests (counters are kept).
    pub fn clear_requests(&self) {
        lock(&self.log).clear();
    }

    /// The current state of a job in any of the three backfill families.
    pub fn job(&self, job_id: &str) -> Option<JobSnapshot> {
        self.jobs.snapshot(job_id)
    }

    // ---- used by the request handlers --------------------------------------------------------

    pub(crate) fn fixed_answer(&self) -> bool {
        self.fixed_answer
    }

    pub(crate) fn token_ttl(&self) -> Duration {
        Duration::from_nanos(self.token_ttl_nanos.load(Ordering::Relaxed))
    }

    pub(crate) fn token_endpoint_down(&self) -> bool {
        self.token_endpoint_down.load(Ordering::Relaxed)
    }

    pub(crate) fn token_latency(&self) -> Duration {
        Duration::from_nanos(self.token_latency_nanos.load(Ordering::Relaxed))
    }

    pub(crate) fn token_rate_limited(&self) -> Option<u64> {
        match self.token_rate_limited.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n - 1),
        }
    }

    pub(crate) fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    /// Spends one injected status, if any are left.
    pub(crate) fn take_injection(&self) -> Option<Injection> {
        // Fast path for the common case: a single load.
        self.inject_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()?;
        Some(*lock(&self.injection))
    }

    pub(crate) fn count_token_request(&self) {
        self.token_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_token_issued(&self) {
        self.tokens_issued.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_api_request(&self) {
        self.api_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_expired_token(&self) {
        self.expired_token_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_unauthorized(&self) {
        self.unauthorized_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, request: RecordedRequest) {
        let mut log = lock(&self.log);
        if log.len() >= REQUEST_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(request);
    }

    /// Counts one `/v1` request in the current one-minute window (failed requests count too, as
    /// at Zuora). The quota is reported, not enforced: benchmarks would otherwise trip it.
    pub(crate) fn rate_window_hit(&self) -> RateWindowState {
        let secs = self.started.elapsed().as_secs();
        let minute = secs / 60;
        let mut count = 1;
        let _ = self
            .rate_window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |packed| {
                let (window, seen) = (packed >> 32, packed & 0xFFFF_FFFF);
                count = if window == minute & 0xFFFF_FFFF {
                    (seen + 1).min(0xFFFF_FFFF)
                } else {
                    1
                };
                Some(((minute & 0xFFFF_FFFF) << 32) | count)
            });
        RateWindowState {
            remaining: RATE_LIMIT_PER_MINUTE.saturating_sub(count),
            reset_secs: 60 - secs % 60,
        }
    }

    /// Marks a `/v1` request in flight until the guard drops (for `Concurrency-Limit-Remaining`;
    /// reported, not enforced).
    pub(crate) fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub(crate) fn concurrency_limit(&self) -> u64 {
        CONCURRENCY_LIMIT
    }

    pub(crate) fn concurrency_remaining(&self) -> u64 {
        CONCURRENCY_LIMIT.saturating_sub(self.in_flight.load(Ordering::Relaxed))
    }
}

/// A `/v1` request in flight; see [`SimControl::enter`].
pub(crate) struct InFlight<'a>(&'a SimControl);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
