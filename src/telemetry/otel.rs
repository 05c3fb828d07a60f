//! OpenTelemetry traces at (almost) no cost for requests that are not
//! exported.
//!
//! Nothing is recorded through an OpenTelemetry SDK on the request path.
//! Instead:
//! - when a request arrives, the trace layer gives it a [`RequestSpans`]
//!   (trace ID, server span ID, the head decision): the caller's trace when
//!   its `traceparent` is valid, else a new one. While the request's future
//!   is polled, it is the thread's [`current`] request (a thread-local set
//!   and reset around each poll: no request extension, nothing to clone);
//! - the Zuora call(s) ([`super::upstream::CallTrace`]) add a small
//!   [`CallRecord`] each; `tracing` events and spans opened while the
//!   request is being polled are captured by [`CaptureLayer`];
//! - when the request finishes, the trace layer decides: the trace is
//!   exported if its ID falls under `sampling_ratio`, or the caller's
//!   `traceparent` is sampled, or the request failed. Only then is a
//!   [`ServerRecord`] (the facts, with their children) queued. An unexported
//!   request drops its few records and costs nothing more;
//! - a dedicated thread (`otlp-export`, with its own single-threaded
//!   runtime; see [`super::otlp`]) turns queued records into OTLP protobuf
//!   batches and posts them. Encoding never runs on a runtime worker that
//!   serves requests.
//!
//! The queue is bounded in spans (`telemetry.export_queue`): when the
//! collector is slow or down, spans are dropped and counted
//! (`gateway_spans_dropped_total`); requests never wait.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Uri, Version};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use tracing::field::{Field, Visit};
use tracing::span;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use super::trail::RouteRef;

/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: full traces URL (used as is).
pub const ENV_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_ENDPOINT`: collector base URL (`/v1/traces` appended).
pub const ENV_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `OTEL_BSP_SCHEDULE_DELAY`: longest wait (ms) before a partial batch is sent.
pub const ENV_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";

/// Largest batch sent in one export request (spans).
pub(crate) const MAX_BATCH: usize = 512;
/// Default longest wait before a partial batch is sent.
const DEFAULT_DELAY: Duration = Duration::from_millis(1000);
/// Most child spans (Zuora calls and other spans) kept per trace.
pub(crate) const MAX_CHILDREN: usize = 64;
/// Most events kept per span.
pub(crate) const MAX_EVENTS: usize = 32;

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

// ------------------------------------------------------------------ IDs

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

/// Lowercase hex only (W3C Trace Context).
fn lower_hex(s: &[u8]) -> Option<u128> {
    let mut n: u128 = 0;
    for &b in s {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        n = (n << 4) | u128::from(d);
    }
    Some(n)
}

/// Trace and span IDs are OpenTelemetry's own types (zero is invalid).
pub use opentelemetry::{SpanId, TraceId};

/// What the gateway needs of trace and span IDs beyond OpenTelemetry's API.
pub trait IdExt: Sized {
    /// A random, valid (non-zero) ID.
    fn random() -> Self;
    /// Lowercase hex, as in `traceparent` (32 or 16 characters).
    fn to_hex(&self) -> Box<str>;
}

impl IdExt for TraceId {
    fn random() -> TraceId {
        TraceId::from(fastrand::u128(1..))
    }
    fn to_hex(&self) -> Box<str> {
        let mut buf = [0u8; 32];
        hex_into(&self.to_bytes(), &mut buf);
        // Hex digits are ASCII: never the empty fallback.
        std::str::from_utf8(&buf).unwrap_or_default().into()
    }
}

impl IdExt for SpanId {
    fn random() -> SpanId {
        SpanId::from(fastrand::u64(1..))
    }
    fn to_hex(&self) -> Box<str> {
        let mut buf = [0u8; 16];
        hex_into(&self.to_bytes(), &mut buf);
        std::str::from_utf8(&buf).unwrap_or_default().into()
    }
}

/// Whether `trace_id` falls under `ratio` (the rule of the OpenTelemetry
/// SDKs' `TraceIdRatioBased`, so every service using it agrees).
pub fn ratio_keeps(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    // The low 8 bytes, big-endian, without their lowest bit.
    let rnd = (u128::from_be_bytes(trace_id.to_bytes()) as u64) >> 1;
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    rnd < bound
}

/// A caller's span context, from a valid W3C `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteParent {
    /// The caller's trace.
    pub trace_id: TraceId,
    /// The caller's span (the parent of the gateway's server span).
    pub span_id: SpanId,
    /// The `sampled` trace flag: the caller records this trace.
    pub sampled: bool,
}

/// Parses a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`; later
/// versions may append fields). `None` when invalid: all-zero IDs,
/// uppercase hex, version `ff`, wrong length.
pub fn parse_traceparent(v: &[u8]) -> Option<RemoteParent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = lower_hex(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = lower_hex(&v[3..35])?;
    let span_id = u64::try_from(lower_hex(&v[36..52])?).ok()?;
    let flags = lower_hex(&v[53..55])?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(RemoteParent {
        trace_id: TraceId::from(trace_id),
        span_id: SpanId::from(span_id),
        sampled: flags & 1 == 1,
    })
}

/// `00-<trace>-<span>-<flags>`.
fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> HeaderValue {
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&trace_id.to_bytes(), &mut buf[3..35]);
    hex_into(&span_id.to_bytes(), &mut buf[36..52]);
    if sampled {
        buf[54] = b'1';
    }
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""))
}

// -------------------------------------------------------------- records

/// A span's kind (OTLP `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Work inside the gateway.
    Internal = 1,
    /// The request the gateway serves.
    Server = 2,
    /// A call the gateway makes.
    Client = 3,
    /// Producer.
    Producer = 4,
    /// Consumer.
    Consumer = 5,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// A string.
    Str(Cow<'static, str>),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

/// One span event (a `tracing` event inside a request or span).
#[derive(Debug, Clone)]
pub struct EventRecord {
    /// When.
    pub time: SystemTime,
    /// The event's message.
    pub name: Cow<'static, str>,
    /// The other fields, plus `level` and `target`.
    pub attributes: Vec<(&'static str, AttrValue)>,
}

/// Why a Zuora call failed (`error.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    /// Zuora answered 5xx.
    Status(u16),
    /// No usable answer: `upstream_timeout`, `upstream_connect`, …
    Kind(&'static str),
}

/// One attempt to call Zuora (a `zuora.call` client span once exported).
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// The call's span ID (sent in `traceparent` when forwarded).
    pub span_id: SpanId,
    /// When the call started.
    pub started: Instant,
    /// When its response headers (or its failure) came.
    pub ended: Instant,
    /// Request method.
    pub method: Method,
    /// The URI called.
    pub uri: Uri,
    /// Zuora's status, if it answered.
    pub status: Option<u16>,
    /// Zuora's `Zuora-Request-Id`.
    pub request_id: Option<HeaderValue>,
    /// The failure, if any.
    pub error: Option<CallError>,
}

/// A finished span recorded from `tracing` (inside a request, or a
/// background span such as `zuora.token_fetch`).
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// Its trace.
    pub trace_id: TraceId,
    /// Its ID.
    pub span_id: SpanId,
    /// Its parent (`None`: a root).
    pub parent: Option<SpanId>,
    /// Whether the parent is in another process (a caller).
    pub parent_remote: bool,
    /// The trace's W3C `tracestate`.
    pub trace_state: Option<HeaderValue>,
    /// Span name.
    pub name: Cow<'static, str>,
    /// Span kind (`otel.kind`; internal by default).
    pub kind: SpanKind,
    /// Start.
    pub start: SystemTime,
    /// End.
    pub end: SystemTime,
    /// Attributes (the span's fields).
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// Events.
    pub events: Vec<EventRecord>,
    /// Events not kept ([`MAX_EVENTS`]).
    pub events_dropped: u32,
    /// Error status (`otel.status_code = "ERROR"`).
    pub error: bool,
}

impl SpanRecord {
    /// Whether the span marks a failure (`error.type` or an error status).
    pub fn failed(&self) -> bool {
        self.error || self.attributes.iter().any(|(k, _)| *k == "error.type")
    }

    /// A finished internal span named "s" with no attributes or events, for
    /// the exporter's and the encoder's tests.
    #[cfg(test)]
    pub(crate) fn for_test(trace: u128, id: u64) -> SpanRecord {
        SpanRecord {
            trace_id: TraceId::from(trace),
            span_id: SpanId::from(id),
            parent: None,
            parent_remote: false,
            trace_state: None,
            name: "s".into(),
            kind: SpanKind::Internal,
            start: SystemTime::now(),
            end: SystemTime::now(),
            attributes: vec![],
            events: vec![],
            events_dropped: 0,
            error: false,
        }
    }
}

/// A request's server span with its children, built only for exported
/// traces. Names and attribute strings are produced on the export thread.
#[derive(Debug)]
pub struct ServerRecord {
    /// The trace.
    pub trace_id: TraceId,
    /// The server span.
    pub span_id: SpanId,
    /// The caller's span, when its `traceparent` was valid.
    pub parent: Option<SpanId>,
    /// The caller's `tracestate`.
    pub trace_state: Option<HeaderValue>,
    /// Arrival (wall clock).
    pub time: SystemTime,
    /// Arrival (monotonic; anchors the children's instants).
    pub started: Instant,
    /// Completion.
    pub ended: Instant,
    /// Request method.
    pub method: Method,
    /// Path, without query.
    pub path: Box<str>,
    /// `Host` (or the absolute URI's authority), port included.
    pub host: Option<HeaderValue>,
    /// HTTP version.
    pub version: Version,
    /// `Zuora-Track-Id`.
    pub track_id: HeaderValue,
    /// The matched route.
    pub route: Option<RouteRef>,
    /// The authenticated caller.
    pub caller: Option<Arc<str>>,
    /// `Zuora-Entity-Ids` sent to Zuora.
    pub entity_ids: Option<HeaderValue>,
    /// Zuora's request ID.
    pub request_id: Option<HeaderValue>,
    /// Status returned to the caller.
    pub status: u16,
    /// `error.type`, for failures.
    pub error_type: Option<&'static str>,
    /// Children and events recorded during the request.
    pub children: Children,
}

impl ServerRecord {
    /// The wall-clock time of `at` (an instant during the request).
    pub fn wall(&self, at: Instant) -> SystemTime {
        if at >= self.started {
            self.time + at.duration_since(self.started)
        } else {
            self.time - self.started.duration_since(at)
        }
    }

    fn span_count(&self) -> usize {
        1 + self.children.calls.len() + self.children.spans.len()
    }
}

/// What a trace collected while it was running.
#[derive(Debug, Default)]
pub struct Children {
    /// The Zuora calls.
    pub calls: Vec<CallRecord>,
    /// Other spans (from `tracing`), finished.
    pub spans: Vec<SpanRecord>,
    /// Events of the root span.
    pub events: Vec<EventRecord>,
    /// Events not kept.
    pub events_dropped: u32,
    /// Set when the root finished: whether the trace was exported.
    done: Option<bool>,
}

// --------------------------------------------------------------- traces

/// One trace as recorded in this process: a request's, or a background
/// span's (`zuora.token_fetch`).
#[derive(Debug)]
struct LocalTrace {
    trace_id: TraceId,
    /// The local root: the server span of a request, or the background span.
    root: SpanId,
    /// The caller's span (requests with a valid `traceparent`).
    parent: Option<SpanId>,
    trace_state: Option<HeaderValue>,
    /// Head decision: ratio, or a sampled caller.
    sampled: bool,
    exporter: Exporter,
    children: Mutex<Children>,
}

impl LocalTrace {
    fn lock(&self) -> MutexGuard<'_, Children> {
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a finished child span: kept while the trace runs, sent on its
    /// own once the trace was exported, dropped once it was not.
    fn add_span(&self, span: SpanRecord) {
        let mut c = self.lock();
        match c.done {
            None if c.calls.len() + c.spans.len() < MAX_CHILDREN => c.spans.push(span),
            None => {
                drop(c);
                self.exporter.0.dropped.inc();
            }
            Some(true) => {
                drop(c);
                self.exporter.send(Item::Spans(vec![span]));
            }
            Some(false) => {}
        }
    }

    fn add_event(&self, event: EventRecord) {
        let mut c = self.lock();
        if c.done.is_some() {
            return;
        }
        if c.events.len() < MAX_EVENTS {
            c.events.push(event);
        } else {
            c.events_dropped = c.events_dropped.saturating_add(1);
        }
    }

    /// Marks the trace finished; its children when it is to be exported.
    fn finish(&self, export: bool) -> Option<Children> {
        let mut c = self.lock();
        let children = export.then(|| std::mem::take(&mut *c));
        c.done = Some(export);
        children
    }
}

/// The OpenTelemetry side of one request: a request extension set by the
/// trace layer while export is on. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RequestSpans(Arc<LocalTrace>);

impl RequestSpans {
    /// Opens a request's trace: the caller's (`remote`) or a new one. The
    /// head decision is taken now: `ratio` by trace ID, or a sampled caller.
    pub fn start(
        exporter: &Exporter,
        remote: Option<RemoteParent>,
        trace_state: Option<HeaderValue>,
    ) -> RequestSpans {
        let trace_id = remote.map_or_else(TraceId::random, |r| r.trace_id);
        let sampled = remote.is_some_and(|r| r.sampled) || ratio_keeps(trace_id, exporter.0.ratio);
        RequestSpans(Arc::new(LocalTrace {
            trace_id,
            root: SpanId::random(),
            parent: remote.map(|r| r.span_id),
            trace_state: remote.and(trace_state),
            sampled,
            exporter: exporter.clone(),
            children: Mutex::default(),
        }))
    }

    /// The request's trace ID.
    pub fn trace_id(&self) -> TraceId {
        self.0.trace_id
    }

    /// The server span's ID.
    pub fn span_id(&self) -> SpanId {
        self.0.root
    }

    /// The caller's span, when the request continues the caller's trace.
    pub fn parent(&self) -> Option<SpanId> {
        self.0.parent
    }

    /// The caller's `tracestate` (only with a caller trace).
    pub fn trace_state(&self) -> Option<HeaderValue> {
        self.0.trace_state.clone()
    }

    /// The head decision: exported whatever the outcome.
    pub fn sampled(&self) -> bool {
        self.0.sampled
    }

    /// The `traceparent` (and `tracestate`) to send for a child span.
    pub fn context_headers(&self, child: SpanId) -> (HeaderValue, Option<HeaderValue>) {
        (
            traceparent(self.0.trace_id, child, self.0.sampled),
            self.0.trace_state.clone(),
        )
    }

    /// Records a finished Zuora call.
    pub fn add_call(&self, call: CallRecord) {
        let mut c = self.0.lock();
        if c.done.is_none() && c.calls.len() + c.spans.len() < MAX_CHILDREN {
            c.calls.push(call);
        } else if c.done.is_none() {
            drop(c);
            self.0.exporter.0.dropped.inc();
        }
    }

    /// Ends the request: when `export` (sampled, or failed), returns what
    /// was collected so the caller can queue the server span with it.
    pub fn finish(&self, export: bool) -> Option<Children> {
        self.0.finish(export)
    }

    /// Queues the request's spans (see [`RequestSpans::finish`]).
    pub fn export(&self, record: ServerRecord) {
        self.0.exporter.send(Item::Request(Box::new(record)));
    }

    /// Runs `f` with this request as the current one on this thread: the
    /// [`CaptureLayer`] attaches `tracing` events and spans to it.
    /// [`enter`] does the same for a slot that is moved in and out.
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut slot = Some(self.clone());
        let _entered = enter(&mut slot);
        f()
    }
}

thread_local! {
    static CURRENT: Cell<Option<RequestSpans>> = const { Cell::new(None) };
}

/// While alive, the request moved out of a slot is the current one on this
/// thread; dropping it moves the request back (also on unwind).
#[derive(Debug)]
pub struct Entered<'a> {
    slot: &'a mut Option<RequestSpans>,
    previous: Option<RequestSpans>,
}

/// Makes the request in `slot` current on this thread (see [`Entered`]).
pub fn enter(slot: &mut Option<RequestSpans>) -> Entered<'_> {
    let previous = CURRENT.with(|c| c.replace(slot.take()));
    Entered { slot, previous }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mine = CURRENT.with(|c| c.replace(self.previous.take()));
        *self.slot = mine;
    }
}

/// The request being polled on this thread, if any (export on only).
pub fn current() -> Option<RequestSpans> {
    with_current(RequestSpans::clone)
}

/// Runs `f` with the current request, if any.
fn with_current<R>(f: impl FnOnce(&RequestSpans) -> R) -> Option<R> {
    CURRENT.with(|c| {
        let current = c.take();
        let r = current.as_ref().map(f);
        c.set(current);
        r
    })
}

// ---------------------------------------------------------------- queue

/// What the export thread receives.
#[derive(Debug)]
pub(crate) enum Item {
    Request(Box<ServerRecord>),
    Spans(Vec<SpanRecord>),
    Flush(oneshot::Sender<()>),
    Stop,
}

impl Item {
    /// Spans it holds.
    pub(crate) fn span_count(&self) -> usize {
        match self {
            Item::Request(r) => r.span_count(),
            Item::Spans(s) => s.len(),
            Item::Flush(_) | Item::Stop => 0,
        }
    }
}

#[derive(Debug)]
struct ExporterShared {
    tx: mpsc::UnboundedSender<Item>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    ratio: f64,
    dropped: Counter,
}

/// The sending half of the export queue, with the sampling ratio. Bounded
/// in spans: beyond `capacity`, spans are dropped and counted.
#[derive(Debug, Clone)]
pub struct Exporter(Arc<ExporterShared>);

/// The receiving half (the export thread's).
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) rx: mpsc::UnboundedReceiver<Item>,
    pub(crate) queued: Arc<AtomicUsize>,
}

impl Queue {
    /// Receives the next item; its spans leave the bounded queue.
    pub(crate) async fn recv(&mut self) -> Option<Item> {
        let item = self.rx.recv().await?;
        self.queued.fetch_sub(item.span_count(), Ordering::Relaxed);
        Some(item)
    }
}

impl Exporter {
    /// A queue of at most `capacity` spans; `dropped` counts what does not fit.
    pub(crate) fn new(ratio: f64, capacity: usize, dropped: Counter) -> (Exporter, Queue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (
            Exporter(Arc::new(ExporterShared {
                tx,
                queued: queued.clone(),
                capacity: capacity.max(1),
                ratio,
                dropped,
            })),
            Queue { rx, queued },
        )
    }

    /// The configured sampling ratio.
    pub fn ratio(&self) -> f64 {
        self.0.ratio
    }

    /// Queues `item` unless its spans do not fit (then they are counted as dropped).
    pub(crate) fn send(&self, item: Item) {
        let spans = item.span_count();
        let s = &self.0;
        let before = s.queued.fetch_add(spans, Ordering::Relaxed);
        if before + spans > s.capacity {
            s.queued.fetch_sub(spans, Ordering::Relaxed);
            s.dropped.inc_by(spans as u64);
            return;
        }
        if s.tx.send(item).is_err() {
            // The export thread is gone.
            s.queued.fetch_sub(spans, Ordering::Relaxed);
            s.dropped.inc_by(spans as u64);
        }
    }

    /// Asks the export thread to send what is queued now; the receiver
    /// fires when it has (or is dropped if the thread is gone).
    pub(crate) fn flush(&self) -> oneshot::Receiver<()> {
        let (ack, done) = oneshot::channel();
        let _ = self.0.tx.send(Item::Flush(ack));
        done
    }

    /// Stops the export thread after what is queued.
    pub(crate) fn stop(&self) {
        let _ = self.0.tx.send(Item::Stop);
    }
}

static INSTALLED: OnceLock<Exporter> = OnceLock::new();

/// The process-wide exporter, once [`super::Telemetry::init`] turned export on.
pub fn installed() -> Option<&'static Exporter> {
    INSTALLED.get()
}

/// Installs the process-wide exporter; `false` if one already was.
pub(crate) fn install(exporter: Exporter) -> bool {
    INSTALLED.set(exporter).is_ok()
}

/// Batch settings of the export thread.
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

// ------------------------------------------------------- tracing bridge

/// A `tracing` span being recorded (kept in the span's extensions).
#[derive(Debug)]
struct Captured {
    trace: Arc<LocalTrace>,
    span_id: SpanId,
    /// `None`: the local root of a background trace.
    parent: Option<SpanId>,
    name: Cow<'static, str>,
    kind: SpanKind,
    start: SystemTime,
    attributes: Vec<(&'static str, AttrValue)>,
    events: Vec<EventRecord>,
    events_dropped: u32,
    error: bool,
}

impl Captured {
    fn record(&mut self, values: &span::Record<'_>) {
        let mut v = FieldVisitor::default();
        values.record(&mut v);
        self.apply(v);
    }

    fn apply(&mut self, v: FieldVisitor) {
        if let Some(name) = v.otel_name {
            self.name = Cow::Owned(name);
        }
        if let Some(kind) = v.kind {
            self.kind = kind;
        }
        if let Some(error) = v.error {
            self.error = error;
        }
        for (k, val) in v.attributes {
            match self.attributes.iter_mut().find(|(key, _)| *key == k) {
                Some(slot) => slot.1 = val,
                None => self.attributes.push((k, val)),
            }
        }
    }

    fn add_event(&mut self, event: EventRecord) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(event);
        } else {
            self.events_dropped = self.events_dropped.saturating_add(1);
        }
    }

    fn into_record(self) -> (Arc<LocalTrace>, SpanRecord) {
        let t = &self.trace;
        let record = SpanRecord {
            trace_id: t.trace_id,
            span_id: self.span_id,
            // A captured span's parent is local: the server span, or another span.
            parent: self.parent,
            parent_remote: false,
            trace_state: t.trace_state.clone(),
            name: self.name,
            kind: self.kind,
            start: self.start,
            end: SystemTime::now(),
            attributes: self.attributes,
            events: self.events,
            events_dropped: self.events_dropped,
            error: self.error,
        };
        (self.trace, record)
    }
}

/// Collects `tracing` fields as attributes (and the `otel.*` controls).
#[derive(Debug, Default)]
struct FieldVisitor {
    message: Option<String>,
    attributes: Vec<(&'static str, AttrValue)>,
    otel_name: Option<String>,
    kind: Option<SpanKind>,
    error: Option<bool>,
}

impl FieldVisitor {
    fn put(&mut self, field: &Field, value: AttrValue) {
        match (field.name(), &value) {
            ("message", AttrValue::Str(s)) => self.message = Some(s.to_string()),
            ("otel.name", AttrValue::Str(s)) => self.otel_name = Some(s.to_string()),
            ("otel.kind", AttrValue::Str(s)) => {
                self.kind = Some(match &**s {
                    "server" => SpanKind::Server,
                    "client" => SpanKind::Client,
                    "producer" => SpanKind::Producer,
                    "consumer" => SpanKind::Consumer,
                    _ => SpanKind::Internal,
                });
            }
            ("otel.status_code", AttrValue::Str(s)) => {
                self.error = Some(s.eq_ignore_ascii_case("error"));
            }
            (name, _) if name.starts_with("otel.") => {}
            (name, _) => self.attributes.push((name, value)),
        }
    }
}

impl Visit for FieldVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, AttrValue::Float(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, AttrValue::Int(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match i64::try_from(value) {
            Ok(v) => self.put(field, AttrValue::Int(v)),
            Err(_) => self.put(field, AttrValue::Str(value.to_string().into())),
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, AttrValue::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, AttrValue::Str(Cow::Owned(value.to_owned())));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, AttrValue::Str(value.to_string().into()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, AttrValue::Str(format!("{value:?}").into()));
    }
}

/// What [`CaptureLayer`] sees: the gateway's own INFO+ spans and events,
/// plus the DEBUG events of the Zuora call (retries) and of the token layer
/// (a 401 replayed with a new token). Not the DEBUG `request` span.
pub fn capture_filter() -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::LevelFilter;
    tracing_subscriber::filter::Targets::new()
        .with_target("zuora_gateway", LevelFilter::INFO)
        .with_target("zuora_gateway::upstream::forward", LevelFilter::DEBUG)
        .with_target("zuora_gateway::layers::token", LevelFilter::DEBUG)
}

/// The `tracing` → OpenTelemetry bridge for what is not on the hot path:
/// events emitted while a request is polled become events of its server
/// span; spans opened inside a request become its children; spans opened
/// outside any request (the background `zuora.token_fetch`) are their own
/// traces, exported by ratio or when they record `error.type`. Install it
/// with a filter (the gateway's own INFO+ spans and events, plus the DEBUG
/// events of the Zuora call and the token replay).
#[derive(Debug, Clone)]
pub struct CaptureLayer {
    exporter: Exporter,
}

impl CaptureLayer {
    /// A bridge whose background traces go to `exporter`.
    pub fn new(exporter: Exporter) -> Self {
        CaptureLayer { exporter }
    }
}

impl<S> tracing_subscriber::Layer<S> for CaptureLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let from_parent = span.parent().and_then(|p| {
            p.extensions()
                .get::<Captured>()
                .map(|c| (c.trace.clone(), c.span_id))
        });
        let span_id = SpanId::random();
        let (trace, parent) = match from_parent {
            Some((trace, parent)) => (trace, Some(parent)),
            None => match with_current(|r| r.0.clone()) {
                Some(trace) => {
                    let root = trace.root;
                    (trace, Some(root))
                }
                None => {
                    let trace_id = TraceId::random();
                    let trace = Arc::new(LocalTrace {
                        trace_id,
                        root: span_id,
                        parent: None,
                        trace_state: None,
                        sampled: ratio_keeps(trace_id, self.exporter.ratio()),
                        exporter: self.exporter.clone(),
                        children: Mutex::default(),
                    });
                    (trace, None)
                }
            },
        };
        let mut captured = Captured {
            trace,
            span_id,
            parent,
            name: Cow::Borrowed(attrs.metadata().name()),
            kind: SpanKind::Internal,
            start: SystemTime::now(),
            attributes: Vec::new(),
            events: Vec::new(),
            events_dropped: 0,
            error: false,
        };
        let mut v = FieldVisitor::default();
        attrs.record(&mut v);
        captured.apply(v);
        span.extensions_mut().insert(captured);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(c) = span.extensions_mut().get_mut::<Captured>()
        {
            c.record(values);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let span = ctx
            .event_span(event)
            .filter(|s| s.extensions().get::<Captured>().is_some());
        if span.is_none() && with_current(|_| ()).is_none() {
            // Neither inside a recorded span nor inside a request: a plain log line.
            return;
        }
        let mut v = FieldVisitor::default();
        event.record(&mut v);
        let meta = event.metadata();
        let mut attributes = v.attributes;
        attributes.push((
            "level",
            AttrValue::Str(Cow::Borrowed(meta.level().as_str())),
        ));
        attributes.push(("target", AttrValue::Str(Cow::Borrowed(meta.target()))));
        let record = EventRecord {
            time: SystemTime::now(),
            name: v.message.map_or(Cow::Borrowed("event"), Cow::Owned),
            attributes,
        };
        match span {
            Some(span) => {
                if let Some(c) = span.extensions_mut().get_mut::<Captured>() {
                    c.add_event(record);
                }
            }
            None => {
                with_current(|r| r.0.add_event(record));
            }
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(captured) = ctx
            .span(&id)
            .and_then(|s| s.extensions_mut().remove::<Captured>())
        else {
            return;
        };
        let background_root = captured.parent.is_none();
        let (trace, record) = captured.into_record();
        if !background_root {
            trace.add_span(record);
            return;
        }
        let export = trace.sampled || record.failed();
        if let Some(children) = trace.finish(export) {
            let mut spans = children.spans;
            spans.push(record);
            trace.exporter.send(Item::Spans(spans));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    // A trace ID whose low half decides the ratio: 0 is kept by any
    // ratio > 0, u64::MAX is never kept by a ratio < 1.
    const KEPT: u128 = 1 << 64;
    const NOT_KEPT: u128 = (1 << 64) | u64::MAX as u128;
    const TP: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn exporter(ratio: f64, capacity: usize) -> (Exporter, Queue, Counter) {
        let dropped = Counter::default();
        let (e, q) = Exporter::new(ratio, capacity, dropped.clone());
        (e, q, dropped)
    }

    fn drain(q: &mut Queue) -> Vec<Item> {
        let mut items = Vec::new();
        while let Ok(item) = q.rx.try_recv() {
            items.push(item);
        }
        items
    }

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
    fn traceparent_is_parsed_strictly() {
        let p = parse_traceparent(TP).unwrap();
        assert_eq!(
            p.trace_id.to_hex().as_ref(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(p.span_id, SpanId::from(0x00f0_67aa_0ba9_02b7));
        assert!(p.sampled);
        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!parse_traceparent(unsampled).unwrap().sampled);
        // A later version may append fields.
        let v1 = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(parse_traceparent(v1).is_some());
        for bad in [
            &b"junk"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(
                parse_traceparent(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn child_traceparent_carries_the_trace_and_the_head_decision() {
        let (e, _q, _) = exporter(0.0, 16);
        let remote = parse_traceparent(TP);
        let r = RequestSpans::start(&e, remote, Some(HeaderValue::from_static("a=b")));
        assert!(r.sampled(), "a sampled caller is followed");
        let (tp, ts) = r.context_headers(SpanId::from(0xab));
        assert_eq!(
            tp,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00000000000000ab-01"
        );
        assert_eq!(ts.unwrap(), "a=b");
        let r = RequestSpans::start(&e, None, Some(HeaderValue::from_static("a=b")));
        assert!(!r.sampled());
        let (tp, ts) = r.context_headers(SpanId::from(1));
        assert!(tp.to_str().unwrap().ends_with("-00"));
        assert!(ts.is_none(), "no tracestate without a caller trace");
    }

    fn record(trace: u128, id: u64) -> SpanRecord {
        SpanRecord::for_test(trace, id)
    }

    #[test]
    fn full_queue_drops_and_counts_spans() {
        let (e, mut q, dropped) = exporter(1.0, 3);
        for i in 0..3 {
            e.send(Item::Spans(vec![record(KEPT, i + 1), record(KEPT, i + 10)]));
        }
        assert_eq!(
            drain(&mut q).len(),
            1,
            "3 spans fit, the next 2 and 2 do not"
        );
        assert_eq!(dropped.get(), 4);
    }

    #[test]
    fn children_are_bounded_and_late_children_follow_the_decision() {
        let (e, mut q, dropped) = exporter(0.0, 1000);
        let r = RequestSpans::start(&e, None, None);
        for i in 0..(MAX_CHILDREN as u64 + 3) {
            r.0.add_span(record(u128::from_be_bytes(r.trace_id().to_bytes()), i + 1));
        }
        assert_eq!(dropped.get(), 3);
        let kids = r.finish(true).unwrap();
        assert_eq!(kids.spans.len(), MAX_CHILDREN);
        r.0.add_span(record(u128::from_be_bytes(r.trace_id().to_bytes()), 999));
        assert_eq!(
            drain(&mut q).len(),
            1,
            "a late child of an exported trace is sent"
        );

        let r = RequestSpans::start(&e, None, None);
        assert!(r.finish(false).is_none());
        r.0.add_span(record(u128::from_be_bytes(r.trace_id().to_bytes()), 7));
        r.add_call(CallRecord {
            span_id: SpanId::from(8),
            started: Instant::now(),
            ended: Instant::now(),
            method: Method::GET,
            uri: Uri::from_static("http://z/v1"),
            status: Some(200),
            request_id: None,
            error: None,
        });
        assert!(
            drain(&mut q).is_empty(),
            "nothing of an unexported trace is sent"
        );
        assert_eq!(dropped.get(), 3, "and not counted as dropped either");
    }

    fn capture(e: &Exporter) -> impl tracing::Subscriber + Send + Sync {
        tracing_subscriber::registry().with(CaptureLayer::new(e.clone()))
    }

    #[test]
    fn events_and_spans_inside_a_request_are_attached_to_it() {
        let (e, _q, _) = exporter(1.0, 100);
        let r = RequestSpans::start(&e, None, None);
        tracing::subscriber::with_default(capture(&e), || {
            r.in_scope(|| {
                tracing::info!(limit = "stop-per-job", "rate limit: denied");
                let fetch = tracing::info_span!("zuora.token_fetch", otel.kind = "client");
                fetch.in_scope(|| tracing::info!("inside the fetch"));
                drop(fetch);
            });
            tracing::info!("outside any request: not attached");
        });
        let kids = r.finish(true).unwrap();
        let names: Vec<_> = kids.events.iter().map(|e| e.name.to_string()).collect();
        assert_eq!(names, ["rate limit: denied"]);
        assert!(
            kids.events[0]
                .attributes
                .contains(&("limit", AttrValue::Str("stop-per-job".into())))
        );
        assert_eq!(kids.spans.len(), 1);
        let fetch = &kids.spans[0];
        assert_eq!(fetch.name, "zuora.token_fetch");
        assert_eq!(fetch.kind, SpanKind::Client);
        assert_eq!(fetch.trace_id, r.trace_id());
        assert_eq!(fetch.parent, Some(r.span_id()));
        assert_eq!(fetch.events[0].name, "inside the fetch");
    }

    #[test]
    fn background_spans_are_their_own_traces_exported_by_ratio_or_failure() {
        let (e, mut q, _) = exporter(0.0, 100);
        tracing::subscriber::with_default(capture(&e), || {
            let ok = tracing::info_span!("zuora.token_fetch", error.type = tracing::field::Empty);
            drop(ok.enter());
            drop(ok);
            let failed =
                tracing::info_span!("zuora.token_fetch", error.type = tracing::field::Empty);
            failed.record("error.type", "timeout");
            let child = failed.in_scope(|| tracing::info_span!("child"));
            drop(child);
            drop(failed);
        });
        let items = drain(&mut q);
        assert_eq!(items.len(), 1, "only the failed one: {items:?}");
        let Item::Spans(spans) = &items[0] else {
            panic!("{items:?}")
        };
        assert_eq!(spans.len(), 2);
        let (child, root) = (&spans[0], &spans[1]);
        assert_eq!(root.parent, None);
        assert_eq!(child.parent, Some(root.span_id));
        assert_eq!(child.trace_id, root.trace_id);
        assert!(root.failed());
    }

    #[test]
    fn entering_restores_the_previous_request() {
        let (e, _q, _) = exporter(1.0, 10);
        let a = RequestSpans::start(&e, None, None);
        let b = RequestSpans::start(&e, None, None);
        let mut slot = Some(b.clone());
        a.in_scope(|| {
            {
                let _g = enter(&mut slot);
                assert_eq!(with_current(|r| r.trace_id()), Some(b.trace_id()));
            }
            assert_eq!(with_current(|r| r.trace_id()), Some(a.trace_id()));
        });
        assert!(slot.is_some(), "moved back");
        assert_eq!(with_current(|r| r.trace_id()), None);
    }
}
