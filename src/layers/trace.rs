//! Trace: one server span per request, the request metrics, the access-log
//! line and the `/debug/requests` record, all keyed by the track ID.
//!
//! Sits just inside the track-ID layer and outside rescue, so it sees every
//! response, including the gateway's own errors (with [`RescuedError`]).
//! Inner layers report what they decided through the [`DecisionTrail`] this
//! layer puts into the request extensions; [`RecordContextLayer`], pushed
//! after routing and authentication, copies the route and caller into it.
//!
//! With OTLP export on, the request gets a [`RequestSpans`] (the caller's
//! trace when its `traceparent` is valid, else a new one), current on the
//! thread while its future is polled, and the layer keeps the few facts its
//! server span needs. Only when the request ends, and only
//! if its trace is exported (trace ID under `sampling_ratio`, a sampled
//! caller, or a failure), is the span built: named `METHOD route-template`,
//! with the HTTP semantic-convention attributes plus `zuora.track_id`,
//! `zuora.caller`, `zuora.route`, `zuora.entity_ids`. Every request also
//! gets a DEBUG `request` span holding only its track ID (free at the
//! default level; with debug logs, log lines inside a request carry it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Instant, SystemTime};

use http::{HeaderValue, Method, Version, header};
use tower::{Layer, Service};

use super::{Req, Resp};
use crate::context::{Caller, RouteMatch, TrackId};
use crate::layers::rescue::RescuedError;
use crate::telemetry::Recorder;
use crate::telemetry::access::Completion;
use crate::telemetry::otel::IdExt as _;
use crate::telemetry::otel::{self, Exporter, RequestSpans, ServerRecord};
use crate::telemetry::trail::DecisionTrail;
use crate::telemetry::upstream::{CallerTraceContext, TRACEPARENT, TRACESTATE, ZUORA_REQUEST_ID};

/// Builds [`Trace`].
#[derive(Debug, Clone)]
pub struct TraceLayer {
    recorder: Arc<Recorder>,
    exporter: Option<Exporter>,
}

impl TraceLayer {
    /// Records completed requests through `recorder`; spans go to the
    /// process-wide exporter when [`crate::telemetry::Telemetry::init`]
    /// turned export on.
    pub fn new(recorder: Arc<Recorder>) -> Self {
        TraceLayer::with_exporter(recorder, otel::installed().cloned())
    }

    /// The same, with spans going to `exporter` (`None`: no span export).
    pub fn with_exporter(recorder: Arc<Recorder>, exporter: Option<Exporter>) -> Self {
        TraceLayer { recorder, exporter }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            recorder: self.recorder.clone(),
            exporter: self.exporter.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
    recorder: Arc<Recorder>,
    exporter: Option<Exporter>,
}

/// The authority the caller addressed (`Host`, or an absolute URI's),
/// port included; only read if the span is exported.
fn authority(req: &Req) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    }
}

/// Whether `traceparent` or `tracestate` is among the headers.
fn has_trace_headers(headers: &http::HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| name == TRACEPARENT || name == TRACESTATE)
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
        // Most requests carry no trace headers: one pass over the names
        // finds out, where removing both would hash each name.
        let caller_cx = if has_trace_headers(req.headers()) {
            CallerTraceContext::take_from(req.headers_mut())
        } else {
            None
        };
        // DEBUG: free at the default level; with debug logs, log lines inside a
        // request carry its track ID.
        let span =
            tracing::debug_span!("request", zuora.track_id = track_id.to_str().unwrap_or(""));
        let otel = self.exporter.as_ref().map(|exporter| {
            let (remote, tracestate) = match &caller_cx {
                Some(c) => (c.parent(), c.tracestate.clone()),
                None => (None, None),
            };
            OtelState {
                spans: Some(RequestSpans::start(exporter, remote, tracestate)),
                host: authority(&req),
                version: req.version(),
            }
        });
        // For the access log: the caller's trace ID, unless an exported trace replaces it.
        let caller_trace_id = caller_cx
            .as_ref()
            .and_then(|c| c.trace_id())
            .map(Box::<str>::from);
        if let Some(c) = caller_cx {
            req.extensions_mut().insert(c);
        }
        let mut state = State {
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
            otel,
        };
        let inner = {
            let _entered = state.span.enter();
            let _current = state.otel.as_mut().map(|o| otel::enter(&mut o.spans));
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
    otel: Option<OtelState>,
}

/// What the server span needs beyond the access-log facts (export on only).
struct OtelState {
    /// Moved into a thread-local while the request is polled ([`otel::enter`]).
    spans: Option<RequestSpans>,
    host: Option<HeaderValue>,
    version: Version,
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
            otel,
        } = self;
        recorder.request_ended();
        let (status, resp) = match outcome {
            Outcome::Response(r) => (r.status().as_u16(), Some(r)),
            Outcome::ServiceError => (500, None),
            Outcome::Cancelled => (CLIENT_CLOSED, None),
        };
        let rescued = resp.and_then(|r| r.extensions().get::<RescuedError>());
        let trail = trail.take();
        // Zuora's request ID from the response is only used when the trail
        // has none (both below and in `Recorder::complete`): not looked up
        // otherwise.
        let response_request_id = if trail
            .upstream
            .as_ref()
            .is_some_and(|u| u.request_id.is_some())
        {
            None
        } else {
            resp.and_then(|r| r.headers().get(&ZUORA_REQUEST_ID))
        };
        let trace_id = match otel {
            Some(OtelState {
                spans: Some(spans),
                host,
                version,
            }) => {
                let error_type = rescued.map(|e| e.kind).or_else(|| outcome_kind(status));
                // Exported: sampled (ratio or caller), or failed. Else nothing more is done.
                if let Some(children) = spans.finish(spans.sampled() || error_type.is_some()) {
                    let request_id = trail
                        .upstream
                        .as_ref()
                        .and_then(|u| u.request_id.as_ref())
                        .or(response_request_id)
                        .cloned();
                    spans.export(ServerRecord {
                        trace_id: spans.trace_id(),
                        span_id: spans.span_id(),
                        parent: spans.parent(),
                        trace_state: spans.trace_state(),
                        time,
                        started,
                        ended: Instant::now(),
                        method: method.clone(),
                        path: path.clone(),
                        host,
                        version,
                        track_id: track_id.clone(),
                        route: trail.route.clone(),
                        caller: trail.caller.clone(),
                        entity_ids: trail.entity_ids.clone(),
                        request_id,
                        status,
                        error_type,
                        children,
                    });
                    // The access log points at the exported trace.
                    Some(spans.trace_id().to_hex())
                } else {
                    caller_trace_id
                }
            }
            _ => caller_trace_id,
        };
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
            let (_entered, _current) = match this.state.as_mut() {
                Some(State { span, otel, .. }) => (
                    Some(span.enter()),
                    otel.as_mut().map(|o| otel::enter(&mut o.spans)),
                ),
                None => (None, None),
            };
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

    const SAMPLED_TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const UNSAMPLED_TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

    /// Runs one request through the trace layer with export on at `ratio`;
    /// the inner service answers `status` (a rescued error for 429) after a
    /// Zuora call and an INFO event. Returns what was queued for export.
    async fn export_one(
        ratio: f64,
        traceparent: Option<&'static str>,
        status: u16,
    ) -> (Vec<otel::Item>, Arc<Recorder>) {
        let rec = recorder();
        let (exporter, mut queue) = Exporter::new(ratio, 64, Default::default());
        let svc = ServiceBuilder::new()
            .layer(TraceLayer::with_exporter(
                rec.clone(),
                Some(exporter.clone()),
            ))
            .service_fn(move |req: Req| async move {
                tracing::info!("rate limit: denied");
                let mut out = http::Request::new(());
                *out.uri_mut() = "http://zuora.local/v1/jobs/1".parse().unwrap();
                let call =
                    crate::telemetry::upstream::CallTrace::start(&mut out, req.extensions(), false);
                let resp = http::Response::builder()
                    .status(if status == 429 { 200 } else { status })
                    .body(())
                    .unwrap();
                call.finish_response(&resp);
                if status == 429 {
                    return Ok::<_, Infallible>(crate::layers::rescue::into_response(
                        GatewayError::RateLimited {
                            limit: "stop-per-job".into(),
                            retry_after: std::time::Duration::from_secs(1),
                            quota: None,
                        },
                    ));
                }
                let mut r = Resp::new(empty());
                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Ok(r)
            });
        let mut req = Req::new(empty());
        req.extensions_mut()
            .insert(TrackId(HeaderValue::from_static("t-otel")));
        if let Some(tp) = traceparent {
            req.headers_mut()
                .insert("traceparent", HeaderValue::from_static(tp));
        }
        let subscriber = tracing_subscriber::layer::SubscriberExt::with(
            tracing_subscriber::registry(),
            tracing_subscriber::Layer::with_filter(
                otel::CaptureLayer::new(exporter),
                otel::capture_filter(),
            ),
        );
        let _default = tracing::subscriber::set_default(subscriber);
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status);
        let mut items = Vec::new();
        while let Ok(item) = queue.rx.try_recv() {
            items.push(item);
        }
        (items, rec)
    }

    fn exported(items: &[otel::Item]) -> &ServerRecord {
        match items {
            [otel::Item::Request(r)] => r,
            other => panic!("one request expected: {other:?}"),
        }
    }

    #[tokio::test]
    async fn unsampled_success_exports_nothing() {
        let (items, rec) = export_one(0.0, None, 200).await;
        assert!(items.is_empty(), "{items:?}");
        let found = rec.ring().find(&DebugQuery::parse(None).unwrap());
        assert!(
            found[0].to_value()["trace_id"].is_null(),
            "no trace to point at"
        );
        let (items, rec) = export_one(0.0, Some(UNSAMPLED_TP), 200).await;
        assert!(
            items.is_empty(),
            "an unsampled caller is not a reason: {items:?}"
        );
        let found = rec.ring().find(&DebugQuery::parse(None).unwrap());
        assert_eq!(
            found[0].to_value()["trace_id"],
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "the caller's trace ID, as with export off"
        );
    }

    #[tokio::test]
    async fn sampled_success_is_exported_with_its_call_and_events() {
        let (items, rec) = export_one(1.0, None, 200).await;
        let r = exported(&items);
        let found = rec.ring().find(&DebugQuery::parse(None).unwrap());
        assert_eq!(
            found[0].to_value()["trace_id"],
            &*r.trace_id.to_hex(),
            "the access log points at the exported trace"
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.error_type, None);
        assert_eq!(r.parent, None);
        assert_eq!(r.children.calls.len(), 1);
        assert_eq!(r.children.calls[0].status, Some(200));
        assert_eq!(r.children.events[0].name, "rate limit: denied");
    }

    #[tokio::test]
    async fn sampled_caller_is_exported_at_ratio_zero() {
        let (items, rec) = export_one(0.0, Some(SAMPLED_TP), 200).await;
        let r = exported(&items);
        assert_eq!(
            r.trace_id.to_hex().as_ref(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(r.parent, Some(otel::SpanId::from(0x00f0_67aa_0ba9_02b7)));
        assert_eq!(r.track_id, "t-otel");
        let found = rec.ring().find(&DebugQuery::parse(None).unwrap());
        assert_eq!(
            found[0].to_value()["trace_id"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[tokio::test]
    async fn failures_are_exported_at_ratio_zero() {
        let (items, _) = export_one(0.0, None, 429).await;
        let r = exported(&items);
        assert_eq!(r.error_type, Some("rate_limited"));
        assert_eq!(r.children.calls.len(), 1, "the whole trace is kept");
        let (items, _) = export_one(0.0, None, 503).await;
        let r = exported(&items);
        assert_eq!(r.error_type, Some("503"));
        assert_eq!(
            r.children.calls[0].error,
            Some(otel::CallError::Status(503))
        );
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
