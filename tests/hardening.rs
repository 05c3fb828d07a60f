//! Hostile callers, over real sockets. Every attack here must be refused with
//! a 4xx (or the connection cut) and must never reach Zuora: each test reads
//! the simulator's counters before and after.
//!
//! Raw `TcpStream` writes are used wherever a well-behaved client library
//! would normalise the attack away (request smuggling, path tricks).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fault_server;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zuora_gateway::sim::SimHandle;

const STOP_PATH: &str = "/v1/uno/data-backfill/propagation/jobs";
const STOP_BODY: &str = r#"{"status":"Stopping"}"#;

/// The sidecar config (trusted identity) with a stop and a read route, plus
/// extra `server:` keys (each line indented by two spaces).
fn config_yaml(base_url: &str, server_extra: &[&str]) -> String {
    let mut server = String::from(SERVER_YAML);
    for line in server_extra {
        server.push_str("  ");
        server.push_str(line);
        server.push('\n');
    }
    format!(
        "{server}upstreams:\n  zuora:\n    base_url: {base_url}\n    timeouts: {{ connect: 2s, request: 10s }}\n    oauth:\n      client_id: {CLIENT_ID}\n      client_secret: {CLIENT_SECRET}\ncallers:\n  trusted_identity: billing-test\nroutes:\n  - name: stop\n    method: PUT\n    path: {STOP_PATH}/{{jobId}}\n    upstream: zuora\n    allow_callers: [\"*\"]\n  - name: read\n    method: GET\n    path: {STOP_PATH}/**\n    upstream: zuora\n    allow_callers: [\"*\"]\n"
    )
}

async fn setup(server_extra: &[&str]) -> (SimHandle, Gateway) {
    let sim = simulator().await;
    let g = gateway(&config_yaml(&sim.base_url(), server_extra)).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    (sim, g)
}

/// What reached Zuora: `/v1` requests plus any token-endpoint request that is
/// not the gateway's own `POST` (a smuggled or traversed request would be).
fn forwarded(sim: &SimHandle) -> (u64, usize) {
    let c = sim.control();
    let odd_token_calls = c
        .requests()
        .iter()
        .filter(|r| r.path_and_query.starts_with("/oauth") && r.method != Method::POST)
        .count();
    (c.api_requests(), odd_token_calls)
}

/// Every request Zuora ever saw is inside the routed templates and passes the path checks.
fn assert_only_routed_paths_reached_zuora(sim: &SimHandle) {
    for r in sim.control().requests() {
        let path = r.path_and_query.split('?').next().unwrap_or("");
        if path == "/oauth/token" && r.method == Method::POST {
            continue;
        }
        assert!(
            path.starts_with(STOP_PATH) && zuora_gateway::policy::check_path(path).is_ok(),
            "Zuora saw an unrouted path: {} {}",
            r.method,
            r.path_and_query
        );
    }
}

// ---- raw socket helpers ------------------------------------------------------------------------

/// Writes `bytes` and reads until the server closes (or `wait` passes).
async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_until_close(&mut s, wait).await.0
}

/// Reads until EOF/reset or `wait`; returns the text and whether the server closed.
async fn read_until_close(s: &mut TcpStream, wait: Duration) -> (String, bool) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// Every HTTP/1.1 status code in a raw response stream, in order.
fn statuses(raw: &str) -> Vec<u16> {
    // A response follows the previous body directly (no newline in between).
    raw.match_indices("HTTP/1.1 ")
        .filter(|(i, _)| raw.get(i + 12..i + 13) == Some(" "))
        .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

fn first_status(raw: &str) -> Option<u16> {
    statuses(raw).first().copied()
}

fn stop_request_line(target: &str) -> String {
    format!(
        "PUT {target} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{STOP_BODY}",
        STOP_BODY.len()
    )
}

async fn metric(g: &Gateway, name: &str) -> Option<f64> {
    let r = get(&g.admin_url("/metrics")).await.ok()?;
    r.text()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---- timeouts and size limits ------------------------------------------------------------------

#[tokio::test]
async fn slowloris_headers_are_cut_off_at_the_header_read_timeout() {
    let (sim, g) = setup(&["header_read_timeout: 1s"]).await;
    let before = forwarded(&sim);
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    let started = Instant::now();
    let req = stop_request_line(&format!("{STOP_PATH}/{JOB}"));
    // One byte every 150 ms: the head would take ~20 s to arrive.
    let mut closed_after = None;
    for b in req.as_bytes() {
        if s.write_all(&[*b]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(150), s.read(&mut probe)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Err(_) => {}
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never cut off");
    }
    let closed_after = closed_after.expect("the gateway closed the slow connection");
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(3),
        "cut off after {closed_after:?}"
    );
    assert_eq!(forwarded(&sim), before, "nothing reached Zuora");
    g.shutdown().await;
}

#[tokio::test]
async fn an_idle_connection_that_never_sends_a_byte_is_closed_at_the_header_read_timeout() {
    let (_sim, g) = setup(&["header_read_timeout: 1s"]).await;
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(4)).await;
    assert!(closed, "an idle connection must not hold a slot forever");
    assert!(started.elapsed() < Duration::from_secs(3));
    g.shutdown().await;
}

#[tokio::test]
async fn idle_connections_cannot_exhaust_max_connections() {
    let (sim, g) = setup(&["header_read_timeout: 1s", "max_connections: 2"]).await;
    // Two connections that send nothing take both slots...
    let _a = TcpStream::connect(g.addr).await.unwrap();
    let _b = TcpStream::connect(g.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...a real caller waits in the backlog, then is served once they are cut.
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        get(&g.url(&format!("{STOP_PATH}?pageSize=1"))),
    )
    .await
    .expect("served within the header read timeout")
    .unwrap();
    assert_ne!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(sim.control().api_requests() >= 1);
    g.shutdown().await;
}

#[tokio::test]
async fn too_many_headers_are_refused_and_never_forwarded() {
    let (sim, g) = setup(&["max_header_count: 20"]).await;
    let before = forwarded(&sim);
    let mut req = format!("GET {STOP_PATH} HTTP/1.1\r\nhost: gw\r\n");
    for i in 0..40 {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    let status = first_status(&resp).expect("a status line");
    assert!((400..500).contains(&status), "{resp}");
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

#[tokio::test]
async fn oversized_headers_are_refused_with_431_and_never_forwarded() {
    let (sim, g) = setup(&["max_header_bytes: 8192"]).await;
    let before = forwarded(&sim);
    let req = format!(
        "GET {STOP_PATH} HTTP/1.1\r\nhost: gw\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(first_status(&resp), Some(431), "{resp}");
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

/// Heads larger than hyper's first read (2 KiB in the patched hyper,
/// crates/hyper/PATCHED.md) are read across several growing reads: accepted
/// up to `max_header_bytes` (16 KiB by default), two at a time pipelined,
/// and refused with 431 beyond it.
#[tokio::test]
async fn heads_larger_than_the_first_read_are_served_up_to_max_header_bytes() {
    let (sim, g) = setup(&[]).await;
    let head = |pad: usize| {
        format!(
            "GET {STOP_PATH}?pageSize=1 HTTP/1.1\r\nhost: gw\r\nx-pad: {}\r\n\r\n",
            "p".repeat(pad)
        )
    };
    for pad in [1_900, 2_100, 5_000, 12_000, 15_500] {
        let before = sim.control().api_requests();
        let mut s = TcpStream::connect(g.addr).await.unwrap();
        // Two in one write: the second head starts inside the first's last read.
        s.write_all(format!("{}{}", head(pad), head(pad / 2)).as_bytes())
            .await
            .unwrap();
        let r = read_responses(&mut s, 2, Duration::from_secs(5)).await;
        assert_eq!((r[0].0, r[1].0), (200, 200), "{pad}: {r:?}");
        assert_eq!(sim.control().api_requests(), before + 2, "{pad}");
    }
    let before = forwarded(&sim);
    let resp = raw(g.addr, head(17_000).as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(first_status(&resp), Some(431), "{resp}");
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

#[tokio::test]
async fn an_overlong_uri_is_refused_with_414_and_never_forwarded() {
    let (sim, g) = setup(&["max_uri_bytes: 512"]).await;
    let before = forwarded(&sim);
    let req = format!(
        "GET {STOP_PATH}?q={} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
        "a".repeat(2000)
    );
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(first_status(&resp), Some(414), "{resp}");
    assert!(resp.contains("\"success\":false"), "Zuora-shaped: {resp}");
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

#[tokio::test]
async fn a_body_that_never_finishes_is_refused_with_408_and_never_forwarded() {
    let (sim, g) = setup(&["body_read_timeout: 1s"]).await;
    let before = forwarded(&sim);
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    let head = format!(
        "PUT {STOP_PATH}/{JOB} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"status\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (resp, _) = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(first_status(&resp), Some(408), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_413_and_never_forwarded() {
    let (sim, g) = setup(&["max_body_bytes: 1024"]).await;
    let before = forwarded(&sim);
    let body = format!(r#"{{"status":"Stopping","pad":"{}"}}"#, "x".repeat(4096));
    let r = send(request(
        Method::PUT,
        &g.url(&format!("{STOP_PATH}/{JOB}")),
        &[("content-type", "application/json")],
        body,
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

// ---- concurrency bounds ------------------------------------------------------------------------

#[tokio::test]
async fn beyond_max_in_flight_callers_get_a_fast_503_with_retry_after() {
    let (sim, g) = setup(&["max_in_flight: 2"]).await;
    sim.control().set_latency(Duration::from_millis(1500));
    let url = g.url(&format!("{STOP_PATH}?pageSize=1"));
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await.unwrap() })
        })
        .collect();
    // Wait until both are inside the gateway.
    let deadline = Instant::now() + Duration::from_secs(3);
    while metric(&g, "gateway_in_flight_requests")
        .await
        .unwrap_or(0.0)
        < 2.0
    {
        assert!(Instant::now() < deadline, "requests never went in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = sim.control().api_requests();
    let started = Instant::now();
    let shed = get(&url).await.unwrap();
    assert_eq!(
        shed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        shed.text()
    );
    assert!(shed.headers.contains_key("retry-after"));
    assert!(shed.code().ends_with("61"), "{}", shed.text());
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "shed immediately, not queued ({:?})",
        started.elapsed()
    );
    assert_eq!(
        sim.control().api_requests(),
        before,
        "the shed request never reached Zuora"
    );
    for h in held {
        assert_ne!(h.await.unwrap().status, StatusCode::SERVICE_UNAVAILABLE);
    }
    // Capacity is back.
    sim.control().set_latency(Duration::ZERO);
    assert_ne!(
        get(&url).await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    g.shutdown().await;
}

#[tokio::test]
async fn a_caller_that_disconnects_cancels_the_zuora_call_and_leaks_nothing() {
    let upstream = fault_server::FaultServer::start(fault_server::Fault::Hold).await;
    let g = gateway(&config_yaml(&upstream.base_url(), &["max_in_flight: 1"])).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    // Warm up: one connection's worth of fds exist in steady state.
    upstream.set(fault_server::Fault::Ok);
    let ok = get(&g.url(&format!("{STOP_PATH}?pageSize=1")))
        .await
        .unwrap();
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fds_before = open_fds();
    upstream.set(fault_server::Fault::Hold);

    for round in 0..3 {
        let mut s = TcpStream::connect(g.addr).await.unwrap();
        s.write_all(
            format!("GET {STOP_PATH}?round={round} HTTP/1.1\r\nhost: gw\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while upstream.api_requests() < round + 2 {
            assert!(
                Instant::now() < deadline,
                "the request never reached the upstream"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(metric(&g, "gateway_in_flight_requests").await, Some(1.0));
        drop(s); // the caller goes away
        assert!(
            upstream
                .wait_held_closed(round + 1, Duration::from_secs(2))
                .await,
            "round {round}: the Zuora call was not cancelled"
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        while metric(&g, "gateway_in_flight_requests").await != Some(0.0) {
            assert!(Instant::now() < deadline, "in-flight gauge stuck above 0");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The in-flight permit came back (max_in_flight: 1): a new request is served.
    upstream.set(fault_server::Fault::Ok);
    let ok = get(&g.url(&format!("{STOP_PATH}?pageSize=1")))
        .await
        .unwrap();
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fds_after = open_fds();
    assert!(
        fds_after <= fds_before + 4,
        "file descriptors leaked: {fds_before} -> {fds_after}"
    );
    g.shutdown().await;
}

// ---- idle keep-alive connections give hyper's buffers back ----------------------------------

/// Reads `n` whole responses (Content-Length or chunked bodies) from `s`;
/// their statuses and bodies. Panics if they do not arrive within `wait`.
async fn read_responses(s: &mut TcpStream, n: usize, wait: Duration) -> Vec<(u16, String)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut raw: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while out.len() < n {
        // Parse what is buffered.
        if let Some((status, body, used)) = parse_response(&raw) {
            out.push((status, body));
            raw.drain(..used);
            continue;
        }
        let read = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("responses in time")
            .unwrap();
        assert!(read > 0, "closed after {} responses", out.len());
        raw.extend_from_slice(&buf[..read]);
    }
    assert!(
        raw.is_empty(),
        "unexpected bytes: {:?}",
        String::from_utf8_lossy(&raw)
    );
    out
}

/// One whole response at the start of `raw`: status, body, bytes used.
fn parse_response(raw: &[u8]) -> Option<(u16, String, usize)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&raw[..head_end])
        .unwrap()
        .to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')
                .map(str::trim)
                .map(str::to_owned)
        })
    };
    if let Some(len) = header("content-length") {
        let end = head_end + len.parse::<usize>().unwrap();
        let body = raw.get(head_end..end)?;
        return Some((status, String::from_utf8_lossy(body).into_owned(), end));
    }
    assert_eq!(
        header("transfer-encoding").as_deref(),
        Some("chunked"),
        "{head}"
    );
    let (mut at, mut body) = (head_end, Vec::new());
    loop {
        let line_end = raw[at..].windows(2).position(|w| w == b"\r\n")? + at;
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[at..line_end]).unwrap(), 16).unwrap();
        at = line_end + 2;
        if size == 0 {
            // No trailers from the gateway.
            raw.get(at..at + 2)?;
            return Some((status, String::from_utf8_lossy(&body).into_owned(), at + 2));
        }
        body.extend_from_slice(raw.get(at..at + size)?);
        raw.get(at + size..at + size + 2)?;
        at += size + 2;
    }
}

const RELEASED: &str = "gateway_idle_connections_released_total";

fn keep_alive_get(query: &str) -> String {
    format!("GET {STOP_PATH}?{query} HTTP/1.1\r\nhost: gw\r\n\r\n")
}

fn keep_alive_stop(job: &str) -> String {
    format!(
        "PUT {STOP_PATH}/{job} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{STOP_BODY}",
        STOP_BODY.len()
    )
}

#[tokio::test]
async fn an_idle_keep_alive_connection_gives_back_its_buffers_and_serves_the_next_request() {
    let (sim, g) = setup(&["header_read_timeout: 30s"]).await;
    let job = "0123456789abcdef0123456789abcdef";
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    // A request with a body, then two pipelined in one write.
    s.write_all(keep_alive_stop(job).as_bytes()).await.unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r[0].0, 200, "{}", r[0].1);
    let two = format!(
        "{}{}",
        keep_alive_get("pageSize=1"),
        keep_alive_get("pageSize=2")
    );
    s.write_all(two.as_bytes()).await.unwrap();
    let r = read_responses(&mut s, 2, Duration::from_secs(5)).await;
    assert!(r.iter().all(|(status, _)| *status == 200), "{r:?}");
    assert_eq!(metric(&g, RELEASED).await, Some(0.0));
    // Idle at two sweeps in a row (one a second): hyper's state is given up.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(metric(&g, RELEASED).await, Some(1.0));
    // The same connection serves the next requests: one in two pieces, one
    // with a body.
    let next = keep_alive_get("pageSize=3");
    let (a, b) = next.split_at(10);
    s.write_all(a.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b.as_bytes()).await.unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r[0].0, 200, "{}", r[0].1);
    s.write_all(keep_alive_stop(job).as_bytes()).await.unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r[0].0, 200, "{}", r[0].1);
    // And gives its state up again when idle again.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(metric(&g, RELEASED).await, Some(2.0));
    let framing_refused =
        "GET / HTTP/1.1\r\nhost: gw\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
    s.write_all(framing_refused.as_bytes()).await.unwrap();
    let (text, closed) = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed && first_status(&text) == Some(400), "{text}");
    assert_eq!(sim.control().api_requests(), 5);
    g.shutdown().await;
}

#[tokio::test]
async fn a_slow_response_is_not_mistaken_for_an_idle_connection() {
    // One byte every 50 ms: about 3 s of body, over three sweeps.
    let upstream =
        fault_server::FaultServer::start(fault_server::Fault::SlowBody(Duration::from_millis(50)))
            .await;
    let g = gateway(&config_yaml(
        &upstream.base_url(),
        &["header_read_timeout: 30s"],
    ))
    .await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    s.write_all(keep_alive_get("pageSize=1").as_bytes())
        .await
        .unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(10)).await;
    assert_eq!(r[0].0, 200);
    assert!(
        r[0].1.starts_with(r#"{"success":true"#) && r[0].1.ends_with('}'),
        "{}",
        r[0].1
    );
    assert_eq!(metric(&g, RELEASED).await, Some(0.0));
    g.shutdown().await;
}

#[tokio::test]
async fn a_connection_whose_body_was_left_unread_keeps_its_state_and_keeps_working() {
    let (_sim, g) = setup(&["header_read_timeout: 30s"]).await;
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    // No route for POST: refused before the body is read; hyper discards it.
    let body = "x".repeat(3000);
    let post = format!(
        "POST {STOP_PATH}/x HTTP/1.1\r\nhost: gw\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(post.as_bytes()).await.unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert!((400..500).contains(&r[0].0), "{r:?}");
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(metric(&g, RELEASED).await, Some(0.0));
    s.write_all(keep_alive_get("pageSize=1").as_bytes())
        .await
        .unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r[0].0, 200, "{}", r[0].1);
    g.shutdown().await;
}

/// A request refused before its body is read (no route for POST): the part of
/// the body that has already arrived is discarded, up to 64 KiB (the patched
/// hyper's drain: crates/hyper/PATCHED.md), and the connection serves the
/// next request. A larger body is not read through: the connection closes
/// after the answer.
#[tokio::test]
async fn a_refused_requests_body_up_to_64_kib_is_discarded_and_the_connection_kept() {
    let (_sim, g) = setup(&[]).await;
    // Up to 40 KB: within loopback's initial receive window, so all of it
    // has arrived when the gateway answers.
    for size in [1_500, 3_000, 20_000, 40_000] {
        let mut s = TcpStream::connect(g.addr).await.unwrap();
        let post = format!(
            "POST {STOP_PATH}/x HTTP/1.1\r\nhost: gw\r\ncontent-length: {size}\r\n\r\n{}",
            "x".repeat(size)
        );
        s.write_all(post.as_bytes()).await.unwrap();
        let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
        assert!((400..500).contains(&r[0].0), "{size}: {r:?}");
        s.write_all(keep_alive_get("pageSize=1").as_bytes())
            .await
            .unwrap();
        let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
        assert_eq!(r[0].0, 200, "{size}: {}", r[0].1);
    }
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    let size = 300_000;
    let head = format!("POST {STOP_PATH}/x HTTP/1.1\r\nhost: gw\r\ncontent-length: {size}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // The body is written while the answer is read: the gateway may close
    // before taking all of it.
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&vec![b'x'; size]).await;
    });
    let mut raw = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut raw)).await;
    writer.abort();
    assert!(closed.is_ok(), "the connection was never closed");
    // The answer, unless the close reset the connection before it was read
    // (unread bytes of the body make the close a reset).
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.is_empty() || raw.starts_with("HTTP/1.1 4"), "{raw}");
    g.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_gave_its_state_back_still_closes_at_the_idle_limit_and_at_shutdown() {
    let (_sim, g) = setup(&["header_read_timeout: 3s"]).await;
    let mut a = TcpStream::connect(g.addr).await.unwrap();
    let mut b = TcpStream::connect(g.addr).await.unwrap();
    for s in [&mut a, &mut b] {
        s.write_all(keep_alive_get("pageSize=1").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_responses(s, 1, Duration::from_secs(5)).await[0].0, 200);
    }
    let idle_from = Instant::now();
    // Released after 1–2 s idle, closed after about header_read_timeout
    // (up to a sweep interval later).
    let (_, closed) = read_until_close(&mut a, Duration::from_secs(6)).await;
    let closed_after = idle_from.elapsed();
    assert!(closed, "the idle connection was never closed");
    assert!(
        closed_after >= Duration::from_millis(2900) && closed_after < Duration::from_millis(4600),
        "closed after {closed_after:?}"
    );
    assert!(metric(&g, RELEASED).await >= Some(1.0));
    // The other one was idle as long: shutting down closes it at once.
    let mut c = TcpStream::connect(g.addr).await.unwrap();
    c.write_all(keep_alive_get("pageSize=1").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        read_responses(&mut c, 1, Duration::from_secs(5)).await[0].0,
        200
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(metric(&g, RELEASED).await, Some(3.0));
    let started = Instant::now();
    g.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (_, closed) = read_until_close(&mut c, Duration::from_secs(1)).await;
    assert!(closed);
    drop(b);
}

#[tokio::test]
async fn giving_idle_state_back_never_loses_or_reorders_a_request() {
    // Callers that pause across sweeps at random points of their traffic:
    // between requests (the connection is released), in the middle of a
    // head or a body, or with pipelined requests still unanswered (it must
    // not be). Every request gets its answer, in order.
    let (sim, g) = setup(&["header_read_timeout: 30s"]).await;
    let mut callers = Vec::new();
    for caller in 0..12u64 {
        let addr = g.addr;
        // Each caller's own job and page sizes: identical requests in flight
        // at once would be coalesced into one Zuora call.
        let job = format!("{caller:02}23456789abcdef0123456789abcdef");
        callers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(caller);
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut sent = 0;
            for round in 0..4 {
                let n = rng.usize(1..4);
                let mut batch = String::new();
                for i in 0..n {
                    if rng.bool() {
                        batch.push_str(&keep_alive_stop(&job));
                    } else {
                        batch.push_str(&keep_alive_get(&format!(
                            "pageSize={}",
                            caller * 60 + round * 10 + i as u64 + 1
                        )));
                    }
                }
                // Sometimes a pause of more than two sweeps inside the batch.
                let cut = if rng.u8(..3) == 0 {
                    rng.usize(1..batch.len())
                } else {
                    batch.len()
                };
                s.write_all(&batch.as_bytes()[..cut]).await.unwrap();
                if cut < batch.len() {
                    tokio::time::sleep(Duration::from_millis(2200)).await;
                    s.write_all(&batch.as_bytes()[cut..]).await.unwrap();
                }
                let answers = read_responses(&mut s, n, Duration::from_secs(10)).await;
                assert!(
                    answers.iter().all(|(status, _)| *status == 200),
                    "caller {caller}: {answers:?}"
                );
                sent += n;
                // And sometimes idle between batches, long enough to be released.
                if rng.u8(..2) == 0 {
                    tokio::time::sleep(Duration::from_millis(2200)).await;
                }
            }
            sent
        }));
    }
    let mut sent = 0;
    for c in callers {
        sent += c.await.unwrap();
    }
    assert_eq!(sim.control().api_requests(), sent as u64);
    let released = metric(&g, RELEASED).await.unwrap_or(0.0);
    assert!(
        released >= 6.0,
        "too few releases to test anything: {released}"
    );
    g.shutdown().await;
}

// ---- HTTP/1.1 request smuggling ----------------------------------------------------------------

/// A second request hidden in the body of the first, as a front proxy using
/// the other framing would see it.
const SMUGGLED: &str =
    "GET /v1/uno/data-backfill/propagation/jobs?smuggled=1 HTTP/1.1\r\nhost: gw\r\n\r\n";

fn assert_not_smuggled(sim: &SimHandle) {
    assert!(
        !sim.control()
            .requests()
            .iter()
            .any(|r| r.path_and_query.contains("smuggled")),
        "a smuggled request reached Zuora"
    );
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_never_forwarded() {
    let (sim, g) = setup(&[]).await;
    for order in [
        "content-length: 6\r\ntransfer-encoding: chunked",
        "transfer-encoding: chunked\r\ncontent-length: 6",
    ] {
        let before = forwarded(&sim);
        let req = format!(
            "PUT {STOP_PATH}/{JOB} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n{order}\r\n\r\n0\r\n\r\n{SMUGGLED}"
        );
        let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
        let st = statuses(&resp);
        assert_eq!(st.first(), Some(&400), "{order}: {resp}");
        assert_eq!(
            st.len(),
            1,
            "only one response, the connection is closed: {resp}"
        );
        assert_eq!(forwarded(&sim), before, "{order}");
        assert_not_smuggled(&sim);
    }
    g.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_request_does_not_switch_off_the_framing_checks_for_the_next_one() {
    let (sim, g) = setup(&[]).await;
    let before = forwarded(&sim);
    let req = format!(
        "GET {STOP_PATH}?pageSize=1 HTTP/1.1\r\nhost: gw\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nPUT {STOP_PATH}/{JOB} HTTP/1.1\r\nhost: gw\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    let st = statuses(&resp);
    assert_eq!(st.len(), 2, "{resp}");
    assert_eq!(st[1], 400, "{resp}");
    assert_eq!(
        forwarded(&sim).0,
        before.0 + 1,
        "only the first request reached Zuora"
    );
    assert_not_smuggled(&sim);
    g.shutdown().await;
}

#[tokio::test]
async fn duplicate_differing_content_lengths_are_refused() {
    let (sim, g) = setup(&[]).await;
    let before = forwarded(&sim);
    let req = format!(
        "PUT {STOP_PATH}/{JOB} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 21\r\ncontent-length: 0\r\n\r\n{STOP_BODY}{SMUGGLED}"
    );
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(statuses(&resp), vec![400], "{resp}");
    assert_eq!(forwarded(&sim), before);
    assert_not_smuggled(&sim);
    // A comma-joined list of differing values too.
    let req = format!(
        "PUT {STOP_PATH}/{JOB} HTTP/1.1\r\nhost: gw\r\ncontent-length: 21, 0\r\n\r\n{STOP_BODY}{SMUGGLED}"
    );
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(statuses(&resp), vec![400], "{resp}");
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

#[tokio::test]
async fn transfer_encodings_other_than_chunked_are_refused() {
    let (sim, g) = setup(&[]).await;
    for te in [
        "gzip",
        "chunked, identity",
        "identity",
        "xchunked",
        "chunked\r\ntransfer-encoding: x",
    ] {
        let before = forwarded(&sim);
        let req = format!(
            "PUT {STOP_PATH}/{JOB} HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: {te}\r\n\r\n0\r\n\r\n"
        );
        let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(first_status(&resp), Some(400), "{te}: {resp}");
        assert_eq!(forwarded(&sim), before, "{te}");
    }
    g.shutdown().await;
}

#[tokio::test]
async fn obs_fold_header_continuations_are_refused() {
    let (sim, g) = setup(&[]).await;
    let before = forwarded(&sim);
    let req = format!(
        "PUT {STOP_PATH}/{JOB} HTTP/1.1\r\nhost: gw\r\nx-folded: a\r\n transfer-encoding: chunked\r\ncontent-length: 21\r\n\r\n{STOP_BODY}"
    );
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(first_status(&resp), Some(400), "{resp}");
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

#[tokio::test]
async fn bare_lf_line_endings_are_refused() {
    let (sim, g) = setup(&[]).await;
    for req in [
        format!("GET {STOP_PATH} HTTP/1.1\nhost: gw\n\n"),
        format!("GET {STOP_PATH} HTTP/1.1\r\nhost: gw\nx-a: b\r\n\r\n"),
        format!("GET {STOP_PATH} HTTP/1.1\r\nhost: gw\r\n\n"),
    ] {
        let before = forwarded(&sim);
        let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(first_status(&resp), Some(400), "{req:?}: {resp}");
        assert_eq!(forwarded(&sim), before, "{req:?}");
    }
    g.shutdown().await;
}

#[tokio::test]
async fn bare_cr_and_nul_in_headers_are_refused() {
    let (sim, g) = setup(&[]).await;
    for req in [
        format!("GET {STOP_PATH} HTTP/1.1\r\nhost: gw\r\nx-a: b\rinjected: 1\r\n\r\n"),
        format!("GET {STOP_PATH} HTTP/1.1\r\nhost: gw\r\nx-a: b\0c\r\n\r\n"),
        format!("GET {STOP_PATH} HTTP/1.1\r\nhost: gw\r\nx a: b\r\n\r\n"),
        format!("GET {STOP_PATH} HTTP/1.1\r\nhost: gw\r\nx-a : b\r\n\r\n"),
    ] {
        let before = forwarded(&sim);
        let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(first_status(&resp), Some(400), "{req:?}: {resp}");
        assert_eq!(forwarded(&sim), before, "{req:?}");
    }
    g.shutdown().await;
}

#[tokio::test]
async fn invalid_chunk_sizes_are_refused_and_never_forwarded() {
    let (sim, g) = setup(&[]).await;
    for body in [
        "zz\r\nabc\r\n0\r\n\r\n".to_owned(),
        "-1\r\nabc\r\n0\r\n\r\n".to_owned(),
        "fffffffffffffffff\r\nabc\r\n0\r\n\r\n".to_owned(),
        "3 ; x=\"unterminated\r\nabc\r\n0\r\n\r\n".to_owned(),
        "5\r\nabc\r\n0\r\n\r\n".to_owned(),
        format!("15\n{STOP_BODY}\n0\n\n"),
    ] {
        let before = forwarded(&sim);
        let req = format!(
            "PUT {STOP_PATH}/{JOB} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{body}"
        );
        let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(first_status(&resp), Some(400), "{body:?}: {resp}");
        assert_eq!(forwarded(&sim), before, "{body:?} was forwarded");
    }
    g.shutdown().await;
}

#[tokio::test]
async fn http_1_0_with_transfer_encoding_is_refused() {
    let (sim, g) = setup(&[]).await;
    let before = forwarded(&sim);
    let req = format!(
        "PUT {STOP_PATH}/{JOB} HTTP/1.0\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n15\r\n{STOP_BODY}\r\n0\r\n\r\n"
    );
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(first_status(&resp), Some(400), "{resp}");
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

// ---- path tricks -------------------------------------------------------------------------------

#[tokio::test]
async fn path_tricks_never_reach_zuora_outside_the_routed_templates() {
    let (sim, g) = setup(&[]).await;
    let targets = [
        format!("{STOP_PATH}/../../../oauth/token"),
        format!("{STOP_PATH}/%2e%2e/%2e%2e/%2e%2e/oauth/token"),
        format!("{STOP_PATH}/%2E%2E/x"),
        format!("{STOP_PATH}/.%2e/x"),
        format!("{STOP_PATH}/x%2F..%2F..%2Foauth%2Ftoken"),
        format!("{STOP_PATH}/x%2f..%2f..%2foauth"),
        format!("{STOP_PATH}//{JOB}"),
        format!("/v1/uno/data-backfill/propagation//jobs/{JOB}"),
        format!("{STOP_PATH}/..\\..\\oauth\\token"),
        format!("{STOP_PATH}/%5c..%5coauth"),
        format!("{STOP_PATH}/%c0%ae%c0%ae/x"),
        format!("{STOP_PATH}/%c0%af"),
        format!("{STOP_PATH}/a%00b"),
        format!("{STOP_PATH}/..;"),
        format!("{STOP_PATH}/..;/..;/..;/oauth/token"),
        format!("{STOP_PATH}/x;jsessionid=1"),
        format!("{STOP_PATH}/x%3b"),
        format!("{STOP_PATH}/%252e%252e"),
        format!("{STOP_PATH}/./{JOB}"),
        format!("{STOP_PATH}/."),
        format!("{STOP_PATH}/.."),
        format!("http://evil.example{STOP_PATH}/{JOB}"),
        "http://evil.example/../oauth/token".to_owned(),
        "*".to_owned(),
    ];
    for target in &targets {
        let before = forwarded(&sim);
        let resp = raw(
            g.addr,
            stop_request_line(target).as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(first_status(&resp), Some(400), "{target}: {resp}");
        assert_eq!(forwarded(&sim), before, "{target} reached Zuora");
    }
    // Also for GET on the `**` route, where any depth is routed.
    for target in [
        format!("{STOP_PATH}/..;/..;/..;/v1/accounts"),
        format!("{STOP_PATH}/%2e%2e/%2e%2e/accounts"),
        format!("{STOP_PATH}/x/../../../accounts"),
    ] {
        let before = forwarded(&sim);
        let req = format!("GET {target} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n");
        let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(first_status(&resp), Some(400), "{target}: {resp}");
        assert_eq!(forwarded(&sim), before, "{target} reached Zuora");
    }
    // A raw NUL or space in the request line never parses.
    for line in [
        format!("PUT {STOP_PATH}/a\0b HTTP/1.1\r\n"),
        format!("PUT {STOP_PATH}/a b HTTP/1.1\r\n"),
    ] {
        let before = forwarded(&sim);
        let resp = raw(
            g.addr,
            format!("{line}host: gw\r\nconnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(first_status(&resp), Some(400), "{line:?}: {resp}");
        assert_eq!(forwarded(&sim), before);
    }
    assert_only_routed_paths_reached_zuora(&sim);
    // A normal stop still goes through (the checks are not over-broad).
    let before = sim.control().api_requests();
    let resp = raw(
        g.addr,
        stop_request_line(&format!("{STOP_PATH}/{JOB}")).as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert!(first_status(&resp).is_some(), "{resp}");
    assert_eq!(sim.control().api_requests(), before + 1);
    assert_only_routed_paths_reached_zuora(&sim);
    g.shutdown().await;
}

// ---- bodies ------------------------------------------------------------------------------------

/// Regression (fuzz target `stop_job`): the stop validator skipped the other
/// fields without checking their bytes, so a body that is not JSON (invalid
/// UTF-8, lone surrogate escapes) was forwarded to Zuora.
#[tokio::test]
async fn a_stop_body_that_is_not_valid_json_text_is_refused_and_never_forwarded() {
    let (sim, g) = setup(&[]).await;
    for body in [
        &b"{\"status\":\"Stopping\",\"st!tuc\":\"x\xff\xff\xff\"}"[..],
        br#"{"status":"Stopping","note":"\ud800"}"#,
    ] {
        let before = forwarded(&sim);
        let r = send(request(
            Method::PUT,
            &g.url(&format!("{STOP_PATH}/{JOB}")),
            &[("content-type", "application/json")],
            Bytes::copy_from_slice(body),
        ))
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert!(r.code().ends_with("90"), "malformed JSON: {}", r.text());
        assert_eq!(forwarded(&sim), before);
    }
    g.shutdown().await;
}

// ---- header injection --------------------------------------------------------------------------

#[tokio::test]
async fn non_ascii_header_values_are_refused_and_never_forwarded() {
    let (sim, g) = setup(&[]).await;
    let before = forwarded(&sim);
    let mut req = format!("GET {STOP_PATH} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\nx-name: ")
        .into_bytes();
    req.extend_from_slice(&[0xc3, 0xa9, 0xff]);
    req.extend_from_slice(b"\r\n\r\n");
    let resp = raw(g.addr, &req, Duration::from_secs(3)).await;
    assert_eq!(first_status(&resp), Some(400), "{resp}");
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

#[tokio::test]
async fn an_oversized_track_id_is_refused_and_never_forwarded() {
    let (sim, g) = setup(&[]).await;
    let before = forwarded(&sim);
    let long = "t".repeat(200);
    let r = send(request(
        Method::GET,
        &g.url(&format!("{STOP_PATH}?pageSize=1")),
        &[("zuora-track-id", long.as_str())],
        "",
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(forwarded(&sim), before);
    // With control characters smuggled in via a raw write.
    let req = format!(
        "GET {STOP_PATH} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\nzuora-track-id: a\rb\r\n\r\n"
    );
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(first_status(&resp), Some(400), "{resp}");
    assert_eq!(forwarded(&sim), before);
    g.shutdown().await;
}

#[tokio::test]
async fn connection_header_cannot_strip_headers_the_gateway_sets() {
    let sim = simulator().await;
    let yaml = format!(
        "{}tenancy:\n  - callers: [\"*\"]\n    entity_ids: [\"E-1\"]\n    org_ids: [\"org-1\"]\n",
        config_yaml(&sim.base_url(), &[])
    );
    let g = gateway(&yaml).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    sim.control().clear_requests();
    // A caller naming end-to-end headers in `Connection` (hop-by-hop by RFC)
    // must not make the gateway drop headers it adds itself.
    let req = format!(
        "GET {STOP_PATH}?pageSize=1 HTTP/1.1\r\nhost: gw\r\nconnection: close, authorization, zuora-entity-ids, zuora-org-ids\r\n\r\n"
    );
    let resp = raw(g.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(first_status(&resp), Some(200), "{resp}");
    let seen = sim.control().requests();
    let api = seen
        .iter()
        .find(|r| r.path_and_query.starts_with(STOP_PATH))
        .expect("forwarded");
    assert!(!api.headers.contains_key("connection"));
    assert!(
        api.bearer_token.is_some(),
        "the Zuora token is still attached"
    );
    assert_eq!(api.headers["zuora-entity-ids"], "E-1");
    assert_eq!(api.headers["zuora-org-ids"], "org-1");
    g.shutdown().await;
}

// ---- HTTP/2 (h2c prior knowledge) --------------------------------------------------------------

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A HPACK block for `GET <path>` (literal fields without indexing, so the
/// same bytes are valid for every stream).
fn h2_get_block(path: &str, authority: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
    b.push(0x04); // :path, literal without indexing
    b.push(path.len() as u8);
    b.extend_from_slice(path.as_bytes());
    b.push(0x01); // :authority, literal without indexing
    b.push(authority.len() as u8);
    b.extend_from_slice(authority.as_bytes());
    b
}

/// Reads HTTP/2 frames until EOF or `wait`; returns (type, flags, stream, payload) tuples.
async fn h2_read_frames(s: &mut TcpStream, wait: Duration) -> (Vec<(u8, u8, u32, Vec<u8>)>, bool) {
    let (raw, closed) = {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        let closed = loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        (out, closed)
    };
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 9 <= raw.len() {
        let len =
            (usize::from(raw[i]) << 16) | (usize::from(raw[i + 1]) << 8) | usize::from(raw[i + 2]);
        let kind = raw[i + 3];
        let flags = raw[i + 4];
        let stream =
            u32::from_be_bytes([raw[i + 5], raw[i + 6], raw[i + 7], raw[i + 8]]) & 0x7fff_ffff;
        let end = (i + 9 + len).min(raw.len());
        frames.push((kind, flags, stream, raw[i + 9..end].to_vec()));
        i += 9 + len;
    }
    (frames, closed)
}

const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;

#[tokio::test]
async fn h2_rapid_reset_is_cut_off_and_the_gateway_keeps_serving() {
    let (sim, g) = setup(&[]).await;
    sim.control().set_latency(Duration::from_millis(500));
    let before = sim.control().api_requests();
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    let mut out = H2_PREFACE.to_vec();
    out.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    let block = h2_get_block(&format!("{STOP_PATH}?pageSize=1"), "gw");
    // 2,000 streams, each opened and immediately cancelled (CVE-2023-44487).
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        out.extend(h2_frame(FRAME_HEADERS, 0x4 | 0x1, id, &block));
        out.extend(h2_frame(FRAME_RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    // The server may hang up while we are still writing.
    let _ = s.write_all(&out).await;
    let (frames, closed) = h2_read_frames(&mut s, Duration::from_secs(5)).await;
    let goaway = frames.iter().find(|f| f.0 == FRAME_GOAWAY);
    assert!(goaway.is_some() || closed, "the flood was not cut off");
    if let Some((_, _, _, payload)) = goaway {
        let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
        assert_eq!(code, 0xb, "GOAWAY ENHANCE_YOUR_CALM, got {code:#x}");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let reached = sim.control().api_requests() - before;
    assert!(
        reached < 200,
        "{reached} of 2000 reset streams reached Zuora"
    );
    // Still up and serving, over HTTP/1.1 and HTTP/2.
    sim.control().set_latency(Duration::ZERO);
    let r = get(&g.url(&format!("{STOP_PATH}?pageSize=1")))
        .await
        .unwrap();
    assert_ne!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let r = h2
        .request(request(
            Method::GET,
            &g.url(&format!("{STOP_PATH}?pageSize=1")),
            &[],
            "",
        ))
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    g.shutdown().await;
}

#[tokio::test]
async fn h2_streams_beyond_max_concurrent_streams_are_refused_not_queued() {
    let (sim, g) = setup(&["http2_max_concurrent_streams: 10"]).await;
    sim.control().set_latency(Duration::from_millis(800));
    let before = sim.control().api_requests();
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    let mut out = H2_PREFACE.to_vec();
    out.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    s.write_all(&out).await.unwrap();
    // Let the server's SETTINGS arrive and acknowledge them, like a client would.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut out = h2_frame(FRAME_SETTINGS, 0x1, 0, &[]);
    let block = h2_get_block(&format!("{STOP_PATH}?pageSize=1"), "gw");
    for i in 0..50u32 {
        out.extend(h2_frame(FRAME_HEADERS, 0x4 | 0x1, 1 + 2 * i, &block));
    }
    s.write_all(&out).await.unwrap();
    let (frames, _) = h2_read_frames(&mut s, Duration::from_secs(3)).await;
    let refused = frames
        .iter()
        .filter(|f| f.0 == FRAME_RST_STREAM && f.3 == 7u32.to_be_bytes())
        .count();
    let goaway = frames.iter().any(|f| f.0 == FRAME_GOAWAY);
    assert!(
        refused >= 40 || goaway,
        "streams beyond the limit were not refused ({refused} REFUSED_STREAM)"
    );
    let reached = sim.control().api_requests() - before;
    assert!(
        reached <= 10,
        "{reached} streams reached Zuora at once (limit 10)"
    );
    sim.control().set_latency(Duration::ZERO);
    let r = get(&g.url(&format!("{STOP_PATH}?pageSize=1")))
        .await
        .unwrap();
    assert_ne!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    g.shutdown().await;
}

#[tokio::test]
async fn many_concurrent_h2_streams_on_one_connection_are_all_served() {
    let (sim, g) = setup(&[]).await;
    sim.control().set_latency(Duration::from_millis(100));
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let before = sim.control().api_requests();
    let tasks: Vec<_> = (0..80)
        .map(|i| {
            let h2 = h2.clone();
            let url = g.url(&format!("{STOP_PATH}?page={i}"));
            tokio::spawn(async move {
                let r = h2
                    .request(request(Method::GET, &url, &[], ""))
                    .await
                    .unwrap();
                (r.version(), r.status())
            })
        })
        .collect();
    for t in tasks {
        let (version, status) = t.await.unwrap();
        assert_eq!(version, http::Version::HTTP_2);
        assert_ne!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(sim.control().api_requests() - before, 80);
    g.shutdown().await;
}

// ---- protocol detection, first-request timeout, shutdown ---------------------------------------

#[tokio::test]
async fn an_h2c_preface_in_tiny_writes_is_served_over_http2() {
    let (sim, g) = setup(&[]).await;
    let before = sim.control().api_requests();
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    // The preface in 1- to 3-byte writes, each its own segment.
    for piece in H2_PREFACE
        .chunks(3)
        .flat_map(|c| c.chunks(if c[0] == b'P' { 1 } else { 3 }))
    {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut out = h2_frame(FRAME_SETTINGS, 0, 0, &[]);
    let block = h2_get_block(&format!("{STOP_PATH}?pageSize=1"), "gw");
    out.extend(h2_frame(FRAME_HEADERS, 0x4 | 0x1, 1, &block));
    s.write_all(&out).await.unwrap();
    let (frames, _) = h2_read_frames(&mut s, Duration::from_secs(2)).await;
    assert!(
        frames.iter().any(|f| f.0 == FRAME_SETTINGS),
        "an HTTP/2 server answered: {frames:?}"
    );
    assert!(
        frames.iter().any(|f| f.0 == FRAME_HEADERS && f.2 == 1),
        "stream 1 got a response: {frames:?}"
    );
    assert_eq!(sim.control().api_requests() - before, 1);
    g.shutdown().await;
}

#[tokio::test]
async fn http1_whose_first_bytes_look_like_the_preface_is_served_as_http1() {
    let (_sim, g) = setup(&[]).await;
    for first in ["P", "PU", "PR"] {
        let mut s = TcpStream::connect(g.addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let req = if first == "PR" {
            // A request line that matches the preface up to its version.
            "PRI * HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n".to_string()
        } else {
            stop_request_line(&format!("{STOP_PATH}/{JOB}"))
        };
        s.write_all(&req.as_bytes()[..first.len()]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(&req.as_bytes()[first.len()..]).await.unwrap();
        let (text, closed) = read_until_close(&mut s, Duration::from_secs(3)).await;
        assert!(closed, "{first}: {text}");
        assert!(text.starts_with("HTTP/1.1 "), "{first}: {text}");
        if first != "PR" {
            assert!(text.starts_with("HTTP/1.1 200"), "{first}: {text}");
        }
    }
    g.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_made_a_request_is_not_cut_at_the_first_request_deadline() {
    // The deadline runs from the connect; hyper's own header read timeout
    // from the start of each wait for a head.
    let (_sim, g) = setup(&["header_read_timeout: 1s"]).await;
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    let connected = Instant::now();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let req = format!("GET {STOP_PATH}?pageSize=1 HTTP/1.1\r\nhost: gw\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(connected.elapsed() > Duration::from_millis(1100));
    let last =
        format!("GET {STOP_PATH}?pageSize=2 HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n");
    s.write_all(last.as_bytes()).await.unwrap();
    let (text, closed) = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200"), "{text}");
    g.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_silent_and_idle_connections_without_waiting_for_the_grace() {
    let (_sim, g) = setup(&["header_read_timeout: 30s"]).await;
    let mut silent = TcpStream::connect(g.addr).await.unwrap();
    let mut idle = TcpStream::connect(g.addr).await.unwrap();
    let req = format!("GET {STOP_PATH}?pageSize=1 HTTP/1.1\r\nhost: gw\r\n\r\n");
    idle.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // And an h2c connection between requests (the client answers pings).
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let url = g.url(&format!("{STOP_PATH}?pageSize=1"));
    let r = h2
        .request(request(Method::GET, &url, &[], ""))
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    drop(r);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    g.shutdown().await;
    // The grace is 5 s: none of these held the shutdown up.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    for s in [&mut silent, &mut idle] {
        let (_, closed) = read_until_close(s, Duration::from_secs(1)).await;
        assert!(closed);
    }
}
