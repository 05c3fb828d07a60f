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
        let policy = self.policy.load_full();
        let max_uri = policy.config.server.max_uri_bytes;
        if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > max_uri {
            return reject(GatewayError::UriTooLong(max_uri));
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
