//! The Prometheus registry and the request metrics every request records.
//!
//! Each concern owns its metrics struct, registered into the one registry at
//! startup (`XMetrics::new(&mut registry)`); `/metrics` encodes the registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of per-request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name (`none` when unrouted).
    pub route: String,
    /// HTTP status.
    pub status: u16,
    /// Caller identity (`unknown` before authentication).
    pub caller: String,
}

/// Labels of per-route latency histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name.
    pub route: String,
}

/// Request counts and latencies.
#[derive(Clone)]
pub struct RequestMetrics {
    /// Requests by route, status and caller.
    pub requests: Family<RequestLabels, Counter>,
    /// Whole-request latency by route, seconds.
    pub duration: Family<RouteLabels, Histogram>,
    /// Upstream (Zuora) latency by route, seconds.
    pub upstream_duration: Family<RouteLabels, Histogram>,
    /// Requests in flight.
    pub in_flight: Gauge,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 125.0,
    ]
    .into_iter()
}

impl RequestMetrics {
    /// Registers the request metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let m = RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            upstream_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            in_flight: Gauge::default(),
        };
        registry.register(
            "gateway_requests",
            "Requests handled, by route, status and caller",
            m.requests.clone(),
        );
        registry.register(
            "gateway_request_duration_seconds",
            "Whole request latency, by route",
            m.duration.clone(),
        );
        registry.register(
            "gateway_upstream_duration_seconds",
            "Zuora call latency (to response headers), by route",
            m.upstream_duration.clone(),
        );
        registry.register(
            "gateway_in_flight_requests",
            "Requests being handled",
            m.in_flight.clone(),
        );
        m
    }
}
