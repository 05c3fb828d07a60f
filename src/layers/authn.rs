//! Authn: establishes who is calling ([`Caller`]) under the routed policy's
//! [`Authenticator`](crate::authn::Authenticator), and removes the caller's
//! `Authorization` header so it can never reach Zuora (the token layer adds
//! Zuora's own later). No caller, no further layer: a failure is
//! `Unauthenticated` (401) before anything is forwarded.
//!
//! Cache hits and signature checks complete synchronously; only a token
//! naming an unknown `kid` (one JWKS re-fetch) takes the boxed path.

use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::Either;
use http::header;
use tower::{Layer, Service};

use super::{LayerFuture, RejectOr, Req, Resp, reject};
use crate::authn::{Attempt, Authenticator};
use crate::context::{Caller, RouteMatch};
use crate::error::GatewayError;

/// Builds [`Authn`]. Stateless: the authenticator comes from the request's
/// [`RouteMatch`] policy snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthnLayer;

impl<S> Layer<S> for AuthnLayer {
    type Service = Authn<S>;
    fn layer(&self, inner: S) -> Authn<S> {
        Authn { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Authn<S> {
    inner: S,
}

fn admit(req: &mut Req, caller: Caller) {
    req.headers_mut().remove(header::AUTHORIZATION);
    req.extensions_mut().insert(caller);
}

impl<S> Service<Req> for Authn<S>
where
    S: tower::Service<Req, Response = Resp, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = Either<RejectOr<S::Future>, LayerFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let Some(authn) = req
            .extensions()
            .get::<RouteMatch>()
            .map(|m| m.policy.authn.clone())
        else {
            return Either::Left(reject(GatewayError::Internal(
                "authn layer reached without a route match".to_owned(),
            )));
        };
        match authn.attempt(req.headers()) {
            Attempt::Done(Ok(caller)) => {
                admit(&mut req, caller);
                Either::Left(Either::Right(self.inner.call(req)))
            }
            Attempt::Done(Err(e)) => Either::Left(reject(e)),
            Attempt::NeedsKeys(pending) => {
                let Authenticator::Jwt(jwt) = &*authn else {
                    return Either::Left(reject(GatewayError::Internal(
                        "authentication asked for keys it does not use".to_owned(),
                    )));
                };
                let jwt = jwt.clone();
                // The service that was polled ready handles this request; a clone takes its place.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                // A combinator rather than an async block: the inner future type stays nameable for `Send`.
                Either::Right(Box::pin(jwt.finish(pending).and_then(move |caller| {
                    admit(&mut req, caller);
                    inner.call(req)
                })))
            }
        }
    }
}
