//! Rate limit: applies the matched route's limits (all must admit) before
//! anything reaches Zuora, and reports the tightest one in `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` (draft-polli-ratelimit-headers,
//! the headers Zuora itself uses) on admitted responses.
//!
//! A refusal is [`GatewayError::RateLimited`] (429, `Retry-After`). When
//! Zuora answers 429 itself, its response (with its `Retry-After`) is passed
//! on unchanged and the route's keys are held until that `Retry-After` has
//! passed: later requests are answered here with
//! [`GatewayError::UpstreamRateLimited`] instead of each rediscovering the
//! limit at Zuora.
//!
//! Routes whose limits are all `store: local` are decided synchronously in
//! `call` (no boxing); a `store: redis` limit needs one Redis round trip,
//! whose (boxed) decision future runs before the inner call.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use tower::{Layer, Service};

use super::{GwResult, Req, Resp};
use crate::context::{Caller, RouteMatch};
use crate::error::GatewayError;
use crate::ratelimit::gcra::Quota;
use crate::ratelimit::key::build_key;
use crate::ratelimit::{DEFAULT_UPSTREAM_HOLD, LimiterRegistry, RouteLimit};

/// `RateLimit-Limit`.
pub static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`.
pub static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`.
pub static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Header values for small numbers, built once: cloning one shares its bytes
/// instead of formatting (and allocating) per response.
static SMALL_NUMBERS: LazyLock<Vec<HeaderValue>> =
    LazyLock::new(|| (0..SMALL_NUMBERS_LEN).map(HeaderValue::from).collect());

fn number(n: u64) -> HeaderValue {
    usize::try_from(n)
        .ok()
        .and_then(|i| SMALL_NUMBERS.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

thread_local! {
    /// The last large number of each header, formatted on this thread: a
    /// route's `RateLimit-Limit` is the same on every response, and beyond
    /// [`SMALL_NUMBERS`] formatting it allocates.
    static LAST_LARGE: std::cell::RefCell<[Option<(u64, HeaderValue)>; 3]> =
        const { std::cell::RefCell::new([None, None, None]) };
}

/// [`number`], reusing the value last built on this thread for header
/// `slot` (0: limit, 1: remaining, 2: reset) when `n` is the same.
fn number_in(slot: usize, n: u64) -> HeaderValue {
    if n < SMALL_NUMBERS_LEN {
        return number(n);
    }
    LAST_LARGE
        .try_with(|cell| {
            let mut last = cell.try_borrow_mut().ok()?;
            let entry = last.get_mut(slot)?;
            match entry {
                Some((m, v)) if *m == n => Some(v.clone()),
                _ => {
                    let v = number(n);
                    *entry = Some((n, v.clone()));
                    Some(v)
                }
            }
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| number(n))
}

/// Numbers `0..SMALL_NUMBERS_LEN` are in [`SMALL_NUMBERS`].
const SMALL_NUMBERS_LEN: u64 = 4097;

/// Builds [`RateLimit`] over the shared limiter registry.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    registry: Arc<LimiterRegistry>,
}

impl RateLimitLayer {
    /// Limits with the state in `registry` (one per process, kept across reloads).
    pub fn new(registry: Arc<LimiterRegistry>) -> Self {
        RateLimitLayer { registry }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            registry: self.registry.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    registry: Arc<LimiterRegistry>,
}

/// What the response needs from an admitted request's decision.
#[derive(Debug)]
pub struct Admitted {
    registry: Arc<LimiterRegistry>,
    limits: Arc<[RouteLimit]>,
    keys: Keys,
    quota: Option<Quota>,
}

/// The keys of a route's limits, one per limit: most routes have one
/// limit, whose key is kept without a `Vec` around it.
#[derive(Debug)]
enum Keys {
    One(String),
    Many(Vec<String>),
}

impl Keys {
    /// Builds each limit's key; the first failure wins.
    fn build(
        limits: &[RouteLimit],
        caller: Option<&Caller>,
        route: &RouteMatch,
    ) -> Result<Keys, GatewayError> {
        let key = |l: &RouteLimit| build_key(&l.config().key, caller, route);
        match limits {
            [one] => key(one).map(Keys::One),
            _ => limits
                .iter()
                .map(key)
                .collect::<Result<Vec<_>, _>>()
                .map(Keys::Many),
        }
    }

    fn as_slice(&self) -> &[String] {
        match self {
            Keys::One(k) => std::slice::from_ref(k),
            Keys::Many(v) => v,
        }
    }
}

impl Admitted {
    /// Adds the quota headers, or holds the keys if Zuora said 429.
    fn finish(&self, mut resp: Resp) -> Resp {
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            // Zuora's own 429 (the gateway's refusals are errors, not responses, in here).
            let wait = upstream_retry_after(&resp).unwrap_or(DEFAULT_UPSTREAM_HOLD);
            self.registry
                .hold_upstream(&self.limits, self.keys.as_slice(), wait);
            return resp;
        }
        if let Some(q) = self.quota {
            let h = resp.headers_mut();
            h.insert(RATELIMIT_LIMIT.clone(), number_in(0, u64::from(q.limit)));
            h.insert(
                RATELIMIT_REMAINING.clone(),
                number_in(1, u64::from(q.remaining)),
            );
            h.insert(RATELIMIT_RESET.clone(), number_in(2, ceil_secs(q.reset)));
        }
        resp
    }
}

/// Zuora's `Retry-After` in delta-seconds (an HTTP-date is treated as absent).
fn upstream_retry_after(resp: &Resp) -> Option<Duration> {
    let v = resp.headers().get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl<S> Service<Req> for RateLimit<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = RateLimitFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(route) = req.extensions().get::<RouteMatch>() else {
            return RateLimitFuture::refuse(GatewayError::Internal(
                "rate limiting before routing".into(),
            ));
        };
        let limits = self.registry.route_limits(route);
        if limits.is_empty() {
            return RateLimitFuture::Inner {
                fut: self.inner.call(req),
                admitted: None,
            };
        }
        let caller = req.extensions().get::<Caller>();
        let keys = match Keys::build(&limits, caller, route) {
            Ok(k) => k,
            Err(e) => return RateLimitFuture::refuse(e),
        };
        if !limits.iter().any(RouteLimit::is_shared) {
            return match self.registry.decide_local(&limits, keys.as_slice()) {
                Err(e) => RateLimitFuture::refuse(e),
                Ok(quota) => RateLimitFuture::Inner {
                    fut: self.inner.call(req),
                    admitted: Some(Admitted {
                        registry: self.registry.clone(),
                        limits,
                        keys,
                        quota,
                    }),
                },
            };
        }
        // A Redis round trip first: keep the service that was made ready for after it.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        let registry = self.registry.clone();
        RateLimitFuture::Deciding {
            decision: Box::pin(async move {
                let quota = registry.decide(&limits, keys.as_slice()).await?;
                Ok(Admitted {
                    registry,
                    limits,
                    keys,
                    quota,
                })
            }),
            next: Some(Box::new((inner, req))),
        }
    }
}

/// The shared-store decision of a request.
type Decision = futures_util::future::BoxFuture<'static, Result<Admitted, GatewayError>>;

pin_project_lite::pin_project! {
    /// Future of [`RateLimit`].
    #[project = Proj]
    pub enum RateLimitFuture<S, F> {
        /// Refused in `call`.
        Refused { error: Option<GatewayError> },
        /// Waiting for the shared store's decision; then `next` is called.
        /// Boxed: held inline, the request and service would size every
        /// request's future (this one sits inside it), Redis or not.
        Deciding { decision: Decision, next: Option<Box<(S, Req)>> },
        /// Admitted (or no limits): the inner call.
        Inner { #[pin] fut: F, admitted: Option<Admitted> },
    }
}

impl<S, F> RateLimitFuture<S, F> {
    fn refuse(e: GatewayError) -> Self {
        RateLimitFuture::Refused { error: Some(e) }
    }
}

impl<S> Future for RateLimitFuture<S, S::Future>
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
{
    type Output = GwResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<GwResult> {
        if let Proj::Deciding { decision, next } = self.as_mut().project() {
            let admitted = match decision.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(a)) => a,
            };
            let Some((mut inner, req)) = next.take().map(|next| *next) else {
                return Poll::Ready(Err(GatewayError::Internal(
                    "rate limit future polled after completion".into(),
                )));
            };
            let fut = inner.call(req);
            self.set(RateLimitFuture::Inner {
                fut,
                admitted: Some(admitted),
            });
        }
        match self.project() {
            Proj::Deciding { .. } => Poll::Ready(Err(GatewayError::Internal(
                "rate limit future in an impossible state".into(),
            ))),
            Proj::Refused { error } => Poll::Ready(Err(error.take().unwrap_or_else(|| {
                GatewayError::Internal("rate limit future polled after completion".into())
            }))),
            Proj::Inner { fut, admitted } => match fut.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(resp)) => Poll::Ready(Ok(match admitted.take() {
                    Some(a) => a.finish(resp),
                    None => resp,
                })),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::body::{empty, full};
    use crate::config::Config;
    use crate::policy::Policy;
    use crate::ratelimit::RateLimitMetrics;
    use crate::ratelimit::clock::ManualClock;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{ServiceBuilder, ServiceExt};

    fn policy() -> Arc<Policy> {
        let yaml = "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: simulator } }\ncallers: { trusted_identity: svc }\nroutes:\n  - { name: stop, method: PUT, path: '/v1/jobs/{jobId}', upstream: zuora, allow_callers: ['*'], rate_limits: [per-caller, per-job] }\n  - { name: open, path: '/v1/open', upstream: zuora, allow_callers: ['*'] }\nrate_limits:\n  per-caller: { key: caller, rate: 30/minute, burst: 5 }\n  per-job: { key: jobId, rate: 1/minute }\n";
        let c =
            Config::from_yaml(yaml, Path::new("t.yaml"), Path::new("."), &|_: &str| None).unwrap();
        Arc::new(Policy::compile(Arc::new(c)))
    }

    fn req(p: &Arc<Policy>, route: usize, job: &str, caller: &str) -> Req {
        let mut r = http::Request::put(format!("/v1/jobs/{job}"))
            .body(empty())
            .unwrap();
        r.extensions_mut().insert(RouteMatch {
            policy: p.clone(),
            route,
            params: if route == 0 {
                vec![job.to_owned()]
            } else {
                vec![]
            },
        });
        r.extensions_mut().insert(Caller::named(caller));
        r
    }

    /// An upstream that answers `status` (with `Retry-After: 7` on 429) and counts calls.
    fn upstream(
        status: StatusCode,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<Req, Response = Resp, Error = GatewayError, Future = impl Send>
    + Clone
    + Send
    + 'static {
        tower::service_fn(move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut r = http::Response::new(full("{}"));
                *r.status_mut() = status;
                if status == StatusCode::TOO_MANY_REQUESTS {
                    r.headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from_static("7"));
                }
                Ok::<_, GatewayError>(r)
            }
        })
    }

    fn registry() -> (Arc<LimiterRegistry>, ManualClock) {
        let clock = ManualClock::new();
        (
            LimiterRegistry::with_clock(RateLimitMetrics::default(), Arc::new(clock.clone())),
            clock,
        )
    }

    #[tokio::test]
    async fn admitted_responses_carry_the_tightest_quota() {
        let (reg, _) = registry();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(reg))
            .service(upstream(StatusCode::OK, calls.clone()));
        let p = policy();
        let r = svc.clone().oneshot(req(&p, 0, "A", "alice")).await.unwrap();
        // per-job (1 of 1, reset 60 s) is tighter than per-caller (4 of 5 left).
        assert_eq!(r.headers()["ratelimit-limit"], "1");
        assert_eq!(r.headers()["ratelimit-remaining"], "0");
        assert_eq!(r.headers()["ratelimit-reset"], "60");
        let e = svc
            .clone()
            .oneshot(req(&p, 0, "A", "alice"))
            .await
            .unwrap_err();
        let resp = e.to_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[RETRY_AFTER], "60");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the refusal never reached upstream"
        );
    }

    #[tokio::test]
    async fn routes_without_limits_pass_untouched() {
        let (reg, _) = registry();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(reg))
            .service(upstream(StatusCode::OK, calls.clone()));
        let p = policy();
        for _ in 0..10 {
            let r = svc.clone().oneshot(req(&p, 1, "", "alice")).await.unwrap();
            assert!(r.headers().get("ratelimit-limit").is_none());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn zuora_429_is_passed_on_and_holds_the_key_until_retry_after() {
        let (reg, clock) = registry();
        let calls = Arc::new(AtomicUsize::new(0));
        let limited = ServiceBuilder::new()
            .layer(RateLimitLayer::new(reg.clone()))
            .service(upstream(StatusCode::TOO_MANY_REQUESTS, calls.clone()));
        let p = policy();
        let r = limited
            .clone()
            .oneshot(req(&p, 0, "A", "alice"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            r.headers()[RETRY_AFTER],
            "7",
            "Zuora's Retry-After is passed on"
        );
        assert!(
            r.headers().get("ratelimit-remaining").is_none(),
            "no gateway quota on Zuora's 429"
        );
        // alice is held (per-caller key) even for another job, without calling Zuora.
        let e = limited
            .clone()
            .oneshot(req(&p, 0, "B", "alice"))
            .await
            .unwrap_err();
        match e {
            GatewayError::UpstreamRateLimited { retry_after } => {
                assert_eq!(retry_after, Duration::from_secs(7))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(7));
        let ok = ServiceBuilder::new()
            .layer(RateLimitLayer::new(reg))
            .service(upstream(StatusCode::OK, calls.clone()));
        assert_eq!(
            ok.oneshot(req(&p, 0, "B", "alice")).await.unwrap().status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn missing_route_match_is_refused() {
        let (reg, _) = registry();
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(reg))
            .service(upstream(StatusCode::OK, Arc::new(AtomicUsize::new(0))));
        let r = http::Request::put("/x").body(empty()).unwrap();
        assert!(matches!(
            svc.oneshot(r).await.unwrap_err(),
            GatewayError::Internal(_)
        ));
    }

    #[test]
    fn header_numbers_match_formatting() {
        for n in [0u64, 1, 59, 4096, 4097, 1 << 40] {
            assert_eq!(number(n), HeaderValue::from(n));
        }
        // The per-thread reuse of large numbers answers each slot's own number.
        for (slot, n) in [
            (0, 10_000_000u64),
            (1, 9_999_999),
            (0, 10_000_000),
            (1, 5000),
        ] {
            assert_eq!(number_in(slot, n), HeaderValue::from(n));
            assert_eq!(number_in(slot, n), HeaderValue::from(n));
            assert_eq!(number_in(2, 7), HeaderValue::from(7u64));
        }
    }
}
