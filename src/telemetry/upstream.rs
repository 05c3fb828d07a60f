//! Trace context propagation and the Zuora-call span.
//!
//! Ingress (the trace layer): the caller's `traceparent`/`tracestate` are
//! read, removed from the request, and kept as [`CallerTraceContext`].
//! Egress (the forward service): [`CallTrace::start`] starts the
//! `zuora.call` record (only when OTLP export is on: a span ID and an
//! instant, nothing else until it finishes) and, only when the upstream's
//! `forward_traceparent` is true, sends the gateway's span context (or, with
//! OTLP export off, the caller's own headers) to Zuora.

use std::time::{Duration, Instant};

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};

use super::otel::{CallError, CallRecord, IdExt as _, RemoteParent, RequestSpans, SpanId};
use super::trail::DecisionTrail;
use crate::error::GatewayError;

/// `traceparent` (W3C Trace Context).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate` (W3C Trace Context).
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// `Zuora-Request-Id` (Zuora's own request ID, what support asks for).
pub static ZUORA_REQUEST_ID: HeaderName = HeaderName::from_static("zuora-request-id");
/// `Zuora-Entity-Ids`.
pub static ZUORA_ENTITY_IDS: HeaderName = HeaderName::from_static("zuora-entity-ids");

/// The caller's W3C trace headers, removed from the request at ingress.
#[derive(Debug, Clone)]
pub struct CallerTraceContext {
    /// `traceparent` as sent.
    pub traceparent: HeaderValue,
    /// `tracestate` as sent.
    pub tracestate: Option<HeaderValue>,
}

impl CallerTraceContext {
    /// Removes the trace headers from `headers`; `None` when there was no
    /// `traceparent` (a lone `tracestate` is dropped too).
    pub fn take_from(headers: &mut HeaderMap) -> Option<CallerTraceContext> {
        let tracestate = headers.remove(&TRACESTATE);
        let traceparent = headers.remove(&TRACEPARENT)?;
        Some(CallerTraceContext {
            traceparent,
            tracestate,
        })
    }

    /// The trace ID (32 lowercase hex) when `traceparent` is well formed.
    pub fn trace_id(&self) -> Option<&str> {
        let s = self.traceparent.to_str().ok()?;
        let id = s.get(3..35)?;
        let valid = s.len() >= 55
            && s.as_bytes().get(2) == Some(&b'-')
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && id.bytes().any(|b| b != b'0');
        valid.then_some(id)
    }

    /// The caller's span context, when `traceparent` is valid.
    pub fn parent(&self) -> Option<RemoteParent> {
        super::otel::parse_traceparent(self.traceparent.as_bytes())
    }

    /// Whether the headers carry a valid remote span context.
    pub fn is_valid(&self) -> bool {
        self.parent().is_some()
    }
}

/// One call to Zuora: its client span and its trail entry.
///
/// ```ignore
/// let call = CallTrace::start(&mut req, &original_extensions, upstream.forward_traceparent);
/// let result = client.request(req).await;
/// match &result {
///     Ok(resp) => call.finish_response(resp),
///     Err(_) => call.finish_failed("upstream_connect"),
/// }
/// ```
#[derive(Debug)]
pub struct CallTrace {
    started: Instant,
    trail: Option<DecisionTrail>,
    span: Option<CallSpan>,
}

/// What the `zuora.call` span needs, kept only while export is on.
#[derive(Debug)]
struct CallSpan {
    request: RequestSpans,
    span_id: SpanId,
    method: Method,
    uri: Uri,
}

impl CallTrace {
    /// Starts the `zuora.call` span (only when called while a request with a
    /// trace is polled, i.e. OTLP export is on), records the `Zuora-Entity-Ids` in the trail, and
    /// sets the trace headers of the outgoing request: none unless
    /// `forward_traceparent`. `ext` are the extensions of the caller's
    /// request (the outgoing one may be rebuilt without them).
    pub fn start<B>(
        req: &mut Request<B>,
        ext: &http::Extensions,
        forward_traceparent: bool,
    ) -> CallTrace {
        let trail = ext.get::<DecisionTrail>().cloned();
        if let (Some(t), Some(v)) = (&trail, req.headers().get(&ZUORA_ENTITY_IDS)) {
            t.set_entity_ids(v);
        }
        // The request being polled: the call runs inside its future.
        let span = super::otel::current().map(|request| CallSpan {
            request,
            span_id: SpanId::random(),
            method: req.method().clone(),
            uri: req.uri().clone(),
        });
        let headers = req.headers_mut();
        headers.remove(&TRACEPARENT);
        headers.remove(&TRACESTATE);
        if forward_traceparent {
            let context = match &span {
                Some(s) => Some(s.request.context_headers(s.span_id)),
                None => ext
                    .get::<CallerTraceContext>()
                    .map(|c| (c.traceparent.clone(), c.tracestate.clone())),
            };
            if let Some((traceparent, tracestate)) = context {
                headers.insert(TRACEPARENT.clone(), traceparent);
                if let Some(ts) = tracestate {
                    headers.insert(TRACESTATE.clone(), ts);
                }
            }
        }
        CallTrace {
            started: Instant::now(),
            trail,
            span,
        }
    }

    /// Time since [`CallTrace::start`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn record(
        self,
        status: Option<u16>,
        request_id: Option<&HeaderValue>,
        error: Option<CallError>,
    ) {
        let ended = Instant::now();
        if let Some(t) = &self.trail {
            t.record_upstream(status, request_id, ended - self.started);
        }
        if let Some(s) = self.span {
            s.request.add_call(CallRecord {
                span_id: s.span_id,
                started: self.started,
                ended,
                method: s.method,
                uri: s.uri,
                status,
                request_id: request_id.cloned(),
                error,
            });
        }
    }

    /// Records Zuora's response (status, `Zuora-Request-Id`).
    pub fn finish_response<B>(self, resp: &Response<B>) {
        let status = resp.status().as_u16();
        let error = (status >= 500).then_some(CallError::Status(status));
        self.record(Some(status), resp.headers().get(&ZUORA_REQUEST_ID), error);
    }

    /// Records a failed call (no usable response); `kind` is the
    /// [`GatewayError::kind`] it maps to (`upstream_timeout`, …).
    pub fn finish_failed(self, kind: &'static str) {
        self.record(None, None, Some(CallError::Kind(kind)));
    }

    /// Records one attempt of the pooled client under a deadline, as the
    /// forward service makes it.
    pub fn finish_attempt<B>(
        self,
        outcome: &Result<
            Result<Response<B>, crate::upstream::client::Error>,
            tokio::time::error::Elapsed,
        >,
    ) {
        match outcome {
            Ok(Ok(resp)) => self.finish_response(resp),
            Ok(Err(e)) if e.is_connect() => self.finish_failed("upstream_connect"),
            Ok(Err(_)) => self.finish_failed("bad_upstream_response"),
            Err(_) => self.finish_failed("upstream_timeout"),
        }
    }

    /// [`CallTrace::finish_response`] or [`CallTrace::finish_failed`].
    pub fn finish<B>(self, result: Result<&Response<B>, &GatewayError>) {
        match result {
            Ok(resp) => self.finish_response(resp),
            Err(e) => self.finish_failed(e.kind()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn caller_headers_are_taken_and_parsed() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(TP));
        h.insert("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
        let c = CallerTraceContext::take_from(&mut h).unwrap();
        assert!(h.is_empty());
        assert_eq!(c.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(c.is_valid());
    }

    #[test]
    fn malformed_traceparent_has_no_trace_id() {
        for bad in [
            "junk",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F35",
        ] {
            let c = CallerTraceContext {
                traceparent: HeaderValue::from_static(bad),
                tracestate: None,
            };
            assert_eq!(c.trace_id(), None, "{bad}");
        }
    }

    #[test]
    fn trace_headers_are_stripped_unless_forwarded() {
        let mut req = Request::new(());
        req.headers_mut()
            .insert("traceparent", HeaderValue::from_static(TP));
        req.extensions_mut().insert(CallerTraceContext {
            traceparent: HeaderValue::from_static(TP),
            tracestate: None,
        });
        let ext = req.extensions().clone();
        let _ = CallTrace::start(&mut req, &ext, false);
        assert!(req.headers().get("traceparent").is_none());
        // OTLP is off in unit tests: the caller's own context is forwarded.
        let _ = CallTrace::start(&mut req, &ext, true);
        assert_eq!(req.headers()["traceparent"], TP);
    }

    #[test]
    fn finish_records_status_and_request_id_in_the_trail() {
        let trail = DecisionTrail::new();
        let mut req = Request::new(());
        req.extensions_mut().insert(trail.clone());
        req.headers_mut()
            .insert("zuora-entity-ids", HeaderValue::from_static("e1"));
        let ext = req.extensions().clone();
        let call = CallTrace::start(&mut req, &ext, false);
        let resp = Response::builder()
            .status(503)
            .header("zuora-request-id", "zr-1")
            .body(())
            .unwrap();
        call.finish(Ok(&resp));
        let t = trail.take();
        assert_eq!(t.entity_ids.unwrap(), "e1");
        let u = t.upstream.unwrap();
        assert_eq!(u.status, Some(503));
        assert_eq!(u.request_id.unwrap(), "zr-1");
    }

    #[test]
    fn with_a_request_trace_the_call_is_recorded_and_its_context_forwarded() {
        let (exporter, _queue) = crate::telemetry::otel::Exporter::new(0.0, 16, Default::default());
        let caller = CallerTraceContext {
            traceparent: HeaderValue::from_static(TP),
            tracestate: Some(HeaderValue::from_static("congo=t61rcWkgMzE")),
        };
        let spans = RequestSpans::start(&exporter, caller.parent(), caller.tracestate.clone());
        let mut req = Request::new(());
        *req.uri_mut() = "https://rest.zuora.com/v1/jobs/1".parse().unwrap();
        req.extensions_mut().insert(caller);
        let ext = req.extensions().clone();
        let call = spans.in_scope(|| CallTrace::start(&mut req, &ext, true));
        let tp = req.headers()["traceparent"].to_str().unwrap().to_owned();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(
            !tp.contains("00f067aa0ba902b7"),
            "the gateway's span, not the caller's"
        );
        assert!(tp.ends_with("-01"), "the caller sampled it");
        assert_eq!(req.headers()["tracestate"], "congo=t61rcWkgMzE");
        call.finish_failed("upstream_timeout");
        let kids = spans.finish(true).unwrap();
        assert_eq!(kids.calls.len(), 1);
        let c = &kids.calls[0];
        assert_eq!(c.error, Some(CallError::Kind("upstream_timeout")));
        assert_eq!(
            tp,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01",
                u64::from_be_bytes(c.span_id.to_bytes())
            )
        );
    }
}
