//! Authn: establishes who the caller is ([`Caller`]) and removes the caller's
//! own `Authorization` header, which is never forwarded.
//!
//! This foundation version supports `trusted_identity` (sidecar mode); JWT
//! verification arrives with the policy work.

use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header;
use tower::{Layer, Service};

use super::{RejectOr, Req, Resp, reject};
use crate::config::CallerAuthConfig;
use crate::context::{Caller, RouteMatch};
use crate::error::GatewayError;

/// Builds [`Authn`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AuthnLayer;

impl<S> Layer<S> for AuthnLayer {
    type Service = Authn<S>;
    fn layer(&self, inner: S) -> Authn<S> {
        Authn { inner }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Authn<S> {
    inner: S,
}

impl<S> Service<Req> for Authn<S>
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
        let caller = {
            let Some(m) = req.extensions().get::<RouteMatch>() else {
                return reject(GatewayError::Internal("authn before routing".into()));
            };
            match &m.policy.config.callers {
                CallerAuthConfig::TrustedIdentity(name) => Caller::named(name.as_str()),
                CallerAuthConfig::Jwt(_) => {
                    return reject(GatewayError::Unauthenticated(
                        "JWT caller authentication is not available in this build".into(),
                    ));
                }
            }
        };
        req.headers_mut().remove(header::AUTHORIZATION);
        req.extensions_mut().insert(caller);
        super::observe::ObserveNotes::record(&req);
        Either::Right(self.inner.call(req))
    }
}
