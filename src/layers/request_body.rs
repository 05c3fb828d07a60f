//! Request body: the caller-side guards, applied before anything reads the
//! body and before anything reaches Zuora.
//!
//! - A declared length (`Content-Length`, or the HTTP/2 length) over
//!   `server.max_body_bytes` → 413 at once.
//! - A `Content-Encoding` other than `gzip` / `identity` (`br`, `deflate`,
//!   `compress`, stacked `gzip, gzip`, …) → 415.
//! - Every body is wrapped in [`GuardedBody`]: more than `max_body_bytes`
//!   → 413; the caller taking longer than `server.body_read_timeout` to send
//!   it → 408. Only time spent waiting for the caller counts, not time the
//!   reader (validation, the Zuora connection) takes.
//! - A gzip body is received whole (at most `max_body_bytes` on the wire)
//!   and checked by a streaming decode that keeps no output: decoded size
//!   over `max_body_bytes` → 413 (a gzip bomb never allocates), corrupt →
//!   400 (category 20). It is then passed on byte for byte.
//!
//! A guard that trips while a later layer or the Zuora client is reading the
//! body is recorded; this layer then returns that error (413 / 408) in place
//! of whatever the reader made of it, so it never surfaces as a 502.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::Either;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderValue, Request};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::{GwResult, RejectOr, Req, Resp, reject};
use crate::body::{self, BoxError};
use crate::compression::{ContentCoding, GzipCheck};
use crate::config::ServerConfig;
use crate::context::RouteMatch;
use crate::error::GatewayError;

/// The limits a request body is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// `server.max_body_bytes` (wire size, and decoded size of gzip bodies).
    pub max_body_bytes: u64,
    /// `server.body_read_timeout` (time spent waiting for the caller).
    pub body_read_timeout: Duration,
}

impl BodyLimits {
    /// The limits configured in `server`.
    pub fn from_server(server: &ServerConfig) -> Self {
        BodyLimits {
            max_body_bytes: server.max_body_bytes,
            body_read_timeout: server.body_read_timeout,
        }
    }
}

/// Builds [`RequestBody`].
#[derive(Debug, Clone, Copy)]
pub struct RequestBodyLayer {
    fallback: BodyLimits,
}

impl RequestBodyLayer {
    /// Guards with the limits of the policy snapshot the request was routed
    /// with ([`RouteMatch`]), so reloads apply; `server` is the fallback for
    /// a request without one.
    pub fn new(server: &ServerConfig) -> Self {
        RequestBodyLayer {
            fallback: BodyLimits::from_server(server),
        }
    }
}

impl<S> Layer<S> for RequestBodyLayer {
    type Service = RequestBody<S>;
    fn layer(&self, inner: S) -> RequestBody<S> {
        RequestBody {
            inner,
            fallback: self.fallback,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct RequestBody<S> {
    inner: S,
    fallback: BodyLimits,
}

/// Where a [`GuardedBody`] records why it failed.
type FailureSlot = Arc<OnceLock<GatewayError>>;

impl<S> Service<Req> for RequestBody<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = GatewayError;
    // The gzip path is boxed: its state (the head, the received bytes, the
    // inner service) would otherwise size every request's future, and
    // requests waiting for an upstream slot hold theirs.
    type Future = RejectOr<Either<GuardedFuture<S::Future>, Pin<Box<CheckThenCall<S, S::Future>>>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let limits = req
            .extensions()
            .get::<RouteMatch>()
            .map_or(self.fallback, |m| {
                BodyLimits::from_server(&m.policy.config.server)
            });
        let coding = ContentCoding::of(req.headers());
        if let ContentCoding::Other(value) = coding {
            return reject(GatewayError::UnsupportedEncoding(value));
        }
        let limit = limits.max_body_bytes;
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) || req.body().size_hint().lower() > limit {
            return reject(GatewayError::PayloadTooLarge { limit });
        }
        if req.body().is_end_stream() {
            return Either::Right(Either::Left(GuardedFuture {
                inner: self.inner.call(req),
                failure: None,
            }));
        }
        let failure = FailureSlot::default();
        let (mut parts, body) = req.into_parts();
        let guarded = GuardedBody::new(body, limits, failure.clone());
        match coding {
            ContentCoding::Gzip => {
                // One spelling for Zuora, whatever alias or `identity` padding the caller used.
                parts
                    .headers
                    .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                Either::Right(Either::Right(Box::pin(CheckThenCall {
                    state: GzipState::Receiving {
                        parts,
                        body: guarded,
                        // The declared length is within the limit (checked above).
                        received: BytesMut::with_capacity(
                            declared.unwrap_or(0).try_into().unwrap_or(0),
                        ),
                        failure,
                        limit,
                    },
                    inner: Some(inner),
                    calling: None,
                })))
            }
            ContentCoding::Identity | ContentCoding::Other(_) => {
                let req = Request::from_parts(parts, body::boxed(guarded));
                Either::Right(Either::Left(GuardedFuture {
                    inner: self.inner.call(req),
                    failure: Some(failure),
                }))
            }
        }
    }
}

/// Decoded bytes checked per poll before yielding to the runtime.
const CHECK_SLICE: u64 = 1024 * 1024;

pin_project_lite::pin_project! {
    /// Future of [`RequestBody`] for gzip bodies: receive the whole body,
    /// check it (yielding every MiB of decoded output), then call the inner
    /// service with the same bytes.
    pub struct CheckThenCall<S, F> {
        state: GzipState,
        inner: Option<S>,
        #[pin]
        calling: Option<F>,
    }
}

/// Where a [`CheckThenCall`] is.
enum GzipState {
    Receiving {
        parts: http::request::Parts,
        body: GuardedBody<crate::body::Body>,
        received: BytesMut,
        failure: FailureSlot,
        limit: u64,
    },
    Checking {
        parts: http::request::Parts,
        compressed: Bytes,
        // Boxed: the codec state is large and only gzip requests need it.
        check: Box<GzipCheck>,
    },
    Done,
}

impl GzipState {
    /// Advances receiving and checking; the request to pass on when done.
    fn poll_request(&mut self, cx: &mut Context<'_>) -> Poll<Result<Req, GatewayError>> {
        loop {
            // Owned for the step; put back when it has to wait.
            match std::mem::replace(self, GzipState::Done) {
                GzipState::Receiving {
                    parts,
                    mut body,
                    mut received,
                    failure,
                    limit,
                } => match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Pending => {
                        *self = GzipState::Receiving {
                            parts,
                            body,
                            received,
                            failure,
                            limit,
                        };
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            received.extend_from_slice(&data);
                        }
                        *self = GzipState::Receiving {
                            parts,
                            body,
                            received,
                            failure,
                            limit,
                        };
                    }
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(failure
                            .get()
                            .cloned()
                            .unwrap_or_else(|| caller_body_error(&e))));
                    }
                    Poll::Ready(None) => {
                        *self = GzipState::Checking {
                            parts,
                            compressed: received.freeze(),
                            check: Box::new(GzipCheck::new(limit)),
                        };
                    }
                },
                GzipState::Checking {
                    mut parts,
                    compressed,
                    mut check,
                } => match check.step(&compressed, CHECK_SLICE) {
                    Ok(None) => {
                        *self = GzipState::Checking {
                            parts,
                            compressed,
                            check,
                        };
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Ok(Some(_)) => {
                        parts
                            .headers
                            .insert(CONTENT_LENGTH, HeaderValue::from(compressed.len()));
                        parts.headers.remove(TRANSFER_ENCODING);
                        return Poll::Ready(Ok(Request::from_parts(parts, body::full(compressed))));
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                },
                GzipState::Done => {
                    return Poll::Ready(Err(GatewayError::Internal(
                        "request body future polled after completion".into(),
                    )));
                }
            }
        }
    }
}

impl<S> Future for CheckThenCall<S, S::Future>
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
{
    type Output = GwResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<GwResult> {
        let mut this = self.project();
        if let Some(fut) = this.calling.as_mut().as_pin_mut() {
            return fut.poll(cx);
        }
        let req = ready!(this.state.poll_request(cx))?;
        let Some(mut inner) = this.inner.take() else {
            return Poll::Ready(Err(GatewayError::Internal(
                "request body future polled after completion".into(),
            )));
        };
        this.calling.set(Some(inner.call(req)));
        match this.calling.as_pin_mut() {
            Some(fut) => fut.poll(cx),
            None => Poll::Pending,
        }
    }
}

/// A caller's body stream that broke (reset, disconnect) is the caller's
/// problem, not Zuora's: 400, never 502.
fn caller_body_error(e: &BoxError) -> GatewayError {
    GatewayError::InvalidValue(format!("the request body could not be read: {e}"))
}

pin_project_lite::pin_project! {
    /// Future of [`RequestBody`] for streamed bodies: a guard failure recorded
    /// while the inner service read the body replaces the inner error.
    pub struct GuardedFuture<F> {
        #[pin]
        inner: F,
        failure: Option<FailureSlot>,
    }
}

impl<F: Future<Output = GwResult>> Future for GuardedFuture<F> {
    type Output = GwResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<GwResult> {
        let this = self.project();
        match ready!(this.inner.poll(cx)) {
            Ok(resp) => Poll::Ready(Ok(resp)),
            Err(e) => {
                let recorded = this.failure.as_ref().and_then(|f| f.get().cloned());
                Poll::Ready(Err(recorded.unwrap_or(e)))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A caller's request body held to [`BodyLimits`]. Past the size limit or
    /// the time limit it ends with a boxed [`GatewayError`]
    /// (`PayloadTooLarge` / `BodyTimeout`), also recorded for the layer. A
    /// broken caller stream is recorded as a 400.
    pub struct GuardedBody<B> {
        #[pin]
        inner: B,
        limits: BodyLimits,
        received: u64,
        // Time still allowed waiting for the caller.
        budget: Duration,
        waiting_since: Option<Instant>,
        // Created on the first wait only: bodies that are already here cost no timer.
        timer: Option<Pin<Box<Sleep>>>,
        failure: FailureSlot,
    }
}

impl<B> GuardedBody<B> {
    fn new(inner: B, limits: BodyLimits, failure: FailureSlot) -> Self {
        GuardedBody {
            inner,
            limits,
            received: 0,
            budget: limits.body_read_timeout,
            waiting_since: None,
            timer: None,
            failure,
        }
    }
}

fn fail(slot: &FailureSlot, err: GatewayError) -> BoxError {
    let _ = slot.set(err.clone());
    Box::new(err)
}

impl<B> HttpBody for GuardedBody<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(err) = this.failure.get() {
            return Poll::Ready(Some(Err(Box::new(err.clone()))));
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(since) = this.waiting_since.take() {
                    *this.budget = this.budget.saturating_sub(since.elapsed());
                }
                match frame {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            *this.received = this.received.saturating_add(data.remaining() as u64);
                            if *this.received > this.limits.max_body_bytes {
                                let limit = this.limits.max_body_bytes;
                                return Poll::Ready(Some(Err(fail(
                                    this.failure,
                                    GatewayError::PayloadTooLarge { limit },
                                ))));
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => {
                        Poll::Ready(Some(Err(fail(this.failure, caller_body_error(&e)))))
                    }
                    None => Poll::Ready(None),
                }
            }
            Poll::Pending => {
                let since = *this.waiting_since.get_or_insert_with(Instant::now);
                let deadline = since + *this.budget;
                let timer = match this.timer {
                    Some(t) => {
                        if t.deadline() != deadline {
                            t.as_mut().reset(deadline);
                        }
                        t
                    }
                    None => this
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if timer.as_mut().poll(cx).is_ready() {
                    let err = GatewayError::BodyTimeout(this.limits.body_read_timeout);
                    return Poll::Ready(Some(Err(fail(this.failure, err))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::compression::test_bodies::{chunked, gz};
    use crate::layers::LayerFuture;

    const LIMITS: BodyLimits = BodyLimits {
        max_body_bytes: 1024 * 1024,
        body_read_timeout: Duration::from_millis(300),
    };

    /// The inner service: counts calls, reads the whole body, and maps a body
    /// error the way a careless reader would (to a 502).
    #[derive(Clone, Default)]
    struct Reader {
        calls: Arc<AtomicUsize>,
        seen: Arc<std::sync::Mutex<Option<(http::HeaderMap, Bytes)>>>,
    }

    impl Service<Req> for Reader {
        type Response = Resp;
        type Error = GatewayError;
        type Future = LayerFuture;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Req) -> LayerFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let seen = self.seen.clone();
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| GatewayError::BadUpstreamResponse(e.to_string()))?
                    .to_bytes();
                *seen.lock().unwrap() = Some((parts.headers, bytes));
                Ok(Resp::new(body::empty()))
            })
        }
    }

    fn layer(reader: &Reader) -> RequestBody<Reader> {
        RequestBody {
            inner: reader.clone(),
            fallback: LIMITS,
        }
    }

    fn req(headers: &[(&str, &str)], body: crate::body::Body) -> Req {
        let mut b = Request::put("/v1/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(body).unwrap()
    }

    async fn status(reader: &Reader, r: Req) -> StatusCode {
        match layer(reader).oneshot(r).await {
            Ok(resp) => resp.status(),
            Err(e) => e.classify().0,
        }
    }

    #[tokio::test]
    async fn declared_length_over_the_limit_is_refused_before_the_body_is_read() {
        let reader = Reader::default();
        let r = req(
            &[("content-length", "1048577")],
            body::boxed(chunked(b"x", 1)),
        );
        assert_eq!(status(&reader, r).await, StatusCode::PAYLOAD_TOO_LARGE);
        let r = req(&[], body::full(vec![0u8; 1024 * 1024 + 1]));
        assert_eq!(
            status(&reader, r).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "exact size hint"
        );
        assert_eq!(reader.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn unknown_length_body_past_the_limit_is_413_not_the_readers_502() {
        let reader = Reader::default();
        let big = vec![b'a'; 1024 * 1024 + 10];
        let err = layer(&reader)
            .oneshot(req(&[], body::boxed(chunked(&big, 64 * 1024))))
            .await
            .unwrap_err();
        assert!(
            matches!(err, GatewayError::PayloadTooLarge { limit } if limit == 1024 * 1024),
            "{err:?}"
        );
        let exact = vec![b'a'; 1024 * 1024];
        assert_eq!(
            status(&reader, req(&[], body::boxed(chunked(&exact, 64 * 1024)))).await,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn unsupported_content_encodings_are_415() {
        for ce in ["compress", "br", "deflate", "gzip, gzip", "zstd"] {
            let reader = Reader::default();
            let r = req(&[("content-encoding", ce)], body::full(&b"{}"[..]));
            assert_eq!(
                status(&reader, r).await,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{ce}"
            );
            assert_eq!(reader.calls.load(Ordering::SeqCst), 0, "{ce}");
        }
    }

    #[tokio::test]
    async fn a_gzip_bomb_is_413_without_calling_inner() {
        let reader = Reader::default();
        let bomb = gz(&vec![0u8; 64 << 20]);
        let r = req(
            &[("content-encoding", "gzip")],
            body::boxed(chunked(&bomb, 16 * 1024)),
        );
        assert_eq!(status(&reader, r).await, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(reader.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn corrupt_gzip_is_400_category_20_without_calling_inner() {
        let reader = Reader::default();
        let r = req(
            &[("content-encoding", "gzip")],
            body::full(&b"definitely not gzip"[..]),
        );
        let err = layer(&reader).oneshot(r).await.unwrap_err();
        assert_eq!(err.classify().0, StatusCode::BAD_REQUEST);
        assert!(err.code().ends_with("20"), "{}", err.code());
        assert_eq!(reader.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_valid_gzip_body_is_passed_on_byte_for_byte_with_its_length() {
        let reader = Reader::default();
        let compressed = gz(br#"{"status":"Stopping"}"#);
        let r = req(
            &[("content-encoding", "x-gzip")],
            body::boxed(chunked(&compressed, 5)),
        );
        assert_eq!(status(&reader, r).await, StatusCode::OK);
        let (headers, bytes) = reader.seen.lock().unwrap().take().unwrap();
        assert_eq!(bytes, compressed);
        assert_eq!(headers[CONTENT_ENCODING], "gzip");
        assert_eq!(
            headers[CONTENT_LENGTH],
            compressed.len().to_string().as_str()
        );
    }

    /// A body that sends one chunk and then stalls forever.
    struct Stalling(bool);
    impl HttpBody for Stalling {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.0 {
                Poll::Pending
            } else {
                self.0 = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{\"a\":")))))
            }
        }
    }

    #[tokio::test]
    async fn a_stalled_body_is_408_after_the_read_timeout() {
        for ce in [None, Some("gzip")] {
            let reader = Reader::default();
            let headers: Vec<(&str, &str)> =
                ce.map(|c| ("content-encoding", c)).into_iter().collect();
            let started = std::time::Instant::now();
            let err = layer(&reader)
                .oneshot(req(&headers, body::boxed(Stalling(false))))
                .await
                .unwrap_err();
            assert!(
                matches!(err, GatewayError::BodyTimeout(d) if d == LIMITS.body_read_timeout),
                "{err:?}"
            );
            assert_eq!(err.classify().0, StatusCode::REQUEST_TIMEOUT);
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(300) && took < Duration::from_secs(3),
                "{took:?}"
            );
        }
    }

    #[tokio::test]
    async fn time_the_reader_spends_is_not_charged_to_the_caller() {
        let failure = FailureSlot::default();
        let limits = BodyLimits {
            max_body_bytes: 1 << 20,
            body_read_timeout: Duration::from_millis(100),
        };
        let mut body = GuardedBody::new(chunked(&[b'a'; 3000], 1000), limits, failure);
        for _ in 0..3 {
            // A slow reader: well past the timeout between reads, but the caller never kept us waiting.
            tokio::time::sleep(Duration::from_millis(120)).await;
            assert!(body.frame().await.unwrap().is_ok());
        }
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn bodiless_requests_pass_untouched() {
        let reader = Reader::default();
        let r = Request::get("/v1/x").body(body::empty()).unwrap();
        assert_eq!(status(&reader, r).await, StatusCode::OK);
        assert_eq!(reader.calls.load(Ordering::SeqCst), 1);
    }
}
