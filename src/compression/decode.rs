//! [`GunzipBody`]: decodes a gzip body frame by frame.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::buf::Writer;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::write::MultiGzDecoder;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame};

use super::InvalidGzip;
use crate::body::BoxError;

pin_project_lite::pin_project! {
    /// Decodes the gzip stream carried by `inner`, yielding decoded data as it
    /// becomes available: nothing is buffered beyond the codec's own window
    /// and one output chunk (at most 32 KiB per write into the codec), so a
    /// highly compressed body never expands in memory.
    ///
    /// Concatenated gzip members are decoded one after the other. A corrupt,
    /// truncated or CRC-mismatched stream ends the body with an
    /// [`InvalidGzip`] error; an empty `inner` is an empty body (some servers
    /// label empty bodies `gzip`). Trailers of `inner` are passed on after
    /// the last data.
    pub struct GunzipBody<B> {
        #[pin]
        inner: B,
        decoder: Option<MultiGzDecoder<Writer<BytesMut>>>,
        pending: Bytes,
        seen_input: bool,
        trailers: Option<HeaderMap>,
        done: bool,
    }
}

impl<B> GunzipBody<B> {
    /// Decodes `inner`.
    pub fn new(inner: B) -> Self {
        GunzipBody {
            inner,
            decoder: Some(MultiGzDecoder::new(BytesMut::new().writer())),
            pending: Bytes::new(),
            seen_input: false,
            trailers: None,
            done: false,
        }
    }
}

fn invalid(e: std::io::Error) -> BoxError {
    Box::new(InvalidGzip(e.to_string()))
}

/// Takes what the decoder has written so far.
fn take_output(decoder: &mut MultiGzDecoder<Writer<BytesMut>>) -> Bytes {
    decoder.get_mut().get_mut().split().freeze()
}

impl<B> HttpBody for GunzipBody<B>
where
    B: HttpBody,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let Some(decoder) = this.decoder.as_mut() else {
                // Unreachable: the decoder is only dropped together with `done`.
                *this.done = true;
                continue;
            };
            if !this.pending.is_empty() {
                let n = match decoder.write(this.pending) {
                    Ok(0) => {
                        return Poll::Ready(Some(Err(invalid(std::io::Error::other(
                            "the decoder made no progress",
                        )))));
                    }
                    Ok(n) => n,
                    Err(e) => return Poll::Ready(Some(Err(invalid(e)))),
                };
                this.pending.advance(n);
                if this.pending.is_empty() {
                    // Move what the codec holds to the output before waiting for more input.
                    if let Err(e) = decoder.flush() {
                        return Poll::Ready(Some(Err(invalid(e))));
                    }
                }
                let out = take_output(decoder);
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                continue;
            }
            let finished = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let data = data.copy_to_bytes(data.remaining());
                        if !data.is_empty() {
                            *this.seen_input = true;
                            *this.pending = data;
                        }
                        false
                    }
                    Err(frame) => {
                        *this.trailers = frame.into_trailers().ok();
                        true
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => true,
            };
            if finished {
                *this.done = true;
                let Some(mut decoder) = this.decoder.take() else {
                    continue;
                };
                if !*this.seen_input {
                    continue;
                }
                if let Err(e) = decoder.try_finish() {
                    return Poll::Ready(Some(Err(invalid(e))));
                }
                let out = take_output(&mut decoder);
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http_body_util::BodyExt;

    use super::super::test_bodies::{chunked, gz};
    use super::*;

    #[tokio::test]
    async fn decodes_whatever_the_chunking() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{{\"n\":{i}}},").into_bytes())
            .collect();
        let compressed = gz(&data);
        for size in [1, 7, 1000, 16 * 1024, compressed.len()] {
            let out = GunzipBody::new(chunked(&compressed, size))
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(out.len(), data.len(), "chunk size {size}");
            assert!(out == data[..], "chunk size {size}");
        }
    }

    #[tokio::test]
    async fn a_bomb_is_decoded_in_bounded_frames() {
        let compressed = gz(&vec![0u8; 32 << 20]);
        let mut body = GunzipBody::new(chunked(&compressed, compressed.len()));
        let (mut total, mut largest) = (0usize, 0usize);
        while let Some(frame) = body.frame().await {
            let n = frame.unwrap().into_data().unwrap().len();
            total += n;
            largest = largest.max(n);
        }
        assert_eq!(total, 32 << 20);
        assert!(largest <= 64 * 1024, "largest frame {largest}");
    }

    #[tokio::test]
    async fn corrupt_truncated_and_mismatched_streams_are_errors() {
        let good = gz(br#"{"success":true}"#);
        let mut crc = good.clone();
        let at = crc.len() - 8;
        crc[at] ^= 1;
        for (name, bad) in [
            ("not gzip", b"{\"success\":true}".to_vec()),
            ("truncated", good[..good.len() - 4].to_vec()),
            ("crc", crc),
        ] {
            let err = GunzipBody::new(chunked(&bad, 5))
                .collect()
                .await
                .unwrap_err();
            assert!(err.downcast_ref::<InvalidGzip>().is_some(), "{name}: {err}");
        }
    }

    #[tokio::test]
    async fn empty_input_is_an_empty_body() {
        let out = GunzipBody::new(chunked(b"", 1))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn concatenated_members_and_trailers_pass() {
        let mut data = gz(b"hello ");
        data.extend(gz(b"world"));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-check", http::HeaderValue::from_static("1"));
        let body = super::super::test_bodies::with_trailers(&data, trailers);
        let collected = GunzipBody::new(body).collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-check"], "1");
        assert_eq!(&collected.to_bytes()[..], b"hello world");
    }
}
