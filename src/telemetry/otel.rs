//! The OpenTelemetry trace pipeline: OTLP/HTTP exporter over the gateway's
//! own hyper + rustls client, a bounded export queue drained by one tokio
//! task, and the keep/drop decision (ratio by trace ID; failed requests are
//! always kept).
//!
//! Every span is recorded (the SDK sampler is `AlwaysOn`); the decision is
//! taken when spans end, in [`GatewayProcessor`]:
//! - a trace whose ID falls under `sampling_ratio` is exported span by span;
//! - otherwise its child spans wait (bounded) until the trace's local root —
//!   the server span — ends: if the request failed (the root carries
//!   `error.type` or an error status) the whole trace is exported, else it
//!   is discarded.
//!
//! The queue between request threads and the exporter is bounded
//! (`telemetry.export_queue`): when the collector is slow or down, spans are
//! dropped and counted (`gateway_spans_dropped_total`); requests never wait.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::Uri;
use opentelemetry::trace::{SpanId, Status, TraceId};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: full traces URL (used as is).
pub const ENV_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_ENDPOINT`: collector base URL (`/v1/traces` appended).
pub const ENV_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `OTEL_BSP_SCHEDULE_DELAY`: longest wait (ms) before a partial batch is sent.
pub const ENV_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";

/// Largest batch sent in one export request.
const MAX_BATCH: usize = 512;
/// Default longest wait before a partial batch is sent.
const DEFAULT_DELAY: Duration = Duration::from_millis(1000);
/// Child spans of an undecided trace older than this are discarded.
const PENDING_MAX_AGE: Duration = Duration::from_secs(120);

/// Where traces go: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as is), else
/// `telemetry.otlp_endpoint` + `/v1/traces`, else `OTEL_EXPORTER_OTLP_ENDPOINT`
/// + `/v1/traces`. `None`: no export. Empty variables count as unset.
pub fn resolve_traces_endpoint(
    configured: Option<&Uri>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let env = |k: &str| {
        env(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if let Some(full) = env(ENV_TRACES_ENDPOINT) {
        return Some(full);
    }
    let base = configured
        .map(|u| u.to_string())
        .or_else(|| env(ENV_ENDPOINT))?;
    Some(format!("{}/v1/traces", base.trim_end_matches('/')))
}

/// Whether `trace_id` falls under `ratio` (the same rule as the SDK's
/// `TraceIdRatioBased`, so every service using it agrees).
pub fn ratio_keeps(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let bytes = trace_id.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..16]);
    let rnd = u64::from_be_bytes(low) >> 1;
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    rnd < bound
}

/// Whether a finished local-root span marks its request as failed.
pub fn span_failed(span: &SpanData) -> bool {
    matches!(span.status, Status::Error { .. })
        || span
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "error.type")
}

/// What the export worker receives.
#[derive(Debug)]
pub(crate) enum Msg {
    Span(Box<SpanData>),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Pending {
    traces: HashMap<TraceId, (Instant, Vec<SpanData>)>,
    spans: usize,
}

/// The span processor: keep/drop decision plus the bounded queue to the
/// export worker. `on_end` never blocks: a full queue drops the span.
#[derive(Debug)]
pub struct GatewayProcessor {
    ratio: f64,
    pending: Mutex<Pending>,
    pending_limit: usize,
    queue: mpsc::Sender<Msg>,
    dropped: Counter,
}

impl GatewayProcessor {
    /// A processor feeding `queue`; `pending_limit` bounds the child spans
    /// held while their trace is undecided.
    pub(crate) fn new(
        ratio: f64,
        pending_limit: usize,
        queue: mpsc::Sender<Msg>,
        dropped: Counter,
    ) -> Self {
        GatewayProcessor {
            ratio,
            pending: Mutex::new(Pending::default()),
            pending_limit,
            queue,
            dropped,
        }
    }

    fn enqueue(&self, span: SpanData) {
        if self.queue.try_send(Msg::Span(Box::new(span))).is_err() {
            self.dropped.inc();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn hold(&self, span: SpanData) {
        let trace_id = span.span_context.trace_id();
        let refused = {
            let mut p = self.lock();
            if p.spans >= self.pending_limit {
                // Children whose root never ended here (spawned work that
                // outlived its request) are the only way to stay full: sweep.
                let now = Instant::now();
                let mut freed = 0;
                p.traces.retain(|_, (since, spans)| {
                    let keep = now.duration_since(*since) < PENDING_MAX_AGE;
                    if !keep {
                        freed += spans.len();
                    }
                    keep
                });
                p.spans -= freed;
            }
            if p.spans >= self.pending_limit {
                Some(span)
            } else {
                p.spans += 1;
                p.traces
                    .entry(trace_id)
                    .or_insert_with(|| (Instant::now(), Vec::new()))
                    .1
                    .push(span);
                None
            }
        };
        if refused.is_some() {
            self.dropped.inc();
        }
    }

    fn release(&self, trace_id: TraceId) -> Option<Vec<SpanData>> {
        let mut p = self.lock();
        let (_, spans) = p.traces.remove(&trace_id)?;
        p.spans -= spans.len();
        Some(spans)
    }
}

impl SpanProcessor for GatewayProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        let trace_id = span.span_context.trace_id();
        let local_root = span.parent_span_id == SpanId::INVALID || span.parent_span_is_remote;
        let sampled = ratio_keeps(trace_id, self.ratio);
        if !local_root {
            if sampled {
                self.enqueue(span);
            } else {
                self.hold(span);
            }
            return;
        }
        let held = if sampled {
            None
        } else {
            self.release(trace_id)
        };
        if sampled || span_failed(&span) {
            for child in held.into_iter().flatten() {
                self.enqueue(child);
            }
            self.enqueue(span);
        }
        // else: an unsampled successful request; its held children drop here.
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Flushing is asynchronous (`Telemetry::shutdown`); never block here.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Batch settings of the export worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchConfig {
    pub(crate) max_batch: usize,
    pub(crate) delay: Duration,
}

impl BatchConfig {
    pub(crate) fn from_env() -> BatchConfig {
        let delay = std::env::var(ENV_SCHEDULE_DELAY)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_DELAY, Duration::from_millis);
        BatchConfig {
            max_batch: MAX_BATCH,
            delay,
        }
    }
}

/// Counters the worker updates.
#[derive(Debug, Clone)]
pub(crate) struct WorkerMetrics {
    pub(crate) dropped: Counter,
    pub(crate) exported: Counter,
}

/// Drains the queue into `exporter`: batches of up to `max_batch` spans,
/// sent when full or `delay` after the first span arrived. A failed export
/// counts its spans as dropped (no retry: the queue keeps moving).
pub(crate) async fn run_worker<E: SpanExporter>(
    exporter: E,
    mut rx: mpsc::Receiver<Msg>,
    cfg: BatchConfig,
    metrics: WorkerMetrics,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(cfg.max_batch);
    let mut last_warning: Option<Instant> = None;
    loop {
        let mut flush_ack = None;
        let Some(first) = rx.recv().await else { break };
        match first {
            Msg::Span(s) => batch.push(*s),
            Msg::Flush(ack) => flush_ack = Some(ack),
        }
        let deadline = tokio::time::Instant::now() + cfg.delay;
        while flush_ack.is_none() && batch.len() < cfg.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Msg::Span(s))) => batch.push(*s),
                Ok(Some(Msg::Flush(ack))) => flush_ack = Some(ack),
                Ok(None) | Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match exporter.export(std::mem::take(&mut batch)).await {
                Ok(()) => {
                    metrics.exported.inc_by(n);
                }
                Err(e) => {
                    metrics.dropped.inc_by(n);
                    // One warning per minute at most: a dead collector must not flood the log.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        last_warning = Some(Instant::now());
                        tracing::warn!(error = %e, spans = n, "span export failed; spans dropped");
                    }
                }
            }
            batch.reserve(cfg.max_batch);
        }
        if let Some(ack) = flush_ack {
            let _ = ack.send(());
        }
    }
    let _ = exporter.shutdown();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanKind, TraceFlags, TraceState};
    use opentelemetry::{InstrumentationScope, KeyValue};
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    fn span(trace: u128, id: u64, parent: u64, remote_parent: bool, failed: bool) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(trace),
                SpanId::from(id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from(parent),
            parent_span_is_remote: remote_parent,
            span_kind: SpanKind::Server,
            name: "s".into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: if failed {
                vec![KeyValue::new("error.type", "rate_limited")]
            } else {
                vec![]
            },
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("t").build(),
        }
    }

    fn processor(
        ratio: f64,
        queue: usize,
        pending: usize,
    ) -> (GatewayProcessor, mpsc::Receiver<Msg>, Counter) {
        let (tx, rx) = mpsc::channel(queue);
        let dropped = Counter::default();
        (
            GatewayProcessor::new(ratio, pending, tx, dropped.clone()),
            rx,
            dropped,
        )
    }

    fn drain(rx: &mut mpsc::Receiver<Msg>) -> Vec<u64> {
        let mut ids = Vec::new();
        while let Ok(Msg::Span(s)) = rx.try_recv() {
            ids.push(u64::from_be_bytes(s.span_context.span_id().to_bytes()));
        }
        ids
    }

    // A trace ID whose low half decides the ratio: 0 is always kept by any
    // ratio > 0, u64::MAX is never kept by a ratio < 1.
    const KEPT: u128 = 1 << 64;
    const NOT_KEPT: u128 = (1 << 64) | u64::MAX as u128;

    #[test]
    fn ratio_matches_the_sdk_rule() {
        assert!(ratio_keeps(TraceId::from(KEPT), 0.01));
        assert!(!ratio_keeps(TraceId::from(NOT_KEPT), 0.99));
        assert!(ratio_keeps(TraceId::from(NOT_KEPT), 1.0));
        assert!(!ratio_keeps(TraceId::from(KEPT), 0.0));
        let kept = (0..10_000u128)
            .filter(|i| {
                ratio_keeps(
                    TraceId::from(i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)),
                    0.25,
                )
            })
            .count();
        assert!(
            (2000..3000).contains(&kept),
            "about a quarter kept, got {kept}"
        );
    }

    #[test]
    fn sampled_trace_is_exported_span_by_span() {
        let (p, mut rx, dropped) = processor(0.5, 16, 16);
        p.on_end(span(KEPT, 2, 1, false, false));
        assert_eq!(drain(&mut rx), [2]);
        p.on_end(span(KEPT, 1, 0, false, false));
        assert_eq!(drain(&mut rx), [1]);
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn unsampled_successful_trace_is_discarded_with_its_children() {
        let (p, mut rx, _) = processor(0.5, 16, 16);
        p.on_end(span(NOT_KEPT, 2, 1, false, false));
        p.on_end(span(NOT_KEPT, 1, 0, false, false));
        assert!(drain(&mut rx).is_empty());
        assert_eq!(p.lock().spans, 0, "held children are released");
    }

    #[test]
    fn failed_request_is_kept_whole_even_when_unsampled() {
        let (p, mut rx, _) = processor(0.0, 16, 16);
        p.on_end(span(NOT_KEPT, 3, 1, false, false));
        p.on_end(span(NOT_KEPT, 2, 1, false, false));
        assert!(drain(&mut rx).is_empty(), "children wait for the root");
        // Root with a remote parent (the caller's traceparent) is a local root.
        p.on_end(span(NOT_KEPT, 1, 99, true, true));
        assert_eq!(drain(&mut rx), [3, 2, 1]);
    }

    #[test]
    fn error_status_marks_a_failure() {
        let (p, mut rx, _) = processor(0.0, 16, 16);
        let mut root = span(NOT_KEPT, 1, 0, false, false);
        root.status = Status::error("boom");
        p.on_end(root);
        assert_eq!(drain(&mut rx), [1]);
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let (p, mut rx, dropped) = processor(1.0, 2, 16);
        for i in 1..=5 {
            p.on_end(span(KEPT + i, 1, 0, false, false));
        }
        assert_eq!(drain(&mut rx).len(), 2);
        assert_eq!(dropped.get(), 3);
    }

    #[test]
    fn pending_children_are_bounded() {
        let (p, _rx, dropped) = processor(0.0, 16, 2);
        for i in 0..5 {
            p.on_end(span(NOT_KEPT, 10 + i, 1, false, false));
        }
        assert_eq!(p.lock().spans, 2);
        assert_eq!(dropped.get(), 3);
    }

    #[test]
    fn endpoint_resolution_order() {
        let cfg: Uri = "http://collector:4318/".parse().unwrap();
        let none = |_: &str| None;
        assert_eq!(resolve_traces_endpoint(None, none), None);
        assert_eq!(
            resolve_traces_endpoint(Some(&cfg), none).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        let generic = |k: &str| (k == ENV_ENDPOINT).then(|| "http://env:4318".to_owned());
        assert_eq!(
            resolve_traces_endpoint(None, generic).as_deref(),
            Some("http://env:4318/v1/traces")
        );
        assert_eq!(
            resolve_traces_endpoint(Some(&cfg), generic).as_deref(),
            Some("http://collector:4318/v1/traces"),
            "the config wins over the generic variable"
        );
        let full = |k: &str| (k == ENV_TRACES_ENDPOINT).then(|| "http://t:1/custom".to_owned());
        assert_eq!(
            resolve_traces_endpoint(Some(&cfg), full).as_deref(),
            Some("http://t:1/custom")
        );
        let empty = |_: &str| Some(String::new());
        assert_eq!(resolve_traces_endpoint(None, empty), None);
    }

    #[derive(Debug, Clone)]
    struct CountingExporter {
        seen: Arc<AtomicUsize>,
        fail: bool,
    }

    impl SpanExporter for CountingExporter {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.seen.fetch_add(batch.len(), Ordering::SeqCst);
            if self.fail {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "down".into(),
                ))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn worker_exports_batches_and_counts_failures() {
        for fail in [false, true] {
            let seen = Arc::new(AtomicUsize::new(0));
            let (tx, rx) = mpsc::channel(64);
            let m = WorkerMetrics {
                dropped: Counter::default(),
                exported: Counter::default(),
            };
            let cfg = BatchConfig {
                max_batch: 4,
                delay: Duration::from_millis(20),
            };
            let worker = tokio::spawn(run_worker(
                CountingExporter {
                    seen: seen.clone(),
                    fail,
                },
                rx,
                cfg,
                m.clone(),
            ));
            for i in 0..10 {
                tx.send(Msg::Span(Box::new(span(KEPT, i + 1, 0, false, false))))
                    .await
                    .unwrap();
            }
            let (ack, done) = oneshot::channel();
            tx.send(Msg::Flush(ack)).await.unwrap();
            done.await.unwrap();
            assert_eq!(seen.load(Ordering::SeqCst), 10);
            if fail {
                assert_eq!((m.exported.get(), m.dropped.get()), (0, 10));
            } else {
                assert_eq!((m.exported.get(), m.dropped.get()), (10, 0));
            }
            drop(tx);
            worker.await.unwrap();
        }
    }
}
