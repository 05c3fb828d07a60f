//! Micro benchmarks of the gateway's per-request hot path, each next to a
//! naive baseline measured in the same run (Pingora's habit): the numbers
//! that matter are the ratios within one run, not absolute nanoseconds.
//!
//! Run: `cargo bench --bench hotpath` (add a filter, e.g. `-- route_match`).
//! Under `cargo test --all-targets` criterion runs every bench once (test mode).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use zuora_gateway::authn::{Attempt, Authenticator};
use zuora_gateway::body::full;
use zuora_gateway::config::{CallerAuthConfig, Config, ProcessEnv};
use zuora_gateway::context::Caller;
use zuora_gateway::error::GatewayError;
use zuora_gateway::layers::rescue::into_response;
use zuora_gateway::policy::{Policy, check_path};
use zuora_gateway::upstream::headers::strip_hop_by_hop;

/// Number of routes in the benchmark table.
const ROUTES: usize = 50;
const JOB: &str = "ff8080818bb300af018bb325fe0c58f3";

/// The i-th route template: Zuora-like, mixing literals, `{param}` and `**`.
fn template(i: usize) -> (String, &'static str) {
    match i % 5 {
        0 => (format!("/v1/family{i}/jobs/{{jobId}}"), "PUT"),
        1 => (format!("/v1/family{i}/jobs/**"), "GET"),
        2 => (format!("/v1/family{i}/jobs"), "POST"),
        3 => (
            format!("/v1/object/account{i}/{{id}}/items/{{item}}"),
            "GET",
        ),
        _ => (format!("/v1/settings/family{i}"), "GET"),
    }
}

/// A validated config with [`ROUTES`] routes; the last one is the real
/// stop-job route, so a stop request walks the whole table.
fn config_yaml() -> String {
    let mut y = String::from(
        "server:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n\
         upstreams:\n  zuora:\n    base_url: http://127.0.0.1:9\n    oauth:\n      client_id: id\n      client_secret: secret\n\
         callers:\n  trusted_identity: bench\nroutes:\n",
    );
    for i in 0..ROUTES - 1 {
        let (path, method) = template(i);
        y.push_str(&format!(
            "  - name: r{i}\n    method: {method}\n    path: {path}\n    upstream: zuora\n    allow_callers: [\"*\"]\n"
        ));
    }
    y.push_str(
        "  - name: stop\n    method: PUT\n    path: /v1/uno/data-backfill/propagation/jobs/{jobId}\n    upstream: zuora\n    allow_callers: [\"*\"]\n",
    );
    y
}

fn policy() -> Policy {
    let config = Config::from_yaml(
        &config_yaml(),
        Path::new("bench.yaml"),
        Path::new("."),
        &ProcessEnv,
    )
    .expect("bench config is valid");
    Policy::compile(Arc::new(config))
}

/// Naive baseline 1: split the template strings on every lookup.
struct NaiveTable(Vec<(Method, String)>);

impl NaiveTable {
    fn lookup(&self, method: &Method, path: &str) -> Option<usize> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        'routes: for (i, (m, tpl)) in self.0.iter().enumerate() {
            if m != method {
                continue;
            }
            let parts: Vec<&str> = tpl.split('/').filter(|s| !s.is_empty()).collect();
            let tail = parts.last() == Some(&"**");
            let fixed = if tail { parts.len() - 1 } else { parts.len() };
            if segs.len() < fixed || (!tail && segs.len() != fixed) {
                continue;
            }
            for (p, s) in parts.iter().take(fixed).zip(&segs) {
                if !(p.starts_with('{') || p == s) {
                    continue 'routes;
                }
            }
            return Some(i);
        }
        None
    }
}

fn naive_table() -> NaiveTable {
    let mut v: Vec<(Method, String)> = (0..ROUTES - 1)
        .map(|i| {
            let (p, m) = template(i);
            (m.parse().unwrap(), p)
        })
        .collect();
    v.push((
        Method::PUT,
        "/v1/uno/data-backfill/propagation/jobs/{jobId}".into(),
    ));
    NaiveTable(v)
}

fn route_match(c: &mut Criterion) {
    let policy = policy();
    let naive = naive_table();
    // Baseline 2: exact-match HashMap (only works for literal paths; the floor).
    let exact: HashMap<(Method, String), usize> = (0..ROUTES)
        .map(|i| {
            (
                (
                    Method::PUT,
                    format!("/v1/uno/data-backfill/propagation/jobs/{i}"),
                ),
                i,
            )
        })
        .chain(std::iter::once((
            (
                Method::PUT,
                format!("/v1/uno/data-backfill/propagation/jobs/{JOB}"),
            ),
            ROUTES - 1,
        )))
        .collect();
    let last = format!("/v1/uno/data-backfill/propagation/jobs/{JOB}");
    let first = format!("/v1/family0/jobs/{JOB}");
    let miss = "/v1/not/routed/anywhere";

    assert_eq!(
        policy.routes.lookup(&Method::PUT, &last).unwrap().route,
        ROUTES - 1
    );
    assert_eq!(naive.lookup(&Method::PUT, &last), Some(ROUTES - 1));

    let mut g = c.benchmark_group("route_match_50");
    g.bench_function("route_table/first", |b| {
        b.iter(|| {
            policy
                .routes
                .lookup(black_box(&Method::PUT), black_box(&first))
        })
    });
    g.bench_function("route_table/last", |b| {
        b.iter(|| {
            policy
                .routes
                .lookup(black_box(&Method::PUT), black_box(&last))
        })
    });
    g.bench_function("route_table/miss_404", |b| {
        b.iter(|| {
            policy
                .routes
                .lookup(black_box(&Method::GET), black_box(miss))
        })
    });
    g.bench_function("baseline_naive_split/last", |b| {
        b.iter(|| naive.lookup(black_box(&Method::PUT), black_box(&last)))
    });
    g.bench_function("baseline_hashmap_exact/last", |b| {
        b.iter(|| {
            // The key has to be owned to look up a (Method, String) tuple.
            exact.get(&(black_box(Method::PUT), black_box(last.as_str()).to_owned()))
        })
    });
    g.finish();
}

/// Naive baseline: percent-decode into a new String, then look for dot
/// segments and backslashes (what a quick hand-written check would do).
fn naive_check_path(path: &str) -> bool {
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = path
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            decoded.push(v as char);
            i += 3;
            continue;
        }
        decoded.push(bytes[i] as char);
        i += 1;
    }
    !decoded.contains('\\') && !decoded.split('/').any(|s| s == "." || s == "..")
}

fn path_check(c: &mut Criterion) {
    let ok = format!("/v1/uno/data-backfill/propagation/jobs/{JOB}");
    let bad = "/v1/uno/data-backfill/propagation/jobs/../../../oauth/token";
    assert!(check_path(&ok).is_ok() && check_path(bad).is_err());
    assert!(naive_check_path(&ok) && !naive_check_path(bad));
    let mut g = c.benchmark_group("check_path");
    g.bench_function("check_path/ok", |b| b.iter(|| check_path(black_box(&ok))));
    g.bench_function("check_path/dot_dot", |b| {
        b.iter(|| check_path(black_box(bad)))
    });
    g.bench_function("baseline_decode_then_scan/ok", |b| {
        b.iter(|| naive_check_path(black_box(&ok)))
    });
    g.finish();
}

/// A typical caller request's headers (what wrk/curl and a service SDK send).
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("22"));
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static("billing-service/1.4"),
    );
    h.insert(
        "zuora-track-id",
        HeaderValue::from_static("a1b2c3d4-e5f6-4711-8899-aabbccddeeff"),
    );
    h.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    h
}

/// A typical Zuora response's headers (no hop-by-hop headers).
fn response_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json; charset=utf-8"),
        ("zuora-request-id", "d610fe5f-973e-43e7-8792-d6701db6346c"),
        ("ratelimit-limit", "50000;w=60"),
        ("ratelimit-remaining", "49999"),
        ("ratelimit-reset", "56"),
        ("concurrency-limit-type", "Default"),
        ("concurrency-limit-limit", "40"),
        ("concurrency-limit-remaining", "39"),
        ("content-length", "16"),
        ("date", "Sun, 29 Nov 2026 07:12:33 GMT"),
    ] {
        h.insert(
            http::HeaderName::from_static(k),
            HeaderValue::from_static(v),
        );
    }
    h
}

fn hop_by_hop(c: &mut Criterion) {
    let template = request_headers();
    let response = response_headers();
    let mut g = c.benchmark_group("hop_by_hop");
    // The strip itself (the clone happens in the untimed setup).
    g.bench_function("strip_hop_by_hop/request_with_connection", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| strip_hop_by_hop(black_box(h)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("strip_hop_by_hop/response_without_any", |b| {
        b.iter_batched_ref(
            || response.clone(),
            |h| strip_hop_by_hop(black_box(h)),
            BatchSize::SmallInput,
        )
    });
    // Baseline: what one HeaderMap clone costs (a proxy that copies headers).
    g.bench_function("baseline_clone_headermap", |b| {
        b.iter(|| black_box(&template).clone())
    });
    g.finish();
}

fn error_response(c: &mut Criterion) {
    let mut g = c.benchmark_group("error_response");
    g.bench_function("into_response/no_route_404", |b| {
        b.iter(|| {
            into_response(GatewayError::NoRoute(
                black_box("GET /v1/not/routed").to_owned(),
            ))
        })
    });
    g.bench_function("into_response/rate_limited_429", |b| {
        b.iter(|| {
            into_response(GatewayError::RateLimited {
                limit: black_box("stop-per-caller").to_owned(),
                retry_after: std::time::Duration::from_millis(1500),
                quota: Some(30),
            })
        })
    });
    // Baseline: a static JSON body with the same status and content type.
    g.bench_function("baseline_static_response", |b| {
        b.iter(|| {
            let mut r = Response::new(full(Bytes::from_static(
                br#"{"success":false,"reasons":[{"code":"99000140","message":"no route"}]}"#,
            )));
            *r.status_mut() = black_box(StatusCode::NOT_FOUND);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            r
        })
    });
    g.finish();
}

// ---------------------------------------------------------------- caller JWTs

const HS_KEY: &str = "bench-only-hs256-key-0123456789abcdef0123456789";
const ISSUER: &str = "https://bench.local";
const AUDIENCE: &str = "zuora-gateway";

/// A validated JWT config with one HS256 and one RS256 key (the public PEM
/// written to a temp dir), and a signer for each.
struct JwtSetup {
    config: Config,
    rsa_private_pem: String,
    _dir: tempfile::TempDir,
}

fn jwt_setup() -> JwtSetup {
    let dir = tempfile::tempdir().unwrap();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    std::fs::write(dir.path().join("rs1.pub.pem"), kp.public_key_pem()).unwrap();
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n\
         upstreams:\n  zuora:\n    base_url: http://127.0.0.1:9\n    oauth:\n      client_id: id\n      client_secret: secret\n\
         callers:\n  jwt:\n    issuer: {ISSUER}\n    audience: {AUDIENCE}\n    identity_claim: sub\n    keys:\n\
         \x20     - {{ kid: hs1, alg: HS256, secret: \"{HS_KEY}\" }}\n\
         \x20     - {{ kid: rs1, alg: RS256, public_key_file: rs1.pub.pem }}\n\
         routes:\n  - name: stop\n    method: PUT\n    path: /v1/uno/data-backfill/propagation/jobs/{{jobId}}\n    upstream: zuora\n    allow_callers: [\"billing-*\"]\n\
         tenancy:\n  - callers: [\"billing-eu-*\"]\n    org_ids: [\"org-eu-1\", \"org-eu-2\"]\n\
         \x20 - callers: [\"*\"]\n    org_ids: [\"org-us\"]\n    entity_ids: [\"3c4fd2c0-1b2a-4c3d-8e9f-0a1b2c3d4e5f\"]\n",
    );
    let config = Config::from_yaml(&yaml, Path::new("bench.yaml"), dir.path(), &ProcessEnv)
        .expect("bench JWT config is valid");
    JwtSetup {
        config,
        rsa_private_pem: kp.serialize_pem(),
        _dir: dir,
    }
}

fn mint(alg: jsonwebtoken::Algorithm, kid: &str, key: &jsonwebtoken::EncodingKey) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "sub": "billing-bench", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600,
    });
    let mut h = jsonwebtoken::Header::new(alg);
    h.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

fn verified(a: &Authenticator, headers: &HeaderMap) -> bool {
    matches!(a.attempt(headers), Attempt::Done(Ok(_)))
}

fn jwt(c: &mut Criterion) {
    let setup = jwt_setup();
    let callers: &CallerAuthConfig = &setup.config.callers;
    let hs = mint(
        jsonwebtoken::Algorithm::HS256,
        "hs1",
        &jsonwebtoken::EncodingKey::from_secret(HS_KEY.as_bytes()).unwrap(),
    );
    let rs = mint(
        jsonwebtoken::Algorithm::RS256,
        "rs1",
        &jsonwebtoken::EncodingKey::from_rsa_pem(setup.rsa_private_pem.as_bytes()).unwrap(),
    );
    let (hs_h, rs_h) = (bearer(&hs), bearer(&rs));
    let warm = Authenticator::new(callers).unwrap();
    assert!(verified(&warm, &hs_h) && verified(&warm, &rs_h));

    let mut g = c.benchmark_group("jwt_verify");
    // Cold: a fresh authenticator (empty cache) per iteration; its construction is untimed.
    g.bench_function("hs256_cold", |b| {
        b.iter_batched(
            || Authenticator::new(callers).unwrap(),
            |a| verified(&a, black_box(&hs_h)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("rs256_cold", |b| {
        b.iter_batched(
            || Authenticator::new(callers).unwrap(),
            |a| verified(&a, black_box(&rs_h)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("cache_hit", |b| {
        b.iter(|| verified(&warm, black_box(&rs_h)))
    });
    // Baseline: jsonwebtoken's own HS256 decode (no cache, no gateway rules).
    let key = jsonwebtoken::DecodingKey::from_secret(HS_KEY.as_bytes()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[AUDIENCE]);
    g.bench_function("baseline_jsonwebtoken_decode_hs256", |b| {
        b.iter(|| jsonwebtoken::decode::<serde_json::Value>(black_box(&hs), &key, &v).is_ok())
    });
    g.finish();
}

// ---------------------------------------------------------------- policy + tenancy

fn policy_decision(c: &mut Criterion) {
    let setup = jwt_setup();
    let policy = Policy::compile(Arc::new(setup.config.clone()));
    let us = Caller::named("billing-bench");
    let eu = Caller::named("billing-eu-7");
    let template = request_headers();
    assert!(policy.authorize(0, &us).is_ok());
    assert!(policy.authorize(0, &Caller::named("crm")).is_err());

    let mut g = c.benchmark_group("policy_decision");
    g.bench_function("authorize+tenancy/catch_all_rule", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| {
                policy.authorize(0, black_box(&us)).is_ok()
                    && policy.tenancy.apply(h, black_box(&us), 0).is_ok()
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("authorize+tenancy/first_rule", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| {
                policy.authorize(0, black_box(&eu)).is_ok()
                    && policy.tenancy.apply(h, black_box(&eu), 0).is_ok()
            },
            BatchSize::SmallInput,
        )
    });
    // Baseline: what nginx's `proxy_set_header` does — two fixed header values.
    let org = HeaderValue::from_static("org-us");
    let entity = HeaderValue::from_static("3c4fd2c0-1b2a-4c3d-8e9f-0a1b2c3d4e5f");
    g.bench_function("baseline_set_two_headers", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| {
                h.insert("zuora-org-ids", org.clone());
                h.insert("zuora-entity-ids", entity.clone());
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

// ---------------------------------------------------------------- track IDs

fn track_id(c: &mut Criterion) {
    use zuora_gateway::layers::track_id;
    let mut with = HeaderMap::new();
    with.insert(
        "zuora-track-id",
        HeaderValue::from_static("order-sync-42-a1b2c3d4-e5f6-4711-8899"),
    );
    let without = HeaderMap::new();
    assert!(matches!(track_id::from_headers(&with), Ok(Some(_))));
    let mut g = c.benchmark_group("track_id");
    g.bench_function("from_headers/caller_sent_one", |b| {
        b.iter(|| track_id::from_headers(black_box(&with)))
    });
    g.bench_function("from_headers_or_generate/absent", |b| {
        b.iter(|| match track_id::from_headers(black_box(&without)) {
            Ok(Some(v)) => v,
            _ => track_id::generate(),
        })
    });
    // Baseline: copying the caller's header value through unchecked.
    g.bench_function("baseline_copy_header_value", |b| {
        b.iter(|| black_box(&with).get("zuora-track-id").cloned())
    });
    g.finish();
}

criterion_group!(
    benches,
    track_id,
    route_match,
    path_check,
    hop_by_hop,
    error_response,
    jwt,
    policy_decision
);
criterion_main!(benches);
