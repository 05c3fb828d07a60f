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
    let bytes = bytes.into();
    if bytes.is_empty() {
        // The same body (no frames, exact size 0) without an allocation.
        return empty();
    }
    Full::new(bytes)
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
    let mut chunks = Chunks::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&*e))?;
        if let Ok(data) = frame.into_data() {
            if (chunks.len() as u64).saturating_add(data.len() as u64) > limit {
                return Err(GatewayError::PayloadTooLarge { limit });
            }
            chunks.push(data);
        }
    }
    Ok(chunks.into_bytes())
}

/// Data frames gathered into one buffer, copied only when there is more than
/// one (a small body usually arrives as a single frame, which is kept as is).
#[derive(Debug, Default)]
pub struct Chunks {
    first: Bytes,
    more: Option<BytesMut>,
}

impl Chunks {
    /// Appends a frame's data.
    pub fn push(&mut self, data: Bytes) {
        if let Some(buf) = &mut self.more {
            buf.extend_from_slice(&data);
        } else if self.first.is_empty() {
            self.first = data;
        } else if !data.is_empty() {
            let mut buf = BytesMut::with_capacity(self.first.len() + data.len());
            buf.extend_from_slice(&self.first);
            buf.extend_from_slice(&data);
            self.more = Some(buf);
        }
    }

    /// Bytes gathered so far.
    pub fn len(&self) -> usize {
        self.more.as_ref().map_or(self.first.len(), BytesMut::len)
    }

    /// Whether nothing was gathered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything gathered, as one buffer.
    pub fn into_bytes(self) -> Bytes {
        match self.more {
            Some(buf) => buf.freeze(),
            None => self.first,
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http_body::Body as _;

    use super::*;

    #[test]
    fn chunks_keep_a_single_frame_and_join_several() {
        let one = Bytes::from_static(b"abc");
        let mut c = Chunks::default();
        c.push(Bytes::new());
        c.push(one.clone());
        c.push(Bytes::new());
        assert_eq!(c.len(), 3);
        let out = c.into_bytes();
        assert_eq!(out, "abc");
        assert_eq!(out.as_ptr(), one.as_ptr(), "one frame is not copied");
        let mut c = Chunks::default();
        for part in ["ab", "", "cd", "e"] {
            c.push(Bytes::from(part));
        }
        assert_eq!((c.len(), c.into_bytes()), (5, Bytes::from("abcde")));
        assert!(Chunks::default().is_empty());
    }

    #[tokio::test]
    async fn collect_bounded_joins_frames_and_refuses_over_the_limit() {
        let body = || {
            let frames =
                ["ab", "cd"].map(|s| Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(s))));
            boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
                frames,
            )))
        };
        assert_eq!(collect_bounded(body(), 4).await.unwrap(), "abcd");
        assert!(matches!(
            collect_bounded(body(), 3).await,
            Err(GatewayError::PayloadTooLarge { limit: 3 })
        ));
    }

    #[test]
    fn an_empty_full_body_is_the_empty_body() {
        let b = full(Bytes::new());
        assert!(b.is_end_stream());
        assert_eq!(b.size_hint().exact(), Some(0));
    }
}
