//! The caller's `Accept-Encoding` (RFC 9110 §12.5.3), reduced to what the
//! gateway decides with it: send gzip or not, and whether some other coding
//! is acceptable.

use http::header::ACCEPT_ENCODING;
use http::{HeaderMap, HeaderValue};

use super::is_gzip_token;

/// q-values in thousandths (`q=0.5` → 500).
type Q = u16;

/// A caller's `Accept-Encoding`, parsed once per request.
///
/// Codings are case-insensitive; `x-gzip` counts as `gzip`; `*` stands for
/// every coding not listed; an element with an invalid q-value is ignored.
/// A caller that sends no `Accept-Encoding` at all gets identity (RFC 9110
/// allows any coding then, but callers that do not speak gzip usually send
/// nothing, so the gateway errs on the side of plain bodies).
#[derive(Debug, Clone, Default)]
pub struct AcceptEncoding {
    /// The header's values (joined when several lines were sent).
    raw: Option<HeaderValue>,
    gzip: Option<Q>,
    identity: Option<Q>,
}

impl AcceptEncoding {
    /// Parses the `Accept-Encoding` header(s) of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> AcceptEncoding {
        let mut values = headers.get_all(ACCEPT_ENCODING).iter();
        let raw = match (values.next(), values.next()) {
            (None, _) => None,
            (Some(one), None) => Some(one.clone()),
            (Some(_), Some(_)) => {
                let joined: Vec<&[u8]> = headers
                    .get_all(ACCEPT_ENCODING)
                    .iter()
                    .map(HeaderValue::as_bytes)
                    .collect();
                HeaderValue::from_bytes(&joined.join(&b", "[..])).ok()
            }
        };
        let mut this = AcceptEncoding {
            raw,
            gzip: None,
            identity: None,
        };
        this.gzip = this.q(is_gzip_token);
        this.identity = this.q(|c| c.eq_ignore_ascii_case("identity"));
        this
    }

    /// Whether the caller should get a gzip body: gzip has a non-zero q and
    /// identity is not explicitly preferred over it (ties go to gzip, which
    /// costs the gateway nothing when Zuora already compressed the body).
    pub fn prefers_gzip(&self) -> bool {
        match (self.gzip, self.identity) {
            (Some(g), Some(i)) => g > 0 && g >= i,
            (Some(g), None) => g > 0,
            (None, _) => false,
        }
    }

    /// Whether `coding` is acceptable at all (q > 0). `identity` is acceptable
    /// unless refused with `q=0` (or `*;q=0` without an `identity` element).
    pub fn accepts(&self, coding: &str) -> bool {
        if coding.eq_ignore_ascii_case("identity") {
            return self.identity != Some(0);
        }
        let q = if is_gzip_token(coding) {
            self.gzip
        } else {
            self.q(|c| c.eq_ignore_ascii_case(coding))
        };
        q.is_some_and(|q| q > 0)
    }

    /// The q-value for codings matching `is_coding`: the first explicit
    /// element, else the `*` element, else `None` (not mentioned).
    fn q(&self, is_coding: impl Fn(&str) -> bool) -> Option<Q> {
        let text = self.raw.as_ref()?.to_str().ok()?;
        let mut star = None;
        for element in text.split(',') {
            let mut parts = element.split(';');
            let coding = parts.next().unwrap_or("").trim();
            if coding.is_empty() {
                continue;
            }
            let mut q = Some(1000);
            for param in parts {
                let Some((name, value)) = param.split_once('=') else {
                    continue;
                };
                if name.trim().eq_ignore_ascii_case("q") {
                    q = parse_q(value.trim());
                }
            }
            let Some(q) = q else {
                continue;
            };
            if is_coding(coding) {
                return Some(q);
            }
            if coding == "*" && star.is_none() {
                star = Some(q);
            }
        }
        star
    }
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`.
fn parse_q(s: &str) -> Option<Q> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: Q = 0;
    for (i, b) in frac.bytes().enumerate() {
        thousandths += Q::from(b - b'0') * [100, 10, 1][i];
    }
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ae(values: &[&str]) -> AcceptEncoding {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        AcceptEncoding::from_headers(&h)
    }

    #[test]
    fn gzip_is_preferred_only_when_acceptable_and_not_outranked() {
        let yes = [
            "gzip",
            "GZIP",
            "x-gzip",
            "gzip, deflate, br",
            "br;q=1.0, gzip;q=0.8",
            "*",
            "*;q=0.5",
            "gzip;q=0.5, identity;q=0.5",
            "identity;q=0, *",
        ];
        for v in yes {
            assert!(ae(&[v]).prefers_gzip(), "{v}");
        }
        let no = [
            "",
            "identity",
            "gzip;q=0",
            "gzip; q=0.000",
            "GZIP;Q=0",
            "deflate, br",
            "*;q=0",
            "gzip;q=0.5, identity",
            "*;q=0.5, gzip;q=0",
            "gzip;q=2",
            "gzip;q=0.5.1",
            "gzip;q=0.1234",
        ];
        for v in no {
            assert!(!ae(&[v]).prefers_gzip(), "{v}");
        }
        assert!(!ae(&[]).prefers_gzip(), "no header");
    }

    #[test]
    fn several_header_lines_are_one_list() {
        assert!(ae(&["identity;q=0.1", "gzip"]).prefers_gzip());
        assert!(!ae(&["gzip;q=0.1", "identity"]).prefers_gzip());
    }

    #[test]
    fn other_codings_and_identity_acceptance() {
        let a = ae(&["br;q=0.3, deflate;q=0"]);
        assert!(a.accepts("br") && a.accepts("BR"));
        assert!(!a.accepts("deflate"));
        assert!(!a.accepts("gzip"));
        assert!(a.accepts("identity"));
        assert!(!ae(&["*;q=0"]).accepts("identity"));
        assert!(ae(&["*;q=0, identity"]).accepts("identity"));
        assert!(ae(&["*"]).accepts("zstd"));
        assert!(ae(&[]).accepts("identity"));
        assert!(!ae(&[]).accepts("gzip"));
    }

    #[test]
    fn q_values_parse_strictly() {
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("1.000"), Some(1000));
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("0.05"), Some(50));
        assert_eq!(parse_q("0.001"), Some(1));
        assert_eq!(parse_q("0"), Some(0));
        assert_eq!(parse_q("1.5"), None);
        assert_eq!(parse_q("-0"), None);
        assert_eq!(parse_q(".5"), None);
        assert_eq!(parse_q(""), None);
    }
}
