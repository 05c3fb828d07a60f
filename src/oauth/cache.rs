//! [`TokenCache`]: the current token of one upstream, a background task that
//! keeps it fresh, and the bounded wait of requests that arrive without one.
//!
//! Only the background task requests tokens, which makes the refresh single
//! flight by construction: requests that find no usable token wake the task
//! (an idempotent [`Notify`] permit) and wait on a [`watch`] channel for its
//! next outcome. The task also enforces the pacing Zuora asks for (the token
//! endpoint is rate limited per IP): at most one request per second, jittered
//! exponential backoff up to 10 s after failures, `Retry-After` honoured.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::Uri;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::fetch::{Credentials, FetchError, fetch_token};
use super::metrics::OAuthMetrics;
use super::token::{BearerToken, Issued, Schedule};
use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use crate::secret::Secret;
use crate::upstream::HttpClient;

/// Token requests never start closer together than this (also the backoff floor).
const MIN_FETCH_INTERVAL: Duration = Duration::from_secs(1);
/// A token Zuora rejects (401) younger than this counts towards a rejection
/// streak, which slows token requests down like failures do (so credentials
/// that get tokens Zuora then refuses cannot hammer the token endpoint).
const YOUNG_TOKEN: Duration = Duration::from_secs(30);
/// Longest backoff between failed token requests (unless `Retry-After` says more).
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Shortest time a request waits for a token being fetched.
const MIN_WAIT: Duration = Duration::from_secs(2);
/// Longest a token request may take, whatever the upstream's request timeout.
const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What the background task last did, as seen by waiting requests.
#[derive(Debug, Clone)]
enum Status {
    /// A token request is in flight or about to start.
    Fetching,
    /// The last token request succeeded.
    Fresh,
    /// The last token request failed; the next one starts at `retry_at`.
    Failed {
        message: Arc<str>,
        retry_at: Instant,
    },
}

/// The Zuora token of one upstream. Cheap to clone (one `Arc`); every clone
/// sees the same token. Call [`TokenCache::start`] once, inside the runtime.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: String,
    token_url: Uri,
    client_id: Secret,
    client_secret: Secret,
    refresh_before: Duration,
    fetch_timeout: Duration,
    wait_bound: Duration,
    client: HttpClient,
    /// The latest token (possibly past its usable time); read lock-free.
    current: Arc<ArcSwapOption<Issued>>,
    status: watch::Sender<Status>,
    /// Wakes the background task: a request needs a token, or the cache is gone.
    wake: Arc<Notify>,
    /// Readiness: a usable token is held.
    ready: Arc<AtomicBool>,
    metrics: OAuthMetrics,
    generations: AtomicU64,
    /// Consecutive 401s for young tokens (see [`YOUNG_TOKEN`]).
    rejections: AtomicU32,
    started: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The task holds only a weak reference: let it notice and exit.
        self.wake.notify_one();
    }
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("upstream", &self.inner.upstream)
            .field("token_url", &self.inner.token_url)
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A cache for upstream `cfg`, requesting tokens from `token_url`
    /// (`oauth.token_url`, or `<base_url>/oauth/token`) with `client`.
    /// `ready` (from [`crate::health::Health::token_flag`]) is kept true
    /// while a usable token is held. Nothing is fetched until [`Self::start`].
    ///
    /// Timing: a request without a usable token waits at most
    /// max(2 s, connect timeout); one token request may take at most
    /// min(request timeout, 10 s).
    pub fn new(
        cfg: &UpstreamConfig,
        token_url: Uri,
        client: HttpClient,
        ready: Arc<AtomicBool>,
        metrics: OAuthMetrics,
    ) -> Self {
        ready.store(false, Ordering::Release);
        let current = Arc::new(ArcSwapOption::empty());
        metrics.expiry.watch(&cfg.name, Arc::downgrade(&current));
        let fetch_timeout = cfg.request_timeout.min(MAX_FETCH_TIMEOUT);
        let (status, _) = watch::channel(Status::Fetching);
        TokenCache {
            inner: Arc::new(Inner {
                upstream: cfg.name.clone(),
                token_url,
                client_id: cfg.oauth.client_id.clone(),
                client_secret: cfg.oauth.client_secret.clone(),
                refresh_before: cfg.oauth.refresh_before_expiry,
                fetch_timeout,
                wait_bound: cfg
                    .connect_timeout
                    .max(MIN_WAIT)
                    .min(fetch_timeout.max(MIN_WAIT)),
                client,
                current,
                status,
                wake: Arc::new(Notify::new()),
                ready,
                metrics,
                generations: AtomicU64::new(0),
                rejections: AtomicU32::new(0),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// Starts the background task: fetch now, refresh ahead of expiry, retry
    /// failures with backoff, forever (it never gives up, so an unreachable
    /// Zuora at startup delays readiness but never fails the process). The
    /// task ends when every clone of the cache is dropped. Calling this again
    /// starts nothing.
    pub fn start(&self) -> JoinHandle<()> {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return tokio::spawn(async {});
        }
        tokio::spawn(refresh_loop(
            Arc::downgrade(&self.inner),
            self.inner.wake.clone(),
        ))
    }

    /// A token valid for a while yet. Without one (first start, after a
    /// 401, after refreshes failed until expiry) it waits for the background
    /// task's next answer, bounded; failures give
    /// [`GatewayError::TokenUnavailable`] (503, category 61) with the reason.
    ///
    /// When a usable token is held this is one atomic load, one clock read
    /// and one reference-count increment: no lock, no allocation.
    pub async fn token(&self) -> Result<BearerToken, GatewayError> {
        match self.usable() {
            Some(token) => Ok(token),
            None => self.wait_for_token().await,
        }
    }

    /// Drops `token` after Zuora answered 401 to it, and wakes the refresh,
    /// but only if it is still the current token: a burst of 401s for one
    /// token causes one token request. Returns whether it was current.
    pub fn invalidate(&self, token: &BearerToken) -> bool {
        let expected = Some(Arc::clone(&token.0));
        let previous = self.inner.current.compare_and_swap(&expected, None);
        let was_current = matches!(&*previous, Some(p) if Arc::ptr_eq(p, &token.0));
        if was_current {
            let age = token.0.schedule.issued_at.elapsed();
            let streak = if age < YOUNG_TOKEN {
                self.inner.rejections.fetch_add(1, Ordering::AcqRel) + 1
            } else {
                self.inner.rejections.store(1, Ordering::Release);
                1
            };
            if streak > 1 {
                tracing::warn!(
                    upstream = %self.inner.upstream,
                    generation = token.generation(),
                    age_secs = age.as_secs(),
                    rejections_in_a_row = streak,
                    "Zuora rejected a fresh access token (401); slowing down token requests"
                );
            } else {
                tracing::info!(
                    upstream = %self.inner.upstream,
                    generation = token.generation(),
                    "Zuora rejected the access token (401); requesting a new one"
                );
            }
            self.inner.wake.notify_one();
        }
        was_current
    }

    /// The token held now, usable or not (for diagnostics and tests).
    pub fn current(&self) -> Option<BearerToken> {
        self.inner.current.load_full().map(BearerToken)
    }

    /// The upstream this cache serves.
    pub fn upstream(&self) -> &str {
        &self.inner.upstream
    }

    /// Whether a usable token is held (the readiness flag).
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Counts a 401 handled by the token layer (`replayed`, `not_replayable`,
    /// `token_unavailable`).
    pub fn record_401(&self, outcome: &'static str) {
        self.inner.metrics.recovery(&self.inner.upstream, outcome);
    }

    /// The token held now if it is usable, without waiting (the fast path
    /// of [`TokenCache::token`]).
    pub(crate) fn usable(&self) -> Option<BearerToken> {
        let held = self.inner.current.load();
        match &*held {
            Some(t) if t.usable_at(Instant::now()) => Some(BearerToken(Arc::clone(t))),
            _ => None,
        }
    }

    async fn wait_for_token(&self) -> Result<BearerToken, GatewayError> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.wait_bound;
        let mut status = inner.status.subscribe();
        loop {
            // Seen before the token check, so an outcome landing in between still wakes us.
            let seen = status.borrow_and_update().clone();
            if let Some(token) = self.usable() {
                return Ok(token);
            }
            if let Status::Failed { message, retry_at } = seen {
                let wait = retry_at.saturating_duration_since(Instant::now());
                return Err(GatewayError::TokenUnavailable(format!(
                    "{message}; next attempt in {} s",
                    whole_secs(wait)
                )));
            }
            inner.wake.notify_one();
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(GatewayError::TokenUnavailable(
                        "the token refresh has stopped".to_owned(),
                    ));
                }
                Err(_) => {
                    return Err(GatewayError::TokenUnavailable(format!(
                        "Zuora's token endpoint has not answered within {} s",
                        whole_secs(inner.wait_bound)
                    )));
                }
            }
        }
    }
}

impl Inner {
    /// One token request; installs the token on success.
    async fn fetch_and_install(&self, sent_at: Instant) -> Result<Arc<Issued>, FetchError> {
        let creds = Credentials {
            token_url: &self.token_url,
            client_id: &self.client_id,
            client_secret: &self.client_secret,
        };
        // Exported as its own trace (it runs in the background, not under a
        // request): by ratio, and always when it fails (`error.type`).
        let span = tracing::info_span!(
            "zuora.token_fetch",
            otel.kind = "client",
            upstream = %self.upstream,
            error.type = tracing::field::Empty,
        );
        let result = tracing::Instrument::instrument(
            fetch_token(&self.client, &creds, self.fetch_timeout),
            span.clone(),
        )
        .await;
        if let Err(e) = &result {
            span.record("error.type", e.outcome());
        }
        drop(span);
        match result {
            Ok(grant) => {
                self.metrics.fetch(&self.upstream, "success");
                let issued = Arc::new(Issued {
                    value: grant.access_token,
                    header: grant.header,
                    generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
                    schedule: Schedule::new(sent_at, grant.lifetime, self.refresh_before),
                });
                self.current.store(Some(Arc::clone(&issued)));
                Ok(issued)
            }
            Err(e) => {
                self.metrics.fetch(&self.upstream, e.outcome());
                Err(e)
            }
        }
    }
}

/// The background task: sleeps until the token is due for refresh (or a
/// request needs one), fetches, paces failures.
async fn refresh_loop(cache: Weak<Inner>, wake: Arc<Notify>) {
    let mut failures: u32 = 0;
    let mut last_sent: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    loop {
        let Some(inner) = cache.upgrade() else { return };
        let now = Instant::now();
        let held = inner.current.load_full();
        let usable = held.as_ref().filter(|t| t.usable_at(now));
        let mut due = usable.map_or(now, |t| t.schedule.refresh_at);
        if let Some(last) = last_sent {
            due = due.max(last + pace(inner.rejections.load(Ordering::Acquire)));
        }
        if let Some(retry) = retry_at {
            due = due.max(retry);
        }
        if due > now {
            inner.ready.store(usable.is_some(), Ordering::Release);
            // Also wake when the held token stops being usable, to clear readiness.
            let wake_at = usable.map_or(due, |t| due.min(t.schedule.usable_until));
            drop(held);
            drop(inner);
            tokio::select! {
                () = tokio::time::sleep_until(wake_at) => {}
                () = wake.notified() => {}
            }
            continue;
        }
        // A refresh of a token that was never rejected ends a rejection streak.
        let routine = usable.is_some();
        drop(held);

        let sent_at = Instant::now();
        last_sent = Some(sent_at);
        inner.status.send_replace(Status::Fetching);
        match inner.fetch_and_install(sent_at).await {
            Ok(issued) => {
                retry_at = None;
                if routine {
                    inner.rejections.store(0, Ordering::Release);
                }
                inner.ready.store(true, Ordering::Release);
                inner.status.send_replace(Status::Fresh);
                let expires_in = issued
                    .schedule
                    .expires_at
                    .saturating_duration_since(Instant::now());
                if failures > 0 || issued.generation == 1 {
                    tracing::info!(
                        upstream = %inner.upstream,
                        generation = issued.generation,
                        expires_in_secs = expires_in.as_secs(),
                        after_failures = failures,
                        "obtained a Zuora access token"
                    );
                } else {
                    tracing::debug!(
                        upstream = %inner.upstream,
                        generation = issued.generation,
                        expires_in_secs = expires_in.as_secs(),
                        "refreshed the Zuora access token"
                    );
                }
                failures = 0;
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                let delay = backoff(failures, err.retry_after());
                let next = Instant::now() + delay;
                retry_at = Some(next);
                let still_usable = inner
                    .current
                    .load()
                    .as_ref()
                    .is_some_and(|t| t.usable_at(Instant::now()));
                inner.ready.store(still_usable, Ordering::Release);
                tracing::warn!(
                    upstream = %inner.upstream,
                    outcome = err.outcome(),
                    error = %err,
                    consecutive_failures = failures,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    holding_valid_token = still_usable,
                    "Zuora token request failed"
                );
                inner.status.send_replace(Status::Failed {
                    message: Arc::from(err.to_string()),
                    retry_at: next,
                });
            }
        }
    }
}

/// The wait after the `failures`-th consecutive failure: exponential from
/// 1 s, capped at 10 s, jittered over the upper half, never under 1 s;
/// at least Zuora's `Retry-After` (up to 5 min) when it sent one.
pub(crate) fn backoff(failures: u32, retry_after: Option<Duration>) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let ceiling = MIN_FETCH_INTERVAL
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF);
    let floor = (ceiling / 2).max(MIN_FETCH_INTERVAL);
    let jittered = floor + (ceiling.saturating_sub(floor)).mul_f64(fastrand::f64());
    match retry_after {
        Some(asked) => jittered.max(asked.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// The least time between two token requests after `rejections` young
/// tokens in a row were refused: 1 s, then doubling up to 10 s.
fn pace(rejections: u32) -> Duration {
    let doublings = rejections.saturating_sub(1).min(16);
    MIN_FETCH_INTERVAL
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// Seconds, rounded up, at least 1 (for messages).
fn whole_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_and_stays_within_one_to_ten_seconds() {
        for failures in 1..40 {
            for _ in 0..50 {
                let d = backoff(failures, None);
                assert!(
                    d >= MIN_FETCH_INTERVAL && d <= MAX_BACKOFF,
                    "{failures}: {d:?}"
                );
            }
        }
        assert_eq!(backoff(1, None), Duration::from_secs(1));
        let third = backoff(3, None);
        assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
        assert!(backoff(30, None) >= Duration::from_secs(5));
    }

    #[test]
    fn repeated_rejections_of_fresh_tokens_slow_requests_down_to_one_per_ten_seconds() {
        assert_eq!(pace(0), MIN_FETCH_INTERVAL);
        assert_eq!(pace(1), MIN_FETCH_INTERVAL);
        assert_eq!(pace(2), Duration::from_secs(2));
        assert_eq!(pace(4), Duration::from_secs(8));
        assert_eq!(pace(50), MAX_BACKOFF);
    }

    #[test]
    fn backoff_honours_retry_after_up_to_five_minutes() {
        assert!(backoff(1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
        assert_eq!(
            backoff(1, Some(Duration::from_secs(100_000))),
            MAX_RETRY_AFTER
        );
        assert!(backoff(5, Some(Duration::ZERO)) >= Duration::from_secs(5));
    }
}
