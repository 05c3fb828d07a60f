//! Zuora-shaped responses: request ids, error bodies with 8-digit reason codes, and the headers
//! every response carries.

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, VARY};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use super::control::SimControl;
use super::gzip;

/// `Zuora-Request-Id`: the id Zuora support asks for.
pub(crate) static ZUORA_REQUEST_ID: HeaderName = HeaderName::from_static("zuora-request-id");
/// `Zuora-Track-Id`: a caller-chosen id that Zuora echoes back.
pub(crate) static ZUORA_TRACK_ID: HeaderName = HeaderName::from_static("zuora-track-id");
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
static CONCURRENCY_LIMIT_TYPE: HeaderName = HeaderName::from_static("concurrency-limit-type");
static CONCURRENCY_LIMIT_LIMIT: HeaderName = HeaderName::from_static("concurrency-limit-limit");
static CONCURRENCY_LIMIT_REMAINING: HeaderName =
    HeaderName::from_static("concurrency-limit-remaining");

const JSON_UTF8: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");
const GZIP: HeaderValue = HeaderValue::from_static("gzip");
const ACCEPT_ENCODING: HeaderValue = HeaderValue::from_static("Accept-Encoding");
/// The per-minute API quota of a Production tenant, in the draft's `limit;w=window` form.
const RATELIMIT_LIMIT_VALUE: HeaderValue = HeaderValue::from_static("50000;w=60");
const CONCURRENCY_TYPE_VALUE: HeaderValue = HeaderValue::from_static("Default");

/// Zuora's documented response-compression threshold.
const GZIP_THRESHOLD: usize = 1000;

/// The second half of an 8-digit Zuora reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Category {
    PermissionDenied,
    AuthenticationFailed,
    InvalidValue,
    MissingField,
    MissingParameter,
    RuleRestriction,
    NotFound,
    UnsupportedMethod,
    LockingContention,
    InternalError,
    TemporaryError,
    LimitExceeded,
    MalformedJson,
    IntegrationError,
}

impl Category {
    fn value(self) -> u32 {
        match self {
            Self::PermissionDenied => 10,
            Self::AuthenticationFailed => 11,
            Self::InvalidValue => 20,
            Self::MissingField => 22,
            Self::MissingParameter => 23,
            Self::RuleRestriction => 30,
            Self::NotFound => 40,
            Self::UnsupportedMethod => 45,
            Self::LockingContention => 50,
            Self::InternalError => 60,
            Self::TemporaryError => 61,
            Self::LimitExceeded => 70,
            Self::MalformedJson => 90,
            Self::IntegrationError => 99,
        }
    }

    /// The category Zuora would use for an HTTP status (for injected statuses).
    pub(crate) fn for_status(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::InvalidValue,
            401 => Self::AuthenticationFailed,
            403 => Self::PermissionDenied,
            404 => Self::NotFound,
            405 => Self::UnsupportedMethod,
            409 => Self::LockingContention,
            429 => Self::LimitExceeded,
            502..=504 => Self::TemporaryError,
            _ if status.is_server_error() => Self::InternalError,
            _ if status.is_client_error() => Self::RuleRestriction,
            _ => Self::IntegrationError,
        }
    }
}

/// A 6-digit resource code; combined with a [`Category`] it makes a reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resource(pub(crate) u32);

impl Resource {
    /// OAuth and bearer-token authentication (`90000011` is Zuora's "Authentication error").
    pub(crate) const AUTH: Self = Self(900_000);
    /// Anything not tied to one API resource: unknown paths, bodies, injected faults.
    pub(crate) const GENERIC: Self = Self(500_000);

    /// The 8-digit reason code, as Zuora's examples show it: an integer.
    pub(crate) fn code(self, category: Category) -> u32 {
        self.0 * 100 + category.value()
    }
}

/// The reason code for a bad or expired bearer token.
pub(crate) const AUTHENTICATION_ERROR: u32 = 90_000_011;

/// A UUID-shaped (version 4) random id, kept on the stack.
#[derive(Clone, Copy)]
pub(crate) struct RequestId([u8; 36]);

impl RequestId {
    pub(crate) fn random() -> Self {
        let mut bits = fastrand::u128(..);
        // Version 4, RFC 4122 variant: what a real UUID generator would produce.
        bits = (bits & !(0xF << 76)) | (0x4 << 76);
        bits = (bits & !(0x3 << 62)) | (0x2 << 62);
        let mut out = [b'-'; 36];
        let mut shift = 128;
        for (i, slot) in out.iter_mut().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                continue;
            }
            shift -= 4;
            *slot = HEX_LOWER[((bits >> shift) & 0xF) as usize];
        }
        Self(out)
    }

    pub(crate) fn as_str(&self) -> &str {
        // Always ASCII hex and dashes.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    fn header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.0).unwrap_or(HeaderValue::from_static(""))
    }
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";
const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// `len` random lowercase hex digits (job ids, tokens).
pub(crate) fn random_hex(len: usize) -> String {
    (0..len)
        .map(|_| char::from(HEX_LOWER[fastrand::usize(..16)]))
        .collect()
}

/// A Zuora `processId`: 16 random uppercase hex digits.
pub(crate) fn process_id() -> String {
    (0..16)
        .map(|_| char::from(HEX_UPPER[fastrand::usize(..16)]))
        .collect()
}

/// What one request needs to know to answer the Zuora way.
pub(crate) struct Ctx {
    pub(crate) request_id: RequestId,
    track_id: Option<HeaderValue>,
    accepts_gzip: bool,
}

impl Ctx {
    pub(crate) fn new(headers: &HeaderMap) -> Self {
        Self {
            request_id: RequestId::random(),
            track_id: headers.get(&ZUORA_TRACK_ID).cloned(),
            accepts_gzip: gzip::accepts_gzip(headers),
        }
    }
}

/// A response before the common headers and compression are applied.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
    /// Headers specific to this answer (`Allow`, `Retry-After`, …); usually none.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reply {
    /// A JSON body from a static string (no serialization work).
    pub(crate) fn static_json(status: StatusCode, body: &'static str) -> Self {
        Self {
            status,
            body: Bytes::from_static(body.as_bytes()),
            headers: Vec::new(),
        }
    }

    /// A serialized JSON body.
    pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status,
                body: Bytes::from(body),
                headers: Vec::new(),
            },
            Err(_) => Self::static_json(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"success":false,"reasons":[{"code":50000060,"message":"Internal error"}]}"#,
            ),
        }
    }

    /// Zuora's error shape: `{"success":false,"processId","reasons":[{code,message}],"requestId"}`.
    pub(crate) fn error(status: StatusCode, code: u32, message: &str, ctx: &Ctx) -> Self {
        Self::json(status, &ErrorBody::new(code, message, ctx))
    }

    pub(crate) fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// Zuora's error body.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ErrorBody<'a> {
    success: bool,
    process_id: String,
    reasons: [Reason<'a>; 1],
    request_id: &'a str,
}

impl<'a> ErrorBody<'a> {
    pub(crate) fn new(code: u32, message: &'a str, ctx: &'a Ctx) -> Self {
        Self {
            success: false,
            process_id: process_id(),
            reasons: [Reason::new(code, message)],
            request_id: ctx.request_id.as_str(),
        }
    }
}

/// One entry of `reasons`: an 8-digit code (an integer, as in Zuora's examples) and a message.
#[derive(Serialize)]
pub(crate) struct Reason<'a> {
    code: u32,
    message: &'a str,
}

impl<'a> Reason<'a> {
    pub(crate) fn new(code: u32, message: &'a str) -> Self {
        Self { code, message }
    }
}

/// Turns a [`Reply`] into the wire response: `Zuora-Request-Id`, the echoed `Zuora-Track-Id`,
/// `Content-Type`, gzip when accepted and worth it, `Content-Length`, and for `/v1` answers
/// (`api` is the control whose counters fill them) the rate- and concurrency-limit headers.
pub(crate) fn finalize(reply: Reply, ctx: &Ctx, api: Option<&SimControl>) -> Response<Full<Bytes>> {
    let Reply {
        status,
        mut body,
        headers: extra,
    } = reply;
    let mut headers = HeaderMap::with_capacity(16);
    headers.extend(extra.into_iter().map(|(name, value)| (Some(name), value)));
    headers.insert(CONTENT_TYPE, JSON_UTF8);
    headers.insert(ZUORA_REQUEST_ID.clone(), ctx.request_id.header_value());
    if let Some(track_id) = &ctx.track_id {
        headers.insert(ZUORA_TRACK_ID.clone(), track_id.clone());
    }
    if let Some(control) = api {
        let window = control.rate_window_hit();
        headers.insert(RATELIMIT_LIMIT.clone(), RATELIMIT_LIMIT_VALUE);
        headers.insert(
            RATELIMIT_REMAINING.clone(),
            HeaderValue::from(window.remaining),
        );
        headers.insert(
            RATELIMIT_RESET.clone(),
            HeaderValue::from(window.reset_secs),
        );
        headers.insert(CONCURRENCY_LIMIT_TYPE.clone(), CONCURRENCY_TYPE_VALUE);
        headers.insert(
            CONCURRENCY_LIMIT_LIMIT.clone(),
            HeaderValue::from(control.concurrency_limit()),
        );
        headers.insert(
            CONCURRENCY_LIMIT_REMAINING.clone(),
            HeaderValue::from(control.concurrency_remaining()),
        );
    }
    if body.len() > GZIP_THRESHOLD {
        // The representation depends on Accept-Encoding, so caches must key on it.
        headers.insert(VARY, ACCEPT_ENCODING);
        if ctx.accepts_gzip
            && let Ok(compressed) = gzip::compress(&body)
        {
            body = Bytes::from(compressed);
            headers.insert(CONTENT_ENCODING, GZIP);
        }
    }
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn request_id_is_uuid_v4_shaped() {
        for _ in 0..100 {
            let id = RequestId::random();
            let s = id.as_str();
            assert_eq!(s.len(), 36);
            let parts: Vec<&str> = s.split('-').collect();
            assert_eq!(
                parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(parts[2].starts_with('4'));
            assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
            assert!(s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn reason_codes_are_resource_then_category() {
        assert_eq!(
            Resource::AUTH.code(Category::AuthenticationFailed),
            90_000_011
        );
        assert_eq!(Resource(534_010).code(Category::InvalidValue), 53_401_020);
        assert_eq!(
            Category::for_status(StatusCode::TOO_MANY_REQUESTS),
            Category::LimitExceeded
        );
        assert_eq!(
            Category::for_status(StatusCode::SERVICE_UNAVAILABLE),
            Category::TemporaryError
        );
        assert_eq!(
            Category::for_status(StatusCode::INTERNAL_SERVER_ERROR),
            Category::InternalError
        );
    }

    #[test]
    fn process_id_is_16_upper_hex() {
        let id = process_id();
        assert_eq!(id.len(), 16);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        );
    }
}
