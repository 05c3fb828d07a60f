//! Route: refuses unsafe paths, matches the request against the current
//! policy and records the match (with the policy snapshot) as [`RouteMatch`].
//! Nothing unrouted goes further: deny by default.

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use tower::{Layer, Service};

use super::{RejectOr, Req, Resp, reject};
use crate::context::RouteMatch;
use crate::error::GatewayError;
use crate::policy::{Policy, check_path};
use crate::server::h1_guard::Violation;

/// Builds [`Route`] over the swappable policy.
#[derive(Clone)]
pub struct RouteLayer {
    policy: Arc<ArcSwap<Policy>>,
}

impl RouteLayer {
    /// Routes with whatever policy `policy` holds at request time.
    pub fn new(policy: Arc<ArcSwap<Policy>>) -> Self {
        RouteLayer { policy }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Route<S> {
    inner: S,
    policy: Arc<ArcSwap<Policy>>,
}

/// Refuses HTTP/1 absolute-form targets (`PUT http://evil/...`, for forward
/// proxies, which the gateway is not; HTTP/2 always carries scheme and
/// authority) and header values that are not visible ASCII (RFC 9110 allows
/// obs-text; Zuora has no use for it and it hides injection attempts).
fn check_target_and_headers(req: &Req) -> Result<(), GatewayError> {
    if req.version() < http::Version::HTTP_2
        && (req.uri().scheme().is_some() || req.uri().authority().is_some())
    {
        return Err(GatewayError::BadPath(
            "only origin-form request targets (`/path?query`) are accepted",
        ));
    }
    for (name, value) in req.headers() {
        if value.to_str().is_err() {
            return Err(GatewayError::InvalidValue(format!(
                "header `{name}` has a value that is not visible ASCII"
            )));
        }
    }
    Ok(())
}

impl<S> Service<Req> for Route<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = RejectOr<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        // The stand-in for a request head the HTTP/1.1 framing guard refused.
        if let Some(violation) = req.extensions().get::<Violation>() {
            return reject(GatewayError::InvalidValue(violation.message().to_owned()));
        }
        let policy = self.policy.load_full();
        let max_uri = policy.config.server.max_uri_bytes;
        if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > max_uri {
            return reject(GatewayError::UriTooLong(max_uri));
        }
        if let Err(e) = check_target_and_headers(&req) {
            return reject(e);
        }
        let path = req.uri().path();
        if let Err(e) = check_path(path) {
            return reject(e);
        }
        match policy.routes.lookup(req.method(), path) {
            Ok(m) => {
                req.extensions_mut().insert(RouteMatch {
                    policy,
                    route: m.route,
                    params: m.params,
                });
                futures_util::future::Either::Right(self.inner.call(req))
            }
            Err(e) => reject(e),
        }
    }
}
