//! gzip in both directions. This module owns every use of the codec.

use std::io::Read;

use bytes::Bytes;

use crate::error::GatewayError;

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

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
}
