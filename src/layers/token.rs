//! Token: authenticates the request to Zuora with the route's upstream
//! token, and recovers from a rejected token once.
//!
//! - `Authorization: Bearer <Zuora token>` always replaces whatever the
//!   caller sent (the caller's own credentials never reach Zuora).
//! - On a 401 from Zuora the token is invalidated (only if still current, so
//!   a burst of 401s causes one token request) and the request is replayed
//!   once with the new token. Bodies up to 64 KiB are kept for that; a larger
//!   or unfinished body means the 401 is passed through. One copy of the
//!   request ([`ReplayCopy`], a request extension) serves this replay and
//!   the forward service's own retries; the request's extensions are not
//!   copied at all: [`Forward`](crate::upstream::Forward) hands them back
//!   with the 401 ([`RequestExtensions`]), the copy among them.
//! - With no token to be had the request fails with
//!   [`GatewayError::TokenUnavailable`] (503, category 61).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use super::{GwResult, LayerFuture, Req, Resp};
use crate::body::{Body, BoxError, Chunks, boxed};
use crate::context::{RequestExtensions, RouteMatch};
use crate::error::GatewayError;
use crate::oauth::{BearerToken, TokenCache};
use crate::upstream::forward::ByName;

/// Request bodies up to this size are kept so a 401 can be replayed.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// Builds [`Token`] over the token caches of all upstreams, by upstream name.
#[derive(Clone, Debug)]
pub struct TokenLayer {
    caches: Arc<ByName<TokenCache>>,
}

impl TokenLayer {
    /// Uses `caches` (one per upstream, keyed by upstream name).
    pub fn new(caches: Arc<HashMap<String, TokenCache>>) -> Self {
        let caches = caches
            .iter()
            .map(|(name, c)| (name.clone(), c.clone()))
            .collect();
        TokenLayer {
            caches: Arc::new(caches),
        }
    }
}

impl<S> Layer<S> for TokenLayer {
    type Service = Token<S>;
    fn layer(&self, inner: S) -> Token<S> {
        Token {
            inner,
            caches: self.caches.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Token<S> {
    inner: S,
    caches: Arc<ByName<TokenCache>>,
}

impl<S> Service<Req> for Token<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = LayerFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> LayerFuture {
        let cache = match cache_for(&self.caches, &req) {
            Ok(cache) => cache,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        // The readied service serves this request; the clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The common case: a token is held and there is no body to read
        // (GET, DELETE). Nothing is awaited before the call, so the future
        // holds little more than the inner call's (`send_with_token`'s is
        // ≈ 1.2 KiB, held by every request waiting for an upstream slot).
        if req.body().is_end_stream()
            && let Some(token) = cache.usable()
        {
            let (parts, body) = req.into_parts();
            let call = inner.call(authorized(parts, body, &token, Some(Kept::empty())));
            return Box::pin(answered(call, inner, cache, token));
        }
        Box::pin(send_with_token(inner, cache, req))
    }
}

fn cache_for(caches: &ByName<TokenCache>, req: &Req) -> Result<TokenCache, GatewayError> {
    let Some(route) = req.extensions().get::<RouteMatch>() else {
        return Err(GatewayError::Internal(
            "token layer reached without a RouteMatch".to_owned(),
        ));
    };
    let upstream = &route.config().upstream;
    caches
        .get(upstream)
        .cloned()
        .ok_or_else(|| GatewayError::Internal(format!("no token cache for upstream `{upstream}`")))
}

// Generic over the future type `F` rather than naming `S::Future`: a
// projection held across `.await` trips rustc's `Send` inference (#110338).
async fn send_with_token<S, F>(mut inner: S, cache: TokenCache, req: Req) -> GwResult
where
    S: Service<Req, Response = Resp, Error = GatewayError, Future = F> + Send,
    F: std::future::Future<Output = GwResult> + Send,
{
    let token = cache.token().await?;
    let (parts, body) = req.into_parts();
    let (body, kept) = keep_for_replay(body).await;
    let call = inner.call(authorized(parts, body, &token, kept));
    answered(call, inner, cache, token).await
}

/// The request with the Zuora token, and with a copy of itself for a
/// replay when its body was `kept`.
fn authorized(
    mut parts: http::request::Parts,
    body: Body,
    token: &BearerToken,
    kept: Option<Kept>,
) -> Req {
    parts
        .headers
        .insert(header::AUTHORIZATION, token.header_value());
    if let Some(kept) = kept {
        // The head is copied by Forward, once the request has a slot.
        parts.extensions.insert(ReplayCopy::pending(kept));
    }
    Request::from_parts(parts, body)
}

/// The inner service's answer to `call`, or after a 401 the replay's.
async fn answered<S, F>(call: F, inner: S, cache: TokenCache, token: BearerToken) -> GwResult
where
    S: Service<Req, Response = Resp, Error = GatewayError, Future = F> + Send,
    F: std::future::Future<Output = GwResult> + Send,
{
    let response = call.await?;
    if response.status() != StatusCode::UNAUTHORIZED {
        return Ok(response);
    }
    // Boxed apart: every request's future would otherwise be sized for the
    // replay's state too, and requests waiting for an upstream slot hold it.
    Box::pin(replay_after_401(inner, cache, token, response)).await
}

/// Zuora answered 401: the token goes, and the request is sent once more
/// with a new one if its copy came back with the response.
async fn replay_after_401<S, F>(
    mut inner: S,
    cache: TokenCache,
    token: BearerToken,
    mut response: Resp,
) -> GwResult
where
    S: Service<Req, Response = Resp, Error = GatewayError, Future = F> + Send,
    F: std::future::Future<Output = GwResult> + Send,
{
    // The rejected token goes, whether or not the request can be replayed.
    cache.invalidate(&token);
    let handed_back = response
        .extensions_mut()
        .remove::<RequestExtensions>()
        .and_then(|RequestExtensions(mut extensions)| {
            let mut copy = extensions.remove::<ReplayCopy>()?;
            let head = copy.head.take()?;
            Some((extensions, copy, head))
        });
    let Some((mut extensions, mut copy, mut head)) = handed_back else {
        // The body is gone (or the inner service kept the request).
        cache.record_401("not_replayable");
        return Ok(response);
    };
    let fresh = match cache.token().await {
        Ok(fresh) if !fresh.same_as(&token) => fresh,
        Ok(_) => return Ok(response),
        Err(e) => {
            cache.record_401("token_unavailable");
            return Err(e);
        }
    };
    drop(response);
    cache.record_401("replayed");
    tracing::debug!(
        upstream = cache.upstream(),
        generation = fresh.generation(),
        "replaying a request Zuora answered 401 with a new token"
    );
    // The copy goes along again (with the new token) for Forward's retries of the replay.
    head.headers
        .insert(header::AUTHORIZATION, fresh.header_value());
    let mut parts = head.parts();
    copy.head = Some(head);
    let body = copy.body.clone().into_body();
    extensions.insert(copy);
    parts.extensions = extensions;
    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
    let mut response = inner.call(Request::from_parts(parts, body)).await?;
    // A second 401 goes back as it is, without the extensions handed back with it.
    response.extensions_mut().remove::<RequestExtensions>();
    Ok(response)
}

/// Request extension: the token layer's copy of a request it can replay
/// after a 401 (head with the Zuora token, and the body read into memory).
///
/// The one copy serves two purposes, so that nothing else is copied unless
/// a resend actually happens: the forward service's retries resend it
/// ([`ReplayCopy::head`], [`ReplayCopy::plain_body`]), and it comes back to
/// the token layer with a 401, among the request's extensions
/// ([`RequestExtensions`]), for the replay. The token layer keeps the body;
/// the head is copied by the forward service ([`ReplayCopy::copy_head`])
/// once the request has an upstream slot, so that the many requests waiting
/// for one under load hold their head once, not twice.
#[derive(Debug, Clone)]
pub struct ReplayCopy {
    head: Option<Head>,
    body: Kept,
}

/// A request head, without extensions.
#[derive(Debug, Clone)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn parts(&self) -> http::request::Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.uri = self.uri.clone();
        parts.version = self.version;
        parts.headers = self.headers.clone();
        parts
    }
}

impl ReplayCopy {
    /// A copy of `body`, its head to come ([`ReplayCopy::copy_head`]).
    fn pending(body: Kept) -> Self {
        ReplayCopy { head: None, body }
    }

    /// Copies `parts`' head (the request as it is about to be sent, before
    /// it is rewritten for the upstream), unless the copy has one already:
    /// a replayed request carries the head it was made from.
    pub fn copy_head(&mut self, parts: &http::request::Parts) {
        if self.head.is_none() {
            self.head = Some(Head {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                version: parts.version,
                headers: parts.headers.clone(),
            });
        }
    }

    /// A new copy of the request head (without extensions), once copied.
    pub fn head(&self) -> Option<http::request::Parts> {
        self.head.as_ref().map(Head::parts)
    }

    /// The body, when it is exactly these bytes (no trailers).
    pub fn plain_body(&self) -> Option<&Bytes> {
        self.body.trailers.is_none().then_some(&self.body.data)
    }
}

/// A body read to its end, small enough to send twice.
#[derive(Debug, Clone)]
struct Kept {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Kept {
    /// No body.
    fn empty() -> Kept {
        Kept {
            data: Bytes::new(),
            trailers: None,
        }
    }

    fn into_body(self) -> Body {
        match self.trailers {
            None => crate::body::full(self.data),
            trailers => boxed(Replay {
                data: Some(self.data),
                trailers,
                rest: Rest::Done,
            }),
        }
    }
}

/// Reads `body` if it is at most [`MAX_REPLAY_BYTES`]. Returns the body to
/// send first and, when it fit, a copy for a replay. Bodies known to be
/// larger are not touched; a body that turns out larger (or fails) is sent
/// as what was read followed by the rest (or the error).
async fn keep_for_replay(mut body: Body) -> (Body, Option<Kept>) {
    if body.is_end_stream() {
        // Nothing to read: the body goes as it is.
        return (body, Some(Kept::empty()));
    }
    if body.size_hint().lower() > MAX_REPLAY_BYTES as u64 {
        return (body, None);
    }
    let mut chunks = Chunks::default();
    let mut trailers = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    chunks.push(data);
                    if chunks.len() > MAX_REPLAY_BYTES {
                        return (prefixed(chunks.into_bytes(), Rest::Body(body)), None);
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
            Some(Err(e)) => {
                return (prefixed(chunks.into_bytes(), Rest::Error(Some(e))), None);
            }
        }
    }
    let kept = Kept {
        data: chunks.into_bytes(),
        trailers,
    };
    (kept.clone().into_body(), Some(kept))
}

fn prefixed(data: Bytes, rest: Rest) -> Body {
    boxed(Replay {
        data: Some(data),
        trailers: None,
        rest,
    })
}

/// What follows the bytes already read.
enum Rest {
    Done,
    Body(Body),
    Error(Option<BoxError>),
}

/// Bytes already read, then the rest of the original body (or its error),
/// then trailers.
struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Rest,
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(data) = this.data.take().filter(|d| !d.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match &mut this.rest {
            Rest::Done => {}
            Rest::Body(body) => return Pin::new(body).poll_frame(cx),
            Rest::Error(e) => {
                if let Some(e) = e.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                return Poll::Ready(None);
            }
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.as_ref().is_none_or(Bytes::is_empty)
            && matches!(self.rest, Rest::Done)
            && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let read = self.data.as_ref().map_or(0, Bytes::len) as u64;
        match &self.rest {
            Rest::Done => SizeHint::with_exact(read),
            Rest::Body(body) => {
                let rest = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(read));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(read));
                }
                hint
            }
            Rest::Error(_) => {
                let mut hint = SizeHint::new();
                hint.set_lower(read);
                hint
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Mutex;

    use http::Response;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::body::{empty, full};
    use crate::oauth::test_support::{FakeTokenEndpoint, Harness, harness};
    use crate::policy::Policy;

    /// What the fake upstream saw: the Authorization header and body of each call.
    type Calls = Arc<Mutex<Vec<(String, Bytes)>>>;

    /// What Forward does before sending: the replay copy takes the head.
    fn copy_head_like_forward(parts: &mut http::request::Parts) {
        let mut extensions = std::mem::take(&mut parts.extensions);
        if let Some(copy) = extensions.get_mut::<ReplayCopy>() {
            copy.copy_head(parts);
        }
        parts.extensions = extensions;
    }

    /// An upstream that answers 401 to any token in `revoked`, else 200;
    /// like Forward, it hands the request's extensions back with a 401.
    fn upstream(
        calls: Calls,
        revoked: Arc<Mutex<Vec<String>>>,
    ) -> impl Service<Req, Response = Resp, Error = GatewayError, Future = LayerFuture>
    + Clone
    + Send
    + 'static {
        service_fn(move |req: Req| {
            let calls = calls.clone();
            let revoked = revoked.clone();
            let fut: LayerFuture = Box::pin(async move {
                let auth = req.headers()[header::AUTHORIZATION]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let (mut parts, body) = req.into_parts();
                copy_head_like_forward(&mut parts);
                let body = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                calls.lock().unwrap().push((auth.clone(), body));
                let status = if revoked
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|t| auth.ends_with(t.as_str()))
                {
                    401
                } else {
                    200
                };
                let mut resp = Response::builder().status(status).body(empty()).unwrap();
                if status == 401 {
                    resp.extensions_mut()
                        .insert(RequestExtensions(parts.extensions));
                }
                Ok(resp)
            });
            fut
        })
    }

    async fn setup() -> (FakeTokenEndpoint, Harness, TokenLayer) {
        let ep = FakeTokenEndpoint::start(3600).await;
        let h = harness(&ep.base_url(), ep.token_url(), "");
        h.cache.start();
        let caches = HashMap::from([("zuora".to_owned(), h.cache.clone())]);
        (ep, h, TokenLayer::new(Arc::new(caches)))
    }

    /// The layer with a first token fetched, in front of an upstream that
    /// refuses that token (401) and accepts the next.
    async fn first_token_revoked() -> (
        FakeTokenEndpoint,
        Harness,
        Calls,
        Token<
            impl Service<Req, Response = Resp, Error = GatewayError, Future = LayerFuture>
            + Clone
            + Send
            + 'static,
        >,
    ) {
        let (ep, h, layer) = setup().await;
        h.cache.token().await.unwrap();
        let calls = Calls::default();
        let revoked = Arc::new(Mutex::new(vec![ep.issued()[0].clone()]));
        let svc = layer.layer(upstream(calls.clone(), revoked));
        (ep, h, calls, svc)
    }

    fn request(h: &Harness, body: Body) -> Req {
        let policy = Arc::new(Policy::compile(h.config.clone()));
        let mut req = Request::put("/v1/x")
            .header(header::AUTHORIZATION, "Bearer caller-jwt")
            .body(body)
            .unwrap();
        req.extensions_mut().insert(RouteMatch {
            policy,
            route: 0,
            params: Vec::new(),
        });
        req
    }

    #[tokio::test]
    async fn the_zuora_token_replaces_the_caller_s_authorization() {
        let (ep, h, layer) = setup().await;
        let calls = Calls::default();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream(calls.clone(), Arc::default()));
        let resp = svc.oneshot(request(&h, full("{}"))).await.unwrap();
        assert_eq!(resp.status(), 200);
        let calls = calls.lock().unwrap();
        assert_eq!(calls[0].0, format!("Bearer {}", ep.issued()[0]));
    }

    #[tokio::test]
    async fn a_401_invalidates_the_token_and_the_request_is_replayed_once_with_its_body() {
        let (ep, h, calls, svc) = first_token_revoked().await;
        let first = h.cache.current().unwrap();
        let resp = svc
            .oneshot(request(&h, full(r#"{"status":"Stopping"}"#)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].0, format!("Bearer {}", ep.issued()[0]));
        assert_eq!(calls[1].0, format!("Bearer {}", ep.issued()[1]));
        assert_eq!(calls[1].1, Bytes::from_static(br#"{"status":"Stopping"}"#));
        assert!(!h.cache.current().unwrap().same_as(&first));
        assert!(h.metrics_text().contains(
            r#"zuora_token_401_recoveries_total{upstream="zuora",outcome="replayed"} 1"#
        ));
    }

    #[tokio::test]
    async fn a_request_without_a_body_is_replayed_after_a_401_too() {
        // With a token held and no body, the layer calls in without
        // awaiting anything first: the replay must work on that path too.
        let (ep, h, calls, svc) = first_token_revoked().await;
        let resp = svc.clone().oneshot(request(&h, empty())).await.unwrap();
        assert_eq!(resp.status(), 200);
        {
            let calls = calls.lock().unwrap();
            assert_eq!(calls.len(), 2);
            assert_eq!(calls[0].0, format!("Bearer {}", ep.issued()[0]));
            assert_eq!(calls[1].0, format!("Bearer {}", ep.issued()[1]));
            assert!(calls[1].1.is_empty());
        }
        // The next one goes straight out with the new token.
        let resp = svc.oneshot(request(&h, empty())).await.unwrap();
        assert_eq!(resp.status(), 200);
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[2].0, format!("Bearer {}", ep.issued()[1]));
        assert!(h.metrics_text().contains(
            r#"zuora_token_401_recoveries_total{upstream="zuora",outcome="replayed"} 1"#
        ));
    }

    #[tokio::test]
    async fn a_request_without_a_body_waits_for_the_first_token() {
        // No token held yet: the request waits for the first one (it does
        // not take the no-wait path and go out without one).
        let (ep, h, layer) = setup().await;
        let calls = Calls::default();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream(calls.clone(), Arc::default()));
        let resp = svc.oneshot(request(&h, empty())).await.unwrap();
        assert_eq!(resp.status(), 200);
        let calls = calls.lock().unwrap();
        assert_eq!(calls[0].0, format!("Bearer {}", ep.issued()[0]));
    }

    #[tokio::test]
    async fn a_burst_of_401s_for_one_token_costs_one_token_request() {
        let (ep, h, _calls, svc) = first_token_revoked().await;
        let tasks: Vec<_> = (0..50)
            .map(|_| tokio::spawn(svc.clone().oneshot(request(&h, full("{}")))))
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().status(), 200);
        }
        assert_eq!(ep.requests(), 2);
    }

    #[tokio::test]
    async fn a_second_401_is_passed_through_not_retried_again() {
        let (ep, h, layer) = setup().await;
        h.cache.token().await.unwrap();
        let calls = Calls::default();
        // Everything is refused: "zuora-tok-" is in every token.
        let revoked = Arc::new(Mutex::new(vec![String::new()]));
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream(calls.clone(), revoked));
        let resp = svc.oneshot(request(&h, full("{}"))).await.unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(calls.lock().unwrap().len(), 2);
        assert_eq!(ep.requests(), 2);
    }

    #[tokio::test]
    async fn a_body_over_64_kib_is_streamed_once_and_its_401_passed_through() {
        let (ep, h, calls, svc) = first_token_revoked().await;
        // Unknown length (a stream of 1 KiB chunks), 100 KiB in all.
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..100)
            .map(|_| Ok(Frame::data(Bytes::from(vec![b'x'; 1024]))))
            .collect();
        let body = boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            chunks,
        )));
        let resp = svc.oneshot(request(&h, body)).await.unwrap();
        assert_eq!(resp.status(), 401);
        let bodies: Vec<usize> = calls.lock().unwrap().iter().map(|c| c.1.len()).collect();
        assert_eq!(
            bodies,
            vec![100 * 1024],
            "the whole body reached the upstream, once"
        );
        assert!(h.metrics_text().contains(r#"outcome="not_replayable"} 1"#));
        // The rejected token is dropped all the same.
        assert_eq!(h.cache.token().await.unwrap().generation(), 2);
        assert_eq!(ep.requests(), 2);
    }

    #[tokio::test]
    async fn bodies_are_kept_byte_for_byte_with_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-check", http::HeaderValue::from_static("1"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
            Ok(Frame::trailers(trailers)),
        ];
        let (first, kept) = keep_for_replay(boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )))
        .await;
        let kept = kept.unwrap();
        assert_eq!(first.size_hint().exact(), Some(4));
        let collected = first.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-check"], "1");
        assert_eq!(collected.to_bytes(), "abcd");
        let again = kept.into_body().collect().await.unwrap();
        assert_eq!(again.trailers().unwrap()["x-check"], "1");
        assert_eq!(again.to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn a_body_error_while_reading_reaches_the_upstream_after_the_bytes_read() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("reset by caller".into()),
        ];
        let (first, kept) = keep_for_replay(boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )))
        .await;
        assert!(kept.is_none());
        let err = first.collect().await.unwrap_err();
        assert_eq!(err.to_string(), "reset by caller");
    }

    /// Like Forward: answers 401 to the first call, handing the request's
    /// extensions back; records what each call carried.
    #[allow(clippy::type_complexity)]
    fn forward_like(
        seen: Arc<Mutex<Vec<(bool, Option<Bytes>, Bytes)>>>,
        always_401: bool,
    ) -> impl Service<Req, Response = Resp, Error = GatewayError, Future = LayerFuture>
    + Clone
    + Send
    + 'static {
        service_fn(move |req: Req| {
            let seen = seen.clone();
            let fut: LayerFuture = Box::pin(async move {
                let (mut parts, body) = req.into_parts();
                copy_head_like_forward(&mut parts);
                if let Some(copy) = parts.extensions.get::<ReplayCopy>() {
                    // What Forward would resend on a retry: this very request, current token included.
                    let head = copy.head().unwrap();
                    assert_eq!(head.headers, parts.headers);
                    assert_eq!(
                        (head.method, head.uri),
                        (parts.method.clone(), parts.uri.clone())
                    );
                }
                let routed = parts.extensions.get::<RouteMatch>().is_some();
                let buffered = parts
                    .extensions
                    .get::<ReplayCopy>()
                    .and_then(|c| c.plain_body().cloned());
                let body = body.collect().await.unwrap().to_bytes();
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push((routed, buffered, body));
                    seen.len() == 1
                };
                let mut resp = Response::new(empty());
                if first || always_401 {
                    *resp.status_mut() = StatusCode::UNAUTHORIZED;
                    resp.extensions_mut()
                        .insert(RequestExtensions(parts.extensions));
                }
                Ok(resp)
            });
            fut
        })
    }

    #[tokio::test]
    async fn the_replay_gets_the_extensions_handed_back_and_the_same_body() {
        let (_ep, h, layer) = setup().await;
        h.cache.token().await.unwrap();
        let seen = Arc::default();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(forward_like(Arc::clone(&seen), false));
        let resp = svc.oneshot(request(&h, full("{\"a\":1}"))).await.unwrap();
        assert_eq!(resp.status(), 200);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        for (routed, buffered, body) in seen.iter() {
            assert!(routed, "the RouteMatch reached both calls");
            assert_eq!(body, "{\"a\":1}");
            assert_eq!(buffered.as_ref(), Some(body), "the copy's body is the body");
        }
    }

    #[tokio::test]
    async fn a_passed_through_401_does_not_carry_the_request_extensions_out() {
        let (_ep, h, layer) = setup().await;
        h.cache.token().await.unwrap();
        let seen = Arc::default();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(forward_like(Arc::clone(&seen), true));
        let resp = svc.oneshot(request(&h, empty())).await.unwrap();
        assert_eq!(resp.status(), 401);
        assert!(resp.extensions().get::<RequestExtensions>().is_none());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "replayed once");
        assert!(seen[1].0, "the replay was routed");
        assert_eq!(
            seen[1].1,
            Some(Bytes::new()),
            "the replay carries the copy too"
        );
    }

    #[tokio::test]
    async fn without_a_route_match_the_request_is_an_internal_error() {
        let (_ep, _h, layer) = setup().await;
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream(Calls::default(), Arc::default()));
        let err = svc.oneshot(Request::new(empty())).await.unwrap_err();
        assert!(matches!(err, GatewayError::Internal(_)));
    }
}
