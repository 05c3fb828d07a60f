//! Authorize: the authenticated caller must match one of the route's
//! `allow_callers` globs, else `Forbidden` (403) and nothing is forwarded.
//! Deny by default: a route with no `allow_callers` admits nobody.

use std::task::{Context, Poll};

use futures_util::future::Either;
use tower::{Layer, Service};

use super::{RejectOr, Req, Resp, reject};
use crate::context::{Caller, RouteMatch};
use crate::error::GatewayError;

/// Builds [`Authorize`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthorizeLayer;

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
}

impl<S> Service<Req> for Authorize<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = RejectOr<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let decision = match (
            req.extensions().get::<RouteMatch>(),
            req.extensions().get::<Caller>(),
        ) {
            (Some(m), Some(caller)) => m.policy.authorize(m.route, caller),
            _ => Err(GatewayError::Internal(
                "authorize layer reached without a route match and a caller".to_owned(),
            )),
        };
        match decision {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(e) => reject(e),
        }
    }
}
