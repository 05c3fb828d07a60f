//! Rescue: the one edge where a [`GatewayError`] becomes a response.
//!
//! Everything inside this layer returns typed errors; everything outside it
//! (track ID, telemetry, the server) sees only responses.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{Req, Resp};
use crate::error::GatewayError;

/// Builds [`Rescue`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RescueLayer;

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue { inner }
    }
}

/// Maps `Err(GatewayError)` to its Zuora-shaped response; the error itself is
/// stored in the response extensions for logs and metrics.
#[derive(Debug, Clone)]
pub struct Rescue<S> {
    inner: S,
}

/// Extension on a rescued response: what failed (kind and code), for logs.
#[derive(Debug, Clone)]
pub struct RescuedError {
    /// Stable label (`GatewayError::kind`).
    pub kind: &'static str,
    /// The eight-digit reason code.
    pub code: String,
    /// Detail for logs only (never sent for internal errors).
    pub detail: String,
}

impl<S> Service<Req> for Rescue<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = RescueFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
            // Readiness errors are surfaced by `call` instead (our services are always ready).
            Poll::Ready(Err(_)) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        RescueFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Rescue`].
    pub struct RescueFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Future for RescueFuture<F>
where
    F: Future<Output = Result<Resp, GatewayError>>,
{
    type Output = Result<Resp, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(resp)) => Poll::Ready(Ok(resp)),
            Poll::Ready(Err(err)) => Poll::Ready(Ok(into_response(err))),
        }
    }
}

/// Converts an error into its response, attaching [`RescuedError`].
pub fn into_response(err: GatewayError) -> Resp {
    if let GatewayError::Internal(detail) = &err {
        tracing::error!(detail = %detail, "internal gateway error");
    }
    let mut resp = err.to_response();
    let detail = match &err {
        GatewayError::Internal(d) => d.clone(),
        other => other.to_string(),
    };
    resp.extensions_mut().insert(RescuedError {
        kind: err.kind(),
        code: err.code(),
        detail,
    });
    resp
}
