//! Observe: request counts and latency by route, status and caller, and the
//! in-flight gauge. Sits outside `rescue`, so it sees every response.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use super::{Req, Resp};
use crate::context::{Caller, RouteMatch};
use crate::metrics::{RequestLabels, RequestMetrics, RouteLabels};
use crate::upstream::UpstreamCall;

/// Builds [`Observe`].
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: RequestMetrics,
}

impl ObserveLayer {
    /// Records into `metrics`.
    pub fn new(metrics: RequestMetrics) -> Self {
        ObserveLayer { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: RequestMetrics,
}

/// Shared per-request notes the inner layers leave for this one.
#[derive(Clone, Default)]
struct Seen {
    route: Option<String>,
    caller: Option<String>,
}

impl<S, E> Service<Req> for Observe<S>
where
    S: Service<Req, Response = Resp, Error = E>,
{
    type Response = Resp;
    type Error = E;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let in_flight = InFlightGauge::enter(&self.metrics.in_flight);
        let notes = ObserveNotes(Arc::new(Mutex::new(Seen::default())));
        req.extensions_mut().insert(notes.clone());
        ObserveFuture {
            inner: self.inner.call(req),
            started: Instant::now(),
            metrics: self.metrics.clone(),
            notes,
            _in_flight: in_flight,
        }
    }
}

/// One request counted in the in-flight gauge until dropped: a caller that
/// disconnects drops the future without it completing, and the gauge must
/// still come back down.
struct InFlightGauge(prometheus_client::metrics::gauge::Gauge);

impl InFlightGauge {
    fn enter(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        InFlightGauge(gauge.clone())
    }
}

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Observe`].
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        metrics: RequestMetrics,
        notes: ObserveNotes,
        _in_flight: InFlightGauge,
    }
}

impl<F, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Resp, E>>,
{
    type Output = Result<Resp, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        let metrics = &*this.metrics;
        if let Ok(resp) = &out {
            let seen = this.notes.0.lock().map(|s| s.clone()).unwrap_or_default();
            let route = seen.route.unwrap_or_else(|| "none".to_owned());
            metrics
                .duration
                .get_or_create(&RouteLabels {
                    route: route.clone(),
                })
                .observe(this.started.elapsed().as_secs_f64());
            if let Some(call) = resp.extensions().get::<UpstreamCall>() {
                metrics
                    .upstream_duration
                    .get_or_create(&RouteLabels {
                        route: route.clone(),
                    })
                    .observe(call.elapsed.as_secs_f64());
            }
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    route,
                    status: resp.status().as_u16(),
                    caller: seen.caller.unwrap_or_else(|| "unknown".to_owned()),
                })
                .inc();
        }
        Poll::Ready(out)
    }
}

/// Where inner layers' facts are copied for this layer (request extensions
/// do not travel back with the response).
#[derive(Clone)]
pub struct ObserveNotes(Arc<Mutex<Seen>>);

impl ObserveNotes {
    /// Records route and caller from the request's extensions.
    pub fn record(req: &Req) {
        if let Some(notes) = req.extensions().get::<ObserveNotes>()
            && let Ok(mut seen) = notes.0.lock()
        {
            seen.route = req
                .extensions()
                .get::<RouteMatch>()
                .map(|m| m.name().to_owned());
            seen.caller = req
                .extensions()
                .get::<Caller>()
                .map(|c| c.identity.to_string());
        }
    }
}
