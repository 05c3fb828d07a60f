//! `GatewayError`: every way a request can fail, mapped in one place
//! ([`GatewayError::to_response`]) to a Zuora-shaped JSON error.
//!
//! Codes are eight digits like Zuora's: a six-digit resource code (`99RRRR`,
//! the gateway's own range) followed by Zuora's two-digit category, so a
//! client that switches on the category treats gateway errors as it treats
//! Zuora's.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{Body, full};

/// Zuora's error categories (the last two digits of a code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Category {
    /// 10: permission denied.
    Permission = 10,
    /// 11: authentication failed.
    Authentication = 11,
    /// 20: invalid format or value.
    InvalidValue = 20,
    /// 22: missing required field.
    MissingField = 22,
    /// 40: not found.
    NotFound = 40,
    /// 45: unsupported request method.
    Method = 45,
    /// 60: internal error.
    Internal = 60,
    /// 61: temporary error (retry later).
    Temporary = 61,
    /// 70: request exceeded a limit.
    Limit = 70,
    /// 90: malformed JSON.
    MalformedJson = 90,
}

/// The gateway component that produced an error (the resource part of the code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Component {
    /// Routing and path checks.
    Routing = 1,
    /// Caller authentication.
    Authentication = 2,
    /// Route and tenancy authorization.
    Authorization = 3,
    /// Request validation (stop-job bodies, headers).
    Validation = 4,
    /// Request body handling (size, encoding).
    Body = 5,
    /// Rate limiting.
    RateLimit = 6,
    /// The upstream (Zuora) call.
    Upstream = 7,
    /// The Zuora OAuth token.
    Token = 8,
    /// The gateway itself (overload, internal).
    Gateway = 9,
}

/// Every way the gateway refuses or fails a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// No route matches the path.
    #[error("no route matches {0}")]
    NoRoute(String),
    /// A route matches the path but not the method.
    #[error("method {method} is not routed for this path (allowed: {allow})")]
    MethodNotAllowed {
        /// The refused method.
        method: String,
        /// Comma-separated allowed methods (for the `Allow` header).
        allow: String,
    },
    /// The path is refused before routing (dot segments, encoded slashes, …).
    #[error("invalid request path: {0}")]
    BadPath(&'static str),
    /// Missing or invalid caller credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is authenticated but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// A field or header has an invalid value.
    #[error("{0}")]
    InvalidValue(String),
    /// A required field is missing.
    #[error("{0}")]
    MissingField(String),
    /// The body is not valid JSON.
    #[error("{0}")]
    MalformedJson(String),
    /// The (decompressed) body exceeds `max_body_bytes`.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// A `Content-Encoding` the gateway does not accept.
    #[error("unsupported Content-Encoding `{0}` (only gzip and identity are accepted)")]
    UnsupportedEncoding(String),
    /// The body could not be read in time.
    #[error("request body was not received within {0:?}")]
    BodyTimeout(Duration),
    /// The request URI is longer than `server.max_uri_bytes`.
    #[error("request URI longer than {0} bytes")]
    UriTooLong(usize),
    /// A rate limit refused the request.
    #[error("rate limit `{limit}` exceeded; retry after {} s", retry_after_secs(*.retry_after))]
    RateLimited {
        /// The limit's name.
        limit: String,
        /// When a retry may succeed.
        retry_after: Duration,
        /// `RateLimit-Limit` value, when known.
        quota: Option<u32>,
    },
    /// Zuora said 429 recently for this key; answered locally until `Retry-After`.
    #[error("Zuora rate limit in effect for this key; retry after {} s", retry_after_secs(*.retry_after))]
    UpstreamRateLimited {
        /// Remaining wait.
        retry_after: Duration,
    },
    /// Too many requests in flight in the gateway.
    #[error("the gateway is at capacity; retry shortly")]
    Overloaded,
    /// No valid Zuora token can be obtained right now.
    #[error("no Zuora access token is available: {0}")]
    TokenUnavailable(String),
    /// The rate-limit store failed and the policy is `deny`.
    #[error("the rate-limit store is unavailable")]
    LimiterUnavailable,
    /// The upstream circuit breaker is open.
    #[error("Zuora is failing; requests are shed for a short while")]
    CircuitOpen,
    /// Could not connect to Zuora.
    #[error("could not connect to Zuora: {0}")]
    UpstreamConnect(String),
    /// Zuora did not answer in time.
    #[error("Zuora did not respond within {0:?}")]
    UpstreamTimeout(Duration),
    /// Zuora's response was broken (reset mid-body, corrupt gzip, …).
    #[error("invalid response from Zuora: {0}")]
    BadUpstreamResponse(String),
    /// A bug or an impossible state; details are logged, not returned.
    #[error("internal gateway error")]
    Internal(String),
}

fn retry_after_secs(d: Duration) -> u64 {
    // Whole seconds, rounded up, never 0.
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

impl GatewayError {
    /// HTTP status, component and category of this error.
    pub fn classify(&self) -> (StatusCode, Component, Category) {
        use Category as C;
        use Component as P;
        use GatewayError as E;
        match self {
            E::NoRoute(_) => (StatusCode::NOT_FOUND, P::Routing, C::NotFound),
            E::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, P::Routing, C::Method),
            E::BadPath(_) => (StatusCode::BAD_REQUEST, P::Routing, C::InvalidValue),
            E::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                P::Authentication,
                C::Authentication,
            ),
            E::Forbidden(_) => (StatusCode::FORBIDDEN, P::Authorization, C::Permission),
            E::InvalidValue(_) => (StatusCode::BAD_REQUEST, P::Validation, C::InvalidValue),
            E::MissingField(_) => (StatusCode::BAD_REQUEST, P::Validation, C::MissingField),
            E::MalformedJson(_) => (StatusCode::BAD_REQUEST, P::Validation, C::MalformedJson),
            E::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, P::Body, C::Limit),
            E::UnsupportedEncoding(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, P::Body, C::InvalidValue)
            }
            E::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, P::Body, C::Temporary),
            E::UriTooLong(_) => (StatusCode::URI_TOO_LONG, P::Routing, C::InvalidValue),
            E::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, P::RateLimit, C::Limit),
            E::UpstreamRateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, P::RateLimit, C::Limit)
            }
            E::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, P::Gateway, C::Temporary),
            E::TokenUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, P::Token, C::Temporary),
            E::LimiterUnavailable => (StatusCode::SERVICE_UNAVAILABLE, P::RateLimit, C::Temporary),
            E::CircuitOpen => (StatusCode::SERVICE_UNAVAILABLE, P::Upstream, C::Temporary),
            E::UpstreamConnect(_) => (StatusCode::BAD_GATEWAY, P::Upstream, C::Temporary),
            E::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, P::Upstream, C::Temporary),
            E::BadUpstreamResponse(_) => (StatusCode::BAD_GATEWAY, P::Upstream, C::Internal),
            E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, P::Gateway, C::Internal),
        }
    }

    /// The eight-digit reason code, e.g. `99000211`.
    pub fn code(&self) -> String {
        let (_, component, category) = self.classify();
        format!("99{:04}{:02}", component as u16, category as u8)
    }

    /// A short stable label for metrics and logs (`no_route`, `rate_limited`, …).
    pub fn kind(&self) -> &'static str {
        use GatewayError as E;
        match self {
            E::NoRoute(_) => "no_route",
            E::MethodNotAllowed { .. } => "method_not_allowed",
            E::BadPath(_) => "bad_path",
            E::Unauthenticated(_) => "unauthenticated",
            E::Forbidden(_) => "forbidden",
            E::InvalidValue(_) => "invalid_value",
            E::MissingField(_) => "missing_field",
            E::MalformedJson(_) => "malformed_json",
            E::PayloadTooLarge { .. } => "payload_too_large",
            E::UnsupportedEncoding(_) => "unsupported_encoding",
            E::BodyTimeout(_) => "body_timeout",
            E::UriTooLong(_) => "uri_too_long",
            E::RateLimited { .. } => "rate_limited",
            E::UpstreamRateLimited { .. } => "upstream_rate_limited",
            E::Overloaded => "overloaded",
            E::TokenUnavailable(_) => "token_unavailable",
            E::LimiterUnavailable => "limiter_unavailable",
            E::CircuitOpen => "circuit_open",
            E::UpstreamConnect(_) => "upstream_connect",
            E::UpstreamTimeout(_) => "upstream_timeout",
            E::BadUpstreamResponse(_) => "bad_upstream_response",
            E::Internal(_) => "internal",
        }
    }

    /// The Zuora-shaped response for this error. Internal details are not
    /// exposed (they are logged by the caller of this function).
    pub fn to_response(&self) -> Response<Body> {
        let (status, _, _) = self.classify();
        let body = error_body(&self.code(), &self.to_string());
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            GatewayError::Unauthenticated(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            GatewayError::MethodNotAllowed { allow, .. } => {
                if let Ok(v) = HeaderValue::from_str(allow) {
                    h.insert(header::ALLOW, v);
                }
            }
            GatewayError::RateLimited {
                retry_after, quota, ..
            } => {
                let secs = retry_after_secs(*retry_after);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
                if let Some(q) = quota {
                    h.insert("ratelimit-limit", HeaderValue::from(*q));
                    h.insert("ratelimit-remaining", HeaderValue::from(0u32));
                    h.insert("ratelimit-reset", HeaderValue::from(secs));
                }
            }
            GatewayError::UpstreamRateLimited { retry_after } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*retry_after)),
                );
            }
            GatewayError::Overloaded
            | GatewayError::TokenUnavailable(_)
            | GatewayError::LimiterUnavailable
            | GatewayError::CircuitOpen => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

/// `{"success":false,"reasons":[{"code":"…","message":"…"}]}`.
pub fn error_body(code: &str, message: &str) -> Bytes {
    let v = serde_json::json!({
        "success": false,
        "reasons": [{ "code": code, "message": message }],
    });
    Bytes::from(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_end_with_zuora_categories() {
        assert_eq!(GatewayError::Unauthenticated("x".into()).code(), "99000211");
        assert_eq!(GatewayError::NoRoute("/x".into()).code(), "99000140");
        assert_eq!(GatewayError::Overloaded.code(), "99000961");
        let e = GatewayError::RateLimited {
            limit: "l".into(),
            retry_after: Duration::from_millis(1),
            quota: None,
        };
        assert!(e.code().ends_with("70"));
        assert_eq!(e.to_response().headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn internal_details_are_not_exposed() {
        let e = GatewayError::Internal("secret detail".into());
        assert!(!e.to_string().contains("secret"));
    }
}
