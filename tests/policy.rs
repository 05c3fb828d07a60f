//! Caller authentication, route access, tenancy headers, stop-request
//! validation, `explain` and hot reload — over real sockets, against the
//! embedded simulator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use support::*;
use zuora_gateway::config::Config;
use zuora_gateway::reload::{ReloadMetrics, Reloader};
use zuora_gateway::sim::SimHandle;

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "zuora-gateway";
const STOP_PATH: &str = "/v1/uno/data-backfill/propagation/jobs";

// ---- keys and tokens ---------------------------------------------------------------------

struct RsaKey {
    private_pem: String,
    public_pem: String,
}

/// RSA keys made once per test binary (slot 0: the configured `rs1`; 1, 2: others).
fn rsa(slot: usize) -> &'static RsaKey {
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

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> serde_json::Value {
    json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600 })
}

fn hs256(kid: Option<&str>, body: &serde_json::Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_owned);
    encode(
        &h,
        body,
        &EncodingKey::from_secret(HS_KEY.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn rs256(slot: usize, kid: Option<&str>, body: &serde_json::Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(str::to_owned);
    encode(
        &h,
        body,
        &EncodingKey::from_rsa_pem(rsa(slot).private_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn jwk(slot: usize, kid: &str) -> Jwk {
    let key = EncodingKey::from_rsa_pem(rsa(slot).private_pem.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---- configuration ----------------------------------------------------------------------

/// A directory holding `rs1.pub.pem` (and the config file, for reload tests).
fn key_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rs1.pub.pem"), &rsa(0).public_pem).unwrap();
    dir
}

fn callers_yaml(dir: &Path, jwks_url: Option<&str>) -> String {
    let jwks = jwks_url
        .map(|u| format!("    jwks_url: {u}\n"))
        .unwrap_or_default();
    format!(
        "callers:\n  jwt:\n    issuer: {ISSUER}\n    audience: {AUDIENCE}\n    leeway: 5s\n{jwks}    keys:\n      - {{ kid: hs1, alg: HS256, secret: \"{HS_KEY}\" }}\n      - {{ kid: rs1, alg: RS256, public_key_file: \"{}\" }}\n",
        dir.join("rs1.pub.pem").display()
    )
}

const ROUTES_YAML: &str = r#"routes:
  - name: stop-auto-backfill-job
    method: PUT
    path: /v1/uno/data-backfill/propagation/jobs/{jobId}
    upstream: zuora
    allow_callers: ["billing-*", "revenue-ops", "narrow-*"]
  - name: read-auto-backfill-jobs
    method: GET
    path: /v1/uno/data-backfill/propagation/jobs/**
    upstream: zuora
    allow_callers: ["*"]
tenancy:
  - callers: ["billing-eu-*"]
    entity_ids: ["E-EU"]
    org_ids: ["org-eu-1", "org-eu-2"]
  - callers: ["narrow-*"]
    entity_ids: ["E1", "E2"]
    org_ids: ["o1", "o2", "o3"]
    caller_may_narrow: true
  - callers: ["*"]
    routes: ["stop-auto-backfill-job"]
    org_ids: ["org-us"]
"#;

fn gateway_yaml(sim: &SimHandle, dir: &Path, jwks_url: Option<&str>) -> String {
    format!(
        "{SERVER_YAML}  max_body_bytes: 4096\n{}{}{ROUTES_YAML}",
        upstream_yaml(sim),
        callers_yaml(dir, jwks_url)
    )
}

async fn jwt_gateway(sim: &SimHandle, dir: &Path) -> Gateway {
    let g = gateway(&gateway_yaml(sim, dir, None)).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    g
}

fn stop_url(g: &Gateway, job: &str) -> String {
    g.url(&format!("{STOP_PATH}/{job}"))
}

fn stop_as(g: &Gateway, token: &str, extra: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let auth = bearer(token);
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    stop(g, JOB, &headers)
}

/// The simulator's recorded `/v1` requests.
fn api_log(sim: &SimHandle) -> Vec<zuora_gateway::sim::RecordedRequest> {
    sim.control()
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.starts_with("/v1"))
        .collect()
}

/// The reply came from Zuora (the simulator), not from a gateway refusal.
fn assert_forwarded(r: &Reply) {
    if !r.status.is_success() {
        let code = r.code();
        assert!(
            !code.starts_with("99"),
            "refused by the gateway: {}",
            r.text()
        );
    }
}

fn assert_refused(r: &Reply, status: StatusCode, category: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let code = r.code();
    assert!(code.starts_with("99"), "not a gateway code: {code}");
    assert!(
        code.ends_with(category),
        "{code} should end with {category}: {}",
        r.text()
    );
}

fn message(r: &Reply) -> String {
    r.json()["reasons"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

// ---- authentication ---------------------------------------------------------------------

#[tokio::test]
async fn valid_rs256_and_hs256_callers_are_forwarded_without_their_token() {
    let sim = simulator().await;
    let dir = key_dir();
    let g = jwt_gateway(&sim, dir.path()).await;
    let before = sim.control().api_requests();

    let rs = rs256(0, Some("rs1"), &claims("billing-us-1"));
    let hs = hs256(Some("hs1"), &claims("revenue-ops"));
    for token in [&rs, &hs] {
        let r = send(stop_as(&g, token, &[])).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["success"], true);
    }
    assert_eq!(sim.control().job(JOB).unwrap().status, "Stopping");
    assert_eq!(sim.control().api_requests(), before + 2);
    for rec in api_log(&sim) {
        assert_ne!(
            rec.bearer_token.as_deref(),
            Some(rs.as_str()),
            "the caller's JWT reached Zuora"
        );
        assert_ne!(
            rec.bearer_token.as_deref(),
            Some(hs.as_str()),
            "the caller's JWT reached Zuora"
        );
    }
    g.shutdown().await;
}

#[tokio::test]
async fn every_bad_token_is_a_401_and_nothing_is_forwarded() {
    let sim = simulator().await;
    let dir = key_dir();
    let g = jwt_gateway(&sim, dir.path()).await;
    let before = sim.control().api_requests();

    let mut expired = claims("billing-1");
    expired["exp"] = json!(now() - 120);
    let mut wrong_aud = claims("billing-1");
    wrong_aud["aud"] = json!("another-service");
    let mut wrong_iss = claims("billing-1");
    wrong_iss["iss"] = json!("https://evil.test");
    let good = rs256(0, Some("rs1"), &claims("billing-1"));
    let tampered = {
        let forged = hs256(None, &claims("billing-admin"));
        let p: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", p[0], forged.split('.').nth(1).unwrap(), p[2])
    };
    let confused = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rs1".into());
        let key = EncodingKey::from_secret(rsa(0).public_pem.as_bytes()).unwrap();
        encode(&h, &claims("billing-1"), &key).unwrap()
    };
    let unsigned = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        good.split('.').nth(1).unwrap()
    );

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing token", None, "no bearer token"),
        ("garbage", Some("garbage".into()), "not a JWT"),
        ("expired", Some(hs256(Some("hs1"), &expired)), "expired"),
        (
            "wrong aud",
            Some(hs256(Some("hs1"), &wrong_aud)),
            "audience",
        ),
        ("wrong iss", Some(hs256(Some("hs1"), &wrong_iss)), "issuer"),
        (
            "unknown kid",
            Some(hs256(Some("hs9"), &claims("billing-1"))),
            "not a known key",
        ),
        ("alg none", Some(unsigned), "alg: none"),
        (
            "HS256 with the RSA public key",
            Some(confused),
            "only verifies RS256",
        ),
        (
            "wrong key",
            Some(rs256(1, Some("rs1"), &claims("billing-1"))),
            "signature",
        ),
        ("tampered payload", Some(tampered), "signature"),
    ];
    for (what, token, says) in cases {
        let req = match &token {
            Some(t) => stop_as(&g, t, &[]),
            None => stop(&g, JOB, &[]),
        };
        let r = send(req).await.unwrap();
        assert_refused(&r, StatusCode::UNAUTHORIZED, "11");
        assert_eq!(
            r.headers["www-authenticate"], "Bearer error=\"invalid_token\"",
            "{what}"
        );
        let message = message(&r);
        assert!(message.contains(says), "{what}: {message}");
        if let Some(t) = &token {
            assert!(
                !r.text().contains(t.as_str()),
                "{what}: the token is echoed"
            );
        }
    }
    assert_eq!(
        sim.control().api_requests(),
        before,
        "a refused caller reached Zuora"
    );
    g.shutdown().await;
}

/// A JWKS endpoint whose key set the test rotates.
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: Vec<Jwk>) -> Self {
        let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(serde_json::to_string(&JwkSet { keys }).unwrap()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (d, f) = (doc.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (d, f) = (d.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let body = d.lock().unwrap().clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        JwksServer { addr, doc, fetches }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn rotate(&self, keys: Vec<Jwk>) {
        *self.doc.lock().unwrap() = serde_json::to_string(&JwkSet { keys }).unwrap();
    }
}

#[tokio::test]
async fn a_key_rotated_into_the_jwks_is_accepted_without_restart() {
    let sim = simulator().await;
    let dir = key_dir();
    let jwks = JwksServer::start(vec![jwk(1, "2024-a")]).await;
    let g = gateway(&gateway_yaml(&sim, dir.path(), Some(&jwks.url()))).await;
    wait_ready(&g, Duration::from_secs(5)).await;

    let r = send(stop_as(
        &g,
        &rs256(1, Some("2024-a"), &claims("billing-1")),
        &[],
    ))
    .await
    .unwrap();
    assert_forwarded(&r);
    let fetches = jwks.fetches.load(Ordering::SeqCst);
    assert!(fetches >= 1);

    jwks.rotate(vec![jwk(1, "2024-a"), jwk(2, "2025-b")]);
    let r = send(stop_as(
        &g,
        &rs256(2, Some("2025-b"), &claims("billing-1")),
        &[],
    ))
    .await
    .unwrap();
    assert_forwarded(&r);
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        fetches + 1,
        "one re-fetch for the new kid"
    );
    // A kid that is still unknown after that re-fetch is refused, without another fetch.
    let r = send(stop_as(
        &g,
        &rs256(0, Some("2026-c"), &claims("billing-1")),
        &[],
    ))
    .await
    .unwrap();
    assert_refused(&r, StatusCode::UNAUTHORIZED, "11");
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        fetches + 1,
        "unknown-kid fetches are rate limited"
    );
    // Static keys still work beside the JWKS.
    let r = send(stop_as(&g, &hs256(Some("hs1"), &claims("billing-1")), &[]))
        .await
        .unwrap();
    assert_forwarded(&r);
    g.shutdown().await;
}

// ---- authorization and tenancy ----------------------------------------------------------

#[tokio::test]
async fn a_caller_not_in_allow_callers_gets_403_and_nothing_is_forwarded() {
    let sim = simulator().await;
    let dir = key_dir();
    let g = jwt_gateway(&sim, dir.path()).await;
    let before = sim.control().api_requests();
    let r = send(stop_as(
        &g,
        &hs256(Some("hs1"), &claims("reporting-bot")),
        &[],
    ))
    .await
    .unwrap();
    assert_refused(&r, StatusCode::FORBIDDEN, "10");
    assert!(r.text().contains("reporting-bot"), "{}", r.text());
    assert_eq!(sim.control().api_requests(), before);
    // The same caller may use a route that admits everyone.
    let auth = bearer(&hs256(Some("hs1"), &claims("reporting-bot")));
    let r = send(request(
        Method::GET,
        &g.url(STOP_PATH),
        &[("authorization", &auth)],
        "",
    ))
    .await
    .unwrap();
    assert_forwarded(&r);
    assert_eq!(sim.control().api_requests(), before + 1);
    g.shutdown().await;
}

#[tokio::test]
async fn tenancy_headers_follow_the_caller_and_spoofed_ones_never_reach_zuora() {
    let sim = simulator().await;
    let dir = key_dir();
    let g = jwt_gateway(&sim, dir.path()).await;
    let spoof = [
        ("zuora-entity-ids", "E-SPOOF"),
        ("zuora-org-ids", "org-spoof"),
    ];

    sim.control().clear_requests();
    let r = send(stop_as(
        &g,
        &hs256(Some("hs1"), &claims("billing-eu-7")),
        &spoof,
    ))
    .await
    .unwrap();
    assert_forwarded(&r);
    let rec = api_log(&sim).pop().unwrap();
    let all = |name: &str| {
        rec.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(all("zuora-entity-ids"), ["E-EU"]);
    assert_eq!(all("zuora-org-ids"), ["org-eu-1,org-eu-2"]);

    sim.control().clear_requests();
    let r = send(stop_as(
        &g,
        &hs256(Some("hs1"), &claims("revenue-ops")),
        &spoof,
    ))
    .await
    .unwrap();
    assert_forwarded(&r);
    let rec = api_log(&sim).pop().unwrap();
    assert!(
        rec.headers.get("zuora-entity-ids").is_none(),
        "an empty entity list sends no header"
    );
    assert_eq!(rec.headers["zuora-org-ids"], "org-us");

    // No rule for this caller on the read route: no tenancy headers at all, spoofed ones removed.
    sim.control().clear_requests();
    let auth = bearer(&hs256(Some("hs1"), &claims("reporting-bot")));
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(&spoof);
    let r = send(request(Method::GET, &g.url(STOP_PATH), &headers, ""))
        .await
        .unwrap();
    assert_forwarded(&r);
    let rec = api_log(&sim).pop().unwrap();
    assert!(rec.headers.get("zuora-entity-ids").is_none());
    assert!(rec.headers.get("zuora-org-ids").is_none());

    for rec in api_log(&sim) {
        for v in rec.headers.values() {
            assert!(!v.as_bytes().ends_with(b"SPOOF") && !v.as_bytes().ends_with(b"spoof"));
        }
    }
    g.shutdown().await;
}

#[tokio::test]
async fn a_narrowing_rule_keeps_a_subset_and_refuses_anything_else() {
    let sim = simulator().await;
    let dir = key_dir();
    let g = jwt_gateway(&sim, dir.path()).await;
    let token = hs256(Some("hs1"), &claims("narrow-app"));

    sim.control().clear_requests();
    let r = send(stop_as(
        &g,
        &token,
        &[("zuora-entity-ids", "E2"), ("zuora-org-ids", "o1,o3")],
    ))
    .await
    .unwrap();
    assert_forwarded(&r);
    let rec = api_log(&sim).pop().unwrap();
    assert_eq!(rec.headers["zuora-entity-ids"], "E2");
    assert_eq!(rec.headers["zuora-org-ids"], "o1,o3");

    let before = sim.control().api_requests();
    let r = send(stop_as(&g, &token, &[("zuora-org-ids", "o1,o9")]))
        .await
        .unwrap();
    assert_refused(&r, StatusCode::FORBIDDEN, "10");
    assert!(r.text().contains("o9"), "{}", r.text());
    assert_eq!(sim.control().api_requests(), before);
    g.shutdown().await;
}

// ---- stop-request validation ------------------------------------------------------------

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn every_malformed_job_id_and_body_gets_the_documented_400_and_nothing_is_forwarded() {
    let sim = simulator().await;
    let dir = key_dir();
    let g = jwt_gateway(&sim, dir.path()).await;
    let auth = bearer(&hs256(Some("hs1"), &claims("billing-1")));
    let json = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let before = sim.control().api_requests();

    for (job, says) in [
        ("ff8080818bb300af018bb325fe0c58f", "got 31"),
        ("ff8080818bb300af018bb325fe0c58f3a", "got 33"),
        ("ff8080818bb300af-18bb325fe0c58f3", "found `-`"),
        ("ff8080818bb300af_18bb325fe0c58f3", "found `_`"),
        ("ff8080818bb300af%2018bb325fe0c58", "found `%`"),
    ] {
        let r = send(request(
            Method::PUT,
            &stop_url(&g, job),
            &json,
            r#"{"status":"Stopping"}"#,
        ))
        .await
        .unwrap();
        assert_refused(&r, StatusCode::BAD_REQUEST, "20");
        assert!(message(&r).contains(says), "{job}: {}", r.text());
    }

    // (body, extra headers, status, category, what the message says)
    type Case = (
        Vec<u8>,
        &'static [(&'static str, &'static str)],
        StatusCode,
        &'static str,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (b"".to_vec(), &[], StatusCode::BAD_REQUEST, "22", "empty"),
        (
            b"{}".to_vec(),
            &[],
            StatusCode::BAD_REQUEST,
            "22",
            "`status`",
        ),
        (
            br#"{"status":"Running"}"#.to_vec(),
            &[],
            StatusCode::BAD_REQUEST,
            "20",
            "\"Running\"",
        ),
        (
            br#"{"status":1}"#.to_vec(),
            &[],
            StatusCode::BAD_REQUEST,
            "20",
            "a number",
        ),
        (
            br#"["Stopping"]"#.to_vec(),
            &[],
            StatusCode::BAD_REQUEST,
            "20",
            "JSON object",
        ),
        (
            br#"{"status":"Stopping","status":"Running"}"#.to_vec(),
            &[],
            StatusCode::BAD_REQUEST,
            "20",
            "more than once",
        ),
        (
            br#"{"status":"Stopping""#.to_vec(),
            &[],
            StatusCode::BAD_REQUEST,
            "90",
            "not valid JSON",
        ),
        (
            b"status=Stopping".to_vec(),
            &[],
            StatusCode::BAD_REQUEST,
            "90",
            "not valid JSON",
        ),
        (
            gzip(br#"{"status":"Stopped"}"#),
            &[("content-encoding", "gzip")],
            StatusCode::BAD_REQUEST,
            "20",
            "\"Stopped\"",
        ),
        (
            b"not gzip".to_vec(),
            &[("content-encoding", "gzip")],
            StatusCode::BAD_REQUEST,
            "20",
            "gzip",
        ),
        (
            vec![b' '; 5000],
            &[],
            StatusCode::PAYLOAD_TOO_LARGE,
            "70",
            "4096",
        ),
        (
            gzip(&vec![b' '; 100_000]),
            &[("content-encoding", "gzip")],
            StatusCode::PAYLOAD_TOO_LARGE,
            "70",
            "4096",
        ),
    ];
    for (body, extra, status, category, says) in cases {
        let mut headers = json.to_vec();
        headers.extend_from_slice(extra);
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
        let r = send(request(Method::PUT, &stop_url(&g, JOB), &headers, body))
            .await
            .unwrap();
        assert_refused(&r, status, category);
        assert!(message(&r).contains(says), "{shown}: {}", r.text());
    }
    assert_eq!(
        sim.control().api_requests(),
        before,
        "an invalid stop request reached Zuora"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn a_valid_gzip_stop_body_is_validated_and_forwarded_as_sent() {
    let sim = simulator().await;
    let dir = key_dir();
    let g = jwt_gateway(&sim, dir.path()).await;
    let auth = bearer(&hs256(Some("hs1"), &claims("billing-1")));
    let body = gzip(br#"{"status":"Stopping"}"#);
    sim.control().clear_requests();
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    let r = send(request(
        Method::PUT,
        &stop_url(&g, JOB),
        &headers,
        body.clone(),
    ))
    .await
    .unwrap();
    assert_forwarded(&r);
    let rec = api_log(&sim).pop().unwrap();
    assert_eq!(
        rec.body.as_ref(),
        body.as_slice(),
        "the original gzip bytes are forwarded"
    );
    assert_eq!(rec.headers["content-encoding"], "gzip");
    g.shutdown().await;
}

// ---- explain ----------------------------------------------------------------------------

fn explain(config: &Path, caller: &str, method: &str, path: &str) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zuora-gateway"))
        .args(["explain", "--config"])
        .arg(config)
        .args(["--caller", caller, "--claim", "team=billing", method, path])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn explain_shows_the_decision_for_an_allowed_and_a_denied_caller() {
    let sim = simulator().await;
    let dir = key_dir();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, gateway_yaml(&sim, dir.path(), None)).unwrap();
    let path = format!("{STOP_PATH}/{JOB}");

    let (code, text) = explain(&file, "billing-eu-3", "PUT", &path);
    assert_eq!(code, 0, "{text}");
    for needle in [
        "route:        stop-auto-backfill-job",
        "ALLOWED by allow_callers pattern \"billing-*\"",
        "rule tenancy[0]",
        "Zuora-Entity-Ids: E-EU",
        "Zuora-Org-Ids: org-eu-1,org-eu-2",
        "team=billing",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }

    let (code, text) = explain(&file, "reporting-bot", "PUT", &path);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("DENIED (403)"), "{text}");
    assert!(
        text.contains("[\"billing-*\", \"revenue-ops\", \"narrow-*\"]"),
        "{text}"
    );

    let (code, text) = explain(&file, "billing-1", "GET", "/v1/accounts");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("DENIED (404)"), "{text}");
}

// ---- hot reload -------------------------------------------------------------------------

struct Reloadable {
    g: Gateway,
    file: PathBuf,
    metrics: ReloadMetrics,
    _dir: tempfile::TempDir,
}

async fn reloadable(sim: &SimHandle, watch: bool) -> Reloadable {
    let dir = key_dir();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, gateway_yaml(sim, dir.path(), None)).unwrap();
    let config = Config::load(&file).unwrap();
    let g = start(config).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let metrics = ReloadMetrics::default();
    let policy = g.running.as_ref().unwrap().policy.clone();
    Reloader::new(&file, policy)
        .with_metrics(metrics.clone())
        .watch_file(watch)
        .spawn(std::future::pending());
    Reloadable {
        g,
        file,
        metrics,
        _dir: dir,
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn sighup() {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sighup_applies_a_changed_rule_and_keeps_the_old_rules_when_the_file_is_broken() {
    let sim = simulator().await;
    let r = reloadable(&sim, false).await;
    let g = &r.g;
    let token = hs256(Some("hs1"), &claims("reporting-bot"));
    assert_refused(
        &send(stop_as(g, &token, &[])).await.unwrap(),
        StatusCode::FORBIDDEN,
        "10",
    );

    let text = std::fs::read_to_string(&r.file).unwrap();
    std::fs::write(
        &r.file,
        text.replace("\"narrow-*\"]", "\"narrow-*\", \"reporting-*\"]"),
    )
    .unwrap();
    sighup();
    wait_for("a successful reload", || r.metrics.get("success") == 1).await;
    assert_forwarded(&send(stop_as(g, &token, &[])).await.unwrap());

    std::fs::write(&r.file, "server: [this is not: the schema\n").unwrap();
    sighup();
    wait_for("a failed reload", || r.metrics.get("failure") == 1).await;
    assert_forwarded(&send(stop_as(g, &token, &[])).await.unwrap());
    let other = hs256(Some("hs1"), &claims("intruder"));
    assert_refused(
        &send(stop_as(g, &other, &[])).await.unwrap(),
        StatusCode::FORBIDDEN,
        "10",
    );
    assert_eq!(r.metrics.get("success"), 1);
    r.g.shutdown().await;
}

#[tokio::test]
async fn editing_the_config_file_reloads_it() {
    let sim = simulator().await;
    let r = reloadable(&sim, true).await;
    let token = hs256(Some("hs1"), &claims("reporting-bot"));
    assert_refused(
        &send(stop_as(&r.g, &token, &[])).await.unwrap(),
        StatusCode::FORBIDDEN,
        "10",
    );
    let text = std::fs::read_to_string(&r.file).unwrap();
    std::fs::write(
        &r.file,
        text.replace("\"narrow-*\"]", "\"narrow-*\", \"reporting-*\"]"),
    )
    .unwrap();
    // Poll the behaviour, not the counter: another test's SIGHUP may also reload this gateway.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = send(stop_as(&r.g, &token, &[])).await.unwrap();
        if reply.status != StatusCode::FORBIDDEN {
            assert_forwarded(&reply);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edit was not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(r.metrics.get("success") >= 1);
    r.g.shutdown().await;
}
