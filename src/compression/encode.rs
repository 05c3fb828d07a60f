//! [`GzipBody`]: gzip-compresses a body frame by frame.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::buf::Writer;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::write::GzEncoder;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::body::BoxError;

pin_project_lite::pin_project! {
    /// Compresses `inner` into one gzip member as it streams: each input frame
    /// is fed to the encoder and whatever compressed output is ready is
    /// yielded; the rest follows when `inner` ends. Memory is the codec's
    /// state plus the compressed form of one input frame. The length is
    /// unknown in advance (no `Content-Length`). Trailers are passed on after
    /// the gzip trailer.
    pub struct GzipBody<B> {
        #[pin]
        inner: B,
        encoder: Option<GzEncoder<Writer<BytesMut>>>,
        trailers: Option<HeaderMap>,
        done: bool,
    }
}

impl<B> GzipBody<B> {
    /// Compresses `inner` at [`super::LEVEL`].
    pub fn new(inner: B) -> Self {
        Self::with_level(inner, super::LEVEL)
    }

    /// Compresses `inner` at `level`.
    pub fn with_level(inner: B, level: flate2::Compression) -> Self {
        GzipBody {
            inner,
            encoder: Some(GzEncoder::new(BytesMut::new().writer(), level)),
            trailers: None,
            done: false,
        }
    }
}

fn take_output(encoder: &mut GzEncoder<Writer<BytesMut>>) -> Bytes {
    encoder.get_mut().get_mut().split().freeze()
}

impl<B> HttpBody for GzipBody<B>
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
            let Some(encoder) = this.encoder.as_mut() else {
                // Unreachable: the encoder is only dropped together with `done`.
                *this.done = true;
                continue;
            };
            let finished = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            let n = chunk.len();
                            if let Err(e) = encoder.write_all(chunk) {
                                return Poll::Ready(Some(Err(Box::new(e))));
                            }
                            data.advance(n);
                        }
                        let out = take_output(encoder);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
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
                let Some(mut encoder) = this.encoder.take() else {
                    continue;
                };
                if let Err(e) = encoder.try_finish() {
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                let out = take_output(&mut encoder);
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    /// Unknown length, but bounded when the input is: at worst every byte
    /// costs nine bits (fixed Huffman codes, which the fastest level uses),
    /// plus block headers and the gzip framing. (The bound lets a retrying
    /// client buffer small compressed bodies.)
    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::default();
        if !self.done
            && let Some(upper) = self.inner.size_hint().upper()
        {
            hint.set_upper(upper.saturating_add(upper / 8).saturating_add(256));
        }
        hint
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http_body_util::BodyExt;

    use super::super::GunzipBody;
    use super::super::test_bodies::chunked;
    use super::*;

    #[tokio::test]
    async fn round_trips_through_gunzip_whatever_the_chunking() {
        let data: Vec<u8> = (0..50_000u32)
            .flat_map(|i| format!("{{\"id\":\"job-{i}\",\"status\":\"Completed\"}},").into_bytes())
            .collect();
        for size in [1, 100, 8192, data.len()] {
            let compressed = GzipBody::new(chunked(&data, size))
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert!(
                compressed.len() * 5 < data.len(),
                "JSON compresses well: {} of {}",
                compressed.len(),
                data.len()
            );
            assert_eq!(&compressed[..2], &[0x1f, 0x8b], "gzip magic");
            let round = GunzipBody::new(chunked(&compressed, 333))
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert!(round == data[..], "chunk size {size}");
        }
    }

    #[tokio::test]
    async fn output_streams_before_the_input_ends() {
        // Incompressible-ish input forces output long before the end.
        let mut rng = fastrand::Rng::with_seed(7);
        let data: Vec<u8> = (0..1 << 20).map(|_| rng.u8(..)).collect();
        let mut body = GzipBody::new(chunked(&data, 64 * 1024));
        let mut frames = 0;
        while let Some(f) = body.frame().await {
            assert!(f.unwrap().into_data().unwrap().len() <= 256 * 1024);
            frames += 1;
        }
        assert!(frames > 4, "{frames} frames");
    }

    #[tokio::test]
    async fn the_size_hint_bounds_the_output_when_the_input_is_bounded() {
        let mut rng = fastrand::Rng::with_seed(1);
        for data in [
            vec![b'a'; 20_000],
            (0..20_000).map(|_| rng.u8(..)).collect(),
            (0..300_000).map(|_| rng.u8(128..)).collect(),
            vec![],
            vec![7],
        ] {
            let body = GzipBody::new(http_body_util::Full::new(Bytes::from(data)));
            let upper = body.size_hint().upper().unwrap();
            let out = body.collect().await.unwrap().to_bytes();
            assert!(out.len() as u64 <= upper, "{} > {upper}", out.len());
        }
        assert_eq!(GzipBody::new(chunked(b"abc", 1)).size_hint().upper(), None);
    }

    #[tokio::test]
    async fn an_empty_body_is_a_valid_empty_gzip_stream() {
        let compressed = GzipBody::new(chunked(b"", 1))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert!(!compressed.is_empty());
        let round = GunzipBody::new(chunked(&compressed, 3))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert!(round.is_empty());
    }
}
