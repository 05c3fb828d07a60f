//! Soak: mixed traffic (reads, stops, invalid stops, hostile requests,
//! callers that hang up, HTTP/2) against the embedded simulator while faults
//! are switched on and off, for `SOAK_SECS` (default 600) seconds.
//!
//! ```text
//! cargo test --release --test soak -- --ignored --nocapture
//! SOAK_SECS=60 cargo test --test soak -- --ignored --nocapture     # a quick one
//! ```
//!
//! Asserts: no panic anywhere in the process; every error response carries a
//! reason code; every stop request is accounted for (a 200 whose job the
//! simulator shows stopped, or an error with a reason code); RSS does not grow
//! by more than `SOAK_RSS_SLACK_MB` (default 64) after warm-up; open file
//! descriptors and the in-flight gauge come back to their baseline.
//! Traffic goes to 127.0.0.1 only; every loop is bounded by the deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zuora_gateway::sim::SimHandle;

const JOBS: &str = "/v1/uno/data-backfill/propagation/jobs";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn yaml(sim: &SimHandle) -> String {
    format!(
        "{SERVER_YAML}  header_read_timeout: 2s\n  body_read_timeout: 2s\n  max_in_flight: 256\nupstreams:\n  zuora:\n    base_url: {}\n    timeouts: {{ connect: 1s, request: 2s }}\n    retry: {{ max_attempts: 2, backoff: 20ms }}\n    circuit_breaker: {{ failure_threshold: 30, open_for: 500ms }}\n    oauth:\n      client_id: {CLIENT_ID}\n      client_secret: {CLIENT_SECRET}\ncallers:\n  trusted_identity: billing-soak\nroutes:\n  - name: stop\n    method: PUT\n    path: {JOBS}/{{jobId}}\n    upstream: zuora\n    allow_callers: [\"*\"]\n  - name: read\n    method: GET\n    path: {JOBS}/**\n    upstream: zuora\n    allow_callers: [\"*\"]\n",
        sim.base_url()
    )
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    errors_without_code: AtomicU64,
    transport_errors: AtomicU64,
    hostile_not_refused: AtomicU64,
    stops_sent: AtomicU64,
    stops_answered: AtomicU64,
    /// Stops answered 200 whose job Zuora did not show as stopping.
    stops_lost: AtomicU64,
    by_status: Mutex<HashMap<u16, u64>>,
}

impl Tally {
    fn reply(&self, r: &Reply) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        *self
            .by_status
            .lock()
            .unwrap()
            .entry(r.status.as_u16())
            .or_default() += 1;
        if r.status.is_success() {
            self.ok.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.errors.fetch_add(1, Ordering::Relaxed);
        let code = serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| {
                let c = &v["reasons"][0]["code"];
                (v["success"] == false && (c.is_string() || c.is_number())).then_some(())
            });
        if code.is_none() {
            self.errors_without_code.fetch_add(1, Ordering::Relaxed);
            eprintln!("error without a reason code: {} {:?}", r.status, r.text());
        }
    }
}

fn job_id() -> String {
    (0..32)
        .map(|_| char::from(b"0123456789abcdef"[fastrand::usize(..16)]))
        .collect()
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(bytes).await.ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    std::str::from_utf8(out.get(9..12)?).ok()?.parse().ok()
}

async fn worker(
    sim: Arc<zuora_gateway::sim::SimControl>,
    g: Arc<(std::net::SocketAddr, String)>,
    tally: Arc<Tally>,
    until: Instant,
    h2: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
) {
    let (addr, base) = (&g.0, &g.1);
    while Instant::now() < until {
        let pick = fastrand::u32(..100);
        match pick {
            0..=39 => {
                let url = format!("{base}{JOBS}?pageSize={}", fastrand::u32(1..20));
                match get(&url).await {
                    Ok(r) => tally.reply(&r),
                    Err(_) => {
                        tally.transport_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            40..=69 => {
                let id = job_id();
                tally.stops_sent.fetch_add(1, Ordering::Relaxed);
                let req = request(
                    Method::PUT,
                    &format!("{base}{JOBS}/{id}"),
                    &[("content-type", "application/json")],
                    r#"{"status":"Stopping"}"#,
                );
                match send(req).await {
                    Ok(r) => {
                        tally.stops_answered.fetch_add(1, Ordering::Relaxed);
                        tally.reply(&r);
                        // A 200 means Zuora has the job stopping now (checked at
                        // once: the simulator keeps the newest 10,000 jobs).
                        if r.status == StatusCode::OK
                            && !sim.job(&id).is_some_and(|j| {
                                matches!(j.status.as_str(), "Stopping" | "Stopped" | "Completed")
                            })
                        {
                            eprintln!("stop {id} answered 200 but the job is not stopping");
                            tally.stops_lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        tally.transport_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            70..=77 => {
                // Invalid stop bodies: refused by the gateway.
                let body = ["", "{", r#"{"status":"Stopped"}"#, "[]"][fastrand::usize(..4)];
                let req = request(
                    Method::PUT,
                    &format!("{base}{JOBS}/{}", job_id()),
                    &[("content-type", "application/json")],
                    body,
                );
                match send(req).await {
                    Ok(r) => {
                        if r.status != StatusCode::BAD_REQUEST {
                            tally.hostile_not_refused.fetch_add(1, Ordering::Relaxed);
                        }
                        tally.reply(&r);
                    }
                    Err(_) => {
                        tally.transport_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            78..=87 => {
                let attack: String = match fastrand::u32(..4) {
                    0 => format!(
                        "PUT {JOBS}/../../../oauth/token HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
                    ),
                    1 => format!("GET {JOBS} HTTP/1.1\nhost: gw\n\n"),
                    2 => format!(
                        "PUT {JOBS}/{} HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                        job_id()
                    ),
                    _ => format!(
                        "GET {JOBS}/..;/x HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n"
                    ),
                };
                tally.requests.fetch_add(1, Ordering::Relaxed);
                match raw(*addr, attack.as_bytes()).await {
                    Some(400..=499) => {}
                    other => {
                        eprintln!("hostile request answered {other:?}: {attack:?}");
                        tally.hostile_not_refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            88..=94 => {
                // A caller that hangs up mid-request.
                if let Ok(mut s) = TcpStream::connect(*addr).await {
                    let _ = s
                        .write_all(
                            format!("GET {JOBS}?pageSize=3 HTTP/1.1\r\nhost: gw\r\n\r\n")
                                .as_bytes(),
                        )
                        .await;
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..50))).await;
                }
            }
            _ => {
                let url = format!("{base}{JOBS}?pageSize=2");
                match h2.request(request(Method::GET, &url, &[], "")).await {
                    Ok(resp) => {
                        use http_body_util::BodyExt;
                        let (parts, body) = resp.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        tally.reply(&Reply {
                            status: parts.status,
                            headers: parts.headers,
                            body,
                        });
                    }
                    Err(_) => {
                        tally.transport_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// Switches simulator faults on and off until `until`.
async fn fault_driver(sim: Arc<zuora_gateway::sim::SimControl>, until: Instant) {
    while Instant::now() < until {
        match fastrand::u32(..6) {
            0 => sim.set_latency(Duration::from_millis(fastrand::u64(0..300))),
            1 => sim.inject_status(503, fastrand::usize(1..10), None),
            2 => sim.inject_status(429, fastrand::usize(1..5), Some(1)),
            3 => sim.revoke_all_tokens(),
            4 => {
                sim.set_token_endpoint_down(true);
                tokio::time::sleep(Duration::from_millis(500)).await;
                sim.set_token_endpoint_down(false);
            }
            _ => sim.set_latency(Duration::from_millis(2500)), // beyond timeouts.request
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(1000..3000))).await;
        sim.set_latency(Duration::ZERO);
    }
    sim.set_latency(Duration::ZERO);
    sim.inject_status(503, 0, None);
    sim.set_token_endpoint_down(false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: cargo test --release --test soak -- --ignored --nocapture (SOAK_SECS)"]
async fn soak_mixed_traffic_with_faults_stays_healthy() {
    let panics = Arc::new(AtomicU64::new(0));
    {
        let panics = panics.clone();
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            panics.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    }
    let secs = env_u64("SOAK_SECS", 600);
    let rss_slack_kib = env_u64("SOAK_RSS_SLACK_MB", 64) * 1024;
    let workers = env_u64("SOAK_WORKERS", 16);

    let sim = simulator().await;
    let g = gateway(&yaml(&sim)).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let target = Arc::new((g.addr, format!("http://{}", g.addr)));
    let tally = Arc::new(Tally::default());
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();

    // Warm-up: allocator arenas, pools and caches reach their working size.
    let warm = Instant::now() + Duration::from_secs(secs.clamp(5, 30) / 2);
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            tokio::spawn(worker(
                sim.control(),
                target.clone(),
                tally.clone(),
                warm,
                h2.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_base = rss_kib();
    let fds_base = open_fds();
    eprintln!("baseline after warm-up: rss {rss_base} KiB, fds {fds_base}");

    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let driver = tokio::spawn(fault_driver(sim.control(), until));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            tokio::spawn(worker(
                sim.control(),
                target.clone(),
                tally.clone(),
                until,
                h2.clone(),
            ))
        })
        .collect();
    let mut rss_max = rss_base;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(10).min(until - Instant::now().min(until))).await;
        let rss = rss_kib();
        rss_max = rss_max.max(rss);
        eprintln!(
            "t={:>4}s rss {rss} KiB fds {} requests {} ok {} errors {} stops {}",
            started.elapsed().as_secs(),
            open_fds(),
            tally.requests.load(Ordering::Relaxed),
            tally.ok.load(Ordering::Relaxed),
            tally.errors.load(Ordering::Relaxed),
            tally.stops_sent.load(Ordering::Relaxed),
        );
    }
    for t in tasks {
        t.await.unwrap();
    }
    driver.await.unwrap();

    // Drain: idle connections close (header_read_timeout), in-flight reaches 0.
    drop(h2);
    let settle = Instant::now() + Duration::from_secs(10);
    let metrics_url = g.admin_url("/metrics");
    let in_flight = loop {
        let text = get(&metrics_url)
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        let v = text
            .lines()
            .find(|l| l.starts_with("gateway_in_flight_requests "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0);
        if (v == 0.0 && open_fds() <= fds_base + 8) || Instant::now() > settle {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rss_end = rss_kib();
    let fds_end = open_fds();
    eprintln!(
        "end: rss {rss_end} KiB (base {rss_base}, max {rss_max}), fds {fds_end} (base {fds_base}), statuses {:?}",
        tally.by_status.lock().unwrap()
    );

    // Every stop is accounted for.
    assert_eq!(
        tally.stops_sent.load(Ordering::Relaxed),
        tally.stops_answered.load(Ordering::Relaxed),
        "every stop got an answer"
    );
    assert_eq!(tally.stops_lost.load(Ordering::Relaxed), 0);
    assert!(
        tally.ok.load(Ordering::Relaxed) > 0,
        "some traffic succeeded"
    );
    assert_eq!(tally.errors_without_code.load(Ordering::Relaxed), 0);
    assert_eq!(tally.hostile_not_refused.load(Ordering::Relaxed), 0);
    assert_eq!(tally.transport_errors.load(Ordering::Relaxed), 0);
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a panic happened");
    assert_eq!(in_flight, 0.0, "in-flight gauge back to 0");
    assert!(fds_end <= fds_base + 8, "fds {fds_base} -> {fds_end}");
    assert!(
        rss_end <= rss_base + rss_slack_kib,
        "RSS grew {rss_base} -> {rss_end} KiB (slack {rss_slack_kib} KiB)"
    );
    g.shutdown().await;
}
