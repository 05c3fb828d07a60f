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
        if !visible_ascii(value.as_bytes()) {
            return Err(GatewayError::InvalidValue(format!(
                "header `{name}` has a value that is not visible ASCII"
            )));
        }
    }
    Ok(())
}

/// What `HeaderValue::to_str` accepts (visible ASCII and tab), checked
/// without a branch per byte so that the compiler can vectorize it: the
/// bearer token alone is hundreds of bytes on every request.
fn visible_ascii(bytes: &[u8]) -> bool {
    bytes.chunks(64).all(|chunk| {
        chunk.iter().fold(true, |ok, &b| {
            ok & (((0x20..0x7f).contains(&b)) | (b == b'\t'))
        })
    })
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn visible_ascii_agrees_with_to_str_on_every_byte() {
        for b in 0..=255u8 {
            for len in [1usize, 7, 64, 65, 300] {
                for at in [0, len / 2, len - 1] {
                    let mut v = vec![b'a'; len];
                    v[at] = b;
                    let expected = http::HeaderValue::from_bytes(&v)
                        .map(|h| h.to_str().is_ok())
                        .unwrap_or(false);
                    if http::HeaderValue::from_bytes(&v).is_ok() {
                        assert_eq!(visible_ascii(&v), expected, "byte {b:#x} at {at} of {len}");
                    }
                }
            }
        }
        assert!(visible_ascii(b""));
    }
}
