//! The Prometheus registry and the request metrics every request records.
//!
//! Each concern owns its metrics struct, registered into the one registry at
//! startup (`XMetrics::new(&mut registry)`); `/metrics` encodes the registry.
//!
//! The request metrics are recorded once per request ([`RequestMetrics::record`]).
//! Their handles (a counter per route, status and caller; two histograms per
//! route) are looked up in the prometheus families only the first time a
//! thread sees a combination, then kept in a per-thread cache: a request
//! allocates no label strings and takes no family lock.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// Tells this set of families from others in the per-thread cache.
    id: u64,
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
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let m = RequestMetrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
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
        registry.register(
            "gateway_access_log_dropped_lines",
            "Access-log lines dropped: stdout too slow or failing",
            crate::telemetry::access::dropped_lines(),
        );
        m
    }

    /// Counts one completed request (`route`: `none` when unrouted; `caller`:
    /// `unknown` before authentication) and observes its latency, and its
    /// Zuora latency when Zuora was called.
    pub fn record(
        &self,
        route: &str,
        status: u16,
        caller: &str,
        latency: Duration,
        upstream: Option<Duration>,
    ) {
        let recorded = HANDLES.with(|cache| match cache.try_borrow_mut() {
            Ok(mut cache) => {
                cache.with(self, route, status, caller, |h| {
                    h.record(self, route, latency, upstream)
                });
                true
            }
            Err(_) => false,
        });
        if !recorded {
            // Only if re-entered on this thread: straight to the families.
            Handles::new(self, route, status, caller).record(self, route, latency, upstream);
        }
    }
}

/// The metric handles of one (route, status, caller).
struct Handles {
    requests: Counter,
    duration: Histogram,
    /// Created on first use: a route never calling Zuora shows no series.
    upstream: Option<Histogram>,
}

impl Handles {
    fn new(m: &RequestMetrics, route: &str, status: u16, caller: &str) -> Handles {
        let labels = RequestLabels {
            route: route.to_owned(),
            status,
            caller: caller.to_owned(),
        };
        let route = RouteLabels {
            route: labels.route.clone(),
        };
        Handles {
            requests: m.requests.get_or_create(&labels).clone(),
            duration: m.duration.get_or_create(&route).clone(),
            upstream: None,
        }
    }

    fn upstream_duration(&mut self, m: &RequestMetrics, route: &str) -> &Histogram {
        self.upstream.get_or_insert_with(|| {
            m.upstream_duration
                .get_or_create(&RouteLabels {
                    route: route.to_owned(),
                })
                .clone()
        })
    }

    fn record(
        &mut self,
        m: &RequestMetrics,
        route: &str,
        latency: Duration,
        upstream: Option<Duration>,
    ) {
        self.requests.inc();
        self.duration.observe(latency.as_secs_f64());
        if let Some(u) = upstream {
            self.upstream_duration(m, route).observe(u.as_secs_f64());
        }
    }
}

/// Most combinations cached per thread; past it the cache starts over
/// (handles stay valid: the families keep every series).
const MAX_CACHED: usize = 1024;

#[derive(Default)]
struct HandleCache {
    /// Lookup key being built: metrics id, status, route length, route, caller.
    key: Vec<u8>,
    map: HashMap<Box<[u8]>, Handles, BuildHasherDefault<WordHasher>>,
}

/// A multiply-rotate hash over 8-byte words (FxHash's): a few instructions
/// per key, against SipHash's hundreds. Keys are route and caller names
/// the gateway itself admitted, and the map is capped at [`MAX_CACHED`]
/// entries, so a crafted collision costs at most a bounded scan.
#[derive(Default)]
struct WordHasher(u64);

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            self.add(u64::from_le_bytes(word));
        }
        let mut word = [0u8; 8];
        let rest = chunks.remainder();
        word[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl HandleCache {
    /// Runs `f` on the handles of (route, status, caller), looking them up in
    /// the families on a miss.
    fn with<R>(
        &mut self,
        m: &RequestMetrics,
        route: &str,
        status: u16,
        caller: &str,
        f: impl FnOnce(&mut Handles) -> R,
    ) -> R {
        self.key.clear();
        self.key.extend_from_slice(&m.id.to_le_bytes());
        self.key.extend_from_slice(&status.to_le_bytes());
        self.key
            .extend_from_slice(&(route.len() as u64).to_le_bytes());
        self.key.extend_from_slice(route.as_bytes());
        self.key.extend_from_slice(caller.as_bytes());
        if let Some(h) = self.map.get_mut(&self.key[..]) {
            return f(h);
        }
        if self.map.len() >= MAX_CACHED {
            self.map.clear();
        }
        let h = self
            .map
            .entry(self.key.clone().into_boxed_slice())
            .or_insert_with(|| Handles::new(m, route, status, caller));
        f(h)
    }
}

thread_local! {
    static HANDLES: RefCell<HandleCache> = RefCell::new(HandleCache::default());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn cached_handles_count_per_registry_with_the_same_labels() {
        let (mut ra, mut rb) = (Registry::default(), Registry::default());
        let (a, b) = (RequestMetrics::new(&mut ra), RequestMetrics::new(&mut rb));
        let ms = Duration::from_millis;
        for _ in 0..3 {
            a.record("read", 200, "billing", ms(2), Some(ms(1)));
        }
        a.record("read", 404, "billing", ms(2), None);
        a.record("none", 404, "unknown", ms(1), None);
        b.record("read", 200, "billing", ms(2), Some(ms(1)));
        // From another thread: its own cache, the same series.
        let a2 = a.clone();
        std::thread::spawn(move || a2.record("read", 200, "billing", ms(3), Some(ms(1))))
            .join()
            .unwrap();

        let ta = text(&ra);
        assert!(
            ta.contains(
                "gateway_requests_total{route=\"read\",status=\"200\",caller=\"billing\"} 4"
            ),
            "{ta}"
        );
        assert!(ta.contains(
            "gateway_requests_total{route=\"read\",status=\"404\",caller=\"billing\"} 1"
        ));
        assert!(ta.contains("gateway_request_duration_seconds_count{route=\"read\"} 5"));
        assert!(ta.contains("gateway_upstream_duration_seconds_count{route=\"read\"} 4"));
        assert!(
            !ta.contains("gateway_upstream_duration_seconds_count{route=\"none\"}"),
            "no upstream series for a route that never called Zuora: {ta}"
        );
        let tb = text(&rb);
        assert!(tb.contains(
            "gateway_requests_total{route=\"read\",status=\"200\",caller=\"billing\"} 1"
        ));
        assert!(
            tb.contains("gateway_access_log_dropped_lines_total"),
            "{tb}"
        );
    }

    #[test]
    fn route_and_caller_boundaries_do_not_collide_in_the_cache() {
        let mut r = Registry::default();
        let m = RequestMetrics::new(&mut r);
        let d = Duration::from_millis(1);
        m.record("ab", 200, "c", d, None);
        m.record("a", 200, "bc", d, None);
        let t = text(&r);
        assert!(t.contains("gateway_requests_total{route=\"ab\",status=\"200\",caller=\"c\"} 1"));
        assert!(t.contains("gateway_requests_total{route=\"a\",status=\"200\",caller=\"bc\"} 1"));
    }
}
