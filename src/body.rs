//! The one body type used through the stack, and small constructors.
//!
//! Requests and responses carry a boxed body so that layers can replace it
//! (validation buffers, gzip streams) without changing the service types.

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

use crate::error::GatewayError;

/// Boxed error carried by bodies and the hyper client.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The request/response body type used by every layer.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Reads a whole request body, refusing more than `limit` bytes
/// (`PayloadTooLarge`). A failure inside the body maps via [`body_error`].
pub async fn collect_bounded(mut body: Body, limit: u64) -> Result<Bytes, GatewayError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&*e))?;
        if let Ok(data) = frame.into_data() {
            if (buf.len() as u64).saturating_add(data.len() as u64) > limit {
                return Err(GatewayError::PayloadTooLarge { limit });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// What a failed request body means for the caller: a gateway error raised
/// by a body layer further out (size limit, read timeout, corrupt gzip) is
/// returned as is; anything else means the body could not be read.
pub fn body_error(e: &(dyn std::error::Error + 'static)) -> GatewayError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(gw) = s.downcast_ref::<GatewayError>() {
            return gw.clone();
        }
        source = s.source();
    }
    GatewayError::InvalidValue(format!("the request body could not be read: {e}"))
}
