//! `POST /oauth/token` (OAuth 2.0 client credentials) and bearer-token checks for `/v1`.
//!
//! Issued tokens are 32 random hex digits with an expiry instant. Revocation bumps an epoch:
//! tokens from an older epoch are refused. Token values never reach `tracing`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Serialize;

use super::control::{SimControl, lock};
use super::response::{Category, Ctx, Reason, Reply, Resource};

/// The `scope` Zuora returns: entity, platform and service grants plus the tenant id.
const SCOPE: &str = "entity.7a1e3b6c-0f3d-4c8e-9a53-2f1d8b6c4e19 platform.write \
                     service.genesis.read service.genesis.write service.usage.delete \
                     service.usage.update service.usage.write tenant.19 \
                     user.5f2c1a9e-8b7d-4e3a-9c6b-1d2e3f4a5b6c";

/// When the token map grows past this, long-dead entries are dropped.
const PRUNE_ABOVE: usize = 50_000;
/// Expired tokens are remembered this long, so they are still told apart from unknown ones.
const REMEMBER_EXPIRED_FOR: Duration = Duration::from_secs(3600);

/// The client credentials the token endpoint accepts.
pub(crate) struct Credentials {
    client_id: Option<String>,
    client_secret: Option<String>,
}

impl Credentials {
    pub(crate) fn new(client_id: Option<String>, client_secret: Option<String>) -> Self {
        Self {
            client_id,
            client_secret,
        }
    }

    /// `None` means any non-empty value; the caller has already refused empty values.
    fn accepts(&self, client_id: &str, client_secret: &str) -> bool {
        let id_ok = self.client_id.as_deref().is_none_or(|id| id == client_id);
        let secret_ok = self
            .client_secret
            .as_deref()
            .is_none_or(|secret| secret == client_secret);
        id_ok && secret_ok
    }
}

struct TokenEntry {
    expires_at: Instant,
    epoch: u64,
}

/// What a bearer token turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenCheck {
    Valid,
    /// Not issued by this simulator (or forgotten long ago).
    Unknown,
    /// Issued here, past its expiry.
    Expired,
    /// Issued here before [`TokenStore::revoke_all`].
    Revoked,
}

/// The tokens issued so far.
#[derive(Default)]
pub(crate) struct TokenStore {
    tokens: Mutex<HashMap<String, TokenEntry>>,
    epoch: AtomicU64,
}

impl TokenStore {
    fn issue(&self, ttl: Duration) -> String {
        let token = super::response::random_hex(32);
        let now = Instant::now();
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut tokens = lock(&self.tokens);
        if tokens.len() >= PRUNE_ABOVE {
            tokens.retain(|_, entry| {
                entry.epoch == epoch && entry.expires_at + REMEMBER_EXPIRED_FOR > now
            });
        }
        tokens.insert(
            token.clone(),
            TokenEntry {
                expires_at: now + ttl,
                epoch,
            },
        );
        token
    }

    pub(crate) fn check(&self, token: &str) -> TokenCheck {
        let tokens = lock(&self.tokens);
        let Some(entry) = tokens.get(token) else {
            return TokenCheck::Unknown;
        };
        if Instant::now() >= entry.expires_at {
            TokenCheck::Expired
        } else if entry.epoch != self.epoch.load(Ordering::Acquire) {
            TokenCheck::Revoked
        } else {
            TokenCheck::Valid
        }
    }

    pub(crate) fn revoke_all(&self) {
        // Under the lock, so a token being issued right now is either revoked or issued after.
        let _tokens = lock(&self.tokens);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[derive(Serialize)]
struct TokenResponse<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: u64,
    scope: &'static str,
    jti: &'a str,
}

/// An RFC 6749 error (`error`, `error_description`) with Zuora's fields alongside.
#[derive(Serialize)]
struct OAuthError<'a> {
    error: &'static str,
    error_description: &'a str,
    success: bool,
    reasons: [Reason<'a>; 1],
    #[serde(rename = "requestId")]
    request_id: &'a str,
}

fn oauth_error(
    status: StatusCode,
    error: &'static str,
    category: Category,
    description: &str,
    ctx: &Ctx,
) -> Reply {
    Reply::json(
        status,
        &OAuthError {
            error,
            error_description: description,
            success: false,
            reasons: [Reason::new(Resource::AUTH.code(category), description)],
            request_id: ctx.request_id.as_str(),
        },
    )
}

/// Answers a `POST /oauth/token` whose body has been read, decoded and recorded.
///
/// Order: latency, "down" (503), "rate limited" (429), then the OAuth checks.
pub(crate) async fn token_endpoint(
    control: &SimControl,
    headers: &HeaderMap,
    form: &Bytes,
    ctx: &Ctx,
) -> Reply {
    let latency = control.token_latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if control.token_endpoint_down() {
        return Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            Resource::AUTH.code(Category::TemporaryError),
            "The authentication service is temporarily unavailable. Please try again later.",
            ctx,
        );
    }
    if let Some(retry_after) = control.token_rate_limited() {
        return Reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            Resource::AUTH.code(Category::LimitExceeded),
            "Too many authentication requests. Please try again later.",
            ctx,
        )
        .with_header(RETRY_AFTER, HeaderValue::from(retry_after));
    }
    let reply = match issue(control, headers, form, ctx) {
        Ok(reply) | Err(reply) => reply,
    };
    // RFC 6749 §5.1: token responses must not be cached.
    reply
        .with_header(CACHE_CONTROL, HeaderValue::from_static("no-store"))
        .with_header(PRAGMA, HeaderValue::from_static("no-cache"))
}

fn issue(
    control: &SimControl,
    headers: &HeaderMap,
    form: &Bytes,
    ctx: &Ctx,
) -> Result<Reply, Reply> {
    let is_form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| {
            media
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    let invalid_request = |description: &str| {
        oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Category::MissingParameter,
            description,
            ctx,
        )
    };
    if !is_form {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Category::InvalidValue,
            "Content-Type must be application/x-www-form-urlencoded",
            ctx,
        ));
    }

    let mut client_id = None;
    let mut client_secret = None;
    let mut grant_type = None;
    for (name, value) in form_urlencoded::parse(form) {
        let slot = match name.as_ref() {
            "client_id" => &mut client_id,
            "client_secret" => &mut client_secret,
            "grant_type" => &mut grant_type,
            _ => continue,
        };
        // RFC 6749 §3.2: parameters must not be repeated.
        if slot.replace(value).is_some() {
            return Err(invalid_request("A parameter was sent more than once"));
        }
    }

    let Some(grant_type) = grant_type.filter(|g| !g.is_empty()) else {
        return Err(invalid_request("Missing required parameter: grant_type"));
    };
    if grant_type != "client_credentials" {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            Category::InvalidValue,
            "grant_type must be client_credentials",
            ctx,
        ));
    }
    let Some(client_id) = client_id.filter(|c| !c.is_empty()) else {
        return Err(invalid_request("Missing required parameter: client_id"));
    };
    let Some(client_secret) = client_secret.filter(|c| !c.is_empty()) else {
        return Err(invalid_request("Missing required parameter: client_secret"));
    };
    if !control.credentials.accepts(&client_id, &client_secret) {
        return Err(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            Category::AuthenticationFailed,
            "Invalid client credentials",
            ctx,
        ));
    }

    let ttl = control.token_ttl();
    let token = control.tokens.issue(ttl);
    control.count_token_issued();
    tracing::debug!(expires_in = ttl.as_secs(), "simulator issued a token");
    let jti = super::response::random_hex(32);
    Ok(Reply::json(
        StatusCode::OK,
        &TokenResponse {
            access_token: &token,
            token_type: "bearer",
            expires_in: ttl.as_secs(),
            scope: SCOPE,
            jti: &jti,
        },
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("bearer   abc "),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Basic abc"),
        );
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer "),
        );
        assert_eq!(bearer_token(&headers), None);
    }

    #[test]
    fn token_lifecycle() {
        let store = TokenStore::default();
        let long = store.issue(Duration::from_secs(60));
        let short = store.issue(Duration::ZERO);
        assert_eq!(store.check(&long), TokenCheck::Valid);
        assert_eq!(store.check(&short), TokenCheck::Expired);
        assert_eq!(store.check("nope"), TokenCheck::Unknown);
        store.revoke_all();
        assert_eq!(store.check(&long), TokenCheck::Revoked);
        let fresh = store.issue(Duration::from_secs(60));
        assert_eq!(store.check(&fresh), TokenCheck::Valid);
    }

    #[test]
    fn credentials_matching() {
        let any = Credentials::new(None, None);
        assert!(any.accepts("id", "secret"));
        let fixed = Credentials::new(Some("id".into()), Some("secret".into()));
        assert!(fixed.accepts("id", "secret"));
        assert!(!fixed.accepts("id", "wrong"));
        assert!(!fixed.accepts("other", "secret"));
    }
}
