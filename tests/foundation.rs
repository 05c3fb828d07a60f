//! The proxy core over real sockets: routing, forwarding, body limits,
//! header hygiene, TLS to the upstream, graceful shutdown, shipped configs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::*;

fn sidecar_yaml(sim: &zuora_gateway::sim::SimHandle, extra_server: &str) -> String {
    format!(
        "{SERVER_YAML}{extra_server}{}callers:\n  trusted_identity: billing-test\nroutes:\n  - name: stop\n    method: PUT\n    path: /v1/uno/data-backfill/propagation/jobs/{{jobId}}\n    upstream: zuora\n    allow_callers: [\"*\"]\n  - name: read\n    method: GET\n    path: /v1/uno/data-backfill/propagation/jobs/**\n    upstream: zuora\n    allow_callers: [\"*\"]\n",
        upstream_yaml(sim)
    )
}

#[tokio::test]
async fn get_and_put_are_proxied_to_zuora() {
    let sim = simulator().await;
    let g = gateway(&sidecar_yaml(&sim, "")).await;
    wait_ready(&g, Duration::from_secs(5)).await;

    let r = get(&g.url("/v1/uno/data-backfill/propagation/jobs?pageSize=5"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["success"], true);
    assert!(
        r.headers.contains_key("zuora-request-id"),
        "Zuora's response headers pass back"
    );
    assert!(r.headers.contains_key("ratelimit-limit"));

    let r = send(stop(&g, JOB, &[])).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["success"], true);
    assert_eq!(sim.control().job(JOB).unwrap().status, "Stopping");
    g.shutdown().await;
}

#[tokio::test]
async fn unknown_route_and_method_are_refused_without_contacting_zuora() {
    let sim = simulator().await;
    let g = gateway(&sidecar_yaml(&sim, "")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let before = sim.control().api_requests();

    let r = get(&g.url("/v1/accounts/A-1")).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.code().ends_with("40"), "{}", r.text());

    let r = send(request(
        Method::DELETE,
        &g.url(&format!("/v1/uno/data-backfill/propagation/jobs/{JOB}")),
        &[],
        "",
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.code().ends_with("45"));
    assert_eq!(r.headers["allow"], "GET, PUT");

    for path in [
        "/v1/uno/data-backfill/propagation/jobs/../../../oauth/token",
        "/v1/uno/data-backfill/propagation/jobs/%2e%2e/x",
        "/v1/uno/data-backfill/propagation/jobs/a%2Fb",
    ] {
        let r = send(request(
            Method::PUT,
            &g.url(path),
            &[],
            r#"{"status":"Stopping"}"#,
        ))
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(r.code().ends_with("20"));
    }
    assert_eq!(
        sim.control().api_requests(),
        before,
        "nothing reached Zuora"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn oversized_body_is_413_before_anything_is_forwarded() {
    let sim = simulator().await;
    let g = gateway(&sidecar_yaml(&sim, "  max_body_bytes: 1024\n")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let before = sim.control().api_requests();
    let big = vec![b' '; 4096];
    let r = send(request(
        Method::PUT,
        &g.url(&format!("/v1/uno/data-backfill/propagation/jobs/{JOB}")),
        &[("content-type", "application/json")],
        big,
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.code().ends_with("70"));
    assert_eq!(sim.control().api_requests(), before);
    g.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded_and_host_is_rewritten() {
    let sim = simulator().await;
    let g = gateway(&sidecar_yaml(&sim, "")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    sim.control().clear_requests();
    let r = send(request(
        Method::GET,
        &g.url("/v1/uno/data-backfill/propagation/jobs"),
        &[
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "trailers"),
            ("host", "gateway.internal"),
            ("x-kept", "yes"),
        ],
        "",
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = sim.control().requests();
    let req = seen
        .iter()
        .rev()
        .find(|r| r.path_and_query.starts_with("/v1/"))
        .expect("request recorded");
    for h in ["x-drop-me", "keep-alive", "proxy-authorization", "te"] {
        assert!(!req.headers.contains_key(h), "{h} was forwarded");
    }
    assert_eq!(req.headers["x-kept"], "yes");
    assert_eq!(req.headers["host"], sim.addr().to_string().as_str());
    g.shutdown().await;
}

#[tokio::test]
async fn tls_upstream_with_private_ca_works_and_is_refused_without_it() {
    let pki = test_pki();
    let sim = zuora_gateway::sim::Simulator::start_tls(
        loopback(),
        zuora_gateway::sim::SimOptions {
            client_id: Some(CLIENT_ID.into()),
            client_secret: Some(CLIENT_SECRET.into()),
            ..Default::default()
        },
        pki.server_config.clone(),
    )
    .await
    .unwrap();
    assert!(sim.base_url().starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();

    let with_ca = sidecar_yaml(&sim, "").replace(
        "    timeouts:",
        &format!("    ca_file: {}\n    timeouts:", ca.display()),
    );
    let g = gateway(&with_ca).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let r = get(&g.url("/v1/uno/data-backfill/propagation/jobs"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    g.shutdown().await;

    // Without the CA the certificate is not trusted: a clear 5xx, never a success.
    let g = gateway(&sidecar_yaml(&sim, "")).await;
    let r = get(&g.url("/v1/uno/data-backfill/propagation/jobs"))
        .await
        .unwrap();
    assert!(
        r.status == StatusCode::BAD_GATEWAY || r.status == StatusCode::SERVICE_UNAVAILABLE,
        "{} {}",
        r.status,
        r.text()
    );
    assert_eq!(r.json()["success"], false);
    g.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let sim = simulator().await;
    let g = gateway(&sidecar_yaml(&sim, "")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    sim.control().set_latency(Duration::from_millis(800));
    let url = g.url("/v1/uno/data-backfill/propagation/jobs");
    let in_flight = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = g.addr;
    let readyz = g.admin_url("/readyz");
    let shutdown = tokio::spawn(g.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // New connections are refused while draining; readiness says so.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
    let r = get(&readyz)
        .await
        .expect("admin port stays up while draining");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().contains("shutting down"), "{}", r.text());
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    shutdown.await.unwrap();
}

#[tokio::test]
async fn local_config_starts_and_becomes_ready() {
    let yaml =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/local.yaml")).unwrap();
    let yaml = yaml
        .replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:0")
        .replace("admin_listen: 127.0.0.1:9901", "admin_listen: 127.0.0.1:0");
    let config = zuora_gateway::config::Config::from_yaml(
        &yaml,
        std::path::Path::new("config/local.yaml"),
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config")),
        &zuora_gateway::config::ProcessEnv,
    )
    .unwrap();
    let g = start(config).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let r = get(&g.admin_url("/healthz")).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let r = get(&g.url("/v1/not-routed")).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = get(&g.admin_url("/metrics")).await.unwrap();
    assert!(
        r.text()
            .contains("gateway_requests_total{route=\"none\",status=\"404\""),
        "{}",
        r.text()
    );
    g.shutdown().await;
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_zuora-gateway")
}

#[test]
fn check_accepts_every_shipped_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let out = std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(&path)
            .env("ZUORA_CLIENT_ID", "0123456789abcdef0123456789abcdef0123")
            .env("ZUORA_CLIENT_SECRET", "placeholder-secret")
            .env(
                "GATEWAY_HS256_SECRET",
                "placeholder-hs256-secret-0123456789abcdef",
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("OK"), "{stdout}");
        assert!(
            !stdout.contains("placeholder-secret"),
            "secrets are never printed"
        );
        checked += 1;
    }
    assert!(checked >= 2, "config/ has gateway.yaml and local.yaml");
}

#[test]
fn check_rejects_broken_configs_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: simulator } }\ncallers: { trusted_identity: svc }\nroutes:\n  - { name: r, path: /v1/x, upstream: zuora, rate_limits: [nope] }\n",
            "routes[0].rate_limits[0]",
        ),
        (
            "server: { listen: 127.0.0.1:8080, colour: blue }\nupstreams: { zuora: { base_url: simulator } }\ncallers: { trusted_identity: svc }\n",
            "colour",
        ),
        (
            "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: 'ftp://x' } }\ncallers: { trusted_identity: svc }\n",
            "upstreams.zuora.base_url",
        ),
        ("server: [oops\n", "line 1"),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("broken{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "case {i}: {stderr}");
        assert!(
            stderr.contains(&format!("broken{i}.yaml")),
            "names the file: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The binary on `config/local.yaml` (embedded simulator, JWT callers), with
/// `server` keys added (`threads`: the runtime they pick): a request with a
/// `dev-token` is proxied, then one on each of six connections open at once
/// (so every serving thread gets some), and SIGTERM drains and exits 0.
fn serve_local_config_with(threads: &str) {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut yaml = std::fs::read_to_string(format!("{root}/config/local.yaml"))
        .unwrap()
        .replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:0")
        .replace("admin_listen: 127.0.0.1:9901", "admin_listen: 127.0.0.1:0")
        .replace("keys/", &format!("{root}/config/keys/"));
    if !threads.is_empty() {
        yaml = yaml.replacen("server:\n", &format!("server:\n  {threads}\n"), 1);
    }
    let config = dir.path().join("local.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let token = std::process::Command::new(bin())
        .args(["dev-token", "--config"])
        .arg(&config)
        .args(["--caller", "billing-eu-1"])
        .output()
        .unwrap();
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    // Killed if an assertion fails first, so no gateway outlives the test.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(
        std::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let listen = loop {
        let line = lines.next().expect("gateway output").unwrap();
        if let Some((addr, _admin)) = listening(&line) {
            break addr;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let request = format!(
        "GET /v1/uno/data-backfill/propagation/jobs?pageSize=2 HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    let mut status = String::new();
    for _ in 0..50 {
        let mut s = std::net::TcpStream::connect(listen).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        status = response.lines().next().unwrap_or("").to_owned();
        if status.contains(" 200 ") {
            break;
        }
        // 503 until the first Zuora token has been fetched.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(status.contains(" 200 "), "{threads:?}: {status}");
    // Connections open at the same time go to different threads.
    let mut open: Vec<_> = (0..6)
        .map(|_| std::net::TcpStream::connect(listen).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for (i, s) in open.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let status = response.lines().next().unwrap_or("");
        assert!(
            status.contains(" 200 "),
            "{threads:?}, connection {i}: {status}"
        );
    }
    let pid = child.0.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = child.0.wait().unwrap();
    assert!(exit.success(), "{threads:?}: {exit}");
}

#[test]
fn serves_on_a_current_thread_runtime_with_one_worker_thread() {
    serve_local_config_with("worker_threads: 1");
}

#[test]
fn serves_on_the_default_threads() {
    serve_local_config_with("");
}

#[test]
fn serves_on_three_current_thread_runtimes() {
    serve_local_config_with("worker_threads: 3");
}

#[test]
fn serves_on_the_work_stealing_runtime() {
    serve_local_config_with("worker_threads: 2\n  work_stealing: true");
}

/// `sidecar_yaml` with `max_concurrent_requests` and a connect timeout
/// (which also bounds the wait for a slot).
fn capped_yaml(sim: &zuora_gateway::sim::SimHandle, slots: usize, connect: &str) -> String {
    sidecar_yaml(sim, "").replace(
        "timeouts: { connect: 2s, request: 10s }",
        &format!(
            "timeouts: {{ connect: {connect}, request: 10s }}\n    max_concurrent_requests: {slots}"
        ),
    )
}

const LIST: &str = "/v1/uno/data-backfill/propagation/jobs?pageSize=5";

#[tokio::test]
async fn requests_beyond_max_concurrent_requests_wait_for_a_slot() {
    let sim = simulator().await;
    let g = gateway(&capped_yaml(&sim, 1, "5s")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    sim.control().set_latency(Duration::from_millis(150));
    let before = sim.control().api_requests();
    let started = std::time::Instant::now();
    let replies = futures_util::future::join_all((0..3).map(|_| get_url(&g))).await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(sim.control().api_requests() - before, 3);
    // One at a time: three 150 ms calls cannot finish in under 450 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    g.shutdown().await;
}

#[tokio::test]
async fn a_request_that_cannot_get_a_slot_in_time_is_503_without_reaching_zuora() {
    let sim = simulator().await;
    let g = gateway(&capped_yaml(&sim, 2, "200ms")).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    sim.control().set_latency(Duration::from_millis(1500));
    let before = sim.control().api_requests();
    let replies = futures_util::future::join_all((0..3).map(|_| get_url(&g))).await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let refused: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!(
        (ok, refused.len()),
        (2, 1),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(refused[0].code(), "99000961", "{}", refused[0].text());
    assert_eq!(refused[0].json()["success"], false);
    assert!(refused[0].headers.contains_key("retry-after"));
    assert_eq!(
        sim.control().api_requests() - before,
        2,
        "the third never reached Zuora"
    );
    g.shutdown().await;
}

async fn get_url(g: &Gateway) -> Reply {
    get(&g.url(LIST)).await.unwrap()
}
