//! Forward: the innermost service. Rewrites the URI onto the route's
//! upstream, cleans headers, sends the request over the pooled client with
//! the upstream's deadline, and hands Zuora's response back (headers such as
//! `Zuora-Request-Id`, `ratelimit-*`, `Concurrency-Limit-*` and `Retry-After`
//! pass through untouched).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Uri};
use tower::Service;

use super::client::HttpClient;
use super::headers::strip_hop_by_hop;
use crate::body::{self, Body};
use crate::config::UpstreamConfig;
use crate::context::RouteMatch;
use crate::error::GatewayError;
use crate::layers::{GwResult, LayerFuture, Req};

/// One upstream, ready to receive requests.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Its configuration.
    pub config: Arc<UpstreamConfig>,
    /// The resolved base URL (the simulator's address for `base_url: simulator`).
    pub base: Uri,
    /// The pooled client.
    pub client: HttpClient,
}

impl Upstream {
    /// The token endpoint: `oauth.token_url` or `<base>/oauth/token`.
    pub fn token_url(&self) -> Result<Uri, GatewayError> {
        if let Some(u) = &self.config.oauth.token_url {
            return Ok(u.clone());
        }
        join(&self.base, "/oauth/token", None)
    }
}

/// Upstreams by name.
pub type Upstreams = Arc<HashMap<String, Upstream>>;

/// What the Zuora call looked like, attached to the response for logs and metrics.
#[derive(Debug, Clone)]
pub struct UpstreamCall {
    /// Zuora's status.
    pub status: u16,
    /// Zuora's `Zuora-Request-Id`, if any.
    pub request_id: Option<HeaderValue>,
    /// Time to response headers.
    pub elapsed: std::time::Duration,
}

/// Builds `base` + `path` (+ `?query`), keeping a path prefix of `base`.
fn join(base: &Uri, path: &str, query: Option<&str>) -> Result<Uri, GatewayError> {
    let prefix = base.path().trim_end_matches('/');
    let mut pq =
        String::with_capacity(prefix.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(prefix);
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme().cloned().unwrap_or(Scheme::HTTPS));
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(
        PathAndQuery::try_from(pq)
            .map_err(|e| GatewayError::Internal(format!("bad upstream URI: {e}")))?,
    );
    Uri::from_parts(parts).map_err(|e| GatewayError::Internal(format!("bad upstream URI: {e}")))
}

/// The innermost service.
#[derive(Clone)]
pub struct Forward {
    upstreams: Upstreams,
}

impl Forward {
    /// Forwards to `upstreams` (looked up by the matched route's `upstream`).
    pub fn new(upstreams: Upstreams) -> Self {
        Forward { upstreams }
    }
}

impl Service<Req> for Forward {
    type Response = http::Response<Body>;
    type Error = GatewayError;
    type Future = LayerFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let prepared = self.prepare(req);
        Box::pin(async move {
            let (upstream, req) = prepared?;
            send(&upstream, req).await
        })
    }
}

impl Forward {
    fn prepare(&self, req: Req) -> Result<(Upstream, Request<Body>), GatewayError> {
        let upstream = {
            let m = req.extensions().get::<RouteMatch>().ok_or_else(|| {
                GatewayError::Internal("request reached forward without a route".into())
            })?;
            let name = &m.config().upstream;
            self.upstreams.get(name).cloned().ok_or_else(|| {
                GatewayError::Internal(format!("upstream `{name}` is not running"))
            })?
        };
        let (mut parts, body) = req.into_parts();
        parts.uri = join(&upstream.base, parts.uri.path(), parts.uri.query())?;
        strip_hop_by_hop(&mut parts.headers);
        // The client sets Host from the URI authority.
        parts.headers.remove(header::HOST);
        if let Some(v) = &upstream.config.zuora_version
            && !parts.headers.contains_key("zuora-version")
        {
            parts.headers.insert("zuora-version", v.clone());
        }
        // HTTP/2 to the upstream is negotiated by the connector, not inherited from the caller.
        parts.version = http::Version::HTTP_11;
        Ok((upstream, Request::from_parts(parts, body)))
    }
}

async fn send(upstream: &Upstream, req: Request<Body>) -> GwResult {
    let started = Instant::now();
    let deadline = upstream.config.request_timeout;
    let result = tokio::time::timeout(deadline, upstream.client.request(req)).await;
    let resp = match result {
        Err(_) => return Err(GatewayError::UpstreamTimeout(deadline)),
        Ok(Err(e)) => return Err(classify_client_error(&e)),
        Ok(Ok(resp)) => resp,
    };
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let call = UpstreamCall {
        status: parts.status.as_u16(),
        request_id: parts.headers.get("zuora-request-id").cloned(),
        elapsed: started.elapsed(),
    };
    parts.extensions = http::Extensions::new();
    parts.extensions.insert(call);
    Ok(http::Response::from_parts(parts, body::boxed(incoming)))
}

/// Maps a client error: a gateway error raised by the request body (size
/// limit, corrupt gzip) wins; then connect failures; everything else is a
/// broken exchange with Zuora.
fn classify_client_error(e: &hyper_util::client::legacy::Error) -> GatewayError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(gw) = s.downcast_ref::<GatewayError>() {
            return gw.clone();
        }
        source = s.source();
    }
    if e.is_connect() {
        return GatewayError::UpstreamConnect(root_cause(e));
    }
    GatewayError::BadUpstreamResponse(root_cause(e))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn join_keeps_base_prefix_and_query() {
        let base: Uri = "https://rest.zuora.com".parse().unwrap();
        assert_eq!(
            join(&base, "/v1/x", Some("a=1")).unwrap().to_string(),
            "https://rest.zuora.com/v1/x?a=1"
        );
        let base: Uri = "http://127.0.0.1:9000/prefix/".parse().unwrap();
        assert_eq!(
            join(&base, "/v1/x", None).unwrap().to_string(),
            "http://127.0.0.1:9000/prefix/v1/x"
        );
    }
}
