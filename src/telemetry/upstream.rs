//! Trace context propagation and the Zuora-call span.
//!
//! Ingress (the trace layer): the caller's `traceparent`/`tracestate` are
//! read, removed from the request, and kept as [`CallerTraceContext`].
//! Egress (the forward service): [`CallTrace::start`] opens the
//! `zuora.call` client span and, only when the upstream's
//! `forward_traceparent` is true, sends the gateway's span context (or, with
//! OTLP export off, the caller's own headers) to Zuora.

use std::time::{Duration, Instant};

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request, Response};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

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

    /// The OpenTelemetry context these headers describe.
    pub fn otel_context(&self) -> opentelemetry::Context {
        let mut h = HeaderMap::with_capacity(2);
        h.insert(TRACEPARENT.clone(), self.traceparent.clone());
        if let Some(ts) = &self.tracestate {
            h.insert(TRACESTATE.clone(), ts.clone());
        }
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(&h))
    }

    /// Whether the headers carry a valid remote span context.
    pub fn is_valid(&self) -> bool {
        self.otel_context().span().span_context().is_valid()
    }
}

/// The trace ID of `span` (hex), when OTLP export is on and it has one.
pub fn span_trace_id(span: &tracing::Span) -> Option<Box<str>> {
    if !super::otel_active() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| sc.trace_id().to_string().into_boxed_str())
}

/// One call to Zuora: its client span and its trail entry.
///
/// ```ignore
/// let call = CallTrace::start(&mut req, &original_extensions, upstream.forward_traceparent);
/// let result = client.request(req).instrument(call.span().clone()).await;
/// match &result {
///     Ok(resp) => call.finish_response(resp),
///     Err(_) => call.finish_failed("upstream_connect"),
/// }
/// ```
#[derive(Debug)]
pub struct CallTrace {
    span: tracing::Span,
    started: Instant,
    trail: Option<DecisionTrail>,
}

impl CallTrace {
    /// Opens the `zuora.call` span (only when OTLP export is on), records
    /// the `Zuora-Entity-Ids` in the trail, and sets the trace headers of
    /// the outgoing request: none unless `forward_traceparent`. `ext` are the
    /// extensions of the caller's request (the outgoing one may be rebuilt
    /// without them).
    pub fn start<B>(
        req: &mut Request<B>,
        ext: &http::Extensions,
        forward_traceparent: bool,
    ) -> CallTrace {
        let trail = ext.get::<DecisionTrail>().cloned();
        if let (Some(t), Some(v)) = (&trail, req.headers().get(&ZUORA_ENTITY_IDS)) {
            t.set_entity_ids(v);
        }
        let span = if super::otel_active() {
            let host = req.uri().host().unwrap_or("");
            let port = req.uri().port_u16();
            tracing::info_span!(
                "zuora.call",
                otel.kind = "client",
                http.request.method = req.method().as_str(),
                server.address = host,
                server.port = port,
                url.path = req.uri().path(),
                http.response.status_code = Empty,
                zuora.request_id = Empty,
                error.type = Empty,
                otel.status_code = Empty,
            )
        } else {
            tracing::Span::none()
        };
        let caller = ext.get::<CallerTraceContext>().cloned();
        let headers = req.headers_mut();
        headers.remove(&TRACEPARENT);
        headers.remove(&TRACESTATE);
        if forward_traceparent {
            if super::otel_active() && !span.is_disabled() {
                let cx = span.context();
                TraceContextPropagator::new()
                    .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
            } else if let Some(c) = caller {
                headers.insert(TRACEPARENT.clone(), c.traceparent);
                if let Some(ts) = c.tracestate {
                    headers.insert(TRACESTATE.clone(), ts);
                }
            }
        }
        CallTrace {
            span,
            started: Instant::now(),
            trail,
        }
    }

    /// The span to instrument the call with.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Time since [`CallTrace::start`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records Zuora's response (status, `Zuora-Request-Id`).
    pub fn finish_response<B>(self, resp: &Response<B>) {
        let status = resp.status().as_u16();
        let request_id = resp.headers().get(&ZUORA_REQUEST_ID);
        self.span.record("http.response.status_code", status);
        if let Some(id) = request_id.and_then(|v| v.to_str().ok()) {
            self.span.record("zuora.request_id", id);
        }
        if status >= 500 {
            self.span.record("error.type", status);
            self.span.record("otel.status_code", "ERROR");
        }
        if let Some(t) = &self.trail {
            t.record_upstream(Some(status), request_id, self.started.elapsed());
        }
    }

    /// Records a failed call (no usable response); `kind` is the
    /// [`GatewayError::kind`] it maps to (`upstream_timeout`, …).
    pub fn finish_failed(self, kind: &'static str) {
        self.span.record("error.type", kind);
        self.span.record("otel.status_code", "ERROR");
        if let Some(t) = &self.trail {
            t.record_upstream(None, None, self.started.elapsed());
        }
    }

    /// Records one attempt of the pooled client under a deadline, as the
    /// forward service makes it.
    pub fn finish_attempt<B>(
        self,
        outcome: &Result<
            Result<Response<B>, hyper_util::client::legacy::Error>,
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
}
