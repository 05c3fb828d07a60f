//! Coalesce: identical stop requests that arrive while one is in flight are
//! joined to it — one Zuora call, every caller gets its response.
//!
//! Applies only to routes with `Validation::StopJob`. "Identical" means the
//! same caller, method, path and query (so the same `jobId`), the same
//! `Zuora-Entity-Ids`, `Zuora-Org-Ids`, `Zuora-Version`, `Accept-Encoding`,
//! `Content-Encoding` and `Content-Type`, and the same body bytes. The first
//! request (the leader) goes on down the stack; the others (followers) wait
//! for its outcome: the leader's response, buffered (bodies above
//! [`MAX_SHARED_RESPONSE`] are not shared: followers then make their own
//! call), or the leader's error as its Zuora-shaped response. A follower's
//! response carries its own `Zuora-Track-Id` and the [`Coalesced`] extension.
//! If the leader's caller goes away mid-call, a follower takes over.
//!
//! It sits before rate limiting: a duplicate that joins an in-flight stop is
//! not a second stop, so it spends no budget and is not refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::{
    ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tower::{Layer, Service};

use super::rescue::RescuedError;
use super::{GwResult, LayerFuture, Req, Resp};
use crate::body::{Body, Chunks, boxed, full};
use crate::config::Validation;
use crate::context::{Caller, RouteMatch, TrackId};
use crate::error::GatewayError;

/// Largest request body considered for coalescing (stop bodies are ~25 bytes).
pub const MAX_STOP_BODY: usize = 64 * 1024;
/// Largest response body buffered and shared with followers.
pub const MAX_SHARED_RESPONSE: usize = 256 * 1024;

static ZUORA_TRACK_ID: HeaderName = HeaderName::from_static("zuora-track-id");
/// Request headers that must be equal for two stops to be joined.
static SCOPE_HEADERS: [HeaderName; 6] = [
    HeaderName::from_static("zuora-entity-ids"),
    HeaderName::from_static("zuora-org-ids"),
    HeaderName::from_static("zuora-version"),
    ACCEPT_ENCODING,
    CONTENT_ENCODING,
    CONTENT_TYPE,
];

/// Response extension: this response was shared from another caller's identical request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalesced;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StopKey {
    caller: Option<Arc<str>>,
    method: Method,
    target: String,
    scope: [Option<HeaderValue>; 6],
    body: Bytes,
}

/// A leader's outcome as followers receive it.
#[derive(Debug)]
struct Shared {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    rescued: Option<RescuedError>,
}

#[derive(Debug, Clone)]
enum Outcome {
    Response(Arc<Shared>),
    /// Too large to share: followers call Zuora themselves.
    Unshareable,
}

type Slot = watch::Receiver<Option<Outcome>>;

#[derive(Debug, Default)]
struct InFlight {
    stops: Mutex<HashMap<Arc<StopKey>, Slot>>,
}

/// A leader's registration; dropping it unpublished (the leader's caller
/// went away) releases the followers to retry.
struct Leader {
    inflight: Arc<InFlight>,
    key: Arc<StopKey>,
    tx: watch::Sender<Option<Outcome>>,
}

impl Leader {
    fn unregister(&self) {
        let mut stops = self
            .inflight
            .stops
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if stops
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            stops.remove(&self.key);
        }
    }

    /// Unregisters first: a request arriving after the outcome is known starts its own call.
    fn publish(self, outcome: Outcome) {
        self.unregister();
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// Builds [`Coalesce`].
#[derive(Clone, Debug, Default)]
pub struct CoalesceLayer {
    inflight: Arc<InFlight>,
}

impl CoalesceLayer {
    /// A layer with its own table of in-flight stops.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for CoalesceLayer {
    type Service = Coalesce<S>;
    fn layer(&self, inner: S) -> Coalesce<S> {
        Coalesce {
            inner,
            inflight: self.inflight.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Coalesce<S> {
    inner: S,
    inflight: Arc<InFlight>,
}

/// Calls `inner` and boxes its future (outside any `async` block, so the
/// future's `Send` bound is proven for the concrete request type).
fn call_boxed<S>(inner: &mut S, req: Req) -> LayerFuture
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
    S::Future: Send + 'static,
{
    Box::pin(inner.call(req))
}

impl<S> Service<Req> for Coalesce<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = Either<S::Future, LayerFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let is_stop = req
            .extensions()
            .get::<RouteMatch>()
            .is_some_and(|m| m.config().validation == Validation::StopJob);
        let declared_len = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if !is_stop || declared_len.is_some_and(|n| n > MAX_STOP_BODY as u64) {
            return Either::Left(self.inner.call(req));
        }
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        Either::Right(Box::pin(coalesce(inner, self.inflight.clone(), req)))
    }
}

async fn coalesce<S>(mut inner: S, inflight: Arc<InFlight>, req: Req) -> GwResult
where
    S: Service<Req, Response = Resp, Error = GatewayError> + Send + 'static,
    S::Future: Send + 'static,
{
    let (parts, body) = req.into_parts();
    let body = match read_bounded(body, MAX_STOP_BODY).await {
        Ok(b) => b,
        // Not a stop body anyone else sends: forward it as it is, alone.
        Err(ReadError::TooLarge(body)) => {
            return call_boxed(&mut inner, Request::from_parts(parts, body)).await;
        }
        Err(ReadError::Failed(_)) => {
            return Err(GatewayError::InvalidValue(
                "the request body could not be read".into(),
            ));
        }
    };
    // Shared by the table and the leader: built once, never copied.
    let key = Arc::new(StopKey {
        caller: parts.extensions.get::<Caller>().map(|c| c.identity.clone()),
        method: parts.method.clone(),
        target: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        scope: std::array::from_fn(|i| parts.headers.get(&SCOPE_HEADERS[i]).cloned()),
        body: body.clone(),
    });
    let track_id = parts.extensions.get::<TrackId>().map(|t| t.0.clone());
    loop {
        let role = {
            let mut stops = inflight
                .stops
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match stops.get(&key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    stops.insert(Arc::clone(&key), rx);
                    Ok(Leader {
                        inflight: inflight.clone(),
                        key: Arc::clone(&key),
                        tx,
                    })
                }
            }
        };
        match role {
            Ok(leader) => {
                return lead(&mut inner, leader, Request::from_parts(parts, full(body))).await;
            }
            Err(mut rx) => {
                let outcome = match rx.wait_for(Option::is_some).await {
                    Ok(o) => o.clone(),
                    // The leader's caller went away before the outcome: try again (maybe as leader).
                    Err(_) => continue,
                };
                match outcome {
                    Some(Outcome::Response(shared)) => {
                        return Ok(follower_response(&shared, track_id));
                    }
                    Some(Outcome::Unshareable) | None => {
                        return call_boxed(&mut inner, Request::from_parts(parts, full(body)))
                            .await;
                    }
                }
            }
        }
    }
}

async fn lead<S>(inner: &mut S, leader: Leader, req: Req) -> GwResult
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
    S::Future: Send + 'static,
{
    let resp = match call_boxed(inner, req).await {
        Ok(r) => r,
        Err(e) => {
            leader.publish(Outcome::Response(Arc::new(error_outcome(&e))));
            return Err(e);
        }
    };
    let (parts, body) = resp.into_parts();
    match read_bounded(body, MAX_SHARED_RESPONSE).await {
        Ok(bytes) => {
            leader.publish(Outcome::Response(Arc::new(Shared {
                status: parts.status,
                version: parts.version,
                headers: parts.headers.clone(),
                body: bytes.clone(),
                rescued: None,
            })));
            Ok(Response::from_parts(parts, full(bytes)))
        }
        Err(ReadError::TooLarge(rest)) => {
            leader.publish(Outcome::Unshareable);
            Ok(Response::from_parts(parts, rest))
        }
        Err(ReadError::Failed(detail)) => {
            let e = GatewayError::BadUpstreamResponse(detail);
            leader.publish(Outcome::Response(Arc::new(error_outcome(&e))));
            Err(e)
        }
    }
}

/// The Zuora-shaped response of `e`, as the rescue layer would make it.
fn error_outcome(e: &GatewayError) -> Shared {
    let (parts, body) = e.to_response().into_parts();
    // The error body is a complete in-memory body: collecting it is immediate.
    let body = body
        .collect()
        .now_or_never()
        .and_then(Result::ok)
        .map(|c| c.to_bytes())
        .unwrap_or_else(|| crate::error::error_body(&e.code(), &e.to_string()));
    let detail = match e {
        GatewayError::Internal(d) => d.clone(),
        other => other.to_string(),
    };
    Shared {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
        rescued: Some(RescuedError {
            kind: e.kind(),
            code: e.code(),
            detail,
        }),
    }
}

fn follower_response(shared: &Shared, track_id: Option<HeaderValue>) -> Resp {
    let mut resp = Response::new(full(shared.body.clone()));
    *resp.status_mut() = shared.status;
    *resp.version_mut() = shared.version;
    *resp.headers_mut() = shared.headers.clone();
    match track_id {
        Some(t) => {
            resp.headers_mut().insert(ZUORA_TRACK_ID.clone(), t);
        }
        None => {
            resp.headers_mut().remove(&ZUORA_TRACK_ID);
        }
    }
    resp.extensions_mut().insert(Coalesced);
    if let Some(r) = &shared.rescued {
        resp.extensions_mut().insert(r.clone());
    }
    resp
}

enum ReadError {
    /// Over the bound: what was read, followed by the rest, as one body.
    TooLarge(Body),
    /// The body failed (detail for logs; no secrets in body errors).
    Failed(String),
}

/// Reads `body` whole if it is at most `max` bytes.
async fn read_bounded(mut body: Body, max: usize) -> Result<Bytes, ReadError> {
    let mut buf = Chunks::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Failed(e.to_string()))?;
        match frame.into_data() {
            Ok(data) => {
                buf.push(data);
                if buf.len() > max {
                    return Err(ReadError::TooLarge(prefixed(buf.into_bytes(), body)));
                }
            }
            Err(trailers) => {
                // Trailers are not buffered for sharing: hand the whole body back.
                let trailers = trailers.into_trailers().unwrap_or_default();
                return Err(ReadError::TooLarge(with_trailers(
                    buf.into_bytes(),
                    trailers,
                )));
            }
        }
    }
    Ok(buf.into_bytes())
}

fn prefixed(head: Bytes, rest: Body) -> Body {
    let head = http_body_util::Full::new(head).map_err(|never| match never {});
    boxed(Chain {
        head: Some(head),
        rest,
    })
}

fn with_trailers(data: Bytes, trailers: HeaderMap) -> Body {
    let stream = futures_util::stream::iter([
        Ok::<_, crate::body::BoxError>(http_body::Frame::data(data)),
        Ok(http_body::Frame::trailers(trailers)),
    ]);
    boxed(http_body_util::StreamBody::new(stream))
}

pin_project_lite::pin_project! {
    /// One body after another.
    struct Chain<A, B> {
        #[pin]
        head: Option<A>,
        #[pin]
        rest: B,
    }
}

impl<A, B> http_body::Body for Chain<A, B>
where
    A: http_body::Body<Data = Bytes>,
    B: http_body::Body<Data = Bytes>,
    A::Error: Into<crate::body::BoxError>,
    B::Error: Into<crate::body::BoxError>,
{
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if let Some(head) = this.head.as_mut().as_pin_mut() {
            match head.poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(f)) => return Poll::Ready(Some(f.map_err(Into::into))),
                Poll::Ready(None) => this.head.set(None),
            }
        }
        this.rest
            .poll_frame(cx)
            .map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.head
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
            && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.rest.size_hint();
        if let Some(head) = &self.head {
            let h = head.size_hint();
            hint.set_lower(hint.lower() + h.lower());
            if let (Some(a), Some(b)) = (hint.upper(), h.upper()) {
                hint.set_upper(a + b);
            }
        }
        hint
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::body::empty;
    use crate::config::Config;
    use crate::policy::Policy;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tower::{ServiceBuilder, ServiceExt};

    const JOB: &str = "ff8080818bb300af018bb325fe0c58f3";

    fn policy() -> Arc<Policy> {
        let yaml = "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: simulator } }\ncallers: { trusted_identity: svc }\nroutes:\n  - { name: stop, method: PUT, path: '/v1/uno/data-backfill/propagation/jobs/{jobId}', upstream: zuora, allow_callers: ['*'] }\n  - { name: other, path: '/v1/other/{id}', upstream: zuora, allow_callers: ['*'] }\n";
        let c =
            Config::from_yaml(yaml, Path::new("t.yaml"), Path::new("."), &|_: &str| None).unwrap();
        let p = Arc::new(Policy::compile(Arc::new(c)));
        assert_eq!(p.config.routes[0].validation, Validation::StopJob);
        p
    }

    fn stop(p: &Arc<Policy>, job: &str, caller: &str, track: &str, body: &'static str) -> Req {
        let mut r = http::Request::put(format!("/v1/uno/data-backfill/propagation/jobs/{job}"))
            .header(CONTENT_TYPE, "application/json")
            .body(full(body))
            .unwrap();
        r.extensions_mut().insert(RouteMatch {
            policy: p.clone(),
            route: 0,
            params: vec![job.to_owned()],
        });
        r.extensions_mut().insert(Caller::named(caller));
        r.extensions_mut()
            .insert(TrackId(HeaderValue::from_str(track).unwrap()));
        r
    }

    /// A slow upstream that counts calls and answers 200 with the call number,
    /// echoing the track id it was sent.
    fn upstream(
        calls: Arc<AtomicUsize>,
        delay: Duration,
        body_len: usize,
    ) -> impl Service<Req, Response = Resp, Error = GatewayError, Future = impl Send>
    + Clone
    + Send
    + 'static {
        tower::service_fn(move |req: Req| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let track = req.extensions().get::<TrackId>().map(|t| t.0.clone());
            async move {
                tokio::time::sleep(delay).await;
                let body = if body_len == 0 {
                    format!("{{\"call\":{n}}}")
                } else {
                    "x".repeat(body_len)
                };
                let mut r = http::Response::new(full(body));
                if let Some(t) = track {
                    r.headers_mut().insert(ZUORA_TRACK_ID.clone(), t);
                }
                Ok::<_, GatewayError>(r)
            }
        })
    }

    async fn text(r: Resp) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn concurrent_identical_stops_share_one_upstream_call() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new())
            .service(upstream(calls.clone(), Duration::from_millis(100), 0));
        let p = policy();
        let body = r#"{"status":"Stopping"}"#;
        let reqs = (0..8).map(|i| {
            svc.clone()
                .oneshot(stop(&p, JOB, "alice", &format!("track-{i}"), body))
        });
        let resps = futures_util::future::join_all(reqs).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let mut followers = 0;
        for (i, r) in resps.into_iter().enumerate() {
            let r = r.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(
                r.headers()["zuora-track-id"],
                format!("track-{i}").as_str(),
                "each caller keeps its track id"
            );
            followers += usize::from(r.extensions().get::<Coalesced>().is_some());
            assert_eq!(text(r).await, r#"{"call":1}"#);
        }
        assert_eq!(followers, 7);
    }

    #[tokio::test]
    async fn different_jobs_callers_or_bodies_are_not_joined() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new())
            .service(upstream(calls.clone(), Duration::from_millis(50), 0));
        let p = policy();
        let other_job = "ff8080818bb300af018bb325fe0c58f4";
        let body = r#"{"status":"Stopping"}"#;
        let a = svc.clone().oneshot(stop(&p, JOB, "alice", "t1", body));
        let b = svc
            .clone()
            .oneshot(stop(&p, other_job, "alice", "t2", body));
        let c = svc.clone().oneshot(stop(&p, JOB, "bob", "t3", body));
        let d = svc
            .clone()
            .oneshot(stop(&p, JOB, "alice", "t4", r#"{"status": "Stopping"}"#));
        let (a, b, c, d) = tokio::join!(a, b, c, d);
        for r in [a, b, c, d] {
            assert!(r.unwrap().extensions().get::<Coalesced>().is_none());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn sequential_stops_are_not_joined() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new())
            .service(upstream(calls.clone(), Duration::ZERO, 0));
        let p = policy();
        for _ in 0..3 {
            svc.clone()
                .oneshot(stop(&p, JOB, "alice", "t", "{}"))
                .await
                .unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn non_stop_routes_pass_through() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new())
            .service(upstream(calls.clone(), Duration::from_millis(30), 0));
        let p = policy();
        let mk = || {
            let mut r = http::Request::put("/v1/other/1").body(empty()).unwrap();
            r.extensions_mut().insert(RouteMatch {
                policy: p.clone(),
                route: 1,
                params: vec!["1".into()],
            });
            r
        };
        let (a, b) = tokio::join!(svc.clone().oneshot(mk()), svc.clone().oneshot(mk()));
        a.unwrap();
        b.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn leader_error_is_shared_as_its_response() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c2 = calls.clone();
        let failing = tower::service_fn(move |_req: Req| {
            c2.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err::<Resp, _>(GatewayError::UpstreamTimeout(Duration::from_secs(1)))
            }
        });
        let svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new())
            .service(failing);
        let p = policy();
        let (a, b) = tokio::join!(
            svc.clone().oneshot(stop(&p, JOB, "alice", "t1", "{}")),
            svc.clone().oneshot(stop(&p, JOB, "alice", "t2", "{}"))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let (err, resp) = match (a, b) {
            (Err(e), Ok(r)) | (Ok(r), Err(e)) => (e, r),
            other => panic!("expected one error and one shared response: {other:?}"),
        };
        assert!(matches!(err, GatewayError::UpstreamTimeout(_)));
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            resp.extensions().get::<RescuedError>().unwrap().kind,
            "upstream_timeout"
        );
        assert!(text(resp).await.contains("\"success\":false"));
    }

    #[tokio::test]
    async fn large_responses_are_not_shared() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new())
            .service(upstream(
                calls.clone(),
                Duration::from_millis(50),
                MAX_SHARED_RESPONSE + 1,
            ));
        let p = policy();
        let (a, b) = tokio::join!(
            svc.clone().oneshot(stop(&p, JOB, "alice", "t1", "{}")),
            svc.clone().oneshot(stop(&p, JOB, "alice", "t2", "{}"))
        );
        assert_eq!(
            text(a.unwrap()).await.len(),
            MAX_SHARED_RESPONSE + 1,
            "the leader's body is intact"
        );
        assert_eq!(text(b.unwrap()).await.len(), MAX_SHARED_RESPONSE + 1);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the follower made its own call"
        );
    }

    #[tokio::test]
    async fn a_follower_takes_over_when_the_leader_is_cancelled() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new())
            .service(upstream(calls.clone(), Duration::from_millis(100), 0));
        let p = policy();
        let leader = tokio::spawn(svc.clone().oneshot(stop(&p, JOB, "alice", "t1", "{}")));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = tokio::spawn(svc.clone().oneshot(stop(&p, JOB, "alice", "t2", "{}")));
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let r = tokio::time::timeout(Duration::from_secs(2), follower)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn oversized_request_bodies_are_forwarded_intact_and_alone() {
        let seen = Arc::new(AtomicUsize::new(0));
        let s2 = seen.clone();
        let echo = tower::service_fn(move |req: Req| {
            let seen = s2.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let n = req.into_body().collect().await.unwrap().to_bytes().len();
                seen.fetch_add(n, Ordering::SeqCst);
                Ok::<_, GatewayError>(http::Response::new(empty()))
            }
        });
        let svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new())
            .service(echo);
        let p = policy();
        let big: &'static str = Box::leak("x".repeat(MAX_STOP_BODY + 1).into_boxed_str());
        let (a, b) = tokio::join!(
            svc.clone().oneshot(stop(&p, JOB, "alice", "t1", big)),
            svc.clone().oneshot(stop(&p, JOB, "alice", "t2", big))
        );
        a.unwrap();
        b.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 2 * (MAX_STOP_BODY + 1));
    }
}
