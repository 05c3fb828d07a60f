//! The token lifecycle against a real (fake) token endpoint over sockets.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::test_support::{CLIENT_ID, CLIENT_SECRET, FakeTokenEndpoint, Mode, harness};
use crate::error::GatewayError;

const ZUORA_401: &str =
    r#"{"success":false,"reasons":[{"code":90000011,"message":"Authentication error"}]}"#;

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_token_request_is_a_client_credentials_form_without_authorization() {
    let ep = FakeTokenEndpoint::start(3600).await;
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    let token = h.cache.token().await.unwrap();
    let seen = ep.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert!(seen[0].headers.get("authorization").is_none());
    let form: Vec<(String, String)> = form_urlencoded::parse(seen[0].body.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(
        form,
        vec![
            ("client_id".to_owned(), CLIENT_ID.to_owned()),
            ("client_secret".to_owned(), CLIENT_SECRET.to_owned()),
            ("grant_type".to_owned(), "client_credentials".to_owned()),
        ]
    );
    assert_eq!(
        token.header_value(),
        format!("Bearer {}", ep.issued()[0]).as_str()
    );
    assert!(token.header_value().is_sensitive());
    assert_eq!(token.generation(), 1);
    assert!(h.ready.load(Ordering::Acquire));
}

#[tokio::test]
async fn concurrent_first_requests_share_one_token_request() {
    let ep = FakeTokenEndpoint::start(3600).await;
    ep.set_latency(Duration::from_millis(400));
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let cache = h.cache.clone();
            tokio::spawn(async move { cache.token().await })
        })
        .collect();
    for t in tasks {
        let token = t.await.unwrap().unwrap();
        assert_eq!(token.generation(), 1);
    }
    assert_eq!(ep.requests(), 1);
    // And the held token serves later calls without another request.
    h.cache.token().await.unwrap();
    assert_eq!(ep.requests(), 1);
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_so_callers_never_wait_or_get_a_stale_one() {
    // 2 s tokens, refresh 1 s before expiry (the configured 300 s is clamped to half).
    let ep = FakeTokenEndpoint::start(2).await;
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    h.cache.token().await.unwrap();
    let end = Instant::now() + Duration::from_millis(4500);
    let mut generations = Vec::new();
    while Instant::now() < end {
        let asked = Instant::now();
        let token = h.cache.token().await.unwrap();
        assert!(
            asked.elapsed() < Duration::from_millis(50),
            "a caller waited {:?}",
            asked.elapsed()
        );
        // Never handed out inside the last 10 % of its life.
        assert!(token.expires_at() > Instant::now() + Duration::from_millis(150));
        if generations.last() != Some(&token.generation()) {
            generations.push(token.generation());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(generations.len() >= 4, "refreshes seen: {generations:?}");
    assert!(
        ep.requests() <= 6,
        "too many token requests: {}",
        ep.requests()
    );
}

#[tokio::test]
async fn a_burst_of_invalidations_of_one_token_causes_one_refresh() {
    let ep = FakeTokenEndpoint::start(3600).await;
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    let old = h.cache.token().await.unwrap();
    let results: Vec<bool> = (0..50).map(|_| h.cache.invalidate(&old)).collect();
    assert_eq!(results.iter().filter(|r| **r).count(), 1);
    let new = h.cache.token().await.unwrap();
    assert!(!new.same_as(&old));
    assert_eq!(new.generation(), 2);
    // A late 401 for the old token does not drop the new one.
    assert!(!h.cache.invalidate(&old));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(h.cache.token().await.unwrap().same_as(&new));
    assert_eq!(ep.requests(), 2);
}

#[tokio::test]
async fn an_endpoint_failing_at_startup_gives_quick_503s_and_recovers_without_restart() {
    let ep = FakeTokenEndpoint::start(3600).await;
    ep.set_mode(Mode::Fail(503, r#"{"message":"maintenance"}"#, None));
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    let asked = Instant::now();
    let err = h.cache.token().await.unwrap_err();
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert!(matches!(err, GatewayError::TokenUnavailable(_)), "{err:?}");
    assert_eq!(err.code(), "99000861");
    assert_eq!(err.classify().0, http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(err.to_string().contains("HTTP 503 (maintenance)"), "{err}");
    assert!(!h.ready.load(Ordering::Acquire));

    ep.set_mode(Mode::Grant);
    wait_until("a token after recovery", Duration::from_secs(5), || {
        h.cache.is_ready()
    })
    .await;
    h.cache.token().await.unwrap();
    let text = h.metrics_text();
    assert!(
        text.contains(r#"zuora_token_fetches_total{upstream="zuora",outcome="server_error"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"zuora_token_fetches_total{upstream="zuora",outcome="success"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_is_retried_with_backoff_not_hammered() {
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url: http::Uri = format!("http://{closed}/oauth/token").parse().unwrap();
    let h = harness(&format!("http://{closed}"), url, "");
    h.cache.start();
    let err = h.cache.token().await.unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let text = h.metrics_text();
    let attempts: u64 = text
        .lines()
        .find(|l| l.starts_with("zuora_token_fetches_total{") && l.contains("connect_error"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    // 1 s, then 1–2 s, then 2–4 s: at most 3 attempts in 3.5 s, at least 2.
    assert!((2..=3).contains(&attempts), "{attempts} attempts\n{text}");
    assert!(!h.cache.is_ready());
}

#[tokio::test]
async fn retry_after_on_a_429_is_honoured() {
    let ep = FakeTokenEndpoint::start(3600).await;
    ep.set_mode(Mode::Fail(
        429,
        r#"{"message":"Too many requests"}"#,
        Some(2),
    ));
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    let err = h.cache.token().await.unwrap_err();
    assert!(err.to_string().contains("HTTP 429"), "{err}");
    ep.set_mode(Mode::Grant);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(ep.requests(), 1, "retried before Retry-After elapsed");
    wait_until("the retry after 2 s", Duration::from_secs(3), || {
        h.cache.is_ready()
    })
    .await;
    assert_eq!(ep.requests(), 2);
}

#[tokio::test]
async fn a_valid_token_keeps_serving_while_refreshes_fail_then_readiness_drops() {
    let ep = FakeTokenEndpoint::start(3).await;
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    let first = h.cache.token().await.unwrap();
    ep.set_mode(Mode::Fail(500, "oops", None));
    // Refresh starts at 1.5 s and fails; the token is usable until 2.7 s.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(ep.requests() >= 2, "no refresh attempted");
    assert!(h.cache.token().await.unwrap().same_as(&first));
    assert!(h.cache.is_ready());
    wait_until(
        "readiness to drop at expiry",
        Duration::from_secs(2),
        || !h.cache.is_ready(),
    )
    .await;
    let err = h.cache.token().await.unwrap_err();
    assert!(err.to_string().contains("HTTP 500"), "{err}");
}

#[tokio::test]
async fn rejected_credentials_report_zuora_s_reason_but_never_the_secret() {
    let ep = FakeTokenEndpoint::start(3600).await;
    ep.set_mode(Mode::Fail(401, ZUORA_401, None));
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    let err = h.cache.token().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("HTTP 401 (reason 90000011: Authentication error)"),
        "{text}"
    );
    assert!(!text.contains(CLIENT_SECRET));
    let body = err.to_response();
    assert_eq!(body.status(), 503);
    assert!(!format!("{:?} {:?}", h.cache, err).contains(CLIENT_SECRET));
}

#[tokio::test]
async fn metrics_report_expiry_and_never_the_token_or_secret() {
    let ep = FakeTokenEndpoint::start(3600).await;
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    let token = h.cache.token().await.unwrap();
    let text = h.metrics_text();
    let expiry: f64 = text
        .lines()
        .find(|l| l.starts_with(r#"zuora_token_expiry_seconds{upstream="zuora"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no expiry gauge in\n{text}"));
    assert!(expiry > 3590.0 && expiry <= 3600.0, "{expiry}");
    assert!(!text.contains(token.secret().expose()));
    assert!(!text.contains(CLIENT_SECRET));
    assert!(!format!("{token:?}").contains(token.secret().expose()));
    h.cache.invalidate(&token);
    // Right after invalidation (before the new token lands) or after: never the old value.
    assert!(!h.metrics_text().contains(token.secret().expose()));
}

#[tokio::test]
async fn the_refresh_task_ends_when_the_cache_is_dropped() {
    let ep = FakeTokenEndpoint::start(3600).await;
    let h = harness(&ep.base_url(), ep.token_url(), "");
    let task = h.cache.start();
    h.cache.token().await.unwrap();
    drop(h);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_cache_that_was_never_started_times_out_with_503() {
    let ep = FakeTokenEndpoint::start(3600).await;
    let h = harness(&ep.base_url(), ep.token_url(), "");
    let asked = Instant::now();
    let err = h.cache.token().await.unwrap_err();
    assert!(matches!(err, GatewayError::TokenUnavailable(_)));
    assert!(asked.elapsed() >= Duration::from_secs(2) && asked.elapsed() < Duration::from_secs(3));
    assert_eq!(ep.requests(), 0);
}

#[tokio::test]
async fn fresh_tokens_rejected_again_and_again_slow_token_requests_down() {
    let ep = FakeTokenEndpoint::start(3600).await;
    let h = harness(&ep.base_url(), ep.token_url(), "");
    h.cache.start();
    let mut token = h.cache.token().await.unwrap();
    let mut arrivals = Vec::new();
    for generation in 2..=3 {
        let rejected = Instant::now();
        assert!(h.cache.invalidate(&token));
        wait_until("the next token", Duration::from_secs(5), || {
            h.cache
                .current()
                .is_some_and(|t| t.generation() == generation)
        })
        .await;
        arrivals.push(rejected.elapsed());
        token = h.cache.current().unwrap();
    }
    // 1 s after the first rejection (the normal floor), 2 s after the second.
    assert!(arrivals[0] < Duration::from_millis(1500), "{arrivals:?}");
    assert!(arrivals[1] >= Duration::from_millis(1900), "{arrivals:?}");
    assert_eq!(ep.requests(), 3);
}
