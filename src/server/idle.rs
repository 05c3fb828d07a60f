//! Giving back an idle HTTP/1 connection's buffers.
//!
//! hyper's HTTP/1 server connection keeps its 8 KiB read buffer, its 8 KiB
//! write buffer and a cached header map for as long as the connection is
//! open, so every idle keep-alive connection costs ≈ 20 KiB. A connection
//! that stays idle for a whole [`SWEEP_EVERY`] is given up instead
//! (`http1::Connection::into_parts`): the socket and its framing guard stay,
//! hyper's state is dropped, and a new hyper connection is built at the
//! caller's next bytes, as for a new connection.
//!
//! That is only sound when hyper holds nothing of a message. The connection's
//! [`Verdict`] tells (see [`Verdict::idle`]): the framing guard publishes how
//! many heads it passed and whether it stands between messages; the request
//! and response bodies here report when hyper is done with them.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::h1_guard::Verdict;
use crate::body::{Body, BoxError};
use crate::error::GatewayError;

/// How often each worker asks its connections whether they are idle; a
/// connection idle at two asks in a row gives up hyper's state.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The caller's request body: a read failure (bad chunk framing, the caller
/// going away) becomes a caller error, never "Zuora failed"; a body that is
/// not empty reports when it was read to its end.
pub(super) struct CallerBody {
    inner: Incoming,
    /// Until the end is read (`None` for a body that was empty).
    open: Option<Arc<Verdict>>,
}

impl CallerBody {
    pub(super) fn new(inner: Incoming, verdict: &Arc<Verdict>) -> Self {
        let open = (!inner.is_end_stream()).then(|| {
            verdict.note_body_open();
            verdict.clone()
        });
        CallerBody { inner, open }
    }

    fn read_to_end(&mut self) {
        if let Some(v) = self.open.take() {
            v.note_body_read();
        }
    }
}

impl HttpBody for CallerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => {
                this.read_to_end();
                Poll::Ready(None)
            }
            Some(Ok(frame)) => {
                if this.inner.is_end_stream() {
                    this.read_to_end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(BoxError::from(GatewayError::InvalidValue(
                format!("the request body could not be read: {e}"),
            ))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CallerBody {
    fn drop(&mut self) {
        if let Some(v) = self.open.take() {
            v.note_body_dropped();
        }
    }
}

/// The response body as hyper sees it: reports when hyper drops it (written
/// to its end, or abandoned with the connection).
pub(super) struct ResponseBody {
    inner: Body,
    done: Option<Arc<Verdict>>,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(v) = self.done.take() {
            v.note_response_done();
        }
    }
}

/// The stack's response future, its body wrapped in a [`ResponseBody`].
pub(super) struct Respond<F> {
    inner: F,
    verdict: Option<Arc<Verdict>>,
}

impl<F> Respond<F> {
    pub(super) fn new(inner: F, verdict: &Arc<Verdict>) -> Self {
        Respond {
            inner,
            verdict: Some(verdict.clone()),
        }
    }
}

impl<F> Future for Respond<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>> + Unpin,
{
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = ready!(Pin::new(&mut this.inner).poll(cx));
        let done = this.verdict.take();
        Poll::Ready(response.map(|r| r.map(|inner| ResponseBody { inner, done })))
    }
}
