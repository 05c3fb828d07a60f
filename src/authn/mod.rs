//! Caller authentication: who is calling.
//!
//! - JWT mode (`callers.jwt`): `Authorization: Bearer <JWT>`, verified
//!   against static keys and/or a JWKS document. Every key verifies exactly
//!   one algorithm; a token whose header `alg` differs from its key's is
//!   refused (no HS/RS confusion, never `none`). `exp` is required; `nbf`,
//!   `iss` and `aud` are checked with `leeway`. The caller's identity is the
//!   `identity_claim` (a non-empty string). Verified tokens are cached until
//!   their `exp` (found by a keyed hash, served only to the identical token).
//! - Trusted-identity mode (`callers.trusted_identity`, sidecar): no
//!   credentials; every request is that caller.
//!
//! Failures are [`GatewayError::Unauthenticated`] with a message saying what
//! was wrong; no message, log line or metric ever contains the token.

mod b64;
mod cache;
mod jwks;
mod keys;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Header};
use serde_json::{Map, Value};

use self::cache::TokenCache;
use self::jwks::JwksSource;
pub use self::jwks::MISS_FETCH_INTERVAL;
use self::keys::{ClaimRules, VerifyKey};
use crate::config::{CallerAuthConfig, JwtConfig, JwtKeyConfig, JwtKeyMaterial};
use crate::context::Caller;
use crate::error::GatewayError;

/// Longest bearer token accepted.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// How callers are authenticated under one configuration.
#[derive(Debug)]
pub enum Authenticator {
    /// Bearer JWTs.
    Jwt(Arc<JwtAuthenticator>),
    /// Sidecar mode: every request is this caller.
    Trusted(Caller),
    /// Could not be built (see [`crate::policy::Policy::compile`]): every
    /// request is refused.
    Unavailable(String),
}

/// The result of the synchronous part of authentication.
#[derive(Debug)]
pub enum Attempt {
    /// Decided without waiting (cache hit, signature checked, or refused).
    Done(Result<Caller, GatewayError>),
    /// The token names a key ID not in the current JWKS: finish with
    /// [`JwtAuthenticator::finish`] (which may fetch the JWKS once).
    NeedsKeys(PendingToken),
}

/// A token waiting for a JWKS re-fetch (owns its copy of the token).
pub struct PendingToken {
    token: String,
    kid: String,
    generation: u64,
}

impl std::fmt::Debug for PendingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingToken")
            .field("kid", &self.kid)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the authenticator for a validated `callers:` section. Starts
    /// nothing: JWKS fetching begins with [`Authenticator::start`] or the
    /// first request.
    pub fn new(cfg: &CallerAuthConfig) -> Result<Self, String> {
        match cfg {
            CallerAuthConfig::TrustedIdentity(name) => {
                Ok(Authenticator::Trusted(Caller::named(name.as_str())))
            }
            CallerAuthConfig::Jwt(jwt) => {
                Ok(Authenticator::Jwt(Arc::new(JwtAuthenticator::new(jwt)?)))
            }
        }
    }

    /// Fetches the JWKS (if any) and starts its background refresh. Call
    /// once at startup, inside the runtime; a failed fetch is logged and
    /// retried by the refresher (requests fail with "unknown key" until then).
    pub async fn start(&self) {
        if let Authenticator::Jwt(j) = self
            && let Some(src) = &j.jwks
        {
            let _ = src.refresh().await;
            src.ensure_refresher(false);
        }
    }

    /// Whether this authenticator was built from exactly `cfg` (so a
    /// reload can keep it, with its token cache and JWKS).
    pub fn is_built_from(&self, cfg: &CallerAuthConfig) -> bool {
        match (self, cfg) {
            (Authenticator::Trusted(c), CallerAuthConfig::TrustedIdentity(name)) => {
                &*c.identity == name.as_str()
            }
            (Authenticator::Jwt(j), CallerAuthConfig::Jwt(cfg)) => same_jwt_config(&j.config, cfg),
            _ => false,
        }
    }

    /// A description for `explain` and logs.
    pub fn describe(&self) -> String {
        match self {
            Authenticator::Trusted(c) => {
                format!("trusted identity `{}` (no credentials checked)", c.identity)
            }
            Authenticator::Unavailable(why) => {
                format!("unavailable ({why}): every request is refused")
            }
            Authenticator::Jwt(j) => {
                let mut s = format!(
                    "bearer JWT, identity from claim `{}`",
                    j.config.identity_claim
                );
                if !j.static_keys.is_empty() {
                    s.push_str(&format!(", {} static key(s)", j.static_keys.len()));
                }
                if let Some(url) = &j.config.jwks_url {
                    s.push_str(&format!(", JWKS {url}"));
                }
                s
            }
        }
    }

    /// Authenticates a request's headers, fetching the JWKS if the token
    /// names an unknown key. The hot path is [`Authenticator::attempt`].
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, GatewayError> {
        match self.attempt(headers) {
            Attempt::Done(r) => r,
            Attempt::NeedsKeys(p) => match self {
                Authenticator::Jwt(j) => j.clone().finish(p).await,
                Authenticator::Trusted(_) | Authenticator::Unavailable(_) => {
                    Err(GatewayError::Internal(
                        "authentication asked for keys it does not use".to_owned(),
                    ))
                }
            },
        }
    }

    /// The synchronous part: everything except waiting for a JWKS fetch.
    pub fn attempt(&self, headers: &HeaderMap) -> Attempt {
        match self {
            Authenticator::Trusted(c) => Attempt::Done(Ok(c.clone())),
            Authenticator::Unavailable(why) => Attempt::Done(Err(GatewayError::Internal(format!(
                "caller authentication is unavailable: {why}"
            )))),
            Authenticator::Jwt(j) => {
                // The common case first: the very token verified before, found
                // without parsing or validating the header text.
                if let Some(caller) = bearer_candidate(headers).and_then(|t| j.cached(t)) {
                    return Attempt::Done(Ok(caller));
                }
                match bearer_token(headers) {
                    Ok(token) => j.attempt(token),
                    Err(e) => Attempt::Done(Err(e)),
                }
            }
        }
    }
}

/// The token part of a single `Authorization: Bearer <token>` header, as
/// bytes and unvalidated: [`bearer_token`] with the same splitting (on the
/// first space, trimming spaces and tabs) but none of its checks. Only good
/// for a cache lookup: a hit is byte-for-byte a token that passed
/// `bearer_token` once, so the header would pass it now too.
fn bearer_candidate(headers: &HeaderMap) -> Option<&[u8]> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let text = trim_ows(value.as_bytes());
    let space = text.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = text.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| trim_ows(rest))
}

/// Without leading and trailing spaces and tabs (the only whitespace a
/// header value can hold).
fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// Extracts the token of the (single) `Authorization: Bearer` header.
fn bearer_token(headers: &HeaderMap) -> Result<&str, GatewayError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(unauthenticated(
            "no bearer token: send `Authorization: Bearer <JWT>`",
        ));
    };
    if values.next().is_some() {
        return Err(unauthenticated("more than one Authorization header"));
    }
    let text = value.to_str().map_err(|_| {
        unauthenticated("the Authorization header contains characters that are not visible ASCII")
    })?;
    let (scheme, rest) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthenticated("the Authorization scheme must be `Bearer`"));
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(unauthenticated("the bearer token is empty"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(unauthenticated(&format!(
            "the bearer token is longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    Ok(token)
}

fn unauthenticated(msg: &str) -> GatewayError {
    GatewayError::Unauthenticated(msg.to_owned())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// JWT verification for one `callers.jwt` configuration.
#[derive(Debug)]
pub struct JwtAuthenticator {
    config: JwtConfig,
    static_keys: Vec<Arc<VerifyKey>>,
    jwks: Option<Arc<JwksSource>>,
    cache: Arc<TokenCache>,
}

enum Selection {
    Keys(Vec<Arc<VerifyKey>>),
    UnknownKid(String),
}

impl JwtAuthenticator {
    /// Compiles the keys of a validated `callers.jwt` section.
    pub fn new(cfg: &JwtConfig) -> Result<Self, String> {
        let rules = ClaimRules::new(cfg);
        let static_keys = cfg
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| VerifyKey::from_config(i, k, &rules).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let cache = Arc::new(TokenCache::new(cfg.cache_entries));
        let jwks = match &cfg.jwks_url {
            Some(url) => Some(Arc::new(JwksSource::new(
                url.clone(),
                cfg.jwks_ca_pem.as_deref().map(Vec::as_slice),
                cfg.jwks_refresh,
                rules,
                cache.clone(),
            )?)),
            None => None,
        };
        Ok(JwtAuthenticator {
            config: cfg.clone(),
            static_keys,
            jwks,
            cache,
        })
    }

    /// Whether the JWKS (when configured) has been loaded at least once.
    pub fn jwks_loaded(&self) -> bool {
        self.jwks.as_ref().is_none_or(|j| j.is_loaded())
    }

    /// Number of cached verified tokens.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// The caller of `token` if it was verified before and has not expired.
    fn cached(&self, token: &[u8]) -> Option<Caller> {
        if let Some(src) = &self.jwks {
            src.ensure_refresher(true);
        }
        self.cache.get(token, now_secs())
    }

    /// Verifies `token` without waiting for the network.
    pub fn attempt(&self, token: &str) -> Attempt {
        if let Some(src) = &self.jwks {
            src.ensure_refresher(true);
        }
        let now = now_secs();
        if let Some(caller) = self.cache.get(token.as_bytes(), now) {
            return Attempt::Done(Ok(caller));
        }
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(_) => return Attempt::Done(Err(header_error(token))),
        };
        let generation = self.jwks.as_ref().map_or(0, |j| j.generation());
        match self.select(&header) {
            Ok(Selection::Keys(keys)) => Attempt::Done(self.verify(token, &header, &keys, now)),
            Ok(Selection::UnknownKid(kid)) if self.jwks.is_some() => {
                Attempt::NeedsKeys(PendingToken {
                    token: token.to_owned(),
                    kid,
                    generation,
                })
            }
            Ok(Selection::UnknownKid(kid)) => Attempt::Done(Err(unknown_kid(&kid))),
            Err(e) => Attempt::Done(Err(e)),
        }
    }

    /// Finishes a token whose `kid` was unknown: one (coalesced,
    /// rate-limited) JWKS fetch, then a second and final lookup.
    pub async fn finish(self: Arc<Self>, pending: PendingToken) -> Result<Caller, GatewayError> {
        if let Some(src) = &self.jwks {
            if pending.generation == 0 {
                // Nothing was ever fetched (no `start()`): this is the startup fetch, not a miss.
                let _ = src.refresh_since(0).await;
            } else {
                src.refresh_after_miss(pending.generation).await;
            }
        }
        let header = jsonwebtoken::decode_header(&pending.token)
            .map_err(|_| header_error(&pending.token))?;
        match self.select(&header)? {
            Selection::Keys(keys) => self.verify(&pending.token, &header, &keys, now_secs()),
            Selection::UnknownKid(_) => Err(unknown_kid(&pending.kid)),
        }
    }

    /// The keys a token may be verified with, by `kid` then algorithm.
    fn select(&self, header: &Header) -> Result<Selection, GatewayError> {
        let jwks_keys = self.jwks.as_ref().map(|j| j.keys());
        let all = || {
            self.static_keys
                .iter()
                .chain(jwks_keys.iter().flat_map(|k| k.iter()))
        };
        let mut candidates: Vec<Arc<VerifyKey>> = match &header.kid {
            Some(kid) => all()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .cloned()
                .collect(),
            None => all().filter(|k| k.kid.is_none()).cloned().collect(),
        };
        if candidates.is_empty() {
            // A lone key without a kid answers to any token (config: "any kid if it is the only key").
            let mut keys = all();
            if let (Some(only), None) = (keys.next(), keys.next())
                && only.kid.is_none()
            {
                candidates.push(only.clone());
            }
        }
        if candidates.is_empty() {
            return match &header.kid {
                Some(kid) => Ok(Selection::UnknownKid(kid.clone())),
                None => Err(unauthenticated(
                    "the token has no key ID (`kid`) and every configured key requires one",
                )),
            };
        }
        let matching: Vec<Arc<VerifyKey>> = candidates
            .iter()
            .filter(|k| k.alg == header.alg)
            .cloned()
            .collect();
        if matching.is_empty() {
            let key = &candidates[0];
            return Err(GatewayError::Unauthenticated(format!(
                "the token is signed with {:?} but {} only verifies {:?}",
                header.alg,
                key.label(),
                key.alg
            )));
        }
        Ok(Selection::Keys(matching))
    }

    fn verify(
        &self,
        token: &str,
        header: &Header,
        keys: &[Arc<VerifyKey>],
        now: u64,
    ) -> Result<Caller, GatewayError> {
        let mut first_error: Option<ErrorKind> = None;
        for key in keys {
            // The key's validation lists only its own algorithm: alg confusion is impossible here too.
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &key.validation) {
                Ok(data) => {
                    let caller = self.caller(data.claims)?;
                    if let Some(exp) = caller.claims.get("exp").and_then(numeric_date) {
                        self.cache.insert(token, caller.clone(), exp, now);
                    }
                    return Ok(caller);
                }
                Err(e) => {
                    let kind = e.into_kind();
                    // A claim error means the signature was good: it is the more useful message.
                    let is_signature = matches!(kind, ErrorKind::InvalidSignature);
                    if first_error
                        .as_ref()
                        .is_none_or(|f| matches!(f, ErrorKind::InvalidSignature) && !is_signature)
                    {
                        first_error = Some(kind);
                    }
                }
            }
        }
        Err(token_error(first_error, header.alg, &self.config))
    }

    fn caller(&self, claims: Map<String, Value>) -> Result<Caller, GatewayError> {
        let claim = &self.config.identity_claim;
        let identity = match claims.get(claim.as_str()) {
            Some(Value::String(s)) if !s.is_empty() => Arc::<str>::from(s.as_str()),
            Some(Value::String(_)) => {
                return Err(GatewayError::Unauthenticated(format!(
                    "the token's identity claim `{claim}` is empty"
                )));
            }
            Some(_) => {
                return Err(GatewayError::Unauthenticated(format!(
                    "the token's identity claim `{claim}` must be a string"
                )));
            }
            None => {
                return Err(GatewayError::Unauthenticated(format!(
                    "the token has no identity claim `{claim}`"
                )));
            }
        };
        Ok(Caller::new(identity, claims))
    }
}

/// `exp` as whole unix seconds (integers, or non-negative finite floats).
fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

fn unknown_kid(kid: &str) -> GatewayError {
    GatewayError::Unauthenticated(format!(
        "the token's key ID (`kid`) `{}` is not a known key",
        printable(kid, 64)
    ))
}

/// What is wrong with a token whose header cannot be decoded.
fn header_error(token: &str) -> GatewayError {
    let mut parts = token.split('.');
    let (Some(head), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return unauthenticated(
            "the bearer token is not a JWT (expected three dot-separated parts)",
        );
    };
    let parsed =
        b64::decode_url_safe(head).and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
    let Some(Value::Object(h)) = parsed else {
        return unauthenticated("the bearer token's header is not base64url-encoded JSON");
    };
    match h.get("alg") {
        Some(Value::String(alg)) if alg.eq_ignore_ascii_case("none") => {
            unauthenticated("unsigned tokens (`alg: none`) are not accepted")
        }
        Some(Value::String(alg)) if alg.parse::<Algorithm>().is_err() => {
            GatewayError::Unauthenticated(format!(
                "the token's algorithm `{}` is not supported",
                printable(alg, 32)
            ))
        }
        Some(Value::String(_)) => unauthenticated("the bearer token's header is malformed"),
        _ => unauthenticated("the token's header has no algorithm (`alg`)"),
    }
}

fn token_error(kind: Option<ErrorKind>, alg: Algorithm, cfg: &JwtConfig) -> GatewayError {
    let msg = match kind {
        Some(ErrorKind::ExpiredSignature) => "the token has expired".to_owned(),
        Some(ErrorKind::ImmatureSignature) => {
            "the token is not valid yet (`nbf` is in the future)".to_owned()
        }
        Some(ErrorKind::InvalidIssuer) => match &cfg.issuer {
            Some(iss) => format!("the token's issuer (`iss`) is not `{iss}`"),
            None => "the token's issuer (`iss`) is not accepted".to_owned(),
        },
        Some(ErrorKind::InvalidAudience) => {
            format!(
                "the token's audience (`aud`) does not include {}",
                quoted_list(&cfg.audience)
            )
        }
        Some(ErrorKind::MissingRequiredClaim(c)) => {
            format!("the token has no `{}` claim", printable(&c, 16))
        }
        Some(ErrorKind::InvalidClaimFormat(c)) => {
            format!(
                "the token's `{}` claim has the wrong type",
                printable(&c, 16)
            )
        }
        Some(ErrorKind::InvalidAlgorithm) => {
            format!("the token's algorithm {alg:?} does not match its key")
        }
        Some(ErrorKind::InvalidSignature)
        | Some(ErrorKind::InvalidRsaKey(_))
        | Some(ErrorKind::InvalidEcdsaKey)
        | Some(ErrorKind::InvalidEddsaKey) => "the token's signature is not valid".to_owned(),
        Some(ErrorKind::InvalidToken)
        | Some(ErrorKind::Base64(_))
        | Some(ErrorKind::Json(_))
        | Some(ErrorKind::Utf8(_)) => "the bearer token is not a well-formed JWT".to_owned(),
        _ => "the bearer token was refused".to_owned(),
    };
    GatewayError::Unauthenticated(msg)
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|a| format!("`{a}`"))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Printable ASCII only, bounded (for quoting token-supplied strings).
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_graphic() && c != '`' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

fn same_jwt_config(a: &JwtConfig, b: &JwtConfig) -> bool {
    a.issuer == b.issuer
        && a.audience == b.audience
        && a.identity_claim == b.identity_claim
        && a.leeway == b.leeway
        && a.jwks_url == b.jwks_url
        && a.jwks_refresh == b.jwks_refresh
        && a.jwks_ca_pem == b.jwks_ca_pem
        && a.cache_entries == b.cache_entries
        && a.keys.len() == b.keys.len()
        && a.keys.iter().zip(&b.keys).all(|(x, y)| same_key(x, y))
}

fn same_key(a: &JwtKeyConfig, b: &JwtKeyConfig) -> bool {
    a.kid == b.kid
        && a.alg == b.alg
        && match (&a.material, &b.material) {
            (JwtKeyMaterial::PublicKeyPem(x), JwtKeyMaterial::PublicKeyPem(y)) => x == y,
            (JwtKeyMaterial::Secret(x), JwtKeyMaterial::Secret(y)) => x == y,
            (JwtKeyMaterial::Jwk(x), JwtKeyMaterial::Jwk(y)) => x == y,
            _ => false,
        }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
