//! One client-credentials token request and the parsing of its answer.
//!
//! Nothing here formats the request form, the token or a response body into
//! a message: errors carry the HTTP status and Zuora's reason code and
//! message (with the client credentials masked, should Zuora echo them).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;

use crate::body::full;
use crate::secret::Secret;
use crate::upstream::HttpClient;

/// Largest token response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest reason message kept from an error response.
const MAX_DETAIL_CHARS: usize = 200;
/// Lifetime assumed when `expires_in` is absent (Zuora documents one hour).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// What the token request needs.
pub(crate) struct Credentials<'a> {
    pub(crate) token_url: &'a Uri,
    pub(crate) client_id: &'a Secret,
    pub(crate) client_secret: &'a Secret,
}

/// A token Zuora issued.
pub(crate) struct Grant {
    pub(crate) access_token: Secret,
    /// `Bearer <token>`, sensitive.
    pub(crate) header: HeaderValue,
    pub(crate) lifetime: Duration,
}

/// Why a token request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// TCP/TLS connection to the token endpoint failed.
    #[error("cannot connect to Zuora's token endpoint: {0}")]
    Connect(String),
    /// No complete answer within the token request timeout.
    #[error("Zuora's token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    /// A non-200 answer.
    #[error("Zuora's token endpoint answered HTTP {}{detail}", status.as_u16())]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// ` (reason …: …)` or empty.
        detail: String,
        /// `Retry-After` of a 429 or 503.
        retry_after: Option<Duration>,
    },
    /// A 200 whose body is not a usable token.
    #[error("Zuora's token endpoint sent an unusable answer: {0}")]
    Invalid(&'static str),
}

impl FetchError {
    /// The `outcome` label of `zuora_token_fetches`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            FetchError::Connect(_) => "connect_error",
            FetchError::Timeout(_) => "timeout",
            FetchError::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                "rate_limited"
            }
            FetchError::Status { status, .. } if status.is_client_error() => "rejected",
            FetchError::Status { .. } => "server_error",
            FetchError::Invalid(_) => "invalid_response",
        }
    }

    /// How long Zuora asked us to wait, if it did.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Requests one token. `timeout` bounds the whole exchange (connect, headers, body).
pub(crate) async fn fetch_token(
    client: &HttpClient,
    creds: &Credentials<'_>,
    timeout: Duration,
) -> Result<Grant, FetchError> {
    match tokio::time::timeout(timeout, exchange(client, creds)).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout(timeout)),
    }
}

async fn exchange(client: &HttpClient, creds: &Credentials<'_>) -> Result<Grant, FetchError> {
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("client_id", creds.client_id.expose())
        .append_pair("client_secret", creds.client_secret.expose())
        .append_pair("grant_type", "client_credentials")
        .finish();
    let request = Request::post(creds.token_url.clone())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .body(full(form))
        .map_err(|e| FetchError::Connect(format!("cannot build the token request: {e}")))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| FetchError::Connect(error_chain(&e)))?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::Invalid("the response body is too large")
            } else {
                FetchError::Connect(format!(
                    "the response was cut off: {}",
                    error_chain(e.as_ref())
                ))
            }
        })?;
    if parts.status != StatusCode::OK {
        return Err(FetchError::Status {
            status: parts.status,
            detail: error_detail(&body, creds),
            retry_after: retry_after(&parts.headers),
        });
    }
    parse_grant(&body)
}

/// Parses a 200 answer: `access_token`, `token_type` (bearer, any case),
/// `expires_in` (seconds, number or numeric string).
pub(crate) fn parse_grant(body: &Bytes) -> Result<Grant, FetchError> {
    // Parsed as a `Value`, never into typed fields: serde's type errors quote
    // the offending value, which could be the token.
    let value: Value =
        serde_json::from_slice(body).map_err(|_| FetchError::Invalid("the body is not JSON"))?;
    let Some(object) = value.as_object() else {
        return Err(FetchError::Invalid("the body is not a JSON object"));
    };
    let token = match object.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        Some(_) => {
            return Err(FetchError::Invalid(
                "`access_token` is empty or not a string",
            ));
        }
        None => return Err(FetchError::Invalid("`access_token` is missing")),
    };
    match object.get("token_type") {
        None => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(_) => return Err(FetchError::Invalid("`token_type` is not `bearer`")),
    }
    let lifetime = match object.get("expires_in") {
        None | Some(Value::Null) => DEFAULT_LIFETIME,
        Some(Value::Number(n)) => {
            n.as_u64()
                .map(Duration::from_secs)
                .ok_or(FetchError::Invalid(
                    "`expires_in` is not a whole number of seconds",
                ))?
        }
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| FetchError::Invalid("`expires_in` is not a whole number of seconds"))?,
        Some(_) => return Err(FetchError::Invalid("`expires_in` is not a number")),
    };
    if lifetime.is_zero() {
        return Err(FetchError::Invalid("`expires_in` is zero"));
    }
    let mut header = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
        FetchError::Invalid("`access_token` has characters not allowed in a header")
    })?;
    header.set_sensitive(true);
    Ok(Grant {
        access_token: Secret::new(token),
        header,
        lifetime,
    })
}

/// ` (reason 90000011: Authentication error)`, from Zuora's error shape, the
/// OAuth shape (`error`, `error_description`) or a bare `message`; empty
/// when the body says nothing usable.
fn error_detail(body: &Bytes, creds: &Credentials<'_>) -> String {
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let text = |v: Option<&Value>| -> Option<String> {
        match v? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let (code, message) = if let Some(reason) = o
        .get("reasons")
        .and_then(Value::as_array)
        .and_then(|r| r.first())
    {
        (text(reason.get("code")), text(reason.get("message")))
    } else if o.contains_key("error") {
        (text(o.get("error")), text(o.get("error_description")))
    } else {
        (text(o.get("code")), text(o.get("message")))
    };
    let detail = match (code, message) {
        (Some(c), Some(m)) => format!("reason {c}: {m}"),
        (Some(c), None) => format!("reason {c}"),
        (None, Some(m)) => m,
        (None, None) => return String::new(),
    };
    format!(" ({})", sanitize(&detail, creds))
}

/// Masks the client credentials (should Zuora echo them), drops control
/// characters, bounds the length.
fn sanitize(detail: &str, creds: &Credentials<'_>) -> String {
    let mut s = detail.to_owned();
    for secret in [creds.client_secret, creds.client_id] {
        if !secret.is_empty() {
            s = s.replace(secret.expose(), "[redacted]");
        }
    }
    let mut out: String = s
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_DETAIL_CHARS)
        .collect();
    if s.chars().filter(|c| !c.is_control()).count() > MAX_DETAIL_CHARS {
        out.push('…');
    }
    out
}

/// `Retry-After` in seconds (HTTP dates are not honoured: the backoff applies).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// `a: b: c` from an error and its sources (hyper's top-level messages alone
/// say little: "client error (Connect)").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn creds() -> (Uri, Secret, Secret) {
        (
            Uri::from_static("http://127.0.0.1:1/oauth/token"),
            Secret::new("client-id-123"),
            Secret::new("s3cr3t-value"),
        )
    }

    #[test]
    fn a_zuora_grant_is_parsed_and_bearer_is_accepted_in_any_case() {
        let g = parse_grant(&Bytes::from_static(
            br#"{"access_token":"abc.def","token_type":"BEARER","expires_in":3599,"scope":"x","jti":"j"}"#,
        ))
        .unwrap();
        assert_eq!(g.access_token.expose(), "abc.def");
        assert_eq!(g.lifetime, Duration::from_secs(3599));
        assert_eq!(g.header, "Bearer abc.def");
        assert!(g.header.is_sensitive());
    }

    #[test]
    fn expires_in_as_a_string_is_accepted() {
        let g = parse_grant(&Bytes::from_static(
            br#"{"access_token":"t","token_type":"bearer","expires_in":"60"}"#,
        ))
        .unwrap();
        assert_eq!(g.lifetime, Duration::from_secs(60));
    }

    #[test]
    fn unusable_grants_are_refused_without_quoting_the_token() {
        for body in [
            &br#"{"access_token":"tok-SECRET","token_type":"mac","expires_in":10}"#[..],
            br#"{"access_token":"tok-SECRET","expires_in":0}"#,
            br#"{"access_token":"tok-SECRET","expires_in":"soon tok-SECRET"}"#,
            br#"{"access_token":"tok-SECRET\n","expires_in":10}"#,
            br#"{"access_token":"","expires_in":10}"#,
            br#"{"token_type":"bearer"}"#,
            br#"["tok-SECRET"]"#,
            b"tok-SECRET",
        ] {
            let err = parse_grant(&Bytes::copy_from_slice(body)).err().unwrap();
            assert!(!err.to_string().contains("SECRET"), "{err}");
            assert_eq!(err.outcome(), "invalid_response");
        }
    }

    #[test]
    fn error_details_come_from_zuora_or_oauth_shapes_with_credentials_masked() {
        let (url, id, secret) = creds();
        let c = Credentials {
            token_url: &url,
            client_id: &id,
            client_secret: &secret,
        };
        let zuora = Bytes::from_static(
            br#"{"success":false,"reasons":[{"code":90000011,"message":"Authentication error"}]}"#,
        );
        assert_eq!(
            error_detail(&zuora, &c),
            " (reason 90000011: Authentication error)"
        );
        let oauth = Bytes::from_static(
            br#"{"error":"invalid_client","error_description":"unknown client client-id-123 / s3cr3t-value"}"#,
        );
        let d = error_detail(&oauth, &c);
        assert!(
            d.starts_with(" (reason invalid_client: unknown client [redacted]"),
            "{d}"
        );
        assert!(!d.contains("s3cr3t") && !d.contains("client-id-123"));
        assert_eq!(
            error_detail(&Bytes::from_static(b"<html>down</html>"), &c),
            ""
        );
        let long = Bytes::from(format!(r#"{{"message":"{}"}}"#, "x".repeat(1000)));
        assert!(error_detail(&long, &c).chars().count() < MAX_DETAIL_CHARS + 10);
    }

    #[test]
    fn outcomes_distinguish_rate_limits_rejections_and_server_errors() {
        let status = |s: u16| FetchError::Status {
            status: StatusCode::from_u16(s).unwrap(),
            detail: String::new(),
            retry_after: None,
        };
        assert_eq!(status(429).outcome(), "rate_limited");
        assert_eq!(status(401).outcome(), "rejected");
        assert_eq!(status(503).outcome(), "server_error");
        assert_eq!(
            status(401).to_string(),
            "Zuora's token endpoint answered HTTP 401"
        );
    }
}
