//! Reading request bodies with a size limit.

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

/// The largest request body the simulator reads (compressed or not).
pub(crate) const MAX_BODY: usize = 20 * 1024 * 1024;

/// Why a request body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Over [`MAX_BODY`].
    TooLarge,
    /// The peer went away or sent a broken body.
    Broken,
}

/// Reads the whole body, up to [`MAX_BODY`].
pub(crate) async fn read(body: Incoming) -> Result<Bytes, BodyError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Broken),
    }
}

/// Reads and drops the body without buffering it, so an HTTP/1.1 connection stays reusable.
/// Stops after [`MAX_BODY`] bytes (the connection is then not reused; that is fine).
pub(crate) async fn drain(mut body: Incoming) {
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            seen = seen.saturating_add(data.len());
            if seen > MAX_BODY {
                return;
            }
        }
    }
}
