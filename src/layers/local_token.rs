//! Local token endpoint: `POST /oauth/token` is answered by the gateway
//! itself and never forwarded, so Zuora's official SDKs (which always start
//! with a client-credentials grant against their base URL) work unchanged
//! when pointed at the gateway.
//!
//! - JWT callers: the SDK's `client_secret` is the caller's JWT. It is
//!   verified like any bearer token and handed back as the `access_token`,
//!   valid until the JWT's own `exp`; the SDK then sends it on every call.
//! - Trusted identity (sidecar): any credentials get an opaque placeholder
//!   token; the caller is the trusted identity whatever it sends.
//!
//! Zuora's real credentials never leave the gateway.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use tower::{Layer, Service};

use super::{GwResult, LayerFuture, Req, Resp};
use crate::authn::Authenticator;
use crate::body::{collect_bounded, full};
use crate::error::GatewayError;
use crate::policy::Policy;

/// The path Zuora's SDKs request tokens from.
pub const TOKEN_PATH: &str = "/oauth/token";
/// Largest token request form accepted.
const MAX_FORM_BYTES: u64 = 16 * 1024;
/// Lifetime announced for the trusted-identity placeholder token.
const PLACEHOLDER_TTL_SECS: u64 = 3600;

/// Builds [`LocalToken`].
#[derive(Clone)]
pub struct LocalTokenLayer {
    policy: Arc<ArcSwap<Policy>>,
}

impl LocalTokenLayer {
    /// Answers with the authenticator of the current policy.
    pub fn new(policy: Arc<ArcSwap<Policy>>) -> Self {
        LocalTokenLayer { policy }
    }
}

impl<S> Layer<S> for LocalTokenLayer {
    type Service = LocalToken<S>;
    fn layer(&self, inner: S) -> LocalToken<S> {
        LocalToken {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct LocalToken<S> {
    inner: S,
    policy: Arc<ArcSwap<Policy>>,
}

impl<S> Service<Req> for LocalToken<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = Either<S::Future, LayerFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if req.uri().path() != TOKEN_PATH {
            return Either::Left(self.inner.call(req));
        }
        let policy = self.policy.load_full();
        Either::Right(Box::pin(issue(policy, req)))
    }
}

/// The fields of a client-credentials request.
#[derive(Default)]
struct Grant {
    client_secret: Option<String>,
    grant_type: Option<String>,
}

fn parse_form(body: &[u8]) -> Grant {
    let mut grant = Grant::default();
    for (k, v) in form_urlencoded::parse(body) {
        match k.as_ref() {
            "client_secret" => grant.client_secret = Some(v.into_owned()),
            "grant_type" => grant.grant_type = Some(v.into_owned()),
            _ => {}
        }
    }
    grant
}

async fn issue(policy: Arc<Policy>, req: Req) -> GwResult {
    if req.method() != Method::POST {
        return Err(GatewayError::MethodNotAllowed {
            method: req.method().to_string(),
            allow: "POST".to_owned(),
        });
    }
    let body = collect_bounded(req.into_body(), MAX_FORM_BYTES).await?;
    let grant = parse_form(&body);
    match grant.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(_) => {
            return Err(GatewayError::InvalidValue(
                "grant_type must be client_credentials".to_owned(),
            ));
        }
        None => {
            return Err(GatewayError::MissingField(
                "grant_type is required".to_owned(),
            ));
        }
    }
    let (token, expires_in) = match &*policy.authn {
        Authenticator::Trusted(_) => ("gateway-trusted-identity".to_owned(), PLACEHOLDER_TTL_SECS),
        Authenticator::Unavailable(why) => return Err(GatewayError::Internal(why.clone())),
        Authenticator::Jwt(_) => {
            let Some(jwt) = grant.client_secret.filter(|s| !s.is_empty()) else {
                return Err(GatewayError::Unauthenticated(
                    "client_secret must be your caller JWT".to_owned(),
                ));
            };
            let mut headers = HeaderMap::new();
            let bearer = HeaderValue::try_from(format!("Bearer {jwt}")).map_err(|_| {
                GatewayError::Unauthenticated("client_secret is not a JWT".to_owned())
            })?;
            headers.insert(header::AUTHORIZATION, bearer);
            let caller = policy.authn.authenticate(&headers).await?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let exp = caller
                .claims
                .get("exp")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(now);
            (jwt, exp.saturating_sub(now).max(1))
        }
    };
    let json = serde_json::json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": expires_in,
        "scope": "zuora-gateway",
    });
    let mut resp = Response::new(full(Bytes::from(json.to_string())));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_are_parsed() {
        let g = parse_form(b"client_id=billing&client_secret=a%2Bb&grant_type=client_credentials");
        assert_eq!(g.client_secret.as_deref(), Some("a+b"));
        assert_eq!(g.grant_type.as_deref(), Some("client_credentials"));
    }
}
