//! Validate: built-in request validation of the matched route
//! ([`Validation`]). For `StopJob` routes the job ID (the route's last path
//! parameter) must be 32 characters of `[0-9A-Za-z]` and the body must be a
//! JSON object with `"status": "Stopping"`; see
//! [`stop_job`](crate::policy::stop_job) for the exact categories.
//!
//! The body is collected up to `server.max_body_bytes`; a gzip body
//! (`Content-Encoding: gzip`) is decoded (bounded by the same limit) only to
//! be checked, and forwarded as sent — the original bytes. Nothing invalid
//! reaches Zuora. Routes without validation pass straight through.

use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::Either;
use http::{HeaderMap, Request, header};
use tower::{Layer, Service};

use super::{LayerFuture, RejectOr, Req, Resp, reject};
use crate::body::{collect_bounded, full};
use crate::compression::gunzip_bounded;
use crate::config::Validation;
use crate::context::RouteMatch;
use crate::error::GatewayError;
use crate::policy::stop_job::{check_job_id, check_stop_body};

/// Builds [`Validate`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ValidateLayer;

impl<S> Layer<S> for ValidateLayer {
    type Service = Validate<S>;
    fn layer(&self, inner: S) -> Validate<S> {
        Validate { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Validate<S> {
    inner: S,
}

/// How the request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
}

fn coding(headers: &HeaderMap) -> Result<Coding, GatewayError> {
    let mut found = Coding::Identity;
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let text = value
            .to_str()
            .map_err(|_| GatewayError::UnsupportedEncoding("(not visible ASCII)".to_owned()))?;
        for c in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if c.eq_ignore_ascii_case("identity") {
                continue;
            }
            if (c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip"))
                && found == Coding::Identity
            {
                found = Coding::Gzip;
                continue;
            }
            return Err(GatewayError::UnsupportedEncoding(
                c.chars().take(32).collect(),
            ));
        }
    }
    Ok(found)
}

impl<S> Service<Req> for Validate<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = Either<RejectOr<S::Future>, LayerFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(m) = req.extensions().get::<RouteMatch>() else {
            return Either::Left(reject(GatewayError::Internal(
                "validate layer reached without a route match".to_owned(),
            )));
        };
        if m.config().validation != Validation::StopJob {
            return Either::Left(Either::Right(self.inner.call(req)));
        }
        let names = m.policy.routes.param_names(m.route);
        let checked = match (names.last(), m.params.last()) {
            (Some(name), Some(value)) => check_job_id(name, value),
            _ => Err(GatewayError::Internal(
                "stop_job validation on a route without a path parameter".to_owned(),
            )),
        };
        if let Err(e) = checked {
            return Either::Left(reject(e));
        }
        let limit = m.policy.config.server.max_body_bytes;
        let read_timeout = m.policy.config.server.body_read_timeout;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Either::Left(reject(GatewayError::PayloadTooLarge { limit }));
        }
        let coding = match coding(req.headers()) {
            Ok(c) => c,
            Err(e) => return Either::Left(reject(e)),
        };
        // The service that was polled ready handles this request; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // A combinator rather than an async block: the inner future type stays nameable for `Send`.
        Either::Right(Box::pin(
            checked_stop_request(req, coding, limit, read_timeout)
                .and_then(move |req| inner.call(req)),
        ))
    }
}

/// Collects the body, checks it, and rebuilds the request with the original bytes.
async fn checked_stop_request(
    req: Req,
    coding: Coding,
    limit: u64,
    read_timeout: std::time::Duration,
) -> Result<Req, GatewayError> {
    let (parts, body) = req.into_parts();
    let original = tokio::time::timeout(read_timeout, collect_bounded(body, limit))
        .await
        .map_err(|_| GatewayError::BodyTimeout(read_timeout))??;
    match coding {
        Coding::Identity => check_stop_body(&original)?,
        Coding::Gzip => check_stop_body(&gunzip_bounded(&original, limit)?)?,
    }
    Ok(Request::from_parts(parts, full(original)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn content_encodings_are_classified() {
        let mut h = HeaderMap::new();
        assert_eq!(coding(&h).unwrap(), Coding::Identity);
        h.insert(header::CONTENT_ENCODING, "GZIP".parse().unwrap());
        assert_eq!(coding(&h).unwrap(), Coding::Gzip);
        h.insert(header::CONTENT_ENCODING, "identity".parse().unwrap());
        assert_eq!(coding(&h).unwrap(), Coding::Identity);
        for bad in ["br", "gzip, gzip", "deflate"] {
            h.insert(header::CONTENT_ENCODING, bad.parse().unwrap());
            assert!(
                matches!(coding(&h), Err(GatewayError::UnsupportedEncoding(_))),
                "{bad}"
            );
        }
    }
}
