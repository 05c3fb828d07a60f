//! Rate limiting over real sockets: per-job and per-caller limits, Zuora's
//! own 429s, duplicate-stop coalescing, Redis shared by two gateway
//! processes, Redis failures, reloads.
//!
//! The Redis tests start a real `redis-server` per test on a free port; they
//! fail (not skip) when it is not installed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use support::*;
use zuora_gateway::policy::Policy;
use zuora_gateway::ratelimit::testing::RedisServer;
use zuora_gateway::sim::SimHandle;

const JOB2: &str = "ff8080818bb300af018bb325fe0c58f4";

/// A 32-character job ID numbered `n`.
fn job(n: usize) -> String {
    format!("{n:032x}")
}

fn redis() -> RedisServer {
    assert!(
        RedisServer::available(),
        "redis-server is not installed: the Redis rate-limit tests need a real server (apt-get install -y redis-server)"
    );
    RedisServer::start().expect("start redis-server")
}

/// A sidecar gateway config (caller `identity`) with a stop route limited by
/// `route_limits`, a read route limited by `read_limits`, and `rest` appended.
fn yaml(
    sim: &SimHandle,
    identity: &str,
    route_limits: &str,
    read_limits: &str,
    rest: &str,
) -> String {
    format!(
        "{SERVER_YAML}{}callers:\n  trusted_identity: {identity}\nroutes:\n  - name: stop\n    method: PUT\n    path: /v1/uno/data-backfill/propagation/jobs/{{jobId}}\n    upstream: zuora\n    allow_callers: [\"*\"]\n    rate_limits: [{route_limits}]\n  - name: read\n    method: GET\n    path: /v1/uno/data-backfill/propagation/jobs/**\n    upstream: zuora\n    allow_callers: [\"*\"]\n    rate_limits: [{read_limits}]\n{rest}",
        upstream_yaml(sim)
    )
}

async fn started(yaml: &str) -> Gateway {
    let g = gateway(yaml).await;
    wait_ready(&g, Duration::from_secs(10)).await;
    g
}

#[tokio::test]
async fn second_stop_of_the_same_job_is_429_and_another_job_is_200() {
    let sim = simulator().await;
    let g = started(&yaml(
        &sim,
        "billing-a",
        "per-job",
        "",
        "rate_limits:\n  per-job: { key: jobId, rate: 1/minute }\n",
    ))
    .await;

    let r = send(stop(&g, JOB, &[])).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["ratelimit-limit"], "1");
    assert_eq!(r.headers["ratelimit-remaining"], "0");
    assert_eq!(r.headers["ratelimit-reset"], "60");

    let before = sim.control().api_requests();
    let r = send(stop(&g, JOB, &[])).await.unwrap();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        r.code(),
        "99000670",
        "rate-limit component, Zuora category 70"
    );
    assert!(r.text().contains("per-job"));
    assert_eq!(r.headers["ratelimit-remaining"], "0");
    assert_eq!(
        sim.control().api_requests(),
        before,
        "the refusal never reached Zuora"
    );

    let r = send(stop(&g, JOB2, &[])).await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "another job has its own budget: {}",
        r.text()
    );
    g.shutdown().await;
}

#[tokio::test]
async fn routes_without_limits_are_not_limited() {
    let sim = simulator().await;
    let g = started(&yaml(
        &sim,
        "billing-a",
        "per-job",
        "",
        "rate_limits:\n  per-job: { key: jobId, rate: 1/minute }\n",
    ))
    .await;
    for _ in 0..5 {
        let r = get(&g.url(&format!("/v1/uno/data-backfill/propagation/jobs/{JOB}")))
            .await
            .unwrap();
        assert_ne!(r.status, StatusCode::TOO_MANY_REQUESTS);
    }
    g.shutdown().await;
}

#[tokio::test]
async fn zuora_429_is_passed_on_and_the_next_request_is_answered_locally() {
    let sim = simulator().await;
    let g = started(&yaml(
        &sim,
        "billing-a",
        "per-caller",
        "",
        "rate_limits:\n  per-caller: { key: caller, rate: 100/second, burst: 100 }\n",
    ))
    .await;

    sim.control().inject_status(429, 1, Some(3));
    let r = send(stop(&g, JOB, &[])).await.unwrap();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(
        r.headers["retry-after"], "3",
        "Zuora's Retry-After is passed on"
    );
    assert!(
        !r.code().starts_with("99"),
        "Zuora's own error body: {}",
        r.text()
    );

    let before = sim.control().api_requests();
    // Another job, same caller: held locally until Zuora's Retry-After has passed.
    let r = send(stop(&g, JOB2, &[])).await.unwrap();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.code(), "99000670");
    assert!(r.text().contains("Zuora rate limit"), "{}", r.text());
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        sim.control().api_requests(),
        before,
        "answered without calling Zuora"
    );

    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = send(stop(&g, JOB2, &[])).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sim.control().api_requests(), before + 1);
    g.shutdown().await;
}

#[tokio::test]
async fn concurrent_duplicate_stops_make_one_zuora_call_and_all_succeed() {
    let sim = simulator().await;
    let g = started(&yaml(
        &sim,
        "billing-a",
        "per-job",
        "",
        "rate_limits:\n  per-job: { key: jobId, rate: 1/minute }\n",
    ))
    .await;
    sim.control().set_latency(Duration::from_millis(300));
    let before = sim.control().api_requests();
    let replies = futures_util::future::join_all((0..6).map(|_| send(stop(&g, JOB, &[])))).await;
    for r in replies {
        let r = r.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["success"], true);
    }
    assert_eq!(
        sim.control().api_requests(),
        before + 1,
        "one upstream call for six identical stops"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn reload_does_not_refill_buckets() {
    let sim = simulator().await;
    let text = yaml(
        &sim,
        "billing-a",
        "per-job",
        "",
        "rate_limits:\n  per-job: { key: jobId, rate: 1/minute }\n",
    );
    let g = started(&text).await;
    assert_eq!(
        send(stop(&g, JOB, &[])).await.unwrap().status,
        StatusCode::OK
    );

    // What a reload does: compile the (unchanged) file again and swap the policy.
    let policy = g.running.as_ref().unwrap().policy.clone();
    policy.store(Arc::new(Policy::compile(Arc::new(config(&text)))));
    let r = send(stop(&g, JOB, &[])).await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the reload refilled the bucket: {}",
        r.text()
    );

    // A changed definition is a new limit with fresh buckets.
    let changed = yaml(
        &sim,
        "billing-a",
        "per-job",
        "",
        "rate_limits:\n  per-job: { key: jobId, rate: 2/minute }\n",
    );
    policy.store(Arc::new(Policy::compile(Arc::new(config(&changed)))));
    assert_eq!(
        send(stop(&g, JOB, &[])).await.unwrap().status,
        StatusCode::OK
    );
    g.shutdown().await;
}

#[tokio::test]
async fn per_caller_budgets_are_separate_and_shared_across_gateways() {
    let server = redis();
    let sim = simulator().await;
    let limits = format!(
        "rate_limits:\n  per-caller: {{ key: caller, rate: 2/minute, burst: 2, store: redis }}\nredis: {{ url: '{}' }}\n",
        server.url()
    );
    // Two replicas for alice and one for bob (sidecar mode: one identity per gateway).
    let alice1 = started(&yaml(&sim, "alice", "per-caller", "", &limits)).await;
    let alice2 = started(&yaml(&sim, "alice", "per-caller", "", &limits)).await;
    let bob = started(&yaml(&sim, "bob", "per-caller", "", &limits)).await;

    assert_eq!(
        send(stop(&alice1, &job(1), &[])).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        send(stop(&alice2, &job(2), &[])).await.unwrap().status,
        StatusCode::OK
    );
    let r = send(stop(&alice1, &job(3), &[])).await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "alice's budget is spent on both replicas"
    );
    assert_eq!(
        send(stop(&alice2, &job(4), &[])).await.unwrap().status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let r = send(stop(&bob, &job(5), &[])).await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "bob's budget is his own: {}",
        r.text()
    );
    for g in [alice1, alice2, bob] {
        g.shutdown().await;
    }
}

/// An HS256 caller token for `sub`.
fn jwt(sub: &str) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({ "sub": sub, "exp": exp }),
        &EncodingKey::from_secret(HS_KEY.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn per_caller_budget_is_per_jwt_caller() {
    let sim = simulator().await;
    let text = yaml(
        &sim,
        "unused",
        "per-caller",
        "",
        "rate_limits:\n  per-caller: { key: caller, rate: 2/minute, burst: 2 }\n",
    )
    .replace(
        "callers:\n  trusted_identity: unused\n",
        &format!("callers:\n  jwt:\n    keys:\n      - {{ alg: HS256, secret: \"{HS_KEY}\" }}\n"),
    );
    let g = started(&text).await;
    let (alice, bob) = (
        format!("Bearer {}", jwt("alice")),
        format!("Bearer {}", jwt("bob")),
    );
    for n in 1..=2 {
        let r = send(stop(&g, &job(n), &[("authorization", &alice)]))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let r = send(stop(&g, &job(3), &[("authorization", &alice)]))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert!(r.text().contains("per-caller"));
    let r = send(stop(&g, &job(4), &[("authorization", &bob)]))
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "bob's budget is his own: {}",
        r.text()
    );
    assert_eq!(r.headers["ratelimit-remaining"], "1");
    g.shutdown().await;
}

/// A gateway running as its own OS process (`zuora-gateway serve`).
struct GatewayProcess {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn spawn_process(yaml_text: &str) -> GatewayProcess {
    let (port, admin) = (free_port(), free_port());
    let text = yaml_text
        .replace(
            "admin_listen: 127.0.0.1:0",
            &format!("admin_listen: 127.0.0.1:{admin}"),
        )
        .replace(
            "  listen: 127.0.0.1:0",
            &format!("  listen: 127.0.0.1:{port}"),
        );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, text).unwrap();
    let log = dir.path().join("gateway.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_zuora-gateway"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("start zuora-gateway");
    let mut p = GatewayProcess {
        child,
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        _dir: dir,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = get(&format!("http://127.0.0.1:{admin}/readyz")).await
            && r.status == StatusCode::OK
        {
            return p;
        }
        let exited = p.child.try_wait().unwrap().is_some();
        assert!(
            !exited && tokio::time::Instant::now() < deadline,
            "gateway process not ready; its output:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_gateway_processes_sharing_one_redis_admit_exactly_the_shared_budget() {
    let server = redis();
    let sim = simulator().await;
    let text = yaml(
        &sim,
        "billing-a",
        "all-stops",
        "",
        &format!(
            "rate_limits:\n  all-stops: {{ key: global, rate: 5/minute, burst: 5, store: redis, on_store_error: deny }}\nredis: {{ url: '{}' }}\n",
            server.url()
        ),
    );
    let (a, b) = (spawn_process(&text).await, spawn_process(&text).await);
    let before = sim.control().api_requests();
    let sends = (0..24).map(|i| {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let url = format!(
            "http://{addr}/v1/uno/data-backfill/propagation/jobs/{}",
            job(100 + i)
        );
        send(request(
            Method::PUT,
            &url,
            &[("content-type", "application/json")],
            r#"{"status":"Stopping"}"#,
        ))
    });
    let replies = futures_util::future::join_all(sends).await;
    let mut ok = 0;
    for r in replies {
        let r = r.unwrap();
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => assert_eq!(r.code(), "99000670"),
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!(
        ok, 5,
        "the two processes admitted exactly the shared budget"
    );
    assert_eq!(sim.control().api_requests(), before + 5);
}

#[tokio::test]
async fn redis_down_with_deny_policy_answers_503() {
    let mut server = redis();
    let sim = simulator().await;
    let g = started(&yaml(
        &sim,
        "billing-a",
        "shared",
        "",
        &format!(
            "rate_limits:\n  shared: {{ key: jobId, rate: 10/second, burst: 10, store: redis, on_store_error: deny }}\nredis: {{ url: '{}', timeout: 200ms }}\n",
            server.url()
        ),
    ))
    .await;
    assert_eq!(
        send(stop(&g, JOB, &[])).await.unwrap().status,
        StatusCode::OK
    );
    server.stop();
    let before = sim.control().api_requests();
    let r = send(stop(&g, JOB2, &[])).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.code(), "99000661");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(sim.control().api_requests(), before);
    let metrics = get(&g.admin_url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains(
            r#"gateway_rate_limit_decisions_total{limit="shared",decision="store_error_denied"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"gateway_rate_limit_store_errors_total{limit="shared"} 1"#),
        "{metrics}"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn redis_down_with_local_policy_falls_back_to_a_local_limiter() {
    let mut server = redis();
    let sim = simulator().await;
    let g = started(&yaml(
        &sim,
        "billing-a",
        "shared",
        "",
        &format!(
            "rate_limits:\n  shared: {{ key: jobId, rate: 1/minute, store: redis }}\nredis: {{ url: '{}', timeout: 200ms }}\n",
            server.url()
        ),
    ))
    .await;
    assert_eq!(
        send(stop(&g, JOB, &[])).await.unwrap().status,
        StatusCode::OK
    );
    server.stop();
    // The fallback limits at the same rate, with its own state.
    assert_eq!(
        send(stop(&g, JOB2, &[])).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        send(stop(&g, JOB2, &[])).await.unwrap().status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let metrics = get(&g.admin_url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains(r#"gateway_rate_limit_fallbacks_total{limit="shared"} 2"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("redis://"),
        "the Redis URL is never exposed"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn redis_down_with_allow_policy_admits() {
    let mut server = redis();
    let sim = simulator().await;
    let g = started(&yaml(
        &sim,
        "billing-a",
        "",
        "reads",
        &format!(
            "rate_limits:\n  reads: {{ key: global, rate: 1/minute, store: redis, on_store_error: allow }}\nredis: {{ url: '{}', timeout: 200ms }}\n",
            server.url()
        ),
    ))
    .await;
    let url = g.url("/v1/uno/data-backfill/propagation/jobs");
    assert_eq!(get(&url).await.unwrap().status, StatusCode::OK);
    assert_eq!(
        get(&url).await.unwrap().status,
        StatusCode::TOO_MANY_REQUESTS,
        "Redis limits while it is up"
    );
    server.stop();
    for _ in 0..3 {
        let r = get(&url).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    g.shutdown().await;
}
