//! Zuora misbehaving, over real sockets. Each fault must give the caller a
//! clear Zuora-shaped error within the configured timeout; the process stays
//! up and the connection pool recovers (a normal request works afterwards).
//! Retries happen only where they are safe.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fault_server;
mod support;

use std::time::{Duration, Instant};

use fault_server::{Fault, FaultServer};
use http::{Method, StatusCode};
use support::*;

const JOBS: &str = "/v1/uno/data-backfill/propagation/jobs";

/// A gateway in front of `base_url` (token endpoint `token_url`, default
/// `<base_url>/oauth/token`), with `upstream_extra` lines under the upstream.
fn config_yaml(base_url: &str, token_url: Option<&str>, upstream_extra: &[&str]) -> String {
    let mut extra = String::new();
    for line in upstream_extra {
        extra.push_str("    ");
        extra.push_str(line);
        extra.push('\n');
    }
    let token_url = token_url
        .map(|u| format!("      token_url: {u}\n"))
        .unwrap_or_default();
    format!(
        "{SERVER_YAML}upstreams:\n  zuora:\n    base_url: {base_url}\n{extra}    oauth:\n      client_id: {CLIENT_ID}\n      client_secret: {CLIENT_SECRET}\n{token_url}callers:\n  trusted_identity: billing-test\nroutes:\n  - name: stop\n    method: PUT\n    path: {JOBS}/{{jobId}}\n    upstream: zuora\n    allow_callers: [\"*\"]\n  - name: read\n    method: GET\n    path: {JOBS}/**\n    upstream: zuora\n    allow_callers: [\"*\"]\n  - name: create\n    method: POST\n    path: {JOBS}\n    upstream: zuora\n    allow_callers: [\"*\"]\n"
    )
}

async fn start_gateway(yaml: &str) -> Gateway {
    let g = gateway(yaml).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    g
}

async fn list(g: &Gateway) -> Reply {
    get(&g.url(&format!("{JOBS}?pageSize=1"))).await.unwrap()
}

async fn create(g: &Gateway, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(request(
        Method::POST,
        &g.url(JOBS),
        &all,
        r#"{"type":"RatePlanCharge","jobName":"fault test"}"#,
    ))
    .await
    .unwrap()
}

/// A Zuora-shaped gateway error: `success: false`, an eight-digit code in the
/// gateway's `99…` range ending with `category`.
fn assert_gateway_error(r: &Reply, status: StatusCode, category: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let code = r.code();
    assert_eq!(code.len(), 8, "{code}");
    assert!(code.starts_with("99"), "{code}");
    assert!(
        code.ends_with(category),
        "{code} should end with {category}"
    );
    assert!(
        r.json()["reasons"][0]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test]
async fn connection_refused_is_a_fast_zuora_shaped_502() {
    let tokens = FaultServer::start(Fault::Ok).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let g = start_gateway(&config_yaml(
        &format!("http://{closed}"),
        Some(&format!("{}/oauth/token", tokens.base_url())),
        &["timeouts: { connect: 1s, request: 5s }"],
    ))
    .await;
    let started = Instant::now();
    let r = list(&g).await;
    assert_gateway_error(&r, StatusCode::BAD_GATEWAY, "61");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Still up.
    assert_eq!(
        get(&g.admin_url("/healthz")).await.unwrap().status,
        StatusCode::OK
    );
    g.shutdown().await;
}

#[tokio::test]
async fn a_reset_in_the_middle_of_the_body_is_a_502_not_a_truncated_200_and_the_pool_recovers() {
    let z = FaultServer::start(Fault::ResetMidBody).await;
    let g = start_gateway(&config_yaml(
        &z.base_url(),
        None,
        &["retry: { max_attempts: 1 }"],
    ))
    .await;
    let r = list(&g).await;
    assert_gateway_error(&r, StatusCode::BAD_GATEWAY, "60");
    z.set(Fault::Ok);
    let r = list(&g).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    g.shutdown().await;
}

#[tokio::test]
async fn zuora_closing_without_an_answer_is_a_502_get_is_retried_post_is_not() {
    let z = FaultServer::start(Fault::CloseWithoutAnswer).await;
    let g = start_gateway(&config_yaml(
        &z.base_url(),
        None,
        &["retry: { max_attempts: 3, backoff: 10ms }"],
    ))
    .await;
    let before = z.api_requests();
    let r = list(&g).await;
    assert_gateway_error(&r, StatusCode::BAD_GATEWAY, "60");
    assert_eq!(z.api_requests() - before, 3, "an idempotent GET is retried");

    let before = z.api_requests();
    let r = create(&g, &[]).await;
    assert_gateway_error(&r, StatusCode::BAD_GATEWAY, "60");
    assert_eq!(
        z.api_requests() - before,
        1,
        "a POST without Idempotency-Key is sent exactly once"
    );

    let before = z.api_requests();
    let r = create(&g, &[("idempotency-key", "k-1")]).await;
    assert_gateway_error(&r, StatusCode::BAD_GATEWAY, "60");
    assert_eq!(z.api_requests() - before, 3, "with a key it may be retried");

    z.set(Fault::Ok);
    assert_eq!(list(&g).await.status, StatusCode::OK);
    g.shutdown().await;
}

#[tokio::test]
async fn slow_response_headers_are_a_504_within_the_request_timeout() {
    let sim = simulator().await;
    let g = start_gateway(&config_yaml(
        &sim.base_url(),
        None,
        &[
            "timeouts: { connect: 1s, request: 1s }",
            "retry: { max_attempts: 1 }",
        ],
    ))
    .await;
    // Warm the token first, so only the API call is slow.
    assert_eq!(list(&g).await.status, StatusCode::OK);
    sim.control().set_latency(Duration::from_secs(5));
    let started = Instant::now();
    let r = list(&g).await;
    let took = started.elapsed();
    assert_gateway_error(&r, StatusCode::GATEWAY_TIMEOUT, "61");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    sim.control().set_latency(Duration::ZERO);
    assert_eq!(list(&g).await.status, StatusCode::OK);
    g.shutdown().await;
}

#[tokio::test]
async fn a_body_that_trickles_past_the_request_timeout_is_a_504() {
    let z = FaultServer::start(Fault::SlowBody(Duration::from_millis(100))).await;
    let g = start_gateway(&config_yaml(
        &z.base_url(),
        None,
        &[
            "timeouts: { connect: 1s, request: 1s }",
            "retry: { max_attempts: 1 }",
        ],
    ))
    .await;
    let started = Instant::now();
    let r = list(&g).await;
    let took = started.elapsed();
    assert_gateway_error(&r, StatusCode::GATEWAY_TIMEOUT, "61");
    assert!(took < Duration::from_millis(2000), "{took:?}");
    z.set(Fault::Ok);
    assert_eq!(list(&g).await.status, StatusCode::OK);
    g.shutdown().await;
}

#[tokio::test]
async fn a_truncated_gzip_body_is_a_502() {
    let z = FaultServer::start(Fault::TruncatedGzip).await;
    let g = start_gateway(&config_yaml(
        &z.base_url(),
        None,
        &["retry: { max_attempts: 1 }"],
    ))
    .await;
    let r = send(request(
        Method::GET,
        &g.url(&format!("{JOBS}?pageSize=1")),
        &[("accept-encoding", "gzip")],
        "",
    ))
    .await
    .unwrap();
    assert_gateway_error(&r, StatusCode::BAD_GATEWAY, "60");
    z.set(Fault::Ok);
    assert_eq!(list(&g).await.status, StatusCode::OK);
    g.shutdown().await;
}

#[tokio::test]
async fn a_503_burst_is_retried_for_get_and_passed_back_once_for_post_without_idempotency_key() {
    let sim = simulator().await;
    let g = start_gateway(&config_yaml(
        &sim.base_url(),
        None,
        &["retry: { max_attempts: 3, backoff: 10ms }"],
    ))
    .await;
    assert_eq!(list(&g).await.status, StatusCode::OK);
    let c = sim.control();

    // GET: two 503s, then success on the third attempt.
    c.inject_status(503, 2, None);
    let before = c.api_requests();
    let r = list(&g).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(c.api_requests() - before, 3);

    // POST without Idempotency-Key: exactly one attempt; Zuora's 503 is passed back.
    c.inject_status(503, 1, None);
    let before = c.api_requests();
    let r = create(&g, &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.json()["success"], false);
    assert_eq!(c.api_requests() - before, 1);

    // POST with an Idempotency-Key may be retried.
    c.inject_status(503, 1, None);
    let before = c.api_requests();
    let r = create(&g, &[("idempotency-key", "job-create-1")]).await;
    assert_ne!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(c.api_requests() - before, 2);
    g.shutdown().await;
}

#[tokio::test]
async fn retries_stop_at_the_request_deadline() {
    let sim = simulator().await;
    let g = start_gateway(&config_yaml(
        &sim.base_url(),
        None,
        &[
            "timeouts: { connect: 1s, request: 1s }",
            "retry: { max_attempts: 50, backoff: 100ms }",
            "circuit_breaker: { failure_threshold: 0 }",
        ],
    ))
    .await;
    assert_eq!(list(&g).await.status, StatusCode::OK);
    sim.control().inject_status(503, 1000, None);
    let before = sim.control().api_requests();
    let started = Instant::now();
    let r = list(&g).await;
    let took = started.elapsed();
    assert!(
        matches!(r.status.as_u16(), 503 | 504),
        "{} {}",
        r.status,
        r.text()
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let attempts = sim.control().api_requests() - before;
    assert!(
        (2..50).contains(&attempts),
        "{attempts} attempts: backoff must bound them by the deadline"
    );
    sim.control().inject_status(503, 0, None);
    g.shutdown().await;
}

#[tokio::test]
async fn a_429_burst_is_passed_back_with_retry_after_and_never_retried() {
    let sim = simulator().await;
    let g = start_gateway(&config_yaml(
        &sim.base_url(),
        None,
        &["retry: { max_attempts: 3, backoff: 10ms }"],
    ))
    .await;
    assert_eq!(list(&g).await.status, StatusCode::OK);
    sim.control().inject_status(429, 5, Some(2));
    let before = sim.control().api_requests();
    let r = list(&g).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(r.json()["success"], false);
    assert_eq!(
        sim.control().api_requests() - before,
        1,
        "429 is not retried"
    );
    sim.control().inject_status(429, 0, None);
    g.shutdown().await;
}

#[tokio::test]
async fn the_circuit_breaker_sheds_load_fast_while_zuora_fails_and_probes_it_back() {
    let sim = simulator().await;
    let g = start_gateway(&config_yaml(
        &sim.base_url(),
        None,
        &[
            "retry: { max_attempts: 1 }",
            "circuit_breaker: { failure_threshold: 3, open_for: 1s }",
        ],
    ))
    .await;
    assert_eq!(list(&g).await.status, StatusCode::OK);
    let c = sim.control();
    c.inject_status(503, 1000, None);
    for _ in 0..3 {
        assert_eq!(list(&g).await.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    // Open: shed without contacting Zuora, fast, with Retry-After.
    let before = c.api_requests();
    for _ in 0..20 {
        let started = Instant::now();
        let r = list(&g).await;
        assert_gateway_error(&r, StatusCode::SERVICE_UNAVAILABLE, "61");
        assert!(r.headers.contains_key("retry-after"));
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(c.api_requests(), before, "no upstream contact while open");
    // Zuora recovers; after open_for one probe closes the circuit.
    c.inject_status(503, 0, None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = list(&g).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(c.api_requests(), before + 1, "exactly one probe");
    for _ in 0..5 {
        assert_eq!(list(&g).await.status, StatusCode::OK);
    }
    g.shutdown().await;
}

#[tokio::test]
async fn a_token_endpoint_that_hangs_is_a_503_within_the_fetch_timeout() {
    let sim = simulator().await;
    sim.control().set_token_latency(Duration::from_secs(60));
    let g = gateway(&config_yaml(
        &sim.base_url(),
        None,
        &["timeouts: { connect: 1s, request: 2s }"],
    ))
    .await;
    let before = sim.control().api_requests();
    let started = Instant::now();
    let r = list(&g).await;
    let took = started.elapsed();
    assert_gateway_error(&r, StatusCode::SERVICE_UNAVAILABLE, "61");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        sim.control().api_requests(),
        before,
        "no API call without a token"
    );
    // The endpoint recovers: requests succeed again.
    sim.control().set_token_latency(Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = list(&g).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {}", r.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    g.shutdown().await;
}

#[tokio::test]
async fn the_gateway_survives_every_fault_in_turn_on_one_pool() {
    let z = FaultServer::start(Fault::Ok).await;
    let g = start_gateway(&config_yaml(
        &z.base_url(),
        None,
        &[
            "timeouts: { connect: 1s, request: 1s }",
            "retry: { max_attempts: 1 }",
            "circuit_breaker: { failure_threshold: 0 }",
        ],
    ))
    .await;
    for fault in [
        Fault::ResetMidBody,
        Fault::CloseWithoutAnswer,
        Fault::TruncatedGzip,
        Fault::SlowBody(Duration::from_millis(100)),
        Fault::SlowHeaders(Duration::from_secs(3)),
        Fault::Status(500),
        Fault::Status(502),
    ] {
        z.set(fault);
        let r = send(request(
            Method::GET,
            &g.url(&format!("{JOBS}?pageSize=1")),
            &[("accept-encoding", "gzip")],
            "",
        ))
        .await
        .unwrap();
        assert!(r.status.as_u16() >= 500, "{fault:?}: {}", r.status);
        assert_eq!(r.json()["success"], false, "{fault:?}");
        z.set(Fault::Ok);
        let ok = list(&g).await;
        assert_eq!(ok.status, StatusCode::OK, "after {fault:?}: {}", ok.text());
    }
    g.shutdown().await;
}

#[tokio::test]
async fn a_retried_request_is_resent_exactly_head_and_body() {
    let sim = simulator().await;
    let g = start_gateway(&config_yaml(
        &sim.base_url(),
        None,
        &["retry: { max_attempts: 3, backoff: 10ms }"],
    ))
    .await;
    assert_eq!(list(&g).await.status, StatusCode::OK);
    let c = sim.control();
    for (method, attempts) in [(Method::POST, 3), (Method::GET, 3)] {
        c.inject_status(503, attempts - 1, None);
        let before = c.requests().len();
        let r = if method == Method::POST {
            create(&g, &[("idempotency-key", "job-create-resent")]).await
        } else {
            list(&g).await
        };
        assert_ne!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        let sent: Vec<_> = c
            .requests()
            .into_iter()
            .skip(before)
            .filter(|s| s.method == method)
            .collect();
        assert_eq!(sent.len(), attempts, "{method}");
        for again in &sent[1..] {
            assert_eq!(again.path_and_query, sent[0].path_and_query, "{method}");
            assert_eq!(again.headers, sent[0].headers, "{method}");
            assert_eq!(again.body, sent[0].body, "{method}");
        }
        if method == Method::POST {
            assert!(!sent[0].body.is_empty());
            assert!(sent[0].bearer_token.is_some());
        }
    }
    g.shutdown().await;
}
