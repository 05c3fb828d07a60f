//! gzip both ways: compressed request bodies (`Content-Encoding: gzip`) and compressed responses
//! (`Accept-Encoding: gzip`), as Zuora documents them.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use http::HeaderMap;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING};

/// Why a request body could not be turned into the payload to process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// `Content-Encoding` names something other than gzip or identity.
    Unsupported,
    /// The gzip stream is broken or truncated.
    Corrupt,
    /// The decompressed payload is over the body limit.
    TooLarge,
}

/// Whether `Accept-Encoding` lets us answer with gzip: `gzip` (or `x-gzip`, or `*`) listed with
/// a non-zero q-value. An explicit `gzip;q=0` wins over `*`.
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip_q = None;
    let mut any_q = None;
    for value in headers.get_all(ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            let q = parts
                .filter_map(|param| {
                    let (name, value) = param.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("q")
                        .then(|| value.trim().parse::<f32>().ok())
                        .flatten()
                })
                .next_back()
                .unwrap_or(1.0);
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                gzip_q = Some(q);
            } else if coding == "*" {
                any_q = Some(q);
            }
        }
    }
    gzip_q.or(any_q).is_some_and(|q| q > 0.0)
}

/// The payload of a request body: gunzipped for `Content-Encoding: gzip`, unchanged for no
/// encoding or `identity`, refused for anything else.
pub(crate) fn decode_request_body(
    headers: &HeaderMap,
    body: &bytes::Bytes,
    limit: usize,
) -> Result<bytes::Bytes, DecodeError> {
    let mut gzip = false;
    for value in headers.get_all(CONTENT_ENCODING) {
        let value = value.to_str().map_err(|_| DecodeError::Unsupported)?;
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("identity") {
                continue;
            }
            // One gzip layer is what Zuora documents; stacked or other codings are refused.
            if (coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip"))
                && !gzip
            {
                gzip = true;
            } else {
                return Err(DecodeError::Unsupported);
            }
        }
    }
    if gzip {
        decompress(body, limit).map(bytes::Bytes::from)
    } else {
        Ok(body.clone())
    }
}

/// Gunzips `data`, refusing output over `limit` bytes (a small bomb must not become 4 GiB).
pub(crate) fn decompress(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit));
    let read_limit = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    GzDecoder::new(data)
        .take(read_limit)
        .read_to_end(&mut out)
        .map_err(|_| DecodeError::Corrupt)?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge);
    }
    Ok(out)
}

/// Gzips a response body.
pub(crate) fn compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(data.len() / 4), Compression::fast());
    encoder.write_all(data)?;
    encoder.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn accept(value: &'static str) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static(value));
        accepts_gzip(&headers)
    }

    #[test]
    fn accept_encoding_parsing() {
        assert!(accept("gzip"));
        assert!(accept("br, GZIP"));
        assert!(accept("gzip, deflate, br"));
        assert!(accept("gzip;q=0.5"));
        assert!(accept("*"));
        assert!(!accept("gzip;q=0"));
        assert!(!accept("gzip; q=0.0, br"));
        assert!(!accept("*, gzip;q=0"));
        assert!(!accept("br"));
        assert!(!accept("identity"));
        assert!(!accept(""));
        assert!(!accept("gzipped"));
        assert!(!accept("*;q=0"));
    }

    #[test]
    fn no_accept_encoding_means_plain() {
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn round_trip() {
        let data = b"{\"status\":\"Stopping\"}".repeat(100);
        let packed = compress(&data).unwrap();
        assert_eq!(decompress(&packed, 1 << 20).unwrap(), data);
    }

    #[test]
    fn corrupt_and_oversized_are_refused() {
        assert_eq!(decompress(b"not gzip", 100), Err(DecodeError::Corrupt));
        let packed = compress(&[0u8; 10_000]).unwrap();
        assert_eq!(
            decompress(&packed[..packed.len() - 4], 1 << 20),
            Err(DecodeError::Corrupt)
        );
        assert_eq!(decompress(&packed, 9_999), Err(DecodeError::TooLarge));
        assert_eq!(decompress(&packed, 10_000).unwrap().len(), 10_000);
    }

    #[test]
    fn content_encoding_rules() {
        let body = bytes::Bytes::from_static(b"{}");
        let mut headers = HeaderMap::new();
        assert_eq!(decode_request_body(&headers, &body, 100).unwrap(), body);
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("identity"));
        assert_eq!(decode_request_body(&headers, &body, 100).unwrap(), body);
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert_eq!(
            decode_request_body(&headers, &body, 100),
            Err(DecodeError::Unsupported)
        );
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip, gzip"));
        assert_eq!(
            decode_request_body(&headers, &body, 100),
            Err(DecodeError::Unsupported)
        );
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let packed = bytes::Bytes::from(compress(b"{}").unwrap());
        assert_eq!(decode_request_body(&headers, &packed, 100).unwrap(), body);
    }
}
