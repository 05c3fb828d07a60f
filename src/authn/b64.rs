//! A minimal base64url decoder, used only to explain why a token header was
//! refused (jsonwebtoken does the real decoding).

/// Decodes base64url (padding optional); `None` on any invalid input.
pub(crate) fn decode_url_safe(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character (6 bits) cannot encode a byte.
    if bits >= 6 {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_unpadded_base64url() {
        assert_eq!(
            decode_url_safe("eyJhbGciOiJub25lIn0").as_deref(),
            Some(&b"{\"alg\":\"none\"}"[..])
        );
        assert_eq!(decode_url_safe("YQ").as_deref(), Some(&b"a"[..]));
        assert_eq!(decode_url_safe("YWI").as_deref(), Some(&b"ab"[..]));
        assert_eq!(decode_url_safe("YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(decode_url_safe("_-8").as_deref(), Some(&[0xff, 0xef][..]));
        assert_eq!(decode_url_safe("Y"), None);
        assert_eq!(decode_url_safe("a b"), None);
    }
}
