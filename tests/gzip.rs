//! gzip through the gateway, over real sockets: request-body guards, request
//! compression towards Zuora, and response negotiation with callers.
//!
//! Most tests use the embedded simulator (it records every request as
//! received); a small scripted "Zuora" covers what the simulator cannot
//! produce (a corrupt gzip body, a large uncompressed answer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use flate2::write::GzEncoder;
use http::header::{
    ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING, VARY,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Gateway, Reply, gateway, request, send};

const JOBS: &str = "/v1/uno/data-backfill/propagation/jobs";
const LIMIT: usize = 1024 * 1024;

fn sim_gateway_yaml() -> String {
    format!(
        "{}  max_body_bytes: {LIMIT}\n  body_read_timeout: 2s\nupstreams:\n  zuora:\n    base_url: simulator\ncallers:\n  trusted_identity: svc\nroutes:\n  - {{ name: jobs, path: {JOBS}, upstream: zuora, allow_callers: ['*'] }}\n  - {{ name: job, path: {JOBS}/**, upstream: zuora, allow_callers: ['*'] }}\n",
        support::SERVER_YAML
    )
}

async fn sim_gateway() -> Gateway {
    gateway(&sim_gateway_yaml()).await
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut d = flate2::write::GzDecoder::new(&mut out);
    d.write_all(data).unwrap();
    d.finish().unwrap();
    out
}

/// A JSON body of about `size` bytes.
fn json_body(size: usize) -> Vec<u8> {
    let mut notes = String::new();
    let mut i = 0;
    while notes.len() + 80 < size {
        notes.push_str(&format!(
            "batch {i} of RatePlanCharge backfill, dry run, requested by billing; "
        ));
        i += 1;
    }
    format!(r#"{{"type":"RatePlanCharge","batchSize":100,"dryRun":true,"notes":"{notes}"}}"#)
        .into_bytes()
}

/// Peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

type StreamingClient = Client<HttpConnector, BoxBody<Bytes, Infallible>>;

/// Sends `chunks` as a body of unknown length (HTTP/1.1 chunked).
async fn send_chunked(url: &str, headers: &[(&str, &str)], chunks: Vec<Bytes>) -> Reply {
    let client: StreamingClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let frames = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(http_body::Frame::data(c))),
    );
    let mut b = Request::post(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client
        .request(b.body(BoxBody::new(StreamBody::new(frames))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// The `/v1` requests the simulator recorded (token requests left out).
fn api_log(sim: &zuora_gateway::sim::SimControl) -> Vec<zuora_gateway::sim::RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.path_and_query.starts_with("/v1/"))
        .collect()
}

// ---- towards Zuora ----------------------------------------------------------------------------

#[tokio::test]
async fn zuora_always_sees_accept_encoding_gzip() {
    let g = sim_gateway().await;
    let sim = g.sim();
    for accept in [
        None,
        Some("identity"),
        Some("br, deflate"),
        Some("gzip;q=0"),
        Some("*"),
    ] {
        sim.clear_requests();
        let headers: Vec<(&str, &str)> =
            accept.map(|a| ("accept-encoding", a)).into_iter().collect();
        send(request(Method::GET, &g.url(JOBS), &headers, ""))
            .await
            .unwrap();
        let log = api_log(&sim);
        assert_eq!(log.len(), 1, "{accept:?}");
        let seen: Vec<_> = log[0].headers.get_all(ACCEPT_ENCODING).iter().collect();
        assert_eq!(seen, ["gzip"], "caller sent {accept:?}");
    }
    g.shutdown().await;
}

#[tokio::test]
async fn a_20kb_plain_json_body_reaches_zuora_gzip_compressed() {
    let g = sim_gateway().await;
    let sim = g.sim();
    let body = json_body(20 * 1024);
    assert!(body.len() >= 20 * 1024);
    sim.clear_requests();
    send(request(
        Method::POST,
        &g.url(JOBS),
        &[("content-type", "application/json")],
        body.clone(),
    ))
    .await
    .unwrap();
    let log = api_log(&sim);
    assert_eq!(log.len(), 1);
    let seen = &log[0];
    assert_eq!(seen.headers[CONTENT_ENCODING], "gzip");
    assert_eq!(&seen.body[..2], &[0x1f, 0x8b], "gzip on the wire");
    assert!(
        seen.body.len() * 4 < body.len(),
        "{} bytes on the wire for {}",
        seen.body.len(),
        body.len()
    );
    assert_eq!(seen.decoded_body, body);
    g.shutdown().await;
}

#[tokio::test]
async fn a_small_body_is_sent_plain() {
    let g = sim_gateway().await;
    let sim = g.sim();
    let body = br#"{"type":"RatePlanCharge","batchSize":10}"#;
    sim.clear_requests();
    send(request(
        Method::POST,
        &g.url(JOBS),
        &[("content-type", "application/json")],
        &body[..],
    ))
    .await
    .unwrap();
    let log = api_log(&sim);
    assert_eq!(log.len(), 1);
    assert!(!log[0].headers.contains_key(CONTENT_ENCODING));
    assert_eq!(
        log[0].headers[CONTENT_LENGTH],
        body.len().to_string().as_str()
    );
    assert_eq!(&log[0].body[..], &body[..]);
    g.shutdown().await;
}

#[tokio::test]
async fn a_gzip_caller_body_reaches_zuora_byte_for_byte() {
    let g = sim_gateway().await;
    let sim = g.sim();
    let packed = gzip(&json_body(5000));
    sim.clear_requests();
    let headers = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    send(request(
        Method::POST,
        &g.url(JOBS),
        &headers,
        packed.clone(),
    ))
    .await
    .unwrap();
    let log = api_log(&sim);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].body, packed);
    assert_eq!(log[0].headers[CONTENT_ENCODING], "gzip");
    g.shutdown().await;
}

// ---- caller-side guards -------------------------------------------------------------------------

#[tokio::test]
async fn a_64_mib_gzip_bomb_is_413_without_reaching_zuora_and_memory_stays_bounded() {
    // Built by streaming zeros into the encoder: the test never holds 64 MiB either.
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 64 * 1024];
    for _ in 0..1024 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < 200 * 1024, "bomb is {} bytes", bomb.len());

    let g = sim_gateway().await;
    let sim = g.sim();
    let before_calls = sim.api_requests();
    let before_rss = peak_rss();
    let headers = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    let reply = send(request(Method::POST, &g.url(JOBS), &headers, bomb))
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert!(reply.code().ends_with("70"), "{}", reply.code());
    assert_eq!(sim.api_requests(), before_calls, "Zuora was not called");
    if let (Some(before), Some(after)) = (before_rss, peak_rss()) {
        let grew = after.saturating_sub(before);
        assert!(
            grew < 24 * 1024 * 1024,
            "peak RSS grew by {} MiB",
            grew >> 20
        );
    }
    g.shutdown().await;
}

#[tokio::test]
async fn corrupt_gzip_is_400_category_20_without_reaching_zuora() {
    let g = sim_gateway().await;
    let sim = g.sim();
    let before = sim.api_requests();
    let packed = gzip(br#"{"status":"Stopping"}"#);
    for bad in [
        packed[..packed.len() / 2].to_vec(),
        b"{\"status\":\"Stopping\"}".to_vec(),
    ] {
        let headers = [
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ];
        let reply = send(request(Method::POST, &g.url(JOBS), &headers, bad))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
        assert!(reply.code().ends_with("20"), "{}", reply.code());
    }
    assert_eq!(sim.api_requests(), before);
    g.shutdown().await;
}

#[tokio::test]
async fn unsupported_content_encodings_are_415_without_reaching_zuora() {
    let g = sim_gateway().await;
    let sim = g.sim();
    let before = sim.api_requests();
    for ce in ["compress", "br", "deflate", "gzip, gzip"] {
        let headers = [
            ("content-type", "application/json"),
            ("content-encoding", ce),
        ];
        let reply = send(request(Method::POST, &g.url(JOBS), &headers, "{}"))
            .await
            .unwrap();
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{ce}: {}",
            reply.text()
        );
    }
    assert_eq!(sim.api_requests(), before);
    g.shutdown().await;
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_413_without_reaching_zuora() {
    let g = sim_gateway().await;
    let sim = g.sim();
    let before = sim.api_requests();
    let reply = send(request(
        Method::POST,
        &g.url(JOBS),
        &[],
        vec![b' '; LIMIT + 1],
    ))
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(sim.api_requests(), before);
    g.shutdown().await;
}

#[tokio::test]
async fn a_chunked_body_past_the_limit_is_413_not_502() {
    let g = sim_gateway().await;
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let chunks = vec![chunk; LIMIT / (64 * 1024) + 2];
    let reply = send_chunked(
        &g.url(JOBS),
        &[("content-type", "application/json")],
        chunks,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.code(), "99000570");
    g.shutdown().await;
}

#[tokio::test]
async fn a_chunked_body_within_the_limit_reaches_zuora_compressed() {
    let g = sim_gateway().await;
    let sim = g.sim();
    let body = json_body(3000);
    let chunks: Vec<Bytes> = body.chunks(700).map(Bytes::copy_from_slice).collect();
    sim.clear_requests();
    send_chunked(
        &g.url(JOBS),
        &[("content-type", "application/json")],
        chunks,
    )
    .await;
    let log = api_log(&sim);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].headers[CONTENT_ENCODING], "gzip");
    assert_eq!(log[0].decoded_body, body);
    g.shutdown().await;
}

// ---- towards callers: the simulator's job list ---------------------------------------------------

#[tokio::test]
async fn a_large_job_list_reaches_a_gzip_caller_as_zuora_sent_it_and_a_plain_caller_decoded() {
    let g = sim_gateway().await;
    let plain = send(request(Method::GET, &g.url(JOBS), &[], ""))
        .await
        .unwrap();
    assert_eq!(plain.status, StatusCode::OK, "{}", plain.text());
    assert!(
        plain.body.len() > 1000,
        "list is {} bytes",
        plain.body.len()
    );
    assert!(!plain.headers.contains_key(CONTENT_ENCODING));
    assert!(
        !plain.headers.contains_key(CONTENT_LENGTH),
        "decoded length is not known up front"
    );
    assert_eq!(plain.headers[VARY], "Accept-Encoding");
    let jobs = plain.json();

    let packed = send(request(
        Method::GET,
        &g.url(JOBS),
        &[("accept-encoding", "gzip")],
        "",
    ))
    .await
    .unwrap();
    assert_eq!(packed.status, StatusCode::OK);
    assert_eq!(packed.headers[CONTENT_ENCODING], "gzip");
    assert_eq!(
        packed.headers[CONTENT_LENGTH],
        packed.body.len().to_string().as_str(),
        "passed through with Zuora's length"
    );
    assert!(packed.body.len() < plain.body.len());
    let unpacked: serde_json::Value = serde_json::from_slice(&gunzip(&packed.body)).unwrap();
    assert_eq!(unpacked["jobs"], jobs["jobs"]);

    let seen = api_log(&g.sim());
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|r| r.headers[ACCEPT_ENCODING] == "gzip"));
    g.shutdown().await;
}

// ---- towards callers: a scripted Zuora ------------------------------------------------------------

/// A large JSON list as Zuora would send it.
fn big_list() -> Vec<u8> {
    let jobs: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"id":"ff8080818bb300af018bb325fe{i:06}","status":"Completed","type":"RatePlanCharge","progress":100}}"#))
        .collect();
    format!(r#"{{"success":true,"jobs":[{}]}}"#, jobs.join(",")).into_bytes()
}

/// A scripted Zuora on 127.0.0.1:0: `/oauth/token` issues a token;
/// `/v1/scripted/gzip` a gzip list; `/v1/scripted/plain` the list uncompressed;
/// `/v1/scripted/not-gzip` a plain body labelled gzip.
async fn scripted_zuora() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(support::loopback())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: Request<hyper::body::Incoming>| async move {
                        let list = big_list();
                        let resp = match req.uri().path() {
                        "/oauth/token" => Response::builder()
                            .header(CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from_static(
                                br#"{"access_token":"scripted-token","token_type":"bearer","expires_in":3599,"scope":"tenant.1","jti":"j"}"#,
                            ))),
                        "/v1/scripted/gzip" => {
                            let packed = gzip(&list);
                            Response::builder()
                                .header(CONTENT_TYPE, "application/json")
                                .header(CONTENT_ENCODING, "gzip")
                                .header(CONTENT_LENGTH, packed.len())
                                .header(VARY, "Accept-Encoding")
                                .body(Full::new(Bytes::from(packed)))
                        }
                        "/v1/scripted/plain" => Response::builder()
                            .header(CONTENT_TYPE, "application/json")
                            .header(CONTENT_LENGTH, list.len())
                            .body(Full::new(Bytes::from(list))),
                        _ => Response::builder()
                            .header(CONTENT_TYPE, "application/json")
                            .header(CONTENT_ENCODING, "gzip")
                            .body(Full::new(Bytes::from(list))),
                    };
                        Ok::<_, Infallible>(resp.unwrap())
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn scripted_gateway(compress_responses_over: Option<u64>) -> Gateway {
    let zuora = scripted_zuora().await;
    let over = compress_responses_over
        .map(|n| format!("  compress_responses_over: {n}\n"))
        .unwrap_or_default();
    let yaml = format!(
        "{}{over}upstreams:\n  zuora:\n    base_url: http://{zuora}\n    oauth:\n      client_id: {}\n      client_secret: {}\ncallers:\n  trusted_identity: svc\nroutes:\n  - {{ name: scripted, path: /v1/scripted/**, upstream: zuora, allow_callers: ['*'] }}\n",
        support::SERVER_YAML,
        support::CLIENT_ID,
        support::CLIENT_SECRET
    );
    gateway(&yaml).await
}

async fn fetch(g: &Gateway, path: &str, accept: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept-encoding", a)).into_iter().collect();
    send(request(Method::GET, &g.url(path), &headers, ""))
        .await
        .unwrap()
}

/// `gateway_body_bytes_total{side=…,direction=…}` from the admin endpoint.
async fn body_bytes(g: &Gateway, side: &str, direction: &str) -> u64 {
    let text = support::get(&g.admin_url("/metrics")).await.unwrap().text();
    let key = format!("gateway_body_bytes_total{{side=\"{side}\",direction=\"{direction}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {key} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn q_values_decide_between_zuoras_gzip_and_a_decoded_body() {
    let g = scripted_gateway(None).await;
    let list = big_list();
    let packed = gzip(&list);
    let cases = [
        (Some("gzip"), true),
        (Some("GZIP"), true),
        (Some("gzip, deflate, br"), true),
        (Some("*;q=0.5"), true),
        (Some("gzip;q=0"), false),
        (Some("identity"), false),
        (Some("gzip;q=0.5, identity"), false),
        (Some("br"), false),
        (None, false),
    ];
    for (accept, gets_gzip) in cases {
        let reply = fetch(&g, "/v1/scripted/gzip", accept).await;
        assert_eq!(reply.status, StatusCode::OK, "{accept:?}");
        assert_eq!(reply.headers[VARY], "Accept-Encoding", "{accept:?}");
        if gets_gzip {
            assert_eq!(reply.headers[CONTENT_ENCODING], "gzip", "{accept:?}");
            assert_eq!(reply.body, packed, "same bytes Zuora sent ({accept:?})");
        } else {
            assert!(!reply.headers.contains_key(CONTENT_ENCODING), "{accept:?}");
            assert!(!reply.headers.contains_key(CONTENT_LENGTH), "{accept:?}");
            assert_eq!(reply.headers[TRANSFER_ENCODING], "chunked", "{accept:?}");
            assert!(reply.body == list[..], "{accept:?}");
        }
    }
    g.shutdown().await;
}

#[tokio::test]
async fn the_saving_is_visible_in_the_body_byte_counters() {
    let g = scripted_gateway(None).await;
    let packed_len = gzip(&big_list()).len() as u64;
    fetch(&g, "/v1/scripted/gzip", Some("gzip")).await;
    assert_eq!(body_bytes(&g, "zuora", "in").await, packed_len);
    assert_eq!(body_bytes(&g, "caller", "out").await, packed_len);
    fetch(&g, "/v1/scripted/gzip", None).await;
    assert_eq!(body_bytes(&g, "zuora", "in").await, 2 * packed_len);
    assert_eq!(
        body_bytes(&g, "caller", "out").await,
        packed_len + big_list().len() as u64
    );
    g.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_gzip_response_is_502_for_a_caller_that_needs_it_decoded() {
    let g = scripted_gateway(None).await;
    let reply = fetch(&g, "/v1/scripted/not-gzip", Some("identity")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.json()["success"], false);
    // A gzip caller too: small Zuora bodies are read whole and a corrupt gzip
    // stream is a 502, never a 200 the caller cannot decode (docs/hardening.md).
    let reply = fetch(&g, "/v1/scripted/not-gzip", Some("gzip")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    g.shutdown().await;
}

#[tokio::test]
async fn a_plain_response_over_the_threshold_is_compressed_for_gzip_callers_only() {
    let g = scripted_gateway(Some(1000)).await;
    let list = big_list();
    let packed = fetch(&g, "/v1/scripted/plain", Some("gzip")).await;
    assert_eq!(packed.headers[CONTENT_ENCODING], "gzip");
    assert_eq!(packed.headers[VARY], "Accept-Encoding");
    assert!(packed.body.len() * 4 < list.len());
    assert_eq!(gunzip(&packed.body), list);
    let plain = fetch(&g, "/v1/scripted/plain", None).await;
    assert!(!plain.headers.contains_key(CONTENT_ENCODING));
    assert!(plain.body == list[..]);
    g.shutdown().await;

    let off = scripted_gateway(None).await;
    let reply = fetch(&off, "/v1/scripted/plain", Some("gzip")).await;
    assert!(
        !reply.headers.contains_key(CONTENT_ENCODING),
        "off by default"
    );
    off.shutdown().await;
}

/// Sends headers and the first body bytes, then nothing; returns the status
/// line of the answer (a raw socket, so the test controls the pace).
async fn stall_after(g: &Gateway, content_encoding: Option<&str>, first: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(g.addr).await.unwrap();
    let ce = content_encoding
        .map(|c| format!("content-encoding: {c}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {JOBS} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{ce}content-length: 100\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.windows(2).any(|w| w == b"\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 5 s");
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn a_slow_body_is_408() {
    let yaml = sim_gateway_yaml().replace("body_read_timeout: 2s", "body_read_timeout: 300ms");
    let g = gateway(&yaml).await;
    let sim = g.sim();
    let before = sim.api_requests();
    let status = stall_after(&g, Some("gzip"), &[0x1f, 0x8b]).await;
    assert!(status.starts_with("HTTP/1.1 408"), "gzip: {status}");
    assert_eq!(
        sim.api_requests(),
        before,
        "a gzip body is checked before Zuora is called"
    );
    let status = stall_after(&g, None, b"{\"type\":").await;
    assert!(status.starts_with("HTTP/1.1 408"), "plain: {status}");
    g.shutdown().await;
}
