//! Telemetry over real sockets: track IDs, access log, `/debug/requests`,
//! and spans exported to a real OTLP/HTTP receiver started by the test.
//!
//! Tests that need the global subscriber (access log, span export) run the
//! gateway binary as a child process with stdout captured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::*;
use zuora_gateway::sim::SimHandle;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const CALLER_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";
const ENTITY: &str = "3c4fd2c0-1b2a-4c3d-8e9f-0a1b2c3d4e5f";
/// A tenancy rule (appended after the telemetry section).
const TENANCY: &str =
    "tenancy:\n  - callers: [\"*\"]\n    entity_ids: [\"3c4fd2c0-1b2a-4c3d-8e9f-0a1b2c3d4e5f\"]\n";

fn yaml(sim: &SimHandle, upstream_extra: &str, telemetry: &str) -> String {
    format!(
        "{SERVER_YAML}{}{upstream_extra}callers:\n  trusted_identity: billing-test\nroutes:\n  - name: stop\n    method: PUT\n    path: /v1/uno/data-backfill/propagation/jobs/{{jobId}}\n    upstream: zuora\n    allow_callers: [\"*\"]\n  - name: read\n    method: GET\n    path: /v1/uno/data-backfill/propagation/jobs/**\n    upstream: zuora\n    allow_callers: [\"*\"]\ntelemetry:\n  service_name: gw-under-test\n{telemetry}",
        upstream_yaml(sim)
    )
}

/// Zuora answered (whatever it said: without a token cache in this build it
/// may be a 401, which is still Zuora's answer passed through).
fn assert_answered_by_zuora(r: &Reply) {
    assert!(
        r.headers.contains_key("zuora-request-id"),
        "{} {}",
        r.status,
        r.text()
    );
    assert!(r.status.as_u16() < 500, "{} {}", r.status, r.text());
}

fn list_url(g: &Gateway) -> String {
    g.url("/v1/uno/data-backfill/propagation/jobs?pageSize=5")
}

fn with_track_id(url: &str, value: &[u8]) -> Request<Full<Bytes>> {
    let mut req = request(Method::GET, url, &[], "");
    req.headers_mut()
        .insert("zuora-track-id", HeaderValue::from_bytes(value).unwrap());
    req
}

// ---------------------------------------------------------------- track IDs

#[tokio::test]
async fn callers_track_id_is_forwarded_to_zuora_and_echoed() {
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "", "  log_format: json\n")).await;
    let r = send(with_track_id(&list_url(&g), b"order-sync-42"))
        .await
        .unwrap();
    assert_answered_by_zuora(&r);
    assert_eq!(r.headers["zuora-track-id"], "order-sync-42");
    let seen = sim.control().requests();
    let last = seen.last().expect("Zuora was called");
    assert_eq!(last.headers["zuora-track-id"], "order-sync-42");
    g.shutdown().await;
}

#[tokio::test]
async fn missing_track_id_is_generated_forwarded_and_different_per_request() {
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "", "  log_format: json\n")).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = get(&list_url(&g)).await.unwrap();
        assert_answered_by_zuora(&r);
        let id = r.headers["zuora-track-id"].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let forwarded = sim.control().requests().last().unwrap().headers["zuora-track-id"].clone();
        assert_eq!(forwarded, id.as_str(), "Zuora sees the same generated ID");
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    g.shutdown().await;
}

#[tokio::test]
async fn invalid_track_ids_are_refused_and_nothing_is_forwarded() {
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "", "  log_format: json\n")).await;
    let too_long = "a".repeat(65);
    let cases: [(&str, &[u8]); 7] = [
        ("65 characters", too_long.as_bytes()),
        ("colon", b"abc:def"),
        ("semicolon", b"abc;def"),
        ("double quote", b"abc\"def"),
        ("single quote", b"abc'def"),
        ("non-ASCII", "caf\u{e9}".as_bytes()),
        ("control character", b"abc\tdef"),
    ];
    let before = sim.control().api_requests();
    for (what, value) in cases {
        let r = send(with_track_id(&list_url(&g), value)).await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text());
        assert!(
            r.code().ends_with("20"),
            "{what}: category 20, got {}",
            r.code()
        );
        let echoed = r.headers["zuora-track-id"].as_bytes();
        assert_eq!(
            echoed.len(),
            32,
            "{what}: a fresh, valid track ID is returned"
        );
        assert_ne!(echoed, value);
    }
    assert_eq!(
        sim.control().api_requests(),
        before,
        "nothing reached Zuora"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn gateway_errors_carry_the_track_id_too() {
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "", "  log_format: json\n")).await;
    let r = send(with_track_id(&g.url("/v1/accounts/A-1"), b"lost-1"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.headers["zuora-track-id"], "lost-1");
    g.shutdown().await;
}

// ------------------------------------------------------------ debug ring

#[tokio::test]
async fn debug_requests_finds_a_request_by_track_id_and_by_status() {
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "", "  debug_requests: 50\n")).await;
    let r = send(with_track_id(&list_url(&g), b"find-me-1"))
        .await
        .unwrap();
    assert_answered_by_zuora(&r);
    let zuora_request_id = r.headers["zuora-request-id"].to_str().unwrap().to_owned();
    let first = r;
    let r = send(with_track_id(&g.url("/v1/accounts/A-1"), b"not-routed"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = first;

    let d = get(&g.admin_url("/debug/requests?track_id=find-me-1"))
        .await
        .unwrap();
    assert_eq!(d.status, StatusCode::OK, "{}", d.text());
    let v = d.json();
    assert_eq!(v["returned"], 1, "{v}");
    let rec = &v["requests"][0];
    assert_eq!(rec["track_id"], "find-me-1");
    assert_eq!(rec["route"], "read");
    assert_eq!(rec["caller"], "billing-test");
    assert_eq!(rec["status"], r.status.as_u16());
    assert_eq!(rec["upstream_status"], r.status.as_u16());
    assert_eq!(rec["zuora_request_id"], zuora_request_id.as_str());
    assert_eq!(rec["path"], "/v1/uno/data-backfill/propagation/jobs");
    assert!(rec["latency_ms"].as_f64().unwrap() > 0.0);

    let d = get(&g.admin_url("/debug/requests?status=404&limit=5"))
        .await
        .unwrap();
    let v = d.json();
    assert_eq!(v["returned"], 1, "{v}");
    assert_eq!(v["requests"][0]["track_id"], "not-routed");
    assert_eq!(v["requests"][0]["error_kind"], "no_route");
    assert!(
        v["requests"][0]["error_code"]
            .as_str()
            .unwrap()
            .ends_with("40")
    );
    g.shutdown().await;
}

// ------------------------------------------------------------ traceparent

#[tokio::test]
async fn traceparent_is_not_forwarded_to_zuora_by_default() {
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "", "  log_format: json\n")).await;
    let r = send(request(
        Method::GET,
        &list_url(&g),
        &[("traceparent", TRACEPARENT), ("tracestate", "a=b")],
        "",
    ))
    .await
    .unwrap();
    assert_answered_by_zuora(&r);
    let last = sim.control().requests().last().unwrap().clone();
    assert!(!last.headers.contains_key("traceparent"));
    assert!(!last.headers.contains_key("tracestate"));
    g.shutdown().await;
}

#[tokio::test]
async fn traceparent_is_forwarded_when_the_upstream_allows_it() {
    let sim = simulator().await;
    let g = gateway(&yaml(
        &sim,
        "    forward_traceparent: true\n",
        "  log_format: json\n",
    ))
    .await;
    let r = send(request(
        Method::GET,
        &list_url(&g),
        &[("traceparent", TRACEPARENT)],
        "",
    ))
    .await
    .unwrap();
    assert_answered_by_zuora(&r);
    let last = sim.control().requests().last().unwrap().clone();
    let tp = last.headers["traceparent"].to_str().unwrap();
    assert!(tp.contains(CALLER_TRACE_ID), "same trace continues: {tp}");
    g.shutdown().await;
}

// ------------------------------------------------- the binary, as a child

/// The gateway binary running as a child process, its stdout collected.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
    admin: SocketAddr,
    _config: tempfile::NamedTempFile,
}

impl Proc {
    fn spawn(yaml: &str, env: &[(&str, &str)]) -> Proc {
        use std::io::Write;
        let mut config = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        config.write_all(yaml.as_bytes()).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zuora-gateway"));
        cmd.arg("serve")
            .arg("--config")
            .arg(config.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env_remove("RUST_LOG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("gateway binary starts");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => sink.lock().unwrap().push(l),
                    Err(_) => break,
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let (addr, admin) = loop {
            let found = lines.lock().unwrap().iter().find_map(|l| listening(l));
            if let Some(a) = found {
                break a;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("gateway exited with {status}: {:?}", lines.lock().unwrap());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not start: {:?}",
                lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Proc {
            child,
            lines,
            addr,
            admin,
            _config: config,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    fn stdout(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The JSON access-log line of `track_id` (waits briefly for it).
    async fn access_line(&self, track_id: &str) -> serde_json::Value {
        for _ in 0..100 {
            let found = self.stdout().iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["target"] == "access" && v["track_id"] == track_id).then_some(v)
            });
            if let Some(v) = found {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no access line for {track_id}: {:#?}", self.stdout());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn access_log_line_has_the_fields_and_no_secrets() {
    let sim = simulator().await;
    let p = Proc::spawn(&yaml(&sim, "", "  log_format: json\n"), &[]);
    let fake_jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJiaWxsaW5nIn0.c2lnbmF0dXJlLXNlY3JldA";
    let r = send(request(
        Method::GET,
        &p.url("/v1/uno/data-backfill/propagation/jobs?pageSize=5&apiKey=query-secret-value"),
        &[
            ("zuora-track-id", "access-1"),
            ("authorization", &format!("Bearer {fake_jwt}")),
            ("traceparent", TRACEPARENT),
        ],
        "",
    ))
    .await
    .unwrap();
    assert_answered_by_zuora(&r);
    let v = p.access_line("access-1").await;
    assert_eq!(v["method"], "GET");
    assert_eq!(v["route"], "read");
    assert_eq!(v["path"], "/v1/uno/data-backfill/propagation/jobs");
    assert_eq!(v["caller"], "billing-test");
    assert_eq!(v["status"], r.status.as_u16());
    assert_eq!(v["upstream_status"], r.status.as_u16());
    assert_eq!(
        v["zuora_request_id"],
        r.headers["zuora-request-id"].to_str().unwrap()
    );
    assert_eq!(
        v["trace_id"], CALLER_TRACE_ID,
        "the caller's trace ID, export being off"
    );
    assert!(v["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(v["bytes_out"].as_u64().is_some() || r.headers.get("content-length").is_none());

    // A refusal has its error kind and code.
    let r = send(with_track_id(&p.url("/v1/accounts/A-1"), b"access-2"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let v = p.access_line("access-2").await;
    assert_eq!(v["status"], 404);
    assert_eq!(v["error_kind"], "no_route");
    assert!(v["error_code"].as_str().unwrap().ends_with("40"));

    let all = p.stdout().join("\n");
    for secret in [fake_jwt, "query-secret-value", CLIENT_SECRET, "Bearer"] {
        assert!(
            !all.contains(secret),
            "`{secret}` leaked into the logs:\n{all}"
        );
    }
}

#[tokio::test]
async fn text_log_format_writes_key_value_access_lines() {
    let sim = simulator().await;
    let p = Proc::spawn(&yaml(&sim, "", "  log_format: text\n"), &[]);
    let r = send(with_track_id(&list_url_of(&p), b"text-1"))
        .await
        .unwrap();
    assert_answered_by_zuora(&r);
    let mut found = None;
    for _ in 0..100 {
        found = p
            .stdout()
            .into_iter()
            .find(|l| l.contains("access") && l.contains("track_id=\"text-1\""));
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = found.unwrap_or_else(|| panic!("no text access line: {:#?}", p.stdout()));
    assert!(
        line.contains(&format!("status={}", r.status.as_u16())),
        "{line}"
    );
    assert!(!line.starts_with('{'), "not JSON: {line}");
}

#[tokio::test]
async fn access_off_in_rust_log_silences_only_the_access_log() {
    let sim = simulator().await;
    let p = Proc::spawn(
        &yaml(&sim, "", "  log_format: json\n"),
        &[("RUST_LOG", "info,access=off")],
    );
    let r = send(with_track_id(&list_url_of(&p), b"silent-1"))
        .await
        .unwrap();
    assert_answered_by_zuora(&r);
    // Long enough for the access-log writer's batch delay, many times over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = p.stdout();
    assert!(
        lines.iter().any(|l| l.contains("zuora-gateway listening")),
        "other INFO lines still written: {lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("silent-1")),
        "no access line: {lines:#?}"
    );
}

#[tokio::test]
async fn concurrent_requests_give_whole_json_lines_and_shutdown_flushes_them() {
    let sim = simulator().await;
    let mut p = Proc::spawn(&yaml(&sim, "", "  log_format: json\n"), &[]);
    let url = list_url_of(&p);
    let sent: Vec<_> = (0..200)
        .map(|i| {
            let req = with_track_id(&url, format!("burst-{i}").as_bytes());
            tokio::spawn(send(req))
        })
        .collect();
    for s in sent {
        assert_answered_by_zuora(&s.await.unwrap().unwrap());
    }
    // SIGTERM at once: lines still queued must be written before exit.
    let pid = p.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let exited = tokio::task::spawn_blocking(move || {
        let status = p.child.wait();
        (p, status)
    });
    let (p, status) = tokio::time::timeout(Duration::from_secs(20), exited)
        .await
        .expect("the gateway exits after SIGTERM")
        .unwrap();
    assert!(status.unwrap().success());
    // The reader thread sees EOF shortly after exit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = p.stdout();
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON line ({e}): {l}"));
        if v["target"] == "access" {
            assert!(seen.insert(v["track_id"].as_str().unwrap().to_owned()));
        }
    }
    for i in 0..200 {
        assert!(seen.contains(&format!("burst-{i}")), "burst-{i} missing");
    }
}

fn list_url_of(p: &Proc) -> String {
    p.url("/v1/uno/data-backfill/propagation/jobs?pageSize=5")
}

// ------------------------------------------------------- OTLP receiver

type Received = Arc<Mutex<Vec<Span>>>;

/// A real OTLP/HTTP receiver: POST /v1/traces with protobuf bodies.
async fn otlp_receiver() -> (SocketAddr, Received, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Received = Arc::default();
    let store = spans.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        let ok = req.method() == Method::POST && req.uri().path() == "/v1/traces";
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        if !ok {
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            return Ok::<_, std::convert::Infallible>(r);
                        }
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        let mut s = store.lock().unwrap();
                        for rs in export.resource_spans {
                            for ss in rs.scope_spans {
                                s.extend(ss.spans);
                            }
                        }
                        let out = ExportTraceServiceResponse::default().encode_to_vec();
                        let mut r = Response::new(Full::new(Bytes::from(out)));
                        r.headers_mut().insert(
                            "content-type",
                            HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, spans, task)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            AnyValue::BoolValue(b) => Some(b.to_string()),
            AnyValue::DoubleValue(d) => Some(d.to_string()),
            _ => None,
        })
}

/// Waits until a server span with `zuora.track_id == track` arrives.
async fn server_span(spans: &Received, track: &str) -> Span {
    for _ in 0..200 {
        let found = spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| attr(s, "zuora.track_id").as_deref() == Some(track))
            .cloned();
        if let Some(s) = found {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no span for {track}: {:#?}", spans.lock().unwrap());
}

fn spans_of_trace(spans: &Received, trace_id: &[u8]) -> Vec<Span> {
    spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect()
}

#[tokio::test]
async fn spans_reach_the_otlp_receiver_with_track_id_and_parent_links() {
    let sim = simulator().await;
    let (collector, spans, _rx) = otlp_receiver().await;
    let p = Proc::spawn(
        &yaml(
            &sim,
            "",
            &format!(
                "  log_format: json\n  otlp_endpoint: http://{collector}\n  sampling_ratio: 1.0\n{TENANCY}"
            ),
        ),
        &[],
    );

    // Without a caller trace: a new trace, server span and Zuora-call child.
    let r = send(stop_req(&p, &[("zuora-track-id", "span-1")]))
        .await
        .unwrap();
    assert_answered_by_zuora(&r);
    let server = server_span(&spans, "span-1").await;
    assert_eq!(
        server.name,
        "PUT /v1/uno/data-backfill/propagation/jobs/{jobId}"
    );
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr(&server, "http.request.method").as_deref(), Some("PUT"));
    assert_eq!(
        attr(&server, "http.route").as_deref(),
        Some("/v1/uno/data-backfill/propagation/jobs/{jobId}")
    );
    let status = r.status.as_u16().to_string();
    assert_eq!(
        attr(&server, "http.response.status_code").as_deref(),
        Some(&*status)
    );
    assert_eq!(
        attr(&server, "zuora.caller").as_deref(),
        Some("billing-test")
    );
    assert_eq!(attr(&server, "zuora.route").as_deref(), Some("stop"));
    assert_eq!(attr(&server, "zuora.entity_ids").as_deref(), Some(ENTITY));
    assert_eq!(
        attr(&server, "zuora.request_id").as_deref(),
        Some(r.headers["zuora-request-id"].to_str().unwrap())
    );
    assert!(server.parent_span_id.is_empty(), "a root span");
    // The Zuora call is a child in the same trace.
    let mut call = None;
    for _ in 0..100 {
        call = spans_of_trace(&spans, &server.trace_id)
            .into_iter()
            .find(|s| s.name == "zuora.call");
        if call.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let call = call.expect("zuora.call span exported");
    assert_eq!(
        call.parent_span_id, server.span_id,
        "child of the server span"
    );
    assert_eq!(call.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(
        attr(&call, "http.response.status_code").as_deref(),
        Some(&*status)
    );
    assert_eq!(
        call.trace_id, server.trace_id,
        "a single trace ID per request"
    );
    let roots = spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| attr(s, "zuora.track_id").as_deref() == Some("span-1"))
        .count();
    assert_eq!(roots, 1, "one server span per request");

    // The access log carries the exported trace ID.
    let line = p.access_line("span-1").await;
    assert_eq!(line["trace_id"], hex(&server.trace_id));

    // With a caller traceparent: the same trace continues.
    let r = send(request(
        Method::GET,
        &list_url_of(&p),
        &[("zuora-track-id", "span-2"), ("traceparent", TRACEPARENT)],
        "",
    ))
    .await
    .unwrap();
    assert_answered_by_zuora(&r);
    let server = server_span(&spans, "span-2").await;
    assert_eq!(hex(&server.trace_id), CALLER_TRACE_ID);
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN_ID);
    // Not forwarded to Zuora (forward_traceparent is false by default).
    assert!(
        !sim.control()
            .requests()
            .last()
            .unwrap()
            .headers
            .contains_key("traceparent")
    );
}

fn stop_req(p: &Proc, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request(
        Method::PUT,
        &p.url(&format!("/v1/uno/data-backfill/propagation/jobs/{JOB}")),
        &all,
        r#"{"status":"Stopping"}"#,
    )
}

#[tokio::test]
async fn forwarded_traceparent_is_the_gateways_zuora_call_span() {
    let sim = simulator().await;
    let (collector, spans, _rx) = otlp_receiver().await;
    let p = Proc::spawn(
        &yaml(
            &sim,
            "    forward_traceparent: true\n",
            &format!("  log_format: json\n  otlp_endpoint: http://{collector}\n"),
        ),
        &[],
    );
    let r = send(request(
        Method::GET,
        &list_url_of(&p),
        &[("zuora-track-id", "fwd-1"), ("traceparent", TRACEPARENT)],
        "",
    ))
    .await
    .unwrap();
    assert_answered_by_zuora(&r);
    let sent = sim.control().requests().last().unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let server = server_span(&spans, "fwd-1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let call = spans_of_trace(&spans, &server.trace_id)
        .into_iter()
        .find(|s| s.name == "zuora.call")
        .expect("zuora.call exported");
    assert_eq!(
        sent,
        format!("00-{CALLER_TRACE_ID}-{}-01", hex(&call.span_id)),
        "Zuora sees the gateway's call span as parent"
    );
}

/// An upstream with a short request deadline, for timeouts.
fn impatient_yaml(sim: &SimHandle, telemetry: &str) -> String {
    let full = yaml(sim, "", telemetry);
    full.replace("request: 10s", "request: 300ms")
}

#[tokio::test]
async fn failed_requests_are_exported_even_when_sampling_keeps_nothing() {
    let sim = simulator().await;
    let (collector, spans, _rx) = otlp_receiver().await;
    let p = Proc::spawn(
        &impatient_yaml(
            &sim,
            &format!(
                "  log_format: json\n  otlp_endpoint: http://{collector}\n  sampling_ratio: 0\n"
            ),
        ),
        &[],
    );
    let r = send(with_track_id(&list_url_of(&p), b"ok-unsampled"))
        .await
        .unwrap();
    assert_answered_by_zuora(&r);
    let r = send(with_track_id(&p.url("/v1/accounts/A-1"), b"failed-404"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Zuora is too slow next: the gateway answers 504 after the Zuora call.
    sim.control().set_latency(Duration::from_secs(2));
    let r = send(with_track_id(&list_url_of(&p), b"failed-timeout"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    sim.control().set_latency(Duration::ZERO);

    let refused = server_span(&spans, "failed-404").await;
    assert_eq!(attr(&refused, "error.type").as_deref(), Some("no_route"));
    assert_eq!(refused.name, "GET unmatched");
    let failed = server_span(&spans, "failed-timeout").await;
    assert_eq!(
        attr(&failed, "error.type").as_deref(),
        Some("upstream_timeout")
    );
    assert_eq!(
        failed.status.as_ref().map(|s| s.code),
        Some(2),
        "STATUS_CODE_ERROR"
    );
    let call = spans_of_trace(&spans, &failed.trace_id)
        .into_iter()
        .find(|s| s.name == "zuora.call")
        .expect("the whole failed trace is kept, the Zuora call included");
    assert_eq!(call.parent_span_id, failed.span_id);
    assert_eq!(
        attr(&call, "error.type").as_deref(),
        Some("upstream_timeout")
    );
    assert!(
        !spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| attr(s, "zuora.track_id").as_deref() == Some("ok-unsampled")),
        "a successful unsampled request is not exported"
    );
}

#[tokio::test]
async fn a_sampled_caller_is_exported_even_when_sampling_keeps_nothing() {
    let sim = simulator().await;
    let (collector, spans, _rx) = otlp_receiver().await;
    let p = Proc::spawn(
        &yaml(
            &sim,
            "",
            &format!(
                "  log_format: json\n  otlp_endpoint: http://{collector}\n  sampling_ratio: 0\n"
            ),
        ),
        &[],
    );
    // The caller did not sample its trace: a success is not exported.
    let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let r = send(request(
        Method::GET,
        &list_url_of(&p),
        &[
            ("zuora-track-id", "caller-unsampled"),
            ("traceparent", unsampled),
        ],
        "",
    ))
    .await
    .unwrap();
    assert_answered_by_zuora(&r);
    // The caller sampled it: exported whole, whatever the ratio.
    let r = send(request(
        Method::GET,
        &list_url_of(&p),
        &[
            ("zuora-track-id", "caller-sampled"),
            ("traceparent", TRACEPARENT),
        ],
        "",
    ))
    .await
    .unwrap();
    assert_answered_by_zuora(&r);
    let server = server_span(&spans, "caller-sampled").await;
    assert_eq!(hex(&server.trace_id), CALLER_TRACE_ID);
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN_ID);
    let mut call = None;
    for _ in 0..100 {
        call = spans_of_trace(&spans, &server.trace_id)
            .into_iter()
            .find(|s| s.name == "zuora.call");
        if call.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        call.expect("zuora.call exported").parent_span_id,
        server.span_id
    );
    // Flushed together: had the unsampled one been exported, it would be here by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| attr(s, "zuora.track_id").as_deref() == Some("caller-unsampled")),
        "an unsampled caller's successful request is not exported at ratio 0"
    );
    // The access log carries the trace ID either way.
    assert_eq!(
        p.access_line("caller-unsampled").await["trace_id"],
        CALLER_TRACE_ID
    );
}

#[tokio::test]
async fn dead_collector_does_not_break_requests_and_drops_are_counted() {
    let sim = simulator().await;
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let p = Proc::spawn(
        &yaml(
            &sim,
            "",
            // Every request exported (the default ratio would export one in ten).
            &format!(
                "  log_format: json\n  otlp_endpoint: http://{dead}\n  export_queue: 4\n  sampling_ratio: 1.0\n"
            ),
        ),
        &[],
    );
    let started = std::time::Instant::now();
    for i in 0..30 {
        let r = send(with_track_id(
            &list_url_of(&p),
            format!("dead-{i}").as_bytes(),
        ))
        .await
        .unwrap();
        assert_answered_by_zuora(&r);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "requests do not wait for the collector"
    );
    let mut dropped = 0.0;
    for _ in 0..100 {
        let m = get(&p.admin_url("/metrics")).await.unwrap().text();
        dropped = metric(&m, "gateway_spans_dropped_total");
        if dropped > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dropped > 0.0, "drops are counted");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn request_metrics_count_by_route_status_and_caller() {
    let sim = simulator().await;
    let g = gateway(&yaml(&sim, "", "  log_format: json\n")).await;
    for _ in 0..2 {
        assert_answered_by_zuora(&get(&list_url(&g)).await.unwrap());
    }
    let status = get(&list_url(&g)).await.unwrap().status.as_u16();
    let m = get(&g.admin_url("/metrics")).await.unwrap().text();
    let counts: HashMap<&str, f64> = m
        .lines()
        .filter(|l| l.starts_with("gateway_requests_total{"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k, v.parse().ok()?))
        })
        .collect();
    let key = counts
        .keys()
        .find(|k| {
            k.contains("route=\"read\"")
                && k.contains(&format!("status=\"{status}\""))
                && k.contains("caller=\"billing-test\"")
        })
        .unwrap_or_else(|| panic!("{m}"));
    assert_eq!(counts[key], 3.0);
    assert!(
        m.contains("gateway_upstream_duration_seconds_count{route=\"read\"} 3"),
        "{m}"
    );
    assert!(m.contains("gateway_in_flight_requests 0"), "{m}");
    g.shutdown().await;
}

#[tokio::test]
async fn a_401_replay_is_a_span_event_with_two_zuora_calls() {
    let sim = simulator().await;
    let (collector, spans, _rx) = otlp_receiver().await;
    let p = Proc::spawn(
        &yaml(
            &sim,
            "",
            &format!(
                "  log_format: json\n  otlp_endpoint: http://{collector}\n  sampling_ratio: 1.0\n"
            ),
        ),
        &[],
    );
    let r = send(with_track_id(&list_url_of(&p), b"warm-up"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Zuora forgets every token: the next call gets a 401 and is replayed.
    sim.control().revoke_all_tokens();
    let r = send(with_track_id(&list_url_of(&p), b"replay-1"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let server = server_span(&spans, "replay-1").await;
    let names: Vec<_> = server.events.iter().map(|e| e.name.as_str()).collect();
    assert!(
        names.iter().any(|n| n.contains("401")),
        "the replay is a span event: {names:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut calls: Vec<_> = spans_of_trace(&spans, &server.trace_id)
        .into_iter()
        .filter(|s| s.name == "zuora.call")
        .map(|s| {
            assert_eq!(s.parent_span_id, server.span_id);
            attr(&s, "http.response.status_code").unwrap()
        })
        .collect();
    calls.sort();
    assert_eq!(calls, ["200", "401"]);
}
