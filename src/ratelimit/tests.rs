use std::path::Path;
use std::sync::atomic::AtomicU32;

use super::clock::ManualClock;
use super::testing::RedisServer;
use super::*;
use crate::config::Config;
use crate::context::RouteMatch;

const BASE: &str = "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: simulator } }\ncallers: { trusted_identity: svc }\n";

fn policy(yaml: &str) -> Arc<Policy> {
    let config = Config::from_yaml(
        &format!("{BASE}{yaml}"),
        Path::new("t.yaml"),
        Path::new("."),
        &|_: &str| None,
    )
    .unwrap();
    Arc::new(Policy::compile(Arc::new(config)))
}

fn stop_policy(limits: &str, extra: &str) -> Arc<Policy> {
    policy(&format!(
        "routes:\n  - {{ name: stop, method: PUT, path: '/v1/jobs/{{jobId}}', upstream: zuora, allow_callers: ['*'], rate_limits: [{}] }}\nrate_limits:\n{limits}{extra}",
        limit_names(limits)
    ))
}

fn limit_names(limits: &str) -> String {
    limits
        .lines()
        .filter_map(|l| l.trim().split(':').next())
        .filter(|n| !n.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

fn route(p: &Arc<Policy>, job: &str) -> RouteMatch {
    RouteMatch {
        policy: p.clone(),
        route: 0,
        params: vec![job.to_owned()],
    }
}

fn keys(limits: &[RouteLimit], caller: &str, job: &str) -> Vec<String> {
    limits
        .iter()
        .map(|l| {
            match l.config().key.as_slice() {
                [crate::config::LimitKey::Caller] => caller,
                [crate::config::LimitKey::Global] => "",
                _ => job,
            }
            .to_owned()
        })
        .collect()
}

fn local_registry() -> (Arc<LimiterRegistry>, ManualClock) {
    let clock = ManualClock::new();
    (
        LimiterRegistry::with_clock(RateLimitMetrics::default(), Arc::new(clock.clone())),
        clock,
    )
}

fn redis_server() -> RedisServer {
    assert!(
        RedisServer::available(),
        "redis-server is not installed: the Redis rate-limit tests need a real server (apt-get install -y redis-server)"
    );
    RedisServer::start().expect("start redis-server")
}

#[test]
fn second_stop_of_the_same_job_is_refused_until_the_interval_passes() {
    let (reg, clock) = local_registry();
    let p = stop_policy("  per-job: { key: jobId, rate: 1/minute }\n", "");
    let limits = reg.route_limits(&route(&p, "A"));
    let k = keys(&limits, "alice", "A");
    let q = reg.decide_local(&limits, &k).unwrap().unwrap();
    assert_eq!((q.limit, q.remaining), (1, 0));
    match reg.decide_local(&limits, &k).unwrap_err() {
        GatewayError::RateLimited {
            limit,
            retry_after,
            quota,
        } => {
            assert_eq!(limit, "per-job");
            assert_eq!(retry_after, Duration::from_secs(60));
            assert_eq!(quota, Some(1));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        reg.decide_local(&limits, &keys(&limits, "alice", "B"))
            .is_ok(),
        "another job has its own bucket"
    );
    clock.advance(Duration::from_secs(59));
    assert!(reg.decide_local(&limits, &k).is_err());
    clock.advance(Duration::from_secs(1));
    assert!(reg.decide_local(&limits, &k).is_ok());
}

#[test]
fn denied_request_consumes_no_budget_of_the_other_limits() {
    let (reg, _clock) = local_registry();
    let p = stop_policy(
        "  per-caller: { key: caller, rate: 2/minute, burst: 2 }\n  per-job: { key: jobId, rate: 1/minute }\n",
        "",
    );
    let limits = reg.route_limits(&route(&p, "A"));
    reg.decide_local(&limits, &keys(&limits, "alice", "A"))
        .unwrap();
    for _ in 0..10 {
        let e = reg
            .decide_local(&limits, &keys(&limits, "alice", "A"))
            .unwrap_err();
        assert!(
            matches!(e, GatewayError::RateLimited { ref limit, .. } if limit == "per-job"),
            "{e:?}"
        );
    }
    // alice still has her second slot: ten refusals on job A took nothing from it.
    reg.decide_local(&limits, &keys(&limits, "alice", "B"))
        .unwrap();
    let e = reg
        .decide_local(&limits, &keys(&limits, "alice", "C"))
        .unwrap_err();
    assert!(
        matches!(e, GatewayError::RateLimited { ref limit, .. } if limit == "per-caller"),
        "{e:?}"
    );
}

#[test]
fn reload_with_an_unchanged_limit_keeps_its_buckets() {
    let (reg, _clock) = local_registry();
    let limits_yaml = "  per-job: { key: jobId, rate: 1/minute }\n  per-caller: { key: caller, rate: 5/minute, burst: 5 }\n";
    let p1 = stop_policy(limits_yaml, "");
    let l1 = reg.route_limits(&route(&p1, "A"));
    reg.decide_local(&l1, &keys(&l1, "alice", "A")).unwrap();
    // The reload: a new policy compiled from an equal definition; the old one is dropped.
    let p2 = stop_policy(limits_yaml, "");
    drop((l1, p1));
    let l2 = reg.route_limits(&route(&p2, "A"));
    assert!(
        reg.decide_local(&l2, &keys(&l2, "alice", "A")).is_err(),
        "the reload refilled job A's bucket"
    );
}

#[test]
fn reload_with_a_changed_limit_starts_it_fresh_and_keeps_the_others() {
    let (reg, _clock) = local_registry();
    let p1 = stop_policy(
        "  per-job: { key: jobId, rate: 1/minute }\n  per-caller: { key: caller, rate: 2/minute, burst: 2 }\n",
        "",
    );
    let l1 = reg.route_limits(&route(&p1, "A"));
    reg.decide_local(&l1, &keys(&l1, "alice", "A")).unwrap();
    reg.decide_local(&l1, &keys(&l1, "alice", "B")).unwrap();
    let p2 = stop_policy(
        "  per-job: { key: jobId, rate: 2/minute }\n  per-caller: { key: caller, rate: 2/minute, burst: 2 }\n",
        "",
    );
    let l2 = reg.route_limits(&route(&p2, "A"));
    // per-job changed (fresh), per-caller did not: alice's two slots are still spent.
    let e = reg.decide_local(&l2, &keys(&l2, "alice", "A")).unwrap_err();
    assert!(
        matches!(e, GatewayError::RateLimited { ref limit, .. } if limit == "per-caller"),
        "{e:?}"
    );
    drop((l1, p1));
    let _ = reg.route_limits(&route(&p2, "A"));
    let old = crate::config::RateLimitConfig {
        count: 1,
        ..l2[0].config().clone()
    };
    let _ = reg.route_limits(&route(
        &stop_policy("  x: { key: caller, rate: 1/second }\n", ""),
        "A",
    ));
    assert!(
        reg.limiter(&old).is_none(),
        "a definition no policy uses is released"
    );
}

#[test]
fn upstream_hold_answers_locally_until_retry_after_passes() {
    let (reg, clock) = local_registry();
    let p = stop_policy(
        "  per-caller: { key: caller, rate: 100/second, burst: 100 }\n",
        "",
    );
    let limits = reg.route_limits(&route(&p, "A"));
    let k = keys(&limits, "alice", "A");
    reg.hold_upstream(&limits, &k, Duration::from_secs(3));
    match reg.decide_local(&limits, &k).unwrap_err() {
        GatewayError::UpstreamRateLimited { retry_after } => {
            assert_eq!(retry_after, Duration::from_secs(3))
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        reg.decide_local(&limits, &keys(&limits, "bob", "A"))
            .is_ok(),
        "other callers are not held"
    );
    clock.advance(Duration::from_secs(3));
    assert!(reg.decide_local(&limits, &k).is_ok());
}

#[test]
fn upstream_hold_is_capped() {
    let (reg, _clock) = local_registry();
    let p = stop_policy("  per-caller: { key: caller, rate: 1/second }\n", "");
    let limits = reg.route_limits(&route(&p, "A"));
    let k = keys(&limits, "alice", "A");
    reg.hold_upstream(&limits, &k, Duration::from_secs(86_400 * 30));
    match reg.decide_local(&limits, &k).unwrap_err() {
        GatewayError::UpstreamRateLimited { retry_after } => {
            assert_eq!(retry_after, MAX_UPSTREAM_HOLD)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn sweep_releases_idle_keys_and_ended_holds() {
    let (reg, clock) = local_registry();
    let p = stop_policy("  per-job: { key: jobId, rate: 1/second }\n", "");
    let limits = reg.route_limits(&route(&p, "A"));
    for i in 0..50 {
        reg.decide_local(&limits, &[format!("job{i}")]).unwrap();
    }
    reg.hold_upstream(&limits, &["held".to_owned()], Duration::from_secs(5));
    assert_eq!(limits[0].limiter.tracked_keys(), 50);
    clock.advance(Duration::from_secs(1));
    assert_eq!(reg.sweep(), 50);
    assert_eq!(limits[0].limiter.tracked_keys(), 0);
    clock.advance(Duration::from_secs(5));
    reg.sweep();
    assert_eq!(limits[0].limiter.holds.len.load(Ordering::SeqCst), 0);
}

#[test]
fn metrics_count_decisions_by_limit() {
    let mut registry = Registry::default();
    let metrics = RateLimitMetrics::new(&mut registry);
    let reg = LimiterRegistry::with_clock(metrics, Arc::new(ManualClock::new()));
    let p = stop_policy("  per-job: { key: jobId, rate: 1/minute }\n", "");
    let limits = reg.route_limits(&route(&p, "A"));
    reg.decide_local(&limits, &["A".to_owned()]).unwrap();
    reg.decide_local(&limits, &["A".to_owned()]).unwrap_err();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            r#"gateway_rate_limit_decisions_total{limit="per-job",decision="admitted"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"gateway_rate_limit_decisions_total{limit="per-job",decision="limited"} 1"#
        ),
        "{text}"
    );
}

fn redis_yaml(url: &str, on_error: &str, rate: &str) -> Arc<Policy> {
    stop_policy(
        &format!(
            "  shared: {{ key: jobId, rate: {rate}, store: redis, on_store_error: {on_error} }}\n"
        ),
        &format!("redis: {{ url: '{url}', timeout: 200ms, key_prefix: 'test:' }}\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_replicas_share_one_budget_exactly() {
    let server = redis_server();
    // Two registries = two gateway replicas (separate processes in tests/ratelimit.rs).
    let replicas: Vec<Arc<LimiterRegistry>> = (0..2)
        .map(|_| LimiterRegistry::new(RateLimitMetrics::default()))
        .collect();
    let p = redis_yaml(&server.url(), "deny", "10/minute");
    // Budget of 10: burst 10 at 10/minute.
    let p = {
        let mut config = (*p.config).clone();
        config.rate_limits.get_mut("shared").unwrap().burst = 10;
        Arc::new(Policy::compile(Arc::new(config)))
    };
    let admitted = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (reg, p, admitted) = (replicas[i % 2].clone(), p.clone(), admitted.clone());
            tokio::spawn(async move {
                let limits = reg.route_limits(&route(&p, "J"));
                match reg.decide(&limits, &["J".to_owned()]).await {
                    Ok(_) => {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(GatewayError::RateLimited { .. }) => {}
                    Err(other) => panic!("unexpected {other:?}"),
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn redis_refill_follows_the_rate() {
    let server = redis_server();
    let reg = LimiterRegistry::new(RateLimitMetrics::default());
    let p = redis_yaml(&server.url(), "deny", "20/second");
    let limits = reg.route_limits(&route(&p, "J"));
    let k = ["J".to_owned()];
    let q = reg.decide(&limits, &k).await.unwrap().unwrap();
    assert_eq!((q.limit, q.remaining), (1, 0));
    match reg.decide(&limits, &k).await.unwrap_err() {
        GatewayError::RateLimited { retry_after, .. } => {
            assert!(
                retry_after > Duration::ZERO && retry_after <= Duration::from_millis(50),
                "{retry_after:?}"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(reg.decide(&limits, &k).await.is_ok());
}

#[tokio::test]
async fn redis_refusal_consumes_no_budget_of_the_other_limits() {
    let server = redis_server();
    let reg = LimiterRegistry::new(RateLimitMetrics::default());
    let p = stop_policy(
        "  per-caller: { key: caller, rate: 2/minute, burst: 2, store: redis }\n  per-job: { key: jobId, rate: 1/minute, store: redis }\n",
        &format!("redis: {{ url: '{}' }}\n", server.url()),
    );
    let limits = reg.route_limits(&route(&p, "A"));
    reg.decide(&limits, &keys(&limits, "alice", "A"))
        .await
        .unwrap();
    for _ in 0..5 {
        let e = reg
            .decide(&limits, &keys(&limits, "alice", "A"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, GatewayError::RateLimited { ref limit, .. } if limit == "per-job"),
            "{e:?}"
        );
    }
    reg.decide(&limits, &keys(&limits, "alice", "B"))
        .await
        .unwrap();
    let e = reg
        .decide(&limits, &keys(&limits, "alice", "C"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, GatewayError::RateLimited { ref limit, .. } if limit == "per-caller"),
        "{e:?}"
    );
}

#[tokio::test]
async fn redis_hold_from_one_replica_holds_the_other() {
    let server = redis_server();
    let (a, b) = (
        LimiterRegistry::new(RateLimitMetrics::default()),
        LimiterRegistry::new(RateLimitMetrics::default()),
    );
    let p = redis_yaml(&server.url(), "deny", "100/second");
    let (la, lb) = (
        a.route_limits(&route(&p, "J")),
        b.route_limits(&route(&p, "J")),
    );
    let k = ["J".to_owned()];
    a.hold_upstream(&la, &k, Duration::from_secs(5));
    // The hold is written in the background.
    let mut held = false;
    for _ in 0..50 {
        if let Err(GatewayError::UpstreamRateLimited { retry_after }) = b.decide(&lb, &k).await {
            assert!(
                retry_after > Duration::from_secs(4) && retry_after <= Duration::from_secs(5),
                "{retry_after:?}"
            );
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held, "replica b never saw replica a's hold");
}

#[tokio::test]
async fn redis_down_with_local_policy_falls_back_to_a_local_limiter() {
    let mut server = redis_server();
    let mut registry = Registry::default();
    let metrics = RateLimitMetrics::new(&mut registry);
    let reg = LimiterRegistry::new(metrics.clone());
    let p = redis_yaml(&server.url(), "local", "1/minute");
    let limits = reg.route_limits(&route(&p, "J"));
    reg.decide(&limits, &["J".to_owned()]).await.unwrap();
    server.stop();
    // The fallback has its own state at the same rate: one admission, then refusals.
    reg.decide(&limits, &["K".to_owned()]).await.unwrap();
    let e = reg.decide(&limits, &["K".to_owned()]).await.unwrap_err();
    assert!(matches!(e, GatewayError::RateLimited { .. }), "{e:?}");
    let labels = LimitLabels {
        limit: "shared".into(),
    };
    assert_eq!(metrics.fallbacks.get_or_create(&labels).get(), 2);
    assert!(metrics.store_errors.get_or_create(&labels).get() >= 1);
}

#[tokio::test]
async fn redis_down_with_allow_policy_admits() {
    let mut server = redis_server();
    let reg = LimiterRegistry::new(RateLimitMetrics::default());
    let p = redis_yaml(&server.url(), "allow", "1/minute");
    let limits = reg.route_limits(&route(&p, "J"));
    reg.decide(&limits, &["J".to_owned()]).await.unwrap();
    server.stop();
    for _ in 0..3 {
        assert_eq!(reg.decide(&limits, &["J".to_owned()]).await.unwrap(), None);
    }
}

#[tokio::test]
async fn redis_down_with_deny_policy_refuses_with_503() {
    let mut server = redis_server();
    let reg = LimiterRegistry::new(RateLimitMetrics::default());
    let p = redis_yaml(&server.url(), "deny", "100/second");
    let limits = reg.route_limits(&route(&p, "J"));
    reg.decide(&limits, &["J".to_owned()]).await.unwrap();
    server.stop();
    let started = std::time::Instant::now();
    let e = reg.decide(&limits, &["J".to_owned()]).await.unwrap_err();
    assert!(matches!(e, GatewayError::LimiterUnavailable), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by redis.timeout"
    );
    assert_eq!(
        e.to_response().status(),
        http::StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn redis_recovers_after_a_restart() {
    let mut server = redis_server();
    let port = server.port();
    let reg = LimiterRegistry::new(RateLimitMetrics::default());
    let p = redis_yaml(&server.url(), "deny", "100/second");
    let limits = reg.route_limits(&route(&p, "J"));
    reg.decide(&limits, &["J".to_owned()]).await.unwrap();
    server.stop();
    assert!(reg.decide(&limits, &["J".to_owned()]).await.is_err());
    let _server = RedisServer::start_on(port).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if reg.decide(&limits, &["J".to_owned()]).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "decisions did not use Redis again after it came back");
}

#[tokio::test]
async fn redis_unreachable_at_start_does_not_block_startup() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reg = LimiterRegistry::new(RateLimitMetrics::default());
    let p = redis_yaml(
        &format!("redis://:hunter2@127.0.0.1:{port}"),
        "local",
        "1/minute",
    );
    let limits = reg.route_limits(&route(&p, "J"));
    assert!(reg.decide(&limits, &["J".to_owned()]).await.is_ok());
    let store = limits[0].store.as_ref().unwrap();
    assert!(!format!("{store:?}").contains("hunter2"));
}
