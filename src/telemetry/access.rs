//! Request completion: one access-log line (target `access`), the request
//! metrics, and a record in the `/debug/requests` ring — the same facts in
//! all three, from one place.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method};

use super::debug::{DebugRing, RequestRecord};
use super::trail::Trail;
use crate::layers::rescue::RescuedError;
use crate::metrics::{RequestLabels, RequestMetrics, RouteLabels};

/// What the request-path layers need from telemetry: the debug ring and the
/// request metrics. Shared (`Arc`) by the track-ID and trace layers.
#[derive(Clone)]
pub struct Recorder {
    ring: Arc<DebugRing>,
    metrics: Option<RequestMetrics>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("ring_capacity", &self.ring.capacity())
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// Everything known about a request when its response headers are ready.
#[derive(Debug)]
pub struct Completion<'a> {
    /// Arrival (wall clock, for the ring).
    pub time: SystemTime,
    /// Arrival (monotonic, for latency).
    pub started: Instant,
    /// The request's track ID.
    pub track_id: &'a HeaderValue,
    /// Trace ID (hex) when known.
    pub trace_id: Option<Box<str>>,
    /// Request method.
    pub method: &'a Method,
    /// Request path, without the query string.
    pub path: Box<str>,
    /// Status sent to the caller.
    pub status: u16,
    /// Request body size when known.
    pub bytes_in: Option<u64>,
    /// Response body size when known.
    pub bytes_out: Option<u64>,
    /// The gateway error behind the response, if any.
    pub rescued: Option<&'a RescuedError>,
    /// `Zuora-Request-Id` on the response (used when the trail has none).
    pub response_request_id: Option<&'a HeaderValue>,
    /// What the layers decided.
    pub trail: Trail,
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl Recorder {
    /// A recorder over `ring`, recording into `metrics` when given.
    pub fn new(ring: Arc<DebugRing>, metrics: Option<RequestMetrics>) -> Self {
        Recorder { ring, metrics }
    }

    /// The debug ring.
    pub fn ring(&self) -> &Arc<DebugRing> {
        &self.ring
    }

    /// Increments the in-flight gauge (paired with [`Recorder::request_ended`]).
    pub fn request_started(&self) {
        if let Some(m) = &self.metrics {
            m.in_flight.inc();
        }
    }

    /// Decrements the in-flight gauge.
    pub fn request_ended(&self) {
        if let Some(m) = &self.metrics {
            m.in_flight.dec();
        }
    }

    /// Logs, counts and keeps one completed request.
    pub fn complete(&self, mut c: Completion<'_>) {
        let latency = c.started.elapsed();
        if c.response_request_id.is_some()
            && c.trail
                .upstream
                .as_ref()
                .is_none_or(|u| u.request_id.is_none())
        {
            let u = c.trail.upstream.get_or_insert_with(Default::default);
            u.request_id = c.response_request_id.cloned();
        }
        let t = &c.trail;
        let route = t.route.as_ref().map(|r| r.name());
        let caller = t.caller.as_deref();
        let upstream = t.upstream.as_ref();
        let error_kind = c.rescued.map(|e| e.kind);
        let error_code = c.rescued.map(|e| e.code.as_str());
        tracing::info!(
            target: "access",
            track_id = c.track_id.to_str().unwrap_or(""),
            trace_id = c.trace_id.as_deref(),
            method = c.method.as_str(),
            route,
            path = &*c.path,
            caller,
            status = c.status,
            upstream_status = upstream.and_then(|u| u.status),
            zuora_request_id = upstream.and_then(|u| u.request_id.as_ref()).and_then(|v| v.to_str().ok()),
            latency_ms = ms(latency),
            upstream_latency_ms = upstream.map(|u| ms(u.latency)),
            bytes_in = c.bytes_in,
            bytes_out = c.bytes_out,
            error_kind,
            error_code,
            "request"
        );
        if let Some(m) = &self.metrics {
            let route = route.unwrap_or("none");
            m.requests
                .get_or_create(&RequestLabels {
                    route: route.to_owned(),
                    status: c.status,
                    caller: caller.unwrap_or("unknown").to_owned(),
                })
                .inc();
            let labels = RouteLabels {
                route: route.to_owned(),
            };
            m.duration
                .get_or_create(&labels)
                .observe(latency.as_secs_f64());
            if let Some(u) = upstream.filter(|u| u.attempts > 0) {
                m.upstream_duration
                    .get_or_create(&labels)
                    .observe(u.latency.as_secs_f64());
            }
        }
        if self.ring.enabled() {
            self.ring.push(RequestRecord {
                time: c.time,
                track_id: c.track_id.clone(),
                trace_id: c.trace_id,
                method: c.method.clone(),
                path: c.path,
                status: c.status,
                latency,
                error: c.rescued.map(|e| (e.kind, e.code.as_str().into())),
                trail: c.trail,
            });
        }
    }
}
