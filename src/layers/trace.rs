//! Trace: one server span per request, the request metrics, the access-log
//! line and the `/debug/requests` record, all keyed by the track ID.
//!
//! Sits just inside the track-ID layer and outside rescue, so it sees every
//! response, including the gateway's own errors (with [`RescuedError`]).
//! Inner layers report what they decided through the [`DecisionTrail`] this
//! layer puts into the request extensions; [`RecordContextLayer`], pushed
//! after routing and authentication, copies the route and caller into it.
//!
//! With OTLP export on, the span is named `METHOD route-template` and carries
//! the HTTP semantic-convention attributes plus `zuora.track_id`,
//! `zuora.caller`, `zuora.route`, `zuora.entity_ids`; the caller's
//! `traceparent` is continued. With export off, the span is a DEBUG one that
//! only carries the track ID (for correlating debug logs), and no
//! OpenTelemetry work is done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Instant, SystemTime};

use http::{HeaderValue, Method, Version, header};
use opentelemetry::trace::TraceContextExt as _;
use tower::{Layer, Service};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{Req, Resp};
use crate::context::{Caller, RouteMatch, TrackId};
use crate::layers::rescue::RescuedError;
use crate::telemetry::Recorder;
use crate::telemetry::access::Completion;
use crate::telemetry::trail::DecisionTrail;
use crate::telemetry::upstream::{CallerTraceContext, ZUORA_REQUEST_ID, span_trace_id};

/// Builds [`Trace`].
#[derive(Debug, Clone)]
pub struct TraceLayer {
    recorder: Arc<Recorder>,
}

impl TraceLayer {
    /// Records completed requests through `recorder`.
    pub fn new(recorder: Arc<Recorder>) -> Self {
        TraceLayer { recorder }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            recorder: self.recorder.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
    recorder: Arc<Recorder>,
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

fn server_address(req: &Req) -> &str {
    if let Some(h) = req.uri().host() {
        return h;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Strip a port (IPv6 literals keep their brackets).
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

fn content_length(req: &Req) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or_else(|| http_body::Body::size_hint(req.body()).exact())
}

impl<S, E> Service<Req> for Trace<S>
where
    S: Service<Req, Response = Resp, Error = E>,
{
    type Response = Resp;
    type Error = E;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let started = Instant::now();
        let time = SystemTime::now();
        self.recorder.request_started();
        let trail = DecisionTrail::new();
        req.extensions_mut().insert(trail.clone());
        let track_id = req
            .extensions()
            .get::<TrackId>()
            .map(|t| t.0.clone())
            .unwrap_or_else(super::track_id::generate);
        let caller_cx = CallerTraceContext::take_from(req.headers_mut());
        let track_str = track_id.to_str().unwrap_or("");
        let span = if crate::telemetry::otel_active() {
            let span = tracing::info_span!(
                "request",
                otel.kind = "server",
                http.request.method = req.method().as_str(),
                url.path = req.uri().path(),
                server.address = server_address(&req),
                network.protocol.version = version_str(req.version()),
                zuora.track_id = track_str,
                http.route = Empty,
                http.response.status_code = Empty,
                zuora.route = Empty,
                zuora.caller = Empty,
                zuora.entity_ids = Empty,
                zuora.request_id = Empty,
                error.type = Empty,
                otel.status_code = Empty,
            );
            if let Some(c) = &caller_cx {
                let parent = c.otel_context();
                if parent.span().span_context().is_valid() {
                    let _ = span.set_parent(parent);
                }
            }
            span
        } else {
            // DEBUG: free at the default level; with debug logs, log lines inside a
            // request carry its track ID.
            tracing::debug_span!("request", zuora.track_id = track_str)
        };
        let caller_trace_id = caller_cx
            .as_ref()
            .and_then(|c| c.trace_id())
            .map(Box::<str>::from);
        if let Some(c) = caller_cx {
            req.extensions_mut().insert(c);
        }
        let state = State {
            recorder: self.recorder.clone(),
            trail,
            track_id,
            method: req.method().clone(),
            path: req.uri().path().into(),
            bytes_in: content_length(&req),
            started,
            time,
            caller_trace_id,
            span,
        };
        let inner = {
            let _entered = state.span.enter();
            self.inner.call(req)
        };
        TraceFuture {
            inner,
            state: Some(state),
        }
    }
}

struct State {
    recorder: Arc<Recorder>,
    trail: DecisionTrail,
    track_id: HeaderValue,
    method: Method,
    path: Box<str>,
    bytes_in: Option<u64>,
    started: Instant,
    time: SystemTime,
    caller_trace_id: Option<Box<str>>,
    span: tracing::Span,
}

enum Outcome<'a> {
    Response(&'a Resp),
    /// The inner service failed without a response (not expected outside rescue).
    ServiceError,
    /// The caller went away before the response was ready.
    Cancelled,
}

/// Status logged for requests the caller abandoned (nginx's convention).
const CLIENT_CLOSED: u16 = 499;

impl State {
    fn finish(self, outcome: Outcome<'_>) {
        let State {
            recorder,
            trail,
            track_id,
            method,
            path,
            bytes_in,
            started,
            time,
            caller_trace_id,
            span,
        } = self;
        recorder.request_ended();
        let (status, resp) = match outcome {
            Outcome::Response(r) => (r.status().as_u16(), Some(r)),
            Outcome::ServiceError => (500, None),
            Outcome::Cancelled => (CLIENT_CLOSED, None),
        };
        let rescued = resp.and_then(|r| r.extensions().get::<RescuedError>());
        let response_request_id = resp.and_then(|r| r.headers().get(&ZUORA_REQUEST_ID));
        let trail = trail.take();
        let trace_id = if crate::telemetry::otel_active() && !span.is_disabled() {
            let template = trail.route.as_ref().map(|r| r.template());
            span.record("http.response.status_code", status);
            if let Some(r) = &trail.route {
                span.record("http.route", r.template());
                span.record("zuora.route", r.name());
            }
            if let Some(c) = &trail.caller {
                span.record("zuora.caller", &**c);
            }
            if let Some(v) = trail.entity_ids.as_ref().and_then(|v| v.to_str().ok()) {
                span.record("zuora.entity_ids", v);
            }
            let request_id = trail
                .upstream
                .as_ref()
                .and_then(|u| u.request_id.as_ref())
                .or(response_request_id)
                .and_then(|v| v.to_str().ok());
            if let Some(id) = request_id {
                span.record("zuora.request_id", id);
            }
            match (rescued, &outcome_kind(status)) {
                (Some(e), _) => span.record("error.type", e.kind),
                (None, Some(kind)) => span.record("error.type", *kind),
                (None, None) => &span,
            };
            if status >= 500 {
                span.record("otel.status_code", "ERROR");
            }
            let name = format!("{} {}", method.as_str(), template.unwrap_or("unmatched"));
            span.context().span().update_name(name);
            span_trace_id(&span)
        } else {
            caller_trace_id
        };
        // Ends the span before the log line, outside it.
        drop(span);
        recorder.complete(Completion {
            time,
            started,
            track_id: &track_id,
            trace_id,
            method: &method,
            path,
            status,
            bytes_in,
            bytes_out: resp.and_then(|r| http_body::Body::size_hint(r.body()).exact()),
            rescued,
            response_request_id,
            trail,
        });
    }
}

/// `error.type` for failures without a gateway error: upstream 5xx or a
/// cancelled request.
fn outcome_kind(status: u16) -> Option<&'static str> {
    match status {
        CLIENT_CLOSED => Some("client_closed"),
        500 => Some("500"),
        502 => Some("502"),
        503 => Some("503"),
        504 => Some("504"),
        s if s >= 500 => Some("5xx"),
        _ => None,
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Trace`]: polls the inner future inside the request span and
    /// records the request when the response is ready (or when dropped early).
    pub struct TraceFuture<F> {
        #[pin]
        inner: F,
        state: Option<State>,
    }

    impl<F> PinnedDrop for TraceFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(state) = this.project().state.take() {
                state.finish(Outcome::Cancelled);
            }
        }
    }
}

impl<F, E> Future for TraceFuture<F>
where
    F: Future<Output = Result<Resp, E>>,
{
    type Output = Result<Resp, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.state.as_ref().map(|s| s.span.enter());
            ready!(this.inner.poll(cx))
        };
        if let Some(state) = this.state.take() {
            match &result {
                Ok(resp) => state.finish(Outcome::Response(resp)),
                Err(_) => state.finish(Outcome::ServiceError),
            }
        }
        Poll::Ready(result)
    }
}

/// Builds [`RecordContext`]: copies the route and caller, once known, into
/// the request's [`DecisionTrail`]. Push it right after authentication (and
/// it may be pushed again after routing if routing comes later).
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordContextLayer;

impl<S> Layer<S> for RecordContextLayer {
    type Service = RecordContext<S>;
    fn layer(&self, inner: S) -> RecordContext<S> {
        RecordContext { inner }
    }
}

/// See [`RecordContextLayer`].
#[derive(Debug, Clone)]
pub struct RecordContext<S> {
    inner: S,
}

impl<S, E> Service<Req> for RecordContext<S>
where
    S: Service<Req, Response = Resp, Error = E>,
{
    type Response = Resp;
    type Error = E;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> S::Future {
        if let Some(t) = req.extensions().get::<DecisionTrail>() {
            t.observe(
                req.extensions().get::<RouteMatch>(),
                req.extensions().get::<Caller>(),
            );
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::body::{empty, full};
    use crate::error::GatewayError;
    use crate::telemetry::DebugRing;
    use crate::telemetry::debug::DebugQuery;
    use std::convert::Infallible;
    use tower::{ServiceBuilder, ServiceExt};

    fn recorder() -> Arc<Recorder> {
        Arc::new(Recorder::new(Arc::new(DebugRing::new(100)), None))
    }

    #[tokio::test]
    async fn rescued_errors_and_notes_reach_the_ring() {
        let rec = recorder();
        let svc = ServiceBuilder::new()
            .layer(TraceLayer::new(rec.clone()))
            .service_fn(|req: Req| async move {
                assert!(
                    req.headers().get("traceparent").is_none(),
                    "stripped at ingress"
                );
                crate::telemetry::trail::note(&req, "rate_limit", "stop-per-job: denied");
                Ok::<_, Infallible>(crate::layers::rescue::into_response(
                    GatewayError::RateLimited {
                        limit: "stop-per-job".into(),
                        retry_after: std::time::Duration::from_secs(1),
                        quota: None,
                    },
                ))
            });
        let mut req = Req::new(full("{}"));
        *req.method_mut() = Method::PUT;
        *req.uri_mut() = "/v1/x?secret=1".parse().unwrap();
        req.extensions_mut()
            .insert(TrackId(HeaderValue::from_static("t-1")));
        req.headers_mut().insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 429);
        let found = rec
            .ring()
            .find(&DebugQuery::parse(Some("status=429")).unwrap());
        assert_eq!(found.len(), 1);
        let r = found[0].to_value();
        assert_eq!(r["track_id"], "t-1");
        assert_eq!(r["path"], "/v1/x", "no query string");
        assert_eq!(r["error_kind"], "rate_limited");
        assert_eq!(r["decisions"][0]["text"], "stop-per-job: denied");
        assert_eq!(r["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[tokio::test]
    async fn abandoned_request_is_recorded_as_499() {
        let rec = recorder();
        let mut svc = ServiceBuilder::new()
            .layer(TraceLayer::new(rec.clone()))
            .service_fn(|_req: Req| std::future::pending::<Result<Resp, Infallible>>());
        let fut = svc.ready().await.unwrap().call(Req::new(empty()));
        drop(fut);
        let found = rec.ring().find(&DebugQuery::parse(None).unwrap());
        assert_eq!(found[0].status(), 499);
    }
}
