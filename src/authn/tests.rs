use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

use super::*;
use crate::config::{JwtKeyConfig, JwtKeyMaterial};
use crate::secret::Secret;

const HS_SECRET: &str = "unit-test-hs256-secret-0123456789abcdef";

struct RsaKey {
    private_pem: String,
    public_pem: String,
}

fn rsa_key(slot: usize) -> &'static RsaKey {
    static KEYS: OnceLock<Vec<RsaKey>> = OnceLock::new();
    &KEYS.get_or_init(|| {
        (0..3)
            .map(|_| {
                let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
                RsaKey {
                    private_pem: kp.serialize_pem(),
                    public_pem: kp.public_key_pem(),
                }
            })
            .collect()
    })[slot]
}

fn rsa_encoding(slot: usize) -> EncodingKey {
    EncodingKey::from_rsa_pem(rsa_key(slot).private_pem.as_bytes()).unwrap()
}

fn jwk(slot: usize, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(&rsa_encoding(slot), Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

fn base_config() -> JwtConfig {
    JwtConfig {
        issuer: Some("https://issuer.test".into()),
        audience: vec!["zuora-gateway".into()],
        identity_claim: "sub".into(),
        leeway: Duration::from_secs(5),
        keys: vec![
            JwtKeyConfig {
                kid: Some("hs1".into()),
                alg: Algorithm::HS256,
                material: JwtKeyMaterial::Secret(Secret::new(HS_SECRET)),
            },
            JwtKeyConfig {
                kid: Some("rs1".into()),
                alg: Algorithm::RS256,
                material: JwtKeyMaterial::PublicKeyPem(Arc::new(
                    rsa_key(0).public_pem.clone().into_bytes(),
                )),
            },
        ],
        jwks_url: None,
        jwks_refresh: Duration::from_secs(300),
        jwks_ca_pem: None,
        cache_entries: 100,
    }
}

fn claims(sub: &str) -> serde_json::Value {
    json!({
        "sub": sub,
        "iss": "https://issuer.test",
        "aud": "zuora-gateway",
        "exp": now_secs() + 600,
        "team": "billing",
    })
}

fn hs_token(kid: Option<&str>, body: &serde_json::Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_owned);
    encode(
        &h,
        body,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn rs_token(slot: usize, kid: Option<&str>, body: &serde_json::Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(str::to_owned);
    encode(&h, body, &rsa_encoding(slot)).unwrap()
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

fn jwt(cfg: &JwtConfig) -> Arc<JwtAuthenticator> {
    Arc::new(JwtAuthenticator::new(cfg).unwrap())
}

fn now_done(a: &JwtAuthenticator, token: &str) -> Result<Caller, GatewayError> {
    match a.attempt(token) {
        Attempt::Done(r) => r,
        Attempt::NeedsKeys(p) => panic!("unexpected key fetch for {p:?}"),
    }
}

fn refused(r: Result<Caller, GatewayError>) -> String {
    match r {
        Err(GatewayError::Unauthenticated(m)) => m,
        other => panic!("expected 401, got {other:?}"),
    }
}

#[test]
fn valid_hs256_and_rs256_tokens_name_the_caller_and_keep_all_claims() {
    let a = jwt(&base_config());
    let c = now_done(&a, &hs_token(Some("hs1"), &claims("billing-eu-1"))).unwrap();
    assert_eq!(&*c.identity, "billing-eu-1");
    assert_eq!(c.claims["team"], "billing");
    let c = now_done(&a, &rs_token(0, Some("rs1"), &claims("revenue-ops"))).unwrap();
    assert_eq!(&*c.identity, "revenue-ops");
}

#[test]
fn a_verified_token_is_cached_until_exp() {
    let a = jwt(&base_config());
    let token = rs_token(0, Some("rs1"), &claims("svc"));
    now_done(&a, &token).unwrap();
    assert_eq!(a.cached_tokens(), 1);
    now_done(&a, &token).unwrap();
    assert_eq!(a.cached_tokens(), 1);
    // An expired token is never served from the cache (nor cached).
    let mut old = claims("svc");
    old["exp"] = json!(now_secs() - 60);
    refused(now_done(&a, &hs_token(Some("hs1"), &old)));
    assert_eq!(a.cached_tokens(), 1);
}

#[test]
fn each_bad_token_is_refused_with_a_message_that_says_why_and_never_the_token() {
    let a = jwt(&base_config());
    let mut expired = claims("svc");
    expired["exp"] = json!(now_secs() - 60);
    let mut no_exp = claims("svc");
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut future = claims("svc");
    future["nbf"] = json!(now_secs() + 600);
    let mut wrong_aud = claims("svc");
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("svc");
    wrong_iss["iss"] = json!("https://evil.test");
    let mut numeric_sub = claims("svc");
    numeric_sub["sub"] = json!(42);
    let good = rs_token(0, Some("rs1"), &claims("svc"));
    let tampered_payload = {
        let forged = hs_token(None, &claims("admin"));
        let parts: Vec<&str> = good.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            forged.split('.').nth(1).unwrap(),
            parts[2]
        )
    };
    // HS256 "signed" with the RSA public key as the HMAC secret: the classic confusion attack.
    let confused = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rs1".into());
        encode(
            &h,
            &claims("svc"),
            &EncodingKey::from_secret(rsa_key(0).public_pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let unsigned = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        good.split('.').nth(1).unwrap()
    );
    let cases: Vec<(String, &str)> = vec![
        (hs_token(Some("hs1"), &expired), "expired"),
        (hs_token(Some("hs1"), &no_exp), "no `exp` claim"),
        (hs_token(Some("hs1"), &future), "not valid yet"),
        (hs_token(Some("hs1"), &wrong_aud), "audience"),
        (hs_token(Some("hs1"), &wrong_iss), "issuer"),
        (hs_token(Some("hs1"), &numeric_sub), "must be a string"),
        (
            hs_token(Some("nope"), &claims("svc")),
            "`nope` is not a known key",
        ),
        (hs_token(None, &claims("svc")), "no key ID"),
        (
            rs_token(1, Some("rs1"), &claims("svc")),
            "signature is not valid",
        ),
        (tampered_payload, "signature is not valid"),
        (
            confused,
            "signed with HS256 but key `rs1` only verifies RS256",
        ),
        (unsigned, "alg: none"),
        ("garbage".to_owned(), "not a JWT"),
        ("a.b.c".to_owned(), "not base64url-encoded JSON"),
    ];
    for (token, says) in cases {
        let msg = refused(now_done(&a, &token));
        assert!(msg.contains(says), "expected {says:?} in {msg:?}");
        assert!(!msg.contains(&token), "the message echoes the token: {msg}");
    }
    assert_eq!(a.cached_tokens(), 0);
}

#[test]
fn authorization_header_problems_are_401s() {
    let a = Authenticator::Jwt(jwt(&base_config()));
    let token = hs_token(Some("hs1"), &claims("svc"));
    let mut two = bearer(&token);
    two.append(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let mut basic = HeaderMap::new();
    basic.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwYXNz"),
    );
    let mut empty = HeaderMap::new();
    empty.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer   "));
    for (headers, says) in [
        (HeaderMap::new(), "no bearer token"),
        (two, "more than one"),
        (basic, "scheme must be `Bearer`"),
        (empty, "empty"),
    ] {
        let msg = match a.attempt(&headers) {
            Attempt::Done(r) => refused(r),
            Attempt::NeedsKeys(_) => panic!(),
        };
        assert!(msg.contains(says), "{msg}");
    }
    let mut lower = HeaderMap::new();
    lower.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("bearer {token}")).unwrap(),
    );
    assert!(matches!(a.attempt(&lower), Attempt::Done(Ok(_))));
}

#[test]
fn a_lone_key_without_kid_verifies_any_token_of_its_algorithm() {
    let mut cfg = base_config();
    cfg.keys = vec![JwtKeyConfig {
        kid: None,
        alg: Algorithm::HS256,
        material: JwtKeyMaterial::Secret(Secret::new(HS_SECRET)),
    }];
    let a = jwt(&cfg);
    now_done(&a, &hs_token(None, &claims("svc"))).unwrap();
    now_done(&a, &hs_token(Some("whatever"), &claims("svc"))).unwrap();
    let msg = refused(now_done(&a, &rs_token(0, None, &claims("svc"))));
    assert!(msg.contains("only verifies HS256"), "{msg}");
}

#[test]
fn trusted_identity_needs_no_credentials() {
    let a = Authenticator::new(&CallerAuthConfig::TrustedIdentity("sidecar-app".into())).unwrap();
    match a.attempt(&HeaderMap::new()) {
        Attempt::Done(Ok(c)) => assert_eq!(&*c.identity, "sidecar-app"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn reload_keeps_the_authenticator_only_when_callers_are_unchanged() {
    let cfg = base_config();
    let a = Authenticator::new(&CallerAuthConfig::Jwt(Box::new(cfg.clone()))).unwrap();
    assert!(a.is_built_from(&CallerAuthConfig::Jwt(Box::new(cfg.clone()))));
    let mut changed = cfg.clone();
    changed.keys[0].material =
        JwtKeyMaterial::Secret(Secret::new("another-secret-0123456789abcdef0123"));
    assert!(!a.is_built_from(&CallerAuthConfig::Jwt(Box::new(changed))));
    let mut changed = cfg;
    changed.audience = vec!["other".into()];
    assert!(!a.is_built_from(&CallerAuthConfig::Jwt(Box::new(changed))));
    assert!(!a.is_built_from(&CallerAuthConfig::TrustedIdentity("x".into())));
}

/// A JWKS endpoint whose document, status and fetch count the test controls.
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<String>>,
    status: Arc<AtomicU16>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: Vec<Jwk>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(serde_json::to_string(&JwkSet { keys }).unwrap()));
        let status = Arc::new(AtomicU16::new(200));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (d, s, f) = (doc.clone(), status.clone(), fetches.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (d, s, f) = (d.clone(), s.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let body = d.lock().unwrap().clone();
                        let status = s.load(Ordering::SeqCst);
                        async move {
                            // A little latency makes concurrent misses overlap.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let mut r = Response::new(Full::new(Bytes::from(body)));
                            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            doc,
            status,
            fetches,
        }
    }

    fn set_keys(&self, keys: Vec<Jwk>) {
        *self.doc.lock().unwrap() = serde_json::to_string(&JwkSet { keys }).unwrap();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn jwks_config(server: &JwksServer) -> JwtConfig {
    let mut cfg = base_config();
    cfg.keys.clear();
    cfg.jwks_url = Some(format!("http://{}/jwks.json", server.addr).parse().unwrap());
    cfg
}

async fn authenticate(a: &Authenticator, token: &str) -> Result<Caller, GatewayError> {
    a.authenticate(&bearer(token)).await
}

#[tokio::test]
async fn jwks_keys_are_fetched_at_start_and_rotation_is_picked_up_on_an_unknown_kid() {
    let server = JwksServer::start(vec![jwk(0, "k1")]).await;
    let a = Authenticator::new(&CallerAuthConfig::Jwt(Box::new(jwks_config(&server)))).unwrap();
    a.start().await;
    assert_eq!(server.fetches(), 1);
    authenticate(&a, &rs_token(0, Some("k1"), &claims("svc")))
        .await
        .unwrap();
    assert_eq!(server.fetches(), 1, "a known kid needs no fetch");

    server.set_keys(vec![jwk(0, "k1"), jwk(1, "k2")]);
    let c = authenticate(&a, &rs_token(1, Some("k2"), &claims("rotated")))
        .await
        .unwrap();
    assert_eq!(&*c.identity, "rotated");
    assert_eq!(server.fetches(), 2);

    // Unknown kids re-fetch at most once per interval.
    for _ in 0..3 {
        let msg = refused(authenticate(&a, &rs_token(2, Some("k3"), &claims("svc"))).await);
        assert!(msg.contains("`k3` is not a known key"), "{msg}");
    }
    assert_eq!(
        server.fetches(),
        2,
        "the rotation fetch was the miss fetch of this interval"
    );
}

#[tokio::test]
async fn concurrent_unknown_kid_misses_are_coalesced_into_one_fetch() {
    let server = JwksServer::start(vec![jwk(0, "k1")]).await;
    let cfg = jwks_config(&server);
    let a = Arc::new(Authenticator::new(&CallerAuthConfig::Jwt(Box::new(cfg))).unwrap());
    a.start().await;
    server.set_keys(vec![jwk(1, "k2")]);
    let token = rs_token(1, Some("k2"), &claims("svc"));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (a, t) = (a.clone(), token.clone());
            tokio::spawn(async move { authenticate(&a, &t).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        server.fetches(),
        2,
        "one start fetch + one coalesced miss fetch"
    );
}

#[tokio::test]
async fn the_last_good_key_set_is_kept_while_the_jwks_endpoint_is_down() {
    let server = JwksServer::start(vec![jwk(0, "k1")]).await;
    let a = Authenticator::new(&CallerAuthConfig::Jwt(Box::new(jwks_config(&server)))).unwrap();
    a.start().await;
    let Authenticator::Jwt(j) = &a else { panic!() };
    assert!(j.jwks_loaded());
    server.status.store(503, Ordering::SeqCst);
    j.jwks.as_ref().unwrap().refresh().await.unwrap_err();
    server.status.store(200, Ordering::SeqCst);
    server.set_keys(vec![]);
    j.jwks.as_ref().unwrap().refresh().await.unwrap_err();
    authenticate(&a, &rs_token(0, Some("k1"), &claims("svc")))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_withdrawn_jwks_key_stops_verifying_even_cached_tokens() {
    let server = JwksServer::start(vec![jwk(0, "k1"), jwk(1, "k2")]).await;
    let a = Authenticator::new(&CallerAuthConfig::Jwt(Box::new(jwks_config(&server)))).unwrap();
    a.start().await;
    let token = rs_token(0, Some("k1"), &claims("svc"));
    authenticate(&a, &token).await.unwrap();
    server.set_keys(vec![jwk(1, "k2")]);
    let Authenticator::Jwt(j) = &a else { panic!() };
    j.jwks.as_ref().unwrap().refresh().await.unwrap();
    assert_eq!(j.cached_tokens(), 0);
    let msg = refused(authenticate(&a, &token).await);
    assert!(msg.contains("`k1` is not a known key"), "{msg}");
}

#[test]
fn unusable_jwks_entries_are_skipped_not_fatal() {
    let rules = ClaimRules::new(&base_config());
    let good = serde_json::to_value(jwk(0, "k1")).unwrap();
    let doc = json!({"keys": [
        {"kty": "oct", "kid": "sym", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"},
        {"kty": "RSA", "kid": "enc", "use": "enc", "n": good["n"], "e": good["e"]},
        {"kty": "weird", "kid": "w"},
        {"kty": "RSA", "kid": "bad-alg", "alg": "RSA-OAEP", "n": good["n"], "e": good["e"]},
        good,
    ]});
    let keys = jwks::parse_jwks(doc.to_string().as_bytes(), &rules).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].kid.as_deref(), Some("k1"));
    assert_eq!(keys[0].alg, Algorithm::RS256);
}

#[test]
fn a_cached_token_is_served_only_from_a_header_the_full_parser_accepts() {
    let a = Authenticator::Jwt(jwt(&base_config()));
    let token = hs_token(Some("hs1"), &claims("billing-1"));
    let header = |v: &[u8]| {
        let mut h = HeaderMap::new();
        h.append(header::AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
        h
    };
    let outcome = |h: &HeaderMap| match a.attempt(h) {
        Attempt::Done(r) => r,
        Attempt::NeedsKeys(_) => panic!("no key fetch expected"),
    };
    outcome(&bearer(&token)).unwrap();
    // Same token, other spelling of the scheme and whitespace: the cached caller.
    for spelled in [format!("bEaReR {token}"), format!(" \tBearer   {token}\t ")] {
        let c = outcome(&header(spelled.as_bytes())).unwrap();
        assert_eq!(&*c.identity, "billing-1", "{spelled:?}");
    }
    // Same token, but a header the parser refuses: refused with its message, cache or not.
    let mut obs_text = format!("Bearer {token}").into_bytes();
    obs_text.push(0xE9);
    let mut two = bearer(&token);
    two.append(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    for (headers, says) in [
        (header(&obs_text), "not visible ASCII"),
        (two, "more than one"),
        (header(format!("Bearer\t{token}").as_bytes()), "scheme"),
        (header(format!("Basic {token}").as_bytes()), "scheme"),
        (header(format!("Bearer {token}x").as_bytes()), "signature"),
    ] {
        let msg = refused(outcome(&headers));
        assert!(msg.contains(says), "{says}: {msg}");
    }
}
