//! The Zuora OAuth token lifecycle, black-box: a gateway and the embedded
//! simulator on ephemeral ports, requests over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::{Method, StatusCode};
use support::*;
use tokio::time::Instant;
use zuora_gateway::sim::SimHandle;

const JOBS: &str = "/v1/uno/data-backfill/propagation/jobs";

/// Every log line of this test binary (gateway and simulator), from the first `logs()` on.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sidecar gateway in front of `sim`, with extra `oauth:` lines.
fn yaml(sim: &SimHandle, oauth_extra: &str) -> String {
    format!(
        "{SERVER_YAML}upstreams:\n  zuora:\n    base_url: {}\n    timeouts: {{ connect: 2s, request: 10s }}\n    oauth:\n      client_id: {CLIENT_ID}\n      client_secret: {CLIENT_SECRET}\n{oauth_extra}\
         callers:\n  trusted_identity: billing-test\n\
         routes:\n  - name: stop\n    method: PUT\n    path: {JOBS}/{{jobId}}\n    upstream: zuora\n    allow_callers: [\"*\"]\n  - name: read\n    method: GET\n    path: {JOBS}/**\n    upstream: zuora\n    allow_callers: [\"*\"]\n",
        sim.base_url()
    )
}

async fn list(g: &Gateway) -> Reply {
    get(&g.url(JOBS)).await.unwrap()
}

async fn metrics(g: &Gateway) -> String {
    get(&g.admin_url("/metrics")).await.unwrap().text()
}

#[tokio::test]
async fn concurrent_first_requests_cause_exactly_one_token_request() {
    logs();
    let sim = simulator().await;
    sim.control().set_token_latency(Duration::from_millis(800));
    let g = gateway(&yaml(&sim, "")).await;
    let url = g.url(JOBS);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await.unwrap() })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(sim.control().token_requests(), 1);
    assert_eq!(sim.control().unauthorized_requests(), 0);
    g.shutdown().await;
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_of_expiry_under_steady_traffic() {
    logs();
    let sim = simulator().await;
    sim.control().set_token_ttl(Duration::from_secs(4));
    let g = gateway(&yaml(&sim, "      refresh_before_expiry: 2s\n")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let end = Instant::now() + Duration::from_secs(10);
    let mut sent = 0;
    while Instant::now() < end {
        let r = list(&g).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        sent += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let c = sim.control();
    assert!(sent > 100, "only {sent} requests");
    assert_eq!(c.expired_token_requests(), 0);
    assert_eq!(c.unauthorized_requests(), 0);
    // One at startup, then one every ~2 s.
    let fetched = c.token_requests();
    assert!(
        (5..=8).contains(&fetched),
        "{fetched} token requests in 10 s"
    );
    let m = metrics(&g).await;
    assert!(
        m.contains(r#"zuora_token_expiry_seconds{upstream="zuora"}"#),
        "{m}"
    );
    g.shutdown().await;
}

/// A ready gateway in front of a new simulator that has just revoked the
/// token the gateway holds (after one list was served with it), and how many
/// token requests the simulator had seen by then.
async fn gateway_with_its_token_revoked() -> (SimHandle, Gateway, u64) {
    logs();
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    assert_eq!(list(&g).await.status, StatusCode::OK);
    let before = sim.control().token_requests();
    sim.control().revoke_all_tokens();
    (sim, g, before)
}

/// The gateway's metrics count exactly one request replayed after a 401.
async fn assert_one_401_replayed(g: &Gateway) {
    let m = metrics(g).await;
    assert!(
        m.contains(r#"zuora_token_401_recoveries_total{upstream="zuora",outcome="replayed"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_revoked_token_is_refreshed_and_the_request_retried_once() {
    let (sim, g, before) = gateway_with_its_token_revoked().await;
    let c = sim.control();
    let r = send(stop(&g, JOB, &[])).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["success"], true);
    assert_eq!(c.job(JOB).unwrap().status, "Stopping");
    assert_eq!(
        c.token_requests(),
        before + 1,
        "exactly one extra token fetch"
    );
    assert_eq!(c.unauthorized_requests(), 1);
    // The replay carried the same body, with the new token.
    let stops: Vec<_> = c
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::PUT)
        .collect();
    assert_eq!(stops.len(), 2);
    assert_eq!(stops[0].body, stops[1].body);
    assert_ne!(stops[0].bearer_token, stops[1].bearer_token);
    assert_one_401_replayed(&g).await;
    g.shutdown().await;
}

#[tokio::test]
async fn a_revoked_token_is_refreshed_and_a_get_without_body_retried_once() {
    // A GET has no body: the token layer calls in without waiting, and the
    // forward layer copies the head for the replay. The replay must be the
    // same request with the new token.
    let (sim, g, before) = gateway_with_its_token_revoked().await;
    let c = sim.control();
    let seen_before = c.requests().len();
    let r = list(&g).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(c.token_requests(), before + 1);
    assert_eq!(c.unauthorized_requests(), 1);
    let lists: Vec<_> = c
        .requests()
        .into_iter()
        .skip(seen_before)
        .filter(|r| r.method == Method::GET)
        .collect();
    assert_eq!(lists.len(), 2, "{lists:?}");
    assert_eq!(lists[0].path_and_query, lists[1].path_and_query);
    assert_ne!(lists[0].bearer_token, lists[1].bearer_token);
    for name in ["zuora-track-id", "zuora-version", "accept-encoding", "host"] {
        assert_eq!(
            lists[0].headers.get(name),
            lists[1].headers.get(name),
            "{name}"
        );
    }
    assert_one_401_replayed(&g).await;
    g.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_requests_on_a_revoked_token_causes_one_token_request() {
    logs();
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let c = sim.control();
    let before = c.token_requests();
    c.revoke_all_tokens();
    let url = g.url(JOBS);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await.unwrap().status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(c.token_requests(), before + 1);
    g.shutdown().await;
}

#[tokio::test]
async fn token_endpoint_down_at_startup_gives_quick_503s_then_recovers_without_restart() {
    logs();
    let sim = simulator().await;
    sim.control().set_token_endpoint_down(true);
    let g = gateway(&yaml(&sim, "")).await;

    let asked = Instant::now();
    let r = list(&g).await;
    assert!(
        asked.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        asked.elapsed()
    );
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(r.code().ends_with("61"), "{}", r.text());
    assert!(r.text().contains("token"), "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    let ready = get(&g.admin_url("/readyz")).await.unwrap();
    assert_ne!(ready.status, StatusCode::OK);
    assert!(ready.text().contains("token"), "{}", ready.text());
    assert_eq!(
        sim.control().api_requests(),
        0,
        "nothing reached Zuora without a token"
    );

    sim.control().set_token_endpoint_down(false);
    wait_ready(&g, Duration::from_secs(12)).await;
    assert_eq!(list(&g).await.status, StatusCode::OK);
    let m = metrics(&g).await;
    assert!(
        m.contains(r#"zuora_token_fetches_total{upstream="zuora",outcome="server_error"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"zuora_token_fetches_total{upstream="zuora",outcome="success"} 1"#),
        "{m}"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_zuora_at_startup_does_not_fail_startup() {
    logs();
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        "{SERVER_YAML}upstreams:\n  zuora:\n    base_url: http://{closed}\n    timeouts: {{ connect: 1s, request: 5s }}\n    oauth:\n      client_id: {CLIENT_ID}\n      client_secret: {CLIENT_SECRET}\n\
         callers:\n  trusted_identity: t\nroutes:\n  - {{ name: read, path: {JOBS}, upstream: zuora, allow_callers: [\"*\"] }}\n"
    );
    let g = gateway(&yaml).await;
    let r = list(&g).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().contains("cannot connect"), "{}", r.text());
    assert_eq!(
        get(&g.admin_url("/healthz")).await.unwrap().status,
        StatusCode::OK
    );
    assert_ne!(
        get(&g.admin_url("/readyz")).await.unwrap().status,
        StatusCode::OK
    );
    g.shutdown().await;
}

#[tokio::test]
async fn the_callers_authorization_is_replaced_by_the_zuora_token() {
    logs();
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let r = send(request(
        Method::GET,
        &g.url(JOBS),
        &[("authorization", "Bearer caller-credential")],
        "",
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let seen = sim.control().requests();
    let api: Vec<_> = seen
        .iter()
        .filter(|r| r.path_and_query.starts_with("/v1"))
        .collect();
    assert_eq!(api.len(), 1);
    let auth = api[0].headers["authorization"].to_str().unwrap();
    assert!(!auth.contains("caller-credential"));
    assert_eq!(
        auth,
        format!("Bearer {}", api[0].bearer_token.as_deref().unwrap())
    );
    g.shutdown().await;
}

#[tokio::test]
async fn the_client_secret_and_zuora_tokens_never_appear_in_logs_responses_or_metrics() {
    let logs = logs();
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let c = sim.control();
    let mut seen_by_callers = String::new();
    let mut keep = |r: &Reply| {
        seen_by_callers.push_str(&format!("{:?}\n{}\n", r.headers, r.text()));
    };

    // Normal traffic, a 401 recovery, then a failing token endpoint with no token held.
    keep(&list(&g).await);
    c.revoke_all_tokens();
    keep(&send(stop(&g, JOB, &[])).await.unwrap());
    c.set_token_endpoint_down(true);
    c.revoke_all_tokens();
    let failed = list(&g).await;
    assert_eq!(
        failed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        failed.text()
    );
    keep(&failed);
    c.set_token_rate_limited(Some(1));
    c.set_token_endpoint_down(false);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    keep(&list(&g).await);
    keep(&get(&g.admin_url("/readyz")).await.unwrap());
    let metrics_text = metrics(&g).await;
    g.shutdown().await;

    let tokens: Vec<String> = c
        .requests()
        .into_iter()
        .filter_map(|r| r.bearer_token)
        .collect();
    assert!(tokens.len() >= 3, "tokens seen: {}", tokens.len());
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged.contains("obtained a Zuora access token"),
        "logs were not captured"
    );
    assert!(logged.contains("Zuora token request failed"));
    for (what, text) in [
        ("logs", &logged),
        ("responses", &seen_by_callers),
        ("metrics", &metrics_text),
    ] {
        assert!(
            !text.contains(CLIENT_SECRET),
            "the client secret appears in the {what}"
        );
        for t in &tokens {
            assert!(
                !text.contains(t.as_str()),
                "a Zuora token appears in the {what}"
            );
        }
    }
}
