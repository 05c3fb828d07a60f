//! Test support: start the embedded simulator and a gateway on ephemeral
//! ports, send requests over real sockets, make test certificates.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use zuora_gateway::config::{Config, ProcessEnv};
use zuora_gateway::server::{self, Running};
use zuora_gateway::sim::{SimControl, SimHandle, SimOptions, Simulator};

/// Client credentials the tests give both the simulator and the gateway.
pub const CLIENT_ID: &str = "0123456789abcdef0123456789abcdef0123";
pub const CLIENT_SECRET: &str = "test-client-secret-value-42";
/// A dev HS256 key for test callers.
pub const HS_KEY: &str = "test-only-hs256-key-0123456789abcdef0123456789";

/// A 32-character job ID.
pub const JOB: &str = "ff8080818bb300af018bb325fe0c58f3";

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Starts a simulator that only accepts the test credentials.
pub async fn simulator() -> SimHandle {
    simulator_with(SimOptions::default()).await
}

pub async fn simulator_with(mut opts: SimOptions) -> SimHandle {
    opts.client_id = Some(CLIENT_ID.into());
    opts.client_secret = Some(CLIENT_SECRET.into());
    Simulator::start(loopback(), opts)
        .await
        .expect("simulator starts")
}

/// The `upstreams:` section pointing at `sim`.
pub fn upstream_yaml(sim: &SimHandle) -> String {
    format!(
        "upstreams:\n  zuora:\n    base_url: {}\n    timeouts: {{ connect: 2s, request: 10s }}\n    oauth:\n      client_id: {CLIENT_ID}\n      client_secret: {CLIENT_SECRET}\n",
        sim.base_url()
    )
}

/// `server:` on ephemeral ports.
pub const SERVER_YAML: &str =
    "server:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n  shutdown_grace: 5s\n";

/// A gateway running in this process.
pub struct Gateway {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
    /// The embedded simulator's control (for `base_url: simulator`).
    pub fn sim(&self) -> Arc<SimControl> {
        self.running
            .as_ref()
            .and_then(|r| r.simulator.as_ref())
            .expect("embedded simulator")
            .control()
    }
    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// Parses `yaml` (relative paths resolve against `tests/`) and starts it.
pub async fn gateway(yaml: &str) -> Gateway {
    let config = config(yaml);
    start(config).await
}

pub fn config(yaml: &str) -> Config {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    Config::from_yaml(yaml, Path::new("test.yaml"), &dir, &ProcessEnv)
        .unwrap_or_else(|e| panic!("test config: {e}"))
}

pub async fn start(config: Config) -> Gateway {
    let running = server::start(config).await.expect("gateway starts");
    Gateway {
        addr: running.listen_addr,
        admin: running.admin_addr,
        running: Some(running),
    }
}

/// Waits until `/readyz` answers 200 (or panics after `within`).
pub async fn wait_ready(g: &Gateway, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(r) = get(&g.admin_url("/readyz")).await
            && r.status == StatusCode::OK
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway not ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The first reason code of a Zuora-shaped error.
    pub fn code(&self) -> String {
        let v = self.json();
        assert_eq!(v["success"], false, "{v}");
        v["reasons"][0]["code"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v["reasons"][0]["code"].to_string())
    }
}

pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends a request and reads the whole reply.
pub async fn send(req: Request<Full<Bytes>>) -> Result<Reply, hyper_util::client::legacy::Error> {
    let resp = http_client().request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub async fn get(url: &str) -> Result<Reply, hyper_util::client::legacy::Error> {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

/// Builds a request with headers.
pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

/// A valid stop request for `job`.
pub fn stop(g: &Gateway, job: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request(
        Method::PUT,
        &g.url(&format!("/v1/uno/data-backfill/propagation/jobs/{job}")),
        &all,
        r#"{"status":"Stopping"}"#,
    )
}

/// A private CA and a `localhost` server certificate, made now.
pub struct TestPki {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

pub fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "zuora-gateway test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca_issuer).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        server_config: Arc::new(server_config),
    }
}

/// The addresses in the startup line, JSON (`"listen":"…"`) or text (`listen=…`).
pub fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("zuora-gateway listening") {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        return Some((
            v["listen"].as_str()?.parse().ok()?,
            v["admin"].as_str()?.parse().ok()?,
        ));
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.trim_matches('"').parse().ok())
    };
    Some((field("listen=")?, field("admin=")?))
}
