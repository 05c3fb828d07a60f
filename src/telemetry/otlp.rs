//! The export thread: OTLP/HTTP protobuf (`ExportTraceServiceRequest`)
//! built from the records queued by [`super::otel`], posted to the
//! collector over the gateway's hyper + rustls client.
//!
//! It runs on a dedicated thread (`otlp-export`) with its own
//! single-threaded tokio runtime, so building and encoding a batch never
//! stalls a runtime worker that serves requests. Batches hold up to 512
//! spans and leave at the latest `OTEL_BSP_SCHEDULE_DELAY` ms (default
//! 1000) after their first span; a request times out after 10 s. A failed
//! export counts its spans as dropped (no retry: the queue keeps moving).
//!
//! The protobuf is written directly (about twenty fields of the OTLP trace
//! schema; the tests decode it with `opentelemetry-proto`), without an
//! intermediate SDK span model.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use http_body_util::{BodyExt as _, Limited};
use prometheus_client::metrics::counter::Counter;

use super::otel::{
    AttrValue, BatchConfig, CallError, EventRecord, Item, Queue, ServerRecord, SpanId, SpanKind,
    SpanRecord, TraceId,
};

/// Timeout of one export request to the collector.
pub(crate) const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value,…` sent with every export.
pub const ENV_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS`: the same, for traces (wins).
pub const ENV_TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
/// `OTEL_RESOURCE_ATTRIBUTES`: `key=value,…` added to the resource.
pub const ENV_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
/// The instrumentation scope of every span.
const SCOPE: &str = "zuora-gateway";

// ------------------------------------------------------------- settings

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `k1=v1,k2=v2` (W3C Baggage-like, values percent-encoded), as the
/// OpenTelemetry environment variables write lists.
fn key_values(s: &str) -> impl Iterator<Item = (String, String)> + '_ {
    s.split(',').filter_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        let k = percent_decode(k.trim());
        (!k.is_empty()).then(|| (k, percent_decode(v.trim())))
    })
}

/// Headers for export requests: `OTEL_EXPORTER_OTLP_HEADERS`, then
/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (which wins). Returns the headers and
/// the number of entries skipped as invalid (values are never logged: they
/// are usually API keys).
pub fn export_headers(env: impl Fn(&str) -> Option<String>) -> (HeaderMap, usize) {
    let mut headers = HeaderMap::new();
    let mut skipped = 0;
    for var in [ENV_HEADERS, ENV_TRACES_HEADERS] {
        let Some(list) = env(var) else { continue };
        for (k, v) in key_values(&list) {
            match (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                (Ok(name), Ok(mut value)) => {
                    value.set_sensitive(true);
                    headers.insert(name, value);
                }
                _ => skipped += 1,
            }
        }
    }
    (headers, skipped)
}

/// The resource: `OTEL_RESOURCE_ATTRIBUTES`, then `service.name` (from the
/// config, which wins) and the SDK attributes.
pub fn resource_attributes(
    service_name: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut attrs: Vec<(String, String)> = Vec::new();
    let mut put = |k: String, v: String| match attrs.iter_mut().find(|(key, _)| *key == k) {
        Some(slot) => slot.1 = v,
        None => attrs.push((k, v)),
    };
    if let Some(list) = env(ENV_RESOURCE_ATTRIBUTES) {
        for (k, v) in key_values(&list) {
            put(k, v);
        }
    }
    put("service.name".into(), service_name.into());
    put("service.version".into(), env!("CARGO_PKG_VERSION").into());
    put("telemetry.sdk.language".into(), "rust".into());
    attrs
}

// ------------------------------------------------------------- protobuf

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// A protobuf writer: just enough of the wire format for OTLP traces.
#[derive(Debug, Default)]
struct Pb(Vec<u8>);

impl Pb {
    #[inline]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    #[inline]
    fn tag(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }

    #[inline]
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.tag(field, LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    #[inline]
    fn string(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }

    #[inline]
    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, VARINT);
            self.varint(v);
        }
    }

    #[inline]
    fn fixed64(&mut self, field: u32, v: u64) {
        self.tag(field, I64);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    #[inline]
    fn fixed32(&mut self, field: u32, v: u32) {
        self.tag(field, I32);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A nested message: its length is patched in after `f` wrote it.
    fn message(&mut self, field: u32, f: impl FnOnce(&mut Pb)) {
        self.tag(field, LEN);
        let at = self.0.len();
        self.0.push(0);
        f(self);
        let len = self.0.len() - at - 1;
        if len < 0x80 {
            self.0[at] = len as u8;
        } else {
            let mut v = Pb(Vec::with_capacity(10));
            v.varint(len as u64);
            self.0[at] = v.0[0];
            self.0.splice(at + 1..at + 1, v.0[1..].iter().copied());
        }
    }

    /// `KeyValue { key, value: AnyValue }` in repeated field `field`. The
    /// most frequent message: lengths are computed up front, not patched.
    fn attr(&mut self, field: u32, key: &str, value: Value<'_>) {
        let any_len = match value {
            Value::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
            Value::Bool(_) => 2,
            Value::Int(i) => 1 + varint_len(i as u64),
            Value::Float(_) => 9,
        };
        let key_len = if key.is_empty() {
            0
        } else {
            1 + varint_len(key.len() as u64) + key.len()
        };
        let kv_len = key_len + 1 + varint_len(any_len as u64) + any_len;
        self.0.reserve(kv_len + 6);
        self.tag(field, LEN);
        self.varint(kv_len as u64);
        self.string(1, key);
        self.tag(2, LEN);
        self.varint(any_len as u64);
        match value {
            Value::Str(s) => self.bytes(1, s.as_bytes()),
            Value::Bool(b) => {
                self.tag(2, VARINT);
                self.varint(u64::from(b));
            }
            Value::Int(i) => {
                self.tag(3, VARINT);
                self.varint(i as u64);
            }
            Value::Float(f) => self.fixed64(4, f.to_bits()),
        }
    }
}

/// Bytes of `v` as a varint.
#[inline]
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// An attribute value as written.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl<'a> From<&'a AttrValue> for Value<'a> {
    fn from(v: &'a AttrValue) -> Self {
        match v {
            AttrValue::Str(s) => Value::Str(s),
            AttrValue::Int(i) => Value::Int(*i),
            AttrValue::Float(f) => Value::Float(*f),
            AttrValue::Bool(b) => Value::Bool(*b),
        }
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The fields every span has.
struct Head<'a> {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    parent_remote: bool,
    trace_state: Option<&'a HeaderValue>,
    name: &'a str,
    kind: SpanKind,
    start: SystemTime,
    end: SystemTime,
}

// `Span` field numbers (opentelemetry/proto/trace/v1/trace.proto).
const SPAN_ATTRIBUTES: u32 = 9;
const EVENT_ATTRIBUTES: u32 = 3;
/// `SpanFlags`: bits 0–7 trace flags (sampled), then "is-remote is known"
/// and "the parent is remote".
const FLAGS_SAMPLED: u32 = 0x01;
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;

fn span(
    pb: &mut Pb,
    head: &Head<'_>,
    attributes: impl FnOnce(&mut Pb),
    events: &[EventRecord],
    events_dropped: u32,
    error: bool,
) {
    // One allocation check for the common case (a span is a few hundred bytes).
    pb.0.reserve(1024);
    pb.message(2, |s| {
        s.bytes(1, &head.trace_id.to_bytes());
        s.bytes(2, &head.span_id.to_bytes());
        if let Some(ts) = head.trace_state.and_then(|v| v.to_str().ok()) {
            s.string(3, ts);
        }
        if let Some(p) = head.parent {
            s.bytes(4, &p.to_bytes());
        }
        s.string(5, head.name);
        s.uint(6, head.kind as u64);
        s.fixed64(7, nanos(head.start));
        s.fixed64(8, nanos(head.end));
        attributes(s);
        for e in events {
            s.message(11, |ev| {
                ev.fixed64(1, nanos(e.time));
                ev.string(2, &e.name);
                for (k, v) in &e.attributes {
                    ev.attr(EVENT_ATTRIBUTES, k, v.into());
                }
            });
        }
        s.uint(12, u64::from(events_dropped));
        if error {
            // Status { code: STATUS_CODE_ERROR }
            s.message(15, |st| st.uint(3, 2));
        }
        let remote = if head.parent_remote {
            FLAGS_IS_REMOTE
        } else {
            0
        };
        s.fixed32(16, FLAGS_SAMPLED | FLAGS_HAS_IS_REMOTE | remote);
    });
}

/// `network.protocol.version`.
pub(crate) fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

fn text(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

/// A `Host` value without its port (IPv6 literals keep their brackets).
pub(crate) fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

fn server_span(pb: &mut Pb, r: &ServerRecord) {
    let template = r.route.as_ref().map(|route| route.template());
    let name = format!("{} {}", r.method.as_str(), template.unwrap_or("unmatched"));
    let head = Head {
        trace_id: r.trace_id,
        span_id: r.span_id,
        parent: r.parent,
        parent_remote: r.parent.is_some(),
        trace_state: r.trace_state.as_ref(),
        name: &name,
        kind: SpanKind::Server,
        start: r.time,
        end: r.wall(r.ended),
    };
    let attributes = |s: &mut Pb| {
        let a = SPAN_ATTRIBUTES;
        s.attr(a, "http.request.method", Value::Str(r.method.as_str()));
        s.attr(a, "url.path", Value::Str(&r.path));
        if let Some(host) = text(&r.host).map(strip_port).filter(|h| !h.is_empty()) {
            s.attr(a, "server.address", Value::Str(host));
        }
        s.attr(
            a,
            "network.protocol.version",
            Value::Str(version_str(r.version)),
        );
        s.attr(
            a,
            "zuora.track_id",
            Value::Str(r.track_id.to_str().unwrap_or("")),
        );
        if let Some(route) = &r.route {
            s.attr(a, "http.route", Value::Str(route.template()));
        }
        s.attr(
            a,
            "http.response.status_code",
            Value::Int(i64::from(r.status)),
        );
        if let Some(route) = &r.route {
            s.attr(a, "zuora.route", Value::Str(route.name()));
        }
        if let Some(c) = &r.caller {
            s.attr(a, "zuora.caller", Value::Str(c));
        }
        if let Some(e) = text(&r.entity_ids) {
            s.attr(a, "zuora.entity_ids", Value::Str(e));
        }
        if let Some(id) = text(&r.request_id) {
            s.attr(a, "zuora.request_id", Value::Str(id));
        }
        if let Some(e) = r.error_type {
            s.attr(a, "error.type", Value::Str(e));
        }
    };
    let c = &r.children;
    span(
        pb,
        &head,
        attributes,
        &c.events,
        c.events_dropped,
        r.status >= 500,
    );
    for call in &c.calls {
        let head = Head {
            trace_id: r.trace_id,
            span_id: call.span_id,
            parent: Some(r.span_id),
            parent_remote: false,
            trace_state: r.trace_state.as_ref(),
            name: "zuora.call",
            kind: SpanKind::Client,
            start: r.wall(call.started),
            end: r.wall(call.ended),
        };
        let status_text;
        let error: Option<&str> = match call.error {
            Some(CallError::Status(code)) => {
                status_text = code.to_string();
                Some(&status_text)
            }
            Some(CallError::Kind(k)) => Some(k),
            None => None,
        };
        let attributes = |s: &mut Pb| {
            let a = SPAN_ATTRIBUTES;
            let uri = &call.uri;
            s.attr(a, "http.request.method", Value::Str(call.method.as_str()));
            if let Some(host) = uri.host() {
                s.attr(a, "server.address", Value::Str(host));
            }
            let port = uri.port_u16().or_else(|| match uri.scheme_str() {
                Some("https") => Some(443),
                Some("http") => Some(80),
                _ => None,
            });
            if let Some(port) = port {
                s.attr(a, "server.port", Value::Int(i64::from(port)));
            }
            s.attr(a, "url.path", Value::Str(uri.path()));
            if let Some(status) = call.status {
                s.attr(
                    a,
                    "http.response.status_code",
                    Value::Int(i64::from(status)),
                );
            }
            if let Some(id) = text(&call.request_id) {
                s.attr(a, "zuora.request_id", Value::Str(id));
            }
            if let Some(e) = error {
                s.attr(a, "error.type", Value::Str(e));
            }
        };
        span(pb, &head, attributes, &[], 0, error.is_some());
    }
    for child in &c.spans {
        record_span(pb, child);
    }
}

fn record_span(pb: &mut Pb, r: &SpanRecord) {
    let head = Head {
        trace_id: r.trace_id,
        span_id: r.span_id,
        parent: r.parent,
        parent_remote: r.parent_remote,
        trace_state: r.trace_state.as_ref(),
        name: &r.name,
        kind: r.kind,
        start: r.start,
        end: r.end,
    };
    let attributes = |s: &mut Pb| {
        for (k, v) in &r.attributes {
            s.attr(SPAN_ATTRIBUTES, k, v.into());
        }
    };
    span(pb, &head, attributes, &r.events, r.events_dropped, r.error);
}

/// The spans of a batch, encoded as its items arrive (as `ScopeSpans.spans`
/// fields). A batch then holds a few hundred bytes per span rather than its
/// records: a request's, with its children, is several allocations and some
/// KiB, and at 512 spans a batch of records cost more than a MiB.
#[derive(Debug, Default)]
pub(crate) struct EncodedSpans(Pb);

impl EncodedSpans {
    /// Encodes the spans of `item`.
    pub(crate) fn add(&mut self, item: &Item) {
        match item {
            Item::Request(r) => server_span(&mut self.0, r),
            Item::Spans(spans) => {
                for s in spans {
                    record_span(&mut self.0, s);
                }
            }
            Item::Flush(_) | Item::Stop => {}
        }
    }
}

/// One `ExportTraceServiceRequest` holding `spans`.
pub(crate) fn encode(resource: &[(String, String)], spans: &EncodedSpans) -> Vec<u8> {
    let mut pb = Pb(Vec::with_capacity(spans.0.0.len() + 512));
    // ExportTraceServiceRequest.resource_spans
    pb.message(1, |rs| {
        // ResourceSpans.resource
        rs.message(1, |res| {
            for (k, v) in resource {
                res.attr(1, k, Value::Str(v));
            }
        });
        // ResourceSpans.scope_spans
        rs.message(2, |ss| {
            ss.message(1, |scope| {
                scope.string(1, SCOPE);
                scope.string(2, env!("CARGO_PKG_VERSION"));
            });
            ss.0.extend_from_slice(&spans.0.0);
        });
    });
    pb.0
}

// --------------------------------------------------------------- worker

/// Where encoded batches go.
pub(crate) trait Sink {
    /// Sends one encoded `ExportTraceServiceRequest`.
    async fn send(&self, body: Vec<u8>) -> Result<(), String>;
}

/// Counters the worker updates.
#[derive(Debug, Clone)]
pub(crate) struct WorkerMetrics {
    pub(crate) dropped: Counter,
    pub(crate) exported: Counter,
}

/// Drains the queue into `sink`: batches of up to `max_batch` spans, sent
/// when full, `delay` after their first item, or on a flush. A failed
/// export counts its spans as dropped.
pub(crate) async fn run_worker<K: Sink>(
    mut queue: Queue,
    sink: K,
    resource: Vec<(String, String)>,
    cfg: BatchConfig,
    metrics: WorkerMetrics,
) {
    let mut last_warning: Option<Instant> = None;
    let mut stop = false;
    while !stop {
        let Some(first) = queue.recv().await else {
            break;
        };
        let mut batch = Batch::default();
        stop = batch.add(first);
        let deadline = tokio::time::Instant::now() + cfg.delay;
        while !stop && batch.acks.is_empty() && batch.spans < cfg.max_batch {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(item)) => stop = batch.add(item),
                Ok(None) | Err(_) => break,
            }
        }
        if batch.spans > 0 {
            let n = batch.spans as u64;
            let body = encode(&resource, &batch.encoded);
            batch.encoded = EncodedSpans::default();
            match sink.send(body).await {
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
        }
        for ack in batch.acks {
            let _ = ack.send(());
        }
    }
}

#[derive(Default)]
struct Batch {
    encoded: EncodedSpans,
    spans: usize,
    acks: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Batch {
    /// Adds an item; `true` when it asks the worker to stop.
    fn add(&mut self, item: Item) -> bool {
        match item {
            Item::Flush(ack) => self.acks.push(ack),
            Item::Stop => return true,
            item => {
                self.spans += item.span_count();
                self.encoded.add(&item);
            }
        }
        false
    }
}

/// Starts the export thread with its own single-threaded runtime.
pub(crate) fn spawn<K: Sink + Send + 'static>(
    queue: Queue,
    sink: K,
    resource: Vec<(String, String)>,
    cfg: BatchConfig,
    metrics: WorkerMetrics,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("otlp-export".to_owned())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    // The queue is dropped with this thread: every span counts as dropped.
                    tracing::error!(error = %e, "cannot start the span export thread; spans are dropped");
                    return;
                }
            };
            rt.block_on(run_worker(queue, sink, resource, cfg, metrics));
        })
}

/// OTLP/HTTP: `POST <endpoint>` with `application/x-protobuf`.
#[derive(Debug)]
pub(crate) struct HttpSink {
    client: crate::upstream::client::Client,
    endpoint: Uri,
    headers: HeaderMap,
}

impl HttpSink {
    /// A client for `endpoint` (http or https, webpki roots).
    pub(crate) fn new(endpoint: &str, headers: HeaderMap) -> Result<HttpSink, String> {
        let uri: Uri = endpoint.parse().map_err(|e| format!("invalid URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err("expected an http:// or https:// URL".to_owned());
        }
        let tls = crate::upstream::client::tls_config(None)?;
        let client = crate::upstream::client::https_client(
            tls,
            Duration::from_secs(5),
            Duration::from_secs(90),
            2,
        );
        Ok(HttpSink {
            client,
            endpoint: uri,
            headers,
        })
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

impl Sink for HttpSink {
    async fn send(&self, body: Vec<u8>) -> Result<(), String> {
        let mut req = Request::new(crate::body::full(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.endpoint.clone();
        let h = req.headers_mut();
        h.clone_from(&self.headers);
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        h.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("zuora-gateway/", env!("CARGO_PKG_VERSION"))),
        );
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| root_cause(&e))?;
            let status = resp.status();
            // Read the (small) answer so the connection can be reused.
            let _ = Limited::new(resp.into_body(), 64 * 1024).collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        };
        match tokio::time::timeout(EXPORT_TIMEOUT, exchange).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", EXPORT_TIMEOUT.as_secs())),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::telemetry::otel::{CallRecord, Children, Exporter};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn attr(span: &Span, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Any::StringValue(s) => Some(s.clone()),
                Any::IntValue(i) => Some(i.to_string()),
                Any::BoolValue(b) => Some(b.to_string()),
                Any::DoubleValue(d) => Some(d.to_string()),
                _ => None,
            })
    }

    fn server(now: Instant, children: Children) -> ServerRecord {
        ServerRecord {
            trace_id: TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            span_id: SpanId::from(7),
            parent: Some(SpanId::from(0x00f0_67aa_0ba9_02b7)),
            trace_state: Some(HeaderValue::from_static("congo=t61rcWkgMzE")),
            time: SystemTime::now(),
            started: now,
            ended: now + Duration::from_millis(3),
            method: Method::PUT,
            path: "/v1/x/jobs/1".into(),
            host: Some(HeaderValue::from_static("gw.local:8080")),
            version: Version::HTTP_11,
            track_id: HeaderValue::from_static("t-1"),
            route: None,
            caller: Some(Arc::from("billing")),
            entity_ids: Some(HeaderValue::from_static("e-1")),
            request_id: Some(HeaderValue::from_static("zr-1")),
            status: 504,
            error_type: Some("upstream_timeout"),
            children,
        }
    }

    /// One request body for `items`, as the worker builds it.
    fn encode_items(resource: &[(String, String)], items: &[Item]) -> Vec<u8> {
        let mut spans = EncodedSpans::default();
        for item in items {
            spans.add(item);
        }
        encode(resource, &spans)
    }

    fn decode(body: &[u8]) -> (Vec<(String, String)>, Vec<Span>) {
        let req = ExportTraceServiceRequest::decode(body).unwrap();
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        let resource = rs
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(
                |kv| match kv.value.as_ref().unwrap().value.as_ref().unwrap() {
                    Any::StringValue(s) => (kv.key.clone(), s.clone()),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, SCOPE);
        (resource, ss.spans.clone())
    }

    #[test]
    fn a_request_is_encoded_as_valid_otlp() {
        let now = Instant::now();
        let mut children = Children::default();
        children.calls.push(CallRecord {
            span_id: SpanId::from(8),
            started: now + Duration::from_millis(1),
            ended: now + Duration::from_millis(2),
            method: Method::PUT,
            uri: Uri::from_static("https://rest.zuora.com/v1/x/jobs/1"),
            status: None,
            request_id: None,
            error: Some(CallError::Kind("upstream_timeout")),
        });
        children.events.push(EventRecord {
            time: SystemTime::now(),
            name: "replaying a request Zuora answered 401".into(),
            attributes: vec![("attempt", AttrValue::Int(2))],
        });
        let mut record = server(now, children);
        // A long attribute: nested lengths above 127 bytes.
        record.path = format!("/v1/{}", "p".repeat(300)).into();
        let resource = resource_attributes("gw", |_| None);
        let body = encode_items(&resource, &[Item::Request(Box::new(record))]);
        let (res, spans) = decode(&body);
        assert!(res.contains(&("service.name".into(), "gw".into())));
        assert_eq!(spans.len(), 2);
        let (s, call) = (&spans[0], &spans[1]);
        assert_eq!(s.name, "PUT unmatched");
        assert_eq!(s.kind, 2);
        assert_eq!(
            s.trace_id,
            0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128.to_be_bytes()
        );
        assert_eq!(s.span_id, 7u64.to_be_bytes());
        assert_eq!(s.parent_span_id, 0x00f0_67aa_0ba9_02b7u64.to_be_bytes());
        assert_eq!(s.trace_state, "congo=t61rcWkgMzE");
        assert_eq!(s.flags, 0x301);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 3_000_000);
        assert_eq!(attr(s, "url.path").unwrap().len(), 304);
        assert_eq!(attr(s, "server.address").as_deref(), Some("gw.local"));
        assert_eq!(attr(s, "http.response.status_code").as_deref(), Some("504"));
        assert_eq!(attr(s, "zuora.caller").as_deref(), Some("billing"));
        assert_eq!(attr(s, "zuora.entity_ids").as_deref(), Some("e-1"));
        assert_eq!(attr(s, "zuora.request_id").as_deref(), Some("zr-1"));
        assert_eq!(attr(s, "zuora.track_id").as_deref(), Some("t-1"));
        assert_eq!(attr(s, "error.type").as_deref(), Some("upstream_timeout"));
        assert_eq!(attr(s, "network.protocol.version").as_deref(), Some("1.1"));
        assert_eq!(s.status.as_ref().unwrap().code, 2);
        assert_eq!(s.events.len(), 1);
        assert_eq!(s.events[0].name, "replaying a request Zuora answered 401");
        assert_eq!(call.name, "zuora.call");
        assert_eq!(call.kind, 3);
        assert_eq!(call.parent_span_id, s.span_id);
        assert_eq!(call.trace_id, s.trace_id);
        assert_eq!(call.flags, 0x101);
        assert_eq!(
            call.start_time_unix_nano - s.start_time_unix_nano,
            1_000_000
        );
        assert_eq!(
            attr(call, "server.address").as_deref(),
            Some("rest.zuora.com")
        );
        assert_eq!(attr(call, "server.port").as_deref(), Some("443"));
        assert_eq!(
            attr(call, "error.type").as_deref(),
            Some("upstream_timeout")
        );
        assert_eq!(call.status.as_ref().unwrap().code, 2);
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX, -5i64 as u64] {
            let mut pb = Pb::default();
            pb.varint(v);
            assert_eq!(varint_len(v), pb.0.len(), "{v}");
        }
    }

    #[test]
    fn span_records_keep_their_attribute_types() {
        let span = SpanRecord {
            name: "zuora.token_fetch".into(),
            attributes: vec![
                ("s", AttrValue::Str("v".into())),
                ("i", AttrValue::Int(-5)),
                ("f", AttrValue::Float(1.5)),
                ("b", AttrValue::Bool(true)),
            ],
            events_dropped: 3,
            ..SpanRecord::for_test(1, 2)
        };
        let body = encode_items(&[], &[Item::Spans(vec![span])]);
        let (_, spans) = decode(&body);
        let s = &spans[0];
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.kind, 1);
        assert_eq!(s.dropped_events_count, 3);
        assert!(s.status.is_none());
        assert_eq!(attr(s, "s").as_deref(), Some("v"));
        assert_eq!(attr(s, "i").as_deref(), Some("-5"));
        assert_eq!(attr(s, "f").as_deref(), Some("1.5"));
        assert_eq!(attr(s, "b").as_deref(), Some("true"));
    }

    #[test]
    fn environment_lists_are_parsed_and_decoded() {
        let env = |k: &str| match k {
            ENV_HEADERS => Some("api-key=abc%20def, x-b = 1 ,bad header=1,novalue".into()),
            ENV_TRACES_HEADERS => Some("x-b=2".into()),
            ENV_RESOURCE_ATTRIBUTES => {
                Some("deployment.environment=prod,service.name=ignored".into())
            }
            _ => None,
        };
        let (h, skipped) = export_headers(env);
        assert_eq!(h["api-key"], "abc def");
        assert!(h["api-key"].is_sensitive());
        assert_eq!(h["x-b"], "2", "the traces variable wins");
        assert_eq!(skipped, 1);
        let r = resource_attributes("gw", env);
        assert!(r.contains(&("deployment.environment".into(), "prod".into())));
        assert!(r.contains(&("service.name".into(), "gw".into())));
        assert!(!r.iter().any(|(_, v)| v == "ignored"));
    }

    #[derive(Debug, Clone)]
    struct CountingSink {
        seen: Arc<AtomicUsize>,
        fail: bool,
    }

    impl Sink for CountingSink {
        async fn send(&self, body: Vec<u8>) -> Result<(), String> {
            let (_, spans) = decode(&body);
            self.seen.fetch_add(spans.len(), Ordering::SeqCst);
            if self.fail {
                Err("down".into())
            } else {
                Ok(())
            }
        }
    }

    fn spans(n: u64) -> Item {
        Item::Spans((0..n).map(|i| SpanRecord::for_test(1, i + 1)).collect())
    }

    #[tokio::test]
    async fn worker_exports_batches_and_counts_failures() {
        for fail in [false, true] {
            let seen = Arc::new(AtomicUsize::new(0));
            let (exporter, queue) = Exporter::new(1.0, 64, Counter::default());
            let m = WorkerMetrics {
                dropped: Counter::default(),
                exported: Counter::default(),
            };
            let cfg = BatchConfig {
                max_batch: 4,
                delay: Duration::from_millis(20),
            };
            let worker = tokio::spawn(run_worker(
                queue,
                CountingSink {
                    seen: seen.clone(),
                    fail,
                },
                vec![],
                cfg,
                m.clone(),
            ));
            for _ in 0..5 {
                exporter.send(spans(2));
            }
            exporter.flush().await.unwrap();
            assert_eq!(seen.load(Ordering::SeqCst), 10);
            if fail {
                assert_eq!((m.exported.get(), m.dropped.get()), (0, 10));
            } else {
                assert_eq!((m.exported.get(), m.dropped.get()), (10, 0));
            }
            exporter.stop();
            worker.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_dead_collector_is_an_error_not_a_hang() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        let sink = HttpSink::new(&format!("http://{addr}/v1/traces"), HeaderMap::new()).unwrap();
        assert!(sink.send(vec![]).await.is_err());
        assert!(HttpSink::new("ftp://x/v1/traces", HeaderMap::new()).is_err());
    }
}
