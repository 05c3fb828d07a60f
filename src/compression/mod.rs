//! gzip in both directions. This module owns every use of the codec.
//!
//! - [`gunzip_bounded`] decodes a whole body for validation, never producing
//!   more than a limit.
//! - [`gzip_decoded_len`] checks a whole gzip body (valid, decoded size within
//!   a limit) while keeping none of the decoded bytes.
//! - [`GunzipBody`] and [`GzipBody`] are streaming `http_body::Body` adapters
//!   (decode / encode frame by frame, never buffering a whole body).
//! - [`CountingBody`] and [`BodyMetrics`] count wire bytes on each side.
//! - [`AcceptEncoding`] and [`ContentCoding`] parse the two headers.
//!
//! The layers that apply them are [`crate::layers::request_body`] (caller
//! side guards) and [`crate::layers::compression`] (negotiation).

mod accept;
mod count;
mod decode;
mod encode;

use std::io::{Read, Write};

use bytes::Bytes;
use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};

pub use accept::AcceptEncoding;
pub use count::{BodyLabels, BodyMetrics, CountingBody};
pub use decode::GunzipBody;
pub use encode::GzipBody;

use crate::error::GatewayError;

/// The gzip compression level used for everything the gateway compresses.
/// Level 1 keeps most of the size saving on JSON at a fraction of the CPU of
/// the default level (see `docs/compression.md` for the measurements).
pub const LEVEL: flate2::Compression = flate2::Compression::fast();

/// A gzip stream that is not valid (bad header, corrupt deflate data, CRC or
/// length mismatch, truncated).
#[derive(Debug, thiserror::Error)]
#[error("invalid gzip data: {0}")]
pub struct InvalidGzip(pub String);

/// Decodes a complete gzip body, refusing to produce more than `limit` bytes
/// (a gzip bomb never allocates more than the limit).
/// Corrupt input → `InvalidValue` (400, category 20); too large → `PayloadTooLarge` (413).
pub fn gunzip_bounded(input: &[u8], limit: u64) -> Result<Bytes, GatewayError> {
    let decoder = flate2::read::MultiGzDecoder::new(input);
    let mut out = Vec::with_capacity(input.len().saturating_mul(4).min(limit as usize));
    // Read one byte past the limit to tell "exactly at the limit" from "over".
    let read = decoder
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| {
            GatewayError::InvalidValue(format!("the request body is not valid gzip: {e}"))
        })?;
    if read as u64 > limit {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    Ok(Bytes::from(out))
}

/// Decoded bytes checked between two cooperative yields in [`gzip_decoded_len`].
const CHECK_SLICE: u64 = 1024 * 1024;

/// Checks a complete gzip body without keeping any decoded byte: returns its
/// decoded length, `PayloadTooLarge` as soon as decoding passes `limit`, or
/// `InvalidValue` (400, category 20) if it is not valid gzip.
///
/// Memory stays at the codec's own state (a few tens of KB) whatever the
/// input; the work yields to the runtime every MiB of output so a large body
/// does not hold a worker thread.
pub async fn gzip_decoded_len(input: &[u8], limit: u64) -> Result<u64, GatewayError> {
    let mut check = GzipCheck::new(limit);
    loop {
        if let Some(len) = check.step(input, CHECK_SLICE)? {
            return Ok(len);
        }
        tokio::task::yield_now().await;
    }
}

/// The resumable form of [`gzip_decoded_len`], for hand-written futures:
/// call [`GzipCheck::step`] with the same input until it returns a length.
pub struct GzipCheck {
    decoder: flate2::write::MultiGzDecoder<CountingSink>,
    consumed: usize,
    limit: u64,
}

impl std::fmt::Debug for GzipCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GzipCheck")
            .field("consumed", &self.consumed)
            .field("decoded", &self.decoder.get_ref().0)
            .field("limit", &self.limit)
            .finish()
    }
}

impl GzipCheck {
    /// A check refusing more than `limit` decoded bytes.
    pub fn new(limit: u64) -> Self {
        GzipCheck {
            decoder: flate2::write::MultiGzDecoder::new(CountingSink(0)),
            consumed: 0,
            limit,
        }
    }

    /// Decodes about `budget` more bytes of `input` (always the whole body).
    /// `Ok(Some(len))` once the body is checked, `Ok(None)` when the budget
    /// ran out first (call again), or the error.
    pub fn step(&mut self, input: &[u8], budget: u64) -> Result<Option<u64>, GatewayError> {
        let invalid = |e: std::io::Error| {
            GatewayError::InvalidValue(format!("the request body is not valid gzip: {e}"))
        };
        if input.is_empty() {
            return Err(invalid(std::io::Error::other("the body is empty")));
        }
        let stop_at = self.decoder.get_ref().0.saturating_add(budget);
        while let Some(rest) = input.get(self.consumed..).filter(|r| !r.is_empty()) {
            let n = self.decoder.write(rest).map_err(invalid)?;
            if n == 0 {
                return Err(invalid(std::io::Error::other(
                    "the decoder made no progress",
                )));
            }
            self.consumed += n;
            let decoded = self.decoder.get_ref().0;
            if decoded > self.limit {
                return Err(GatewayError::PayloadTooLarge { limit: self.limit });
            }
            if decoded >= stop_at {
                return Ok(None);
            }
        }
        self.decoder.try_finish().map_err(invalid)?;
        let decoded = self.decoder.get_ref().0;
        if decoded > self.limit {
            return Err(GatewayError::PayloadTooLarge { limit: self.limit });
        }
        Ok(Some(decoded))
    }
}

/// A writer that counts and discards.
struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len() as u64);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The content coding of a message, from its `Content-Encoding` header(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentCoding {
    /// No header, an empty one, or only `identity`.
    Identity,
    /// Exactly one `gzip` (or its alias `x-gzip`) coding.
    Gzip,
    /// Anything else (`br`, `deflate`, `compress`, stacked codings such as
    /// `gzip, gzip`), as sent (for messages; non-ASCII is replaced).
    Other(String),
}

impl ContentCoding {
    /// Reads the `Content-Encoding` header(s) of `headers`. `identity` entries
    /// are ignored; codings are case-insensitive.
    pub fn of(headers: &HeaderMap) -> ContentCoding {
        let mut count = 0usize;
        let mut gzip = true;
        let mut printable = true;
        for value in headers.get_all(CONTENT_ENCODING) {
            let Ok(text) = value.to_str() else {
                printable = false;
                gzip = false;
                count += 1;
                continue;
            };
            for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if coding.eq_ignore_ascii_case("identity") {
                    continue;
                }
                count += 1;
                gzip &= is_gzip_token(coding);
            }
        }
        match count {
            0 => ContentCoding::Identity,
            1 if gzip => ContentCoding::Gzip,
            _ if printable => ContentCoding::Other(
                headers
                    .get_all(CONTENT_ENCODING)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            _ => ContentCoding::Other("<non-ASCII value>".to_owned()),
        }
    }
}

/// `gzip` or its legacy alias `x-gzip`, case-insensitive.
pub(crate) fn is_gzip_token(coding: &str) -> bool {
    coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip")
}

/// Whether a body of this `Content-Type` is worth compressing: not images,
/// audio, video or archives that are compressed already.
pub fn is_compressible(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    let (kind, subtype) = essence.split_once('/').unwrap_or((essence, ""));
    let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    if is(kind, "image") && !is(subtype, "svg+xml") || is(kind, "audio") || is(kind, "video") {
        return false;
    }
    const COMPRESSED: [&str; 10] = [
        "zip",
        "gzip",
        "x-gzip",
        "x-compress",
        "x-7z-compressed",
        "x-rar-compressed",
        "x-bzip2",
        "x-xz",
        "zstd",
        "pdf",
    ];
    !COMPRESSED.iter().any(|c| is(subtype, c))
}

/// Bodies for the unit tests of this module and the layers.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_bodies {
    use std::io::Write;

    use bytes::Bytes;
    use http::HeaderMap;
    use http_body::Frame;
    use http_body_util::StreamBody;

    use crate::body::BoxError;

    /// `data` gzip-compressed at the default level.
    pub(crate) fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    type Frames =
        StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>>;

    /// A body of unknown length yielding `data` in frames of `size` bytes.
    pub(crate) fn chunked(data: &[u8], size: usize) -> Frames {
        let frames: Vec<_> = data
            .chunks(size.max(1))
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    /// `data` in one frame followed by `trailers`.
    pub(crate) fn with_trailers(data: &[u8], trailers: HeaderMap) -> Frames {
        let frames = vec![
            Ok(Frame::data(Bytes::copy_from_slice(data))),
            Ok(Frame::trailers(trailers)),
        ];
        StreamBody::new(futures_util::stream::iter(frames))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http::HeaderValue;

    use super::test_bodies::gz;
    use super::*;

    #[test]
    fn decodes_within_limit_and_refuses_beyond() {
        let data = vec![b'a'; 10_000];
        assert_eq!(gunzip_bounded(&gz(&data), 10_000).unwrap().len(), 10_000);
        assert!(matches!(
            gunzip_bounded(&gz(&data), 9_999),
            Err(GatewayError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            gunzip_bounded(b"not gzip", 100),
            Err(GatewayError::InvalidValue(_))
        ));
    }

    #[tokio::test]
    async fn decoded_len_check_counts_without_keeping_output() {
        let data = vec![b'a'; 10_000];
        assert_eq!(gzip_decoded_len(&gz(&data), 10_000).await.unwrap(), 10_000);
        assert!(matches!(
            gzip_decoded_len(&gz(&data), 9_999).await,
            Err(GatewayError::PayloadTooLarge { limit: 9_999 })
        ));
    }

    #[tokio::test]
    async fn decoded_len_check_refuses_a_bomb_early() {
        // 64 MiB of zeros compresses to ~64 KB; the check stops just past the limit.
        let bomb = gz(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 100_000);
        let err = gzip_decoded_len(&bomb, 1 << 20).await.unwrap_err();
        assert!(matches!(err, GatewayError::PayloadTooLarge { limit } if limit == 1 << 20));
    }

    #[tokio::test]
    async fn decoded_len_check_refuses_corrupt_truncated_and_empty_input() {
        let good = gz(br#"{"status":"Stopping"}"#);
        for bad in [&b"not gzip at all"[..], &good[..good.len() - 3], &[][..]] {
            assert!(
                matches!(
                    gzip_decoded_len(bad, 1000).await,
                    Err(GatewayError::InvalidValue(_))
                ),
                "{bad:?}"
            );
        }
        let mut flipped = good.clone();
        let crc_at = flipped.len() - 8;
        flipped[crc_at] ^= 0xff;
        assert!(matches!(
            gzip_decoded_len(&flipped, 1000).await,
            Err(GatewayError::InvalidValue(_))
        ));
    }

    #[tokio::test]
    async fn decoded_len_check_accepts_concatenated_members() {
        let mut two = gz(b"hello ");
        two.extend(gz(b"world"));
        assert_eq!(gzip_decoded_len(&two, 100).await.unwrap(), 11);
    }

    fn ce(values: &[&str]) -> ContentCoding {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        ContentCoding::of(&h)
    }

    #[test]
    fn content_coding_is_identity_gzip_or_other() {
        assert_eq!(ce(&[]), ContentCoding::Identity);
        assert_eq!(ce(&["identity"]), ContentCoding::Identity);
        assert_eq!(ce(&[""]), ContentCoding::Identity);
        assert_eq!(ce(&["gzip"]), ContentCoding::Gzip);
        assert_eq!(ce(&["GZip"]), ContentCoding::Gzip);
        assert_eq!(ce(&["x-gzip"]), ContentCoding::Gzip);
        assert_eq!(ce(&["identity, gzip"]), ContentCoding::Gzip);
        assert_eq!(
            ce(&["gzip, gzip"]),
            ContentCoding::Other("gzip, gzip".into())
        );
        assert_eq!(
            ce(&["gzip", "gzip"]),
            ContentCoding::Other("gzip, gzip".into())
        );
        assert_eq!(ce(&["compress"]), ContentCoding::Other("compress".into()));
        assert_eq!(ce(&["br"]), ContentCoding::Other("br".into()));
        assert_eq!(ce(&["deflate"]), ContentCoding::Other("deflate".into()));
    }

    #[test]
    fn compressible_types() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            is_compressible(&h)
        };
        assert!(is_compressible(&HeaderMap::new()));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("text/csv"));
        assert!(with("image/svg+xml"));
        assert!(!with("image/png"));
        assert!(!with("application/zip"));
        assert!(!with("application/gzip"));
        assert!(with("application/octet-stream"));
    }
}
