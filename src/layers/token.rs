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
        return Err(GatewayError::Internal("token layer reached without a RouteMatch".to_owned()));
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
    parts.headers.insert(header::AUTHORIZATION, token.header_value());
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
    parts.headers.insert(header::AUTHORIZATION, fresh.header_value());
    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
    inner.call(Request::from_parts(parts, kept.into_body())).await
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

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
mod tests {}
