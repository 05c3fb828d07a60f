//! Compression: gzip negotiation on both sides of the gateway. Zuora always
//! gets the bandwidth saving; each caller gets the encoding it asked for.
//!
//! Towards Zuora:
//! - every request carries `Accept-Encoding: gzip`, whatever the caller sent;
//! - a caller body already gzip-encoded goes as is;
//! - a plain body larger than the upstream's `compress_requests_over` (or of
//!   unknown length) is compressed on the way ([`GzipBody`]), with
//!   `Content-Encoding: gzip` and no `Content-Length`; smaller bodies, and
//!   types that are compressed already, go as they are.
//!
//! Towards the caller, by its `Accept-Encoding` ([`AcceptEncoding`]):
//! - gzip from Zuora, caller prefers gzip → the same bytes, untouched;
//! - gzip from Zuora, caller does not → decoded on the fly ([`GunzipBody`]),
//!   `Content-Encoding` and `Content-Length` dropped. The first decoded
//!   bytes are read before the response is returned, so a body that is not
//!   gzip at all becomes a 502 (`BadUpstreamResponse`); corruption found
//!   later, after the headers went out, aborts the stream (HTTP/1.1: the
//!   connection closes before the final chunk; HTTP/2: the stream is reset),
//!   which the caller sees as a truncated response, never as valid data;
//! - plain from Zuora, caller prefers gzip, `server.compress_responses_over`
//!   set and the body larger (or of unknown length) → compressed on the fly.
//!
//! Whenever the encoding depends on the caller, `Vary: Accept-Encoding` is
//! set; a strong `ETag` of a transformed body is made weak.
//!
//! Wire bytes are counted on both sides ([`BodyMetrics`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, ACCEPT_RANGES, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, ETAG,
    HeaderMap, HeaderValue, VARY,
};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tower::{Layer, Service};

use super::{GwResult, Req, Resp};
use crate::body::{self, Body, BoxError};
use crate::compression::{
    AcceptEncoding, BodyMetrics, ContentCoding, CountingBody, GunzipBody, GzipBody, InvalidGzip,
    is_compressible,
};
use crate::context::RouteMatch;
use crate::error::GatewayError;

/// `compress_requests_over` for a request without a route (config default).
const DEFAULT_COMPRESS_REQUESTS_OVER: u64 = 1024;

static GZIP: HeaderValue = HeaderValue::from_static("gzip");
static VARY_ACCEPT_ENCODING: HeaderValue = HeaderValue::from_static("Accept-Encoding");

/// Builds [`Compression`].
#[derive(Clone, Debug)]
pub struct CompressionLayer {
    metrics: BodyMetrics,
}

impl CompressionLayer {
    /// Counts wire bytes into `metrics`. Thresholds are read per request from
    /// the policy snapshot it was routed with.
    pub fn new(metrics: BodyMetrics) -> Self {
        CompressionLayer { metrics }
    }
}

impl<S> Layer<S> for CompressionLayer {
    type Service = Compression<S>;
    fn layer(&self, inner: S) -> Compression<S> {
        Compression {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Compression<S> {
    inner: S,
    metrics: BodyMetrics,
}

impl<S> Service<Req> for Compression<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = CompressionFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let (requests_over, responses_over) = thresholds(&req);
        let plan = ResponsePlan {
            accept: AcceptEncoding::from_headers(req.headers()),
            head: req.method() == Method::HEAD,
            responses_over,
            metrics: self.metrics.clone(),
        };
        req.headers_mut().insert(ACCEPT_ENCODING, GZIP.clone());
        let req = prepare_request(req, requests_over, &self.metrics);
        CompressionFuture {
            inner: self.inner.call(req),
            plan: Some(plan),
            priming: None,
        }
    }
}

/// `compress_requests_over` of the route's upstream and
/// `server.compress_responses_over`, from the request's policy snapshot.
fn thresholds(req: &Req) -> (u64, Option<u64>) {
    match req.extensions().get::<RouteMatch>() {
        Some(m) => {
            let config = &m.policy.config;
            let requests_over = config
                .upstreams
                .get(&m.config().upstream)
                .map_or(DEFAULT_COMPRESS_REQUESTS_OVER, |u| u.compress_requests_over);
            (requests_over, config.server.compress_responses_over)
        }
        None => (DEFAULT_COMPRESS_REQUESTS_OVER, None),
    }
}

/// The body length if known: `Content-Length`, else the body's exact size.
fn known_length(headers: &HeaderMap, body: &Body) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .or_else(|| body.size_hint().exact())
}

/// Compresses a plain request body over `threshold`; counts wire bytes.
fn prepare_request(req: Req, threshold: u64, metrics: &BodyMetrics) -> Req {
    if req.body().is_end_stream() {
        return req;
    }
    let (mut parts, body) = req.into_parts();
    let compress = ContentCoding::of(&parts.headers) == ContentCoding::Identity
        && is_compressible(&parts.headers)
        && known_length(&parts.headers, &body).is_none_or(|n| n > threshold);
    let body = if compress {
        parts.headers.insert(CONTENT_ENCODING, GZIP.clone());
        parts.headers.remove(CONTENT_LENGTH);
        let from_caller = CountingBody::new(body, metrics.caller_in.clone());
        body::boxed(CountingBody::new(
            GzipBody::new(from_caller),
            metrics.zuora_out.clone(),
        ))
    } else {
        body::boxed(CountingBody::both(
            body,
            metrics.caller_in.clone(),
            metrics.zuora_out.clone(),
        ))
    };
    Request::from_parts(parts, body)
}

/// What the response side needs to know about the request.
#[derive(Debug)]
struct ResponsePlan {
    accept: AcceptEncoding,
    head: bool,
    responses_over: Option<u64>,
    metrics: BodyMetrics,
}

/// A response ready to return, or one whose decoded body must be primed first.
enum Next {
    Ready(Resp),
    Prime(http::response::Parts, Body),
}

impl ResponsePlan {
    fn respond(self, resp: Resp) -> Result<Next, GatewayError> {
        let (mut parts, body) = resp.into_parts();
        let bodiless = self.head
            || parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        let m = &self.metrics;
        let unchanged = |parts: http::response::Parts, body: Body| -> Result<Next, GatewayError> {
            let body = body::boxed(CountingBody::both(
                body,
                m.zuora_in.clone(),
                m.caller_out.clone(),
            ));
            Ok(Next::Ready(Response::from_parts(parts, body)))
        };
        match ContentCoding::of(&parts.headers) {
            ContentCoding::Identity => {
                let compress = self.responses_over.is_some_and(|over| {
                    self.accept.prefers_gzip()
                        && !bodiless
                        && !parts.headers.contains_key(CONTENT_RANGE)
                        && is_compressible(&parts.headers)
                        && known_length(&parts.headers, &body).is_none_or(|n| n > over)
                });
                if !compress {
                    return unchanged(parts, body);
                }
                parts.headers.insert(CONTENT_ENCODING, GZIP.clone());
                transformed(&mut parts.headers);
                let from_zuora = CountingBody::new(body, m.zuora_in.clone());
                let body = body::boxed(CountingBody::new(
                    GzipBody::new(from_zuora),
                    m.caller_out.clone(),
                ));
                Ok(Next::Ready(Response::from_parts(parts, body)))
            }
            ContentCoding::Gzip => {
                add_vary(&mut parts.headers);
                if self.accept.prefers_gzip() {
                    return unchanged(parts, body);
                }
                parts.headers.remove(CONTENT_ENCODING);
                transformed(&mut parts.headers);
                if bodiless {
                    return Ok(Next::Ready(Response::from_parts(parts, body)));
                }
                let from_zuora = CountingBody::new(body, m.zuora_in.clone());
                let body = body::boxed(CountingBody::new(
                    GunzipBody::new(from_zuora),
                    m.caller_out.clone(),
                ));
                Ok(Next::Prime(parts, body))
            }
            ContentCoding::Other(codings) => {
                let acceptable = codings
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
                    .all(|c| self.accept.accepts(c));
                if acceptable {
                    add_vary(&mut parts.headers);
                    return unchanged(parts, body);
                }
                Err(GatewayError::BadUpstreamResponse(format!(
                    "Zuora answered with Content-Encoding `{codings}`, which the caller does not accept"
                )))
            }
        }
    }
}

/// Header fixes for a body whose bytes the gateway changed.
fn transformed(headers: &mut HeaderMap) {
    headers.remove(CONTENT_LENGTH);
    // Byte ranges of the original representation no longer apply.
    headers.remove(ACCEPT_RANGES);
    add_vary(headers);
    if let Some(etag) = headers.get(ETAG)
        && etag.as_bytes().first() == Some(&b'"')
    {
        let mut weak = Vec::with_capacity(etag.len() + 2);
        weak.extend_from_slice(b"W/");
        weak.extend_from_slice(etag.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&weak) {
            headers.insert(ETAG, v);
        }
    }
}

/// Adds `Accept-Encoding` to `Vary` unless already there (or `*`).
fn add_vary(headers: &mut HeaderMap) {
    let present = headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.eq_ignore_ascii_case("accept-encoding"));
    if !present {
        headers.append(VARY, VARY_ACCEPT_ENCODING.clone());
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Compression`]: the inner call, then (when decoding for the
    /// caller) the first decoded frame.
    pub struct CompressionFuture<F> {
        #[pin]
        inner: F,
        plan: Option<ResponsePlan>,
        // Boxed: only responses decoded for the caller get here, and inline
        // it would size every request's future.
        priming: Option<Box<(http::response::Parts, Body)>>,
    }
}

impl<F: Future<Output = GwResult>> Future for CompressionFuture<F> {
    type Output = GwResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<GwResult> {
        let this = self.project();
        if this.priming.is_none() {
            let resp = ready!(this.inner.poll(cx))?;
            let Some(plan) = this.plan.take() else {
                return Poll::Ready(Err(GatewayError::Internal(
                    "compression future polled after completion".into(),
                )));
            };
            match plan.respond(resp)? {
                Next::Ready(resp) => return Poll::Ready(Ok(resp)),
                Next::Prime(parts, body) => *this.priming = Some(Box::new((parts, body))),
            }
        }
        let Some((_, body)) = this.priming.as_deref_mut() else {
            return Poll::Ready(Err(GatewayError::Internal(
                "compression future polled after completion".into(),
            )));
        };
        let first = match ready!(Pin::new(body).poll_frame(cx)) {
            Some(Ok(frame)) => Some(frame),
            Some(Err(e)) => {
                this.priming.take();
                return Poll::Ready(Err(upstream_body_error(&e)));
            }
            None => None,
        };
        let Some((parts, rest)) = this.priming.take().map(|p| *p) else {
            return Poll::Ready(Err(GatewayError::Internal(
                "compression future polled after completion".into(),
            )));
        };
        Poll::Ready(Ok(Response::from_parts(
            parts,
            body::boxed(Primed { first, rest }),
        )))
    }
}

fn upstream_body_error(e: &BoxError) -> GatewayError {
    if e.downcast_ref::<InvalidGzip>().is_some() {
        GatewayError::BadUpstreamResponse(format!(
            "Zuora's gzip response could not be decoded: {e}"
        ))
    } else {
        GatewayError::BadUpstreamResponse(format!("reading Zuora's response failed: {e}"))
    }
}

pin_project_lite::pin_project! {
    /// A body whose first frame was already read.
    struct Primed {
        first: Option<Frame<Bytes>>,
        rest: Body,
    }
}

impl HttpBody for Primed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Decoded bodies have no known length anyway.
        if self.first.is_some() {
            SizeHint::default()
        } else {
            self.rest.size_hint()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::compression::test_bodies::{chunked, gz};
    use crate::config::Config;
    use crate::policy::Policy;

    /// What the inner service saw of the request.
    #[derive(Debug, Default, Clone)]
    struct Seen {
        headers: HeaderMap,
        body: Bytes,
    }

    /// A stand-in for Zuora: records the request, answers with `answer()`.
    fn zuora(
        seen: Arc<Mutex<Option<Seen>>>,
        answer: impl Fn() -> Resp + Clone + Send + 'static,
    ) -> impl Service<Req, Response = Resp, Error = GatewayError, Future: Send> + Clone {
        tower::service_fn(move |req: Req| {
            let seen = seen.clone();
            let answer = answer.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map_err(|e| GatewayError::Internal(e.to_string()))?
                    .to_bytes();
                *seen.lock().unwrap() = Some(Seen {
                    headers: parts.headers,
                    body,
                });
                Ok(answer())
            }
        })
    }

    fn json_list(n: usize) -> Vec<u8> {
        let jobs: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"id":"ff8080818bb300af018bb325fe0c{i:04}","status":"Completed","type":"RatePlanCharge"}}"#))
            .collect();
        format!(r#"{{"success":true,"jobs":[{}]}}"#, jobs.join(",")).into_bytes()
    }

    fn gzip_answer(plain: &[u8]) -> impl Fn() -> Resp + Clone + Send + 'static {
        let compressed = Bytes::from(gz(plain));
        move || {
            Response::builder()
                .header(CONTENT_TYPE_JSON.0, CONTENT_TYPE_JSON.1)
                .header(CONTENT_ENCODING, "gzip")
                .header(CONTENT_LENGTH, compressed.len())
                .header(ETAG, "\"v1\"")
                .body(body::full(compressed.clone()))
                .unwrap()
        }
    }

    const CONTENT_TYPE_JSON: (&str, &str) = ("content-type", "application/json; charset=utf-8");

    fn plain_answer(plain: &[u8]) -> impl Fn() -> Resp + Clone + Send + 'static {
        let plain = Bytes::copy_from_slice(plain);
        move || {
            Response::builder()
                .header(CONTENT_TYPE_JSON.0, CONTENT_TYPE_JSON.1)
                .header(CONTENT_LENGTH, plain.len())
                .body(body::full(plain.clone()))
                .unwrap()
        }
    }

    fn layer() -> (CompressionLayer, BodyMetrics) {
        let metrics = BodyMetrics::default();
        (CompressionLayer::new(metrics.clone()), metrics)
    }

    fn get(accept: Option<&str>) -> Req {
        let mut b = Request::get("/v1/uno/data-backfill/propagation/jobs");
        if let Some(a) = accept {
            b = b.header(ACCEPT_ENCODING, a);
        }
        b.body(body::empty()).unwrap()
    }

    /// A request routed with a policy whose `server.compress_responses_over` is `over`.
    fn routed(mut req: Req, over: Option<u64>, requests_over: u64) -> Req {
        let server = match over {
            Some(n) => {
                format!("server: {{ listen: 127.0.0.1:8080, compress_responses_over: {n} }}\n")
            }
            None => "server: { listen: 127.0.0.1:8080 }\n".to_owned(),
        };
        let yaml = format!(
            "{server}upstreams: {{ zuora: {{ base_url: simulator, compress_requests_over: {requests_over} }} }}\ncallers: {{ trusted_identity: svc }}\nroutes:\n  - {{ name: all, path: /v1/**, upstream: zuora, allow_callers: ['*'] }}\n"
        );
        let config =
            Config::from_yaml(&yaml, Path::new("t.yaml"), Path::new("."), &|_: &str| None).unwrap();
        let policy = Arc::new(Policy::compile(Arc::new(config)));
        req.extensions_mut().insert(RouteMatch {
            policy,
            route: 0,
            params: vec![],
        });
        req
    }

    async fn read(resp: Resp) -> (http::response::Parts, Bytes) {
        let (parts, body) = resp.into_parts();
        (parts, body.collect().await.unwrap().to_bytes())
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        crate::compression::gunzip_bounded(data, 1 << 30)
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn zuora_is_always_asked_for_gzip() {
        for accept in [
            None,
            Some("identity"),
            Some("br, deflate"),
            Some("gzip;q=0"),
            Some("gzip"),
        ] {
            let seen = Arc::new(Mutex::new(None));
            let svc = layer().0.layer(zuora(seen.clone(), plain_answer(b"{}")));
            let mut req = get(accept);
            if accept.is_some() {
                req.headers_mut()
                    .append(ACCEPT_ENCODING, HeaderValue::from_static("compress"));
            }
            svc.oneshot(req).await.unwrap();
            let headers = seen.lock().unwrap().take().unwrap().headers;
            let values: Vec<_> = headers.get_all(ACCEPT_ENCODING).iter().collect();
            assert_eq!(values, [&GZIP], "caller sent {accept:?}");
        }
    }

    #[tokio::test]
    async fn gzip_from_zuora_reaches_a_gzip_caller_byte_for_byte() {
        let plain = json_list(200);
        for accept in [
            "gzip",
            "gzip, deflate, br",
            "*;q=0.5",
            "GZIP;q=0.8, identity;q=0.8",
            "x-gzip",
        ] {
            let seen = Arc::new(Mutex::new(None));
            let (layer, metrics) = layer();
            let resp = layer
                .layer(zuora(seen, gzip_answer(&plain)))
                .oneshot(get(Some(accept)))
                .await
                .unwrap();
            let (parts, bytes) = read(resp).await;
            assert_eq!(parts.headers[CONTENT_ENCODING], "gzip", "{accept}");
            assert_eq!(bytes, gz(&plain), "same bytes, no recompression ({accept})");
            assert_eq!(
                parts.headers[CONTENT_LENGTH],
                bytes.len().to_string().as_str()
            );
            assert_eq!(parts.headers[VARY], "Accept-Encoding");
            assert_eq!(
                parts.headers[ETAG], "\"v1\"",
                "untouched representation keeps a strong ETag"
            );
            assert_eq!(metrics.zuora_in.get(), bytes.len() as u64);
            assert_eq!(metrics.caller_out.get(), bytes.len() as u64);
        }
    }

    #[tokio::test]
    async fn gzip_from_zuora_is_decoded_for_a_caller_that_does_not_take_it() {
        let plain = json_list(200);
        for accept in [
            None,
            Some(""),
            Some("identity"),
            Some("gzip;q=0"),
            Some("br"),
            Some("gzip;q=0.5, identity"),
            Some("*;q=0"),
        ] {
            let seen = Arc::new(Mutex::new(None));
            let (layer, metrics) = layer();
            let resp = layer
                .layer(zuora(seen, gzip_answer(&plain)))
                .oneshot(get(accept))
                .await
                .unwrap();
            let (parts, bytes) = read(resp).await;
            assert!(bytes == plain[..], "{accept:?}");
            assert!(!parts.headers.contains_key(CONTENT_ENCODING), "{accept:?}");
            assert!(!parts.headers.contains_key(CONTENT_LENGTH), "{accept:?}");
            assert_eq!(parts.headers[VARY], "Accept-Encoding");
            assert_eq!(parts.headers[ETAG], "W/\"v1\"");
            assert_eq!(metrics.zuora_in.get(), gz(&plain).len() as u64);
            assert_eq!(metrics.caller_out.get(), plain.len() as u64);
        }
    }

    #[tokio::test]
    async fn a_head_response_gets_decoded_headers_and_no_body() {
        let seen = Arc::new(Mutex::new(None));
        let compressed_len = gz(b"{}").len();
        let answer = move || {
            Response::builder()
                .header(CONTENT_ENCODING, "gzip")
                .header(CONTENT_LENGTH, compressed_len)
                .body(body::empty())
                .unwrap()
        };
        let req = Request::head("/v1/x").body(body::empty()).unwrap();
        let (parts, bytes) = read(
            layer()
                .0
                .layer(zuora(seen, answer))
                .oneshot(req)
                .await
                .unwrap(),
        )
        .await;
        assert!(bytes.is_empty());
        assert!(!parts.headers.contains_key(CONTENT_ENCODING));
        assert!(!parts.headers.contains_key(CONTENT_LENGTH));
    }

    #[tokio::test]
    async fn a_body_labelled_gzip_that_is_not_is_a_502_for_a_caller_needing_it_decoded() {
        let seen = Arc::new(Mutex::new(None));
        let answer = || {
            Response::builder()
                .header(CONTENT_ENCODING, "gzip")
                .body(body::full(&br#"{"success":true,"jobs":[]}"#[..]))
                .unwrap()
        };
        let err = layer()
            .0
            .layer(zuora(seen, answer))
            .oneshot(get(None))
            .await
            .unwrap_err();
        assert!(
            matches!(err, GatewayError::BadUpstreamResponse(_)),
            "{err:?}"
        );
        assert_eq!(err.classify().0, StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn corruption_after_the_headers_aborts_the_decoded_stream() {
        let plain = json_list(2000);
        let mut bad = gz(&plain);
        let len = bad.len();
        // Damage the trailer (CRC): every data frame decodes, the end does not verify.
        bad[len - 6] ^= 0xff;
        let seen = Arc::new(Mutex::new(None));
        let answer = move || {
            Response::builder()
                .header(CONTENT_ENCODING, "gzip")
                .body(body::boxed(chunked(&bad, 1024)))
                .unwrap()
        };
        let resp = layer()
            .0
            .layer(zuora(seen, answer))
            .oneshot(get(None))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let err = resp.into_body().collect().await.unwrap_err();
        assert!(err.downcast_ref::<InvalidGzip>().is_some(), "{err}");
    }

    #[tokio::test]
    async fn other_codings_pass_only_to_callers_that_accept_them() {
        let answer = || {
            Response::builder()
                .header(CONTENT_ENCODING, "br")
                .body(body::full(&b"\x0b\x02\x80{}\x03"[..]))
                .unwrap()
        };
        let seen = Arc::new(Mutex::new(None));
        let resp = layer()
            .0
            .layer(zuora(seen.clone(), answer))
            .oneshot(get(Some("br, gzip")))
            .await
            .unwrap();
        assert_eq!(resp.headers()[CONTENT_ENCODING], "br");
        let err = layer()
            .0
            .layer(zuora(seen, answer))
            .oneshot(get(Some("gzip")))
            .await
            .unwrap_err();
        assert!(
            matches!(err, GatewayError::BadUpstreamResponse(_)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_large_plain_body_is_compressed_towards_zuora_and_a_small_one_is_not() {
        let big = json_list(150);
        assert!(big.len() > 10_000);
        let (layer, metrics) = layer();
        let seen = Arc::new(Mutex::new(None));
        let svc = layer.layer(zuora(seen.clone(), plain_answer(b"{}")));
        let req = Request::post("/v1/x")
            .header(CONTENT_LENGTH, big.len())
            .body(body::full(big.clone()))
            .unwrap();
        svc.clone().oneshot(req).await.unwrap();
        let s = seen.lock().unwrap().take().unwrap();
        assert_eq!(s.headers[CONTENT_ENCODING], "gzip");
        assert!(!s.headers.contains_key(CONTENT_LENGTH));
        assert_eq!(gunzip(&s.body), big);
        assert_eq!(metrics.caller_in.get(), big.len() as u64);
        assert_eq!(metrics.zuora_out.get(), s.body.len() as u64);
        assert!(
            metrics.zuora_out.get() * 5 < metrics.caller_in.get(),
            "the saving is visible"
        );

        let small = br#"{"status":"Stopping"}"#;
        let req = Request::put("/v1/x")
            .header(CONTENT_LENGTH, small.len())
            .body(body::full(&small[..]))
            .unwrap();
        svc.clone().oneshot(req).await.unwrap();
        let s = seen.lock().unwrap().take().unwrap();
        assert!(!s.headers.contains_key(CONTENT_ENCODING));
        assert_eq!(s.headers[CONTENT_LENGTH], small.len().to_string().as_str());
        assert_eq!(&s.body[..], small);
    }

    #[tokio::test]
    async fn the_request_threshold_is_the_upstreams_and_unknown_lengths_count_as_large() {
        let body_of = |n: usize| vec![b'x'; n];
        let cases = [
            (1024, 1024, false),
            (1024, 1025, true),
            (100, 101, true),
            (100, 100, false),
        ];
        for (threshold, size, compressed) in cases {
            let seen = Arc::new(Mutex::new(None));
            let svc = layer().0.layer(zuora(seen.clone(), plain_answer(b"{}")));
            let req = Request::post("/v1/x")
                .body(body::full(body_of(size)))
                .unwrap();
            svc.oneshot(routed(req, None, threshold)).await.unwrap();
            let s = seen.lock().unwrap().take().unwrap();
            assert_eq!(
                s.headers.contains_key(CONTENT_ENCODING),
                compressed,
                "threshold {threshold}, size {size}"
            );
        }
        let seen = Arc::new(Mutex::new(None));
        let svc = layer().0.layer(zuora(seen.clone(), plain_answer(b"{}")));
        let req = Request::post("/v1/x")
            .body(body::boxed(chunked(b"{\"a\":1}", 3)))
            .unwrap();
        svc.oneshot(req).await.unwrap();
        let s = seen.lock().unwrap().take().unwrap();
        assert_eq!(s.headers[CONTENT_ENCODING], "gzip");
        assert_eq!(gunzip(&s.body), b"{\"a\":1}");
    }

    #[tokio::test]
    async fn a_gzip_caller_body_goes_to_zuora_untouched() {
        let compressed = gz(&json_list(100));
        let seen = Arc::new(Mutex::new(None));
        let svc = layer().0.layer(zuora(seen.clone(), plain_answer(b"{}")));
        let req = Request::post("/v1/x")
            .header(CONTENT_ENCODING, "gzip")
            .header(CONTENT_LENGTH, compressed.len())
            .body(body::full(compressed.clone()))
            .unwrap();
        svc.oneshot(req).await.unwrap();
        let s = seen.lock().unwrap().take().unwrap();
        assert_eq!(s.body, compressed);
        assert_eq!(s.headers[CONTENT_ENCODING], "gzip");
    }

    #[tokio::test]
    async fn plain_responses_are_compressed_only_when_configured_and_accepted() {
        let plain = json_list(100);
        let cases = [
            (Some(1000), Some("gzip"), true),
            (Some(1000), None, false),
            (Some(1000), Some("identity"), false),
            (None, Some("gzip"), false),
            (Some(plain.len() as u64), Some("gzip"), false),
        ];
        for (over, accept, compressed) in cases {
            let seen = Arc::new(Mutex::new(None));
            let svc = layer().0.layer(zuora(seen, plain_answer(&plain)));
            let (parts, bytes) =
                read(svc.oneshot(routed(get(accept), over, 1024)).await.unwrap()).await;
            assert_eq!(
                parts.headers.contains_key(CONTENT_ENCODING),
                compressed,
                "{over:?} {accept:?}"
            );
            if compressed {
                assert_eq!(gunzip(&bytes), plain);
                assert!(!parts.headers.contains_key(CONTENT_LENGTH));
                assert_eq!(parts.headers[VARY], "Accept-Encoding");
            } else {
                assert!(bytes == plain[..]);
            }
        }
    }

    #[test]
    fn vary_is_added_once() {
        let mut h = HeaderMap::new();
        add_vary(&mut h);
        add_vary(&mut h);
        assert_eq!(h.get_all(VARY).iter().count(), 1);
        let mut h = HeaderMap::new();
        h.insert(VARY, HeaderValue::from_static("Origin, accept-encoding"));
        add_vary(&mut h);
        assert_eq!(h.get_all(VARY).iter().count(), 1);
    }
}
