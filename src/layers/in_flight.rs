//! In-flight limit: at most `server.max_in_flight` requests inside the
//! stack; beyond it, an immediate 503 with `Retry-After` (never a queue).

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tower::{Layer, Service};

use std::future::Future;
use std::pin::Pin;

use tokio::sync::OwnedSemaphorePermit;

use super::{GwResult, Req, Resp};
use crate::error::GatewayError;

/// Builds [`InFlightLimit`].
#[derive(Clone, Debug)]
pub struct InFlightLimitLayer {
    permits: Arc<Semaphore>,
}

impl InFlightLimitLayer {
    /// Allows `max` concurrent requests.
    pub fn new(max: usize) -> Self {
        InFlightLimitLayer {
            permits: Arc::new(Semaphore::new(max)),
        }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;
    fn layer(&self, inner: S) -> InFlightLimit<S> {
        InFlightLimit {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct InFlightLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S> Service<Req> for InFlightLimit<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = InFlightFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => InFlightFuture {
                inner: Some(self.inner.call(req)),
                permit: Some(permit),
            },
            Err(_) => InFlightFuture {
                inner: None,
                permit: None,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`InFlightLimit`]: holds the permit until the inner future completes.
    pub struct InFlightFuture<F> {
        #[pin]
        inner: Option<F>,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F: Future<Output = GwResult>> Future for InFlightFuture<F> {
    type Output = GwResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<GwResult> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            None => Poll::Ready(Err(GatewayError::Overloaded)),
            Some(f) => {
                let out = std::task::ready!(f.poll(cx));
                this.permit.take();
                Poll::Ready(out)
            }
        }
    }
}
