//! Token: authenticates the request to Zuora with the route's upstream
//! token, and recovers from a rejected token once.
//!
//! - `Authorization: Bearer <Zuora token>` always replaces whatever the
//!   caller sent (the caller's own credentials never reach Zuora).
//! - On a 401 from Zuora the token is invalidated (only if still current, so
//!   a burst of 401s causes one token request) and the request is replayed
//!   once with the new token. Bodies up to 64 KiB are kept for that; a larger
//!   or unfinished body means the 401 is passed through.
//! - With no token to be had the request fails with
//!   [`GatewayError::TokenUnavailable`] (503, category 61).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use super::{GwResult, LayerFuture, Req, Resp};
use crate::body::{Body, BoxError, boxed};
use crate::context::RouteMatch;
use crate::error::GatewayError;
use crate::oauth::TokenCache;

/// Request bodies up to this size are kept so a 401 can be replayed.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// Builds [`Token`] over the token caches of all upstreams, by upstream name.
#[derive(Clone, Debug)]
pub struct TokenLayer {
    caches: Arc<HashMap<String, TokenCache>>,
}

impl TokenLayer {
    /// Uses `caches` (one per upstream, keyed by upstream name).
    pub fn new(caches: Arc<HashMap<String, TokenCache>>) -> Self {
        TokenLayer { caches }
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
    caches: Arc<HashMap<String, TokenCache>>,
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
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(send_with_token(inner, cache, req))
    }
}

fn cache_for(caches: &HashMap<String, TokenCache>, req: &Req) -> Result<TokenCache, GatewayError> {
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
    let (mut parts, body) = req.into_parts();
    parts
        .headers
        .insert(header::AUTHORIZATION, token.header_value());
    let (body, kept) = keep_for_replay(body).await;
    let replay = kept.map(|kept| (parts.clone(), kept));
    let response = inner.call(Request::from_parts(parts, body)).await?;
    if response.status() != StatusCode::UNAUTHORIZED {
        return Ok(response);
    }

    let Some((mut parts, kept)) = replay else {
        // The body is gone: the 401 goes back, but the token still goes.
        cache.invalidate(&token);
        cache.record_401("not_replayable");
        return Ok(response);
    };
    cache.invalidate(&token);
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
    parts
        .headers
        .insert(header::AUTHORIZATION, fresh.header_value());
    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
    inner
        .call(Request::from_parts(parts, kept.into_body()))
        .await
}

/// A body read to its end, small enough to send twice.
#[derive(Debug, Clone)]
struct Kept {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Kept {
    fn into_body(self) -> Body {
        boxed(Replay {
            data: Some(self.data),
            trailers: self.trailers,
            rest: Rest::Done,
        })
    }
}

/// Reads `body` if it is at most [`MAX_REPLAY_BYTES`]. Returns the body to
/// send first and, when it fit, a copy for a replay. Bodies known to be
/// larger are not touched; a body that turns out larger (or fails) is sent
/// as what was read followed by the rest (or the error).
async fn keep_for_replay(mut body: Body) -> (Body, Option<Kept>) {
    if body.is_end_stream() {
        let kept = Kept {
            data: Bytes::new(),
            trailers: None,
        };
        return (kept.clone().into_body(), Some(kept));
    }
    if body.size_hint().lower() > MAX_REPLAY_BYTES as u64 {
        return (body, None);
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let mut trailers = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    len += data.len();
                    chunks.push(data);
                    if len > MAX_REPLAY_BYTES {
                        let read = concat(chunks);
                        return (prefixed(read, Rest::Body(body)), None);
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
            Some(Err(e)) => return (prefixed(concat(chunks), Rest::Error(Some(e))), None),
        }
    }
    let kept = Kept {
        data: concat(chunks),
        trailers,
    };
    (kept.clone().into_body(), Some(kept))
}

fn concat(mut chunks: Vec<Bytes>) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for c in chunks {
        out.extend_from_slice(&c);
    }
    out.freeze()
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

    /// An upstream that answers 401 to any token in `revoked`, else 200.
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
                let body = req
                    .into_body()
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
                Ok(Response::builder().status(status).body(empty()).unwrap())
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
        let (ep, h, layer) = setup().await;
        let first = h.cache.token().await.unwrap();
        let calls = Calls::default();
        let revoked = Arc::new(Mutex::new(vec![ep.issued()[0].clone()]));
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream(calls.clone(), revoked));
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
    async fn a_burst_of_401s_for_one_token_costs_one_token_request() {
        let (ep, h, layer) = setup().await;
        h.cache.token().await.unwrap();
        let calls = Calls::default();
        let revoked = Arc::new(Mutex::new(vec![ep.issued()[0].clone()]));
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream(calls.clone(), revoked));
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
        let (ep, h, layer) = setup().await;
        h.cache.token().await.unwrap();
        let calls = Calls::default();
        let revoked = Arc::new(Mutex::new(vec![ep.issued()[0].clone()]));
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream(calls.clone(), revoked));
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
