//! A tiny programmable OAuth token endpoint on 127.0.0.1:0, and upstream
//! configs pointing at it, for the unit tests of the cache and the layer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::{OAuthMetrics, TokenCache};
use crate::config::Config;

/// The client secret every test config uses.
pub(crate) const CLIENT_SECRET: &str = "test-client-s3cr3t";
/// The client ID every test config uses.
pub(crate) const CLIENT_ID: &str = "0123456789abcdef0123456789abcdef0123";

/// How the endpoint answers.
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    /// 200 with a fresh token.
    Grant,
    /// This status, body and optional `Retry-After`.
    Fail(u16, &'static str, Option<u64>),
}

/// One request the endpoint received.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

#[derive(Debug)]
struct State {
    mode: Mutex<Mode>,
    latency_ms: AtomicU64,
    ttl_secs: AtomicU64,
    requests: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    issued: Mutex<Vec<String>>,
}

/// The endpoint; it stops when dropped (its accept task is aborted).
pub(crate) struct FakeTokenEndpoint {
    pub(crate) addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeTokenEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeTokenEndpoint {
    /// Starts on 127.0.0.1:0, issuing tokens that live `ttl_secs`.
    pub(crate) async fn start(ttl_secs: u64) -> FakeTokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            mode: Mutex::new(Mode::Grant),
            latency_ms: AtomicU64::new(0),
            ttl_secs: AtomicU64::new(ttl_secs),
            requests: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeTokenEndpoint { addr, state, task }
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn token_url(&self) -> http::Uri {
        format!("http://{}/oauth/token", self.addr).parse().unwrap()
    }

    pub(crate) fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    pub(crate) fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    pub(crate) fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Every token issued so far, in order.
    pub(crate) fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
}

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    state.seen.lock().unwrap().push(Seen {
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let latency = state.latency_ms.load(Ordering::SeqCst);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let mode = state.mode.lock().unwrap().clone();
    let resp = match mode {
        Mode::Grant => {
            let token = format!("zuora-tok-{n}-{:016x}", fastrand::u64(..));
            state.issued.lock().unwrap().push(token.clone());
            let ttl = state.ttl_secs.load(Ordering::SeqCst);
            let json = format!(
                r#"{{"access_token":"{token}","token_type":"bearer","expires_in":{ttl},"scope":"x tenant.19","jti":"j{n}"}}"#
            );
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(json)))
                .unwrap()
        }
        Mode::Fail(status, body, retry_after) => {
            let mut b = Response::builder().status(StatusCode::from_u16(status).unwrap());
            if let Some(s) = retry_after {
                b = b.header("retry-after", s.to_string());
            }
            b.body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap()
        }
    };
    Ok(resp)
}

/// A validated config whose upstream `zuora` is `base_url`, with extra
/// `oauth:` keys (e.g. `refresh_before_expiry: 1s`) and a catch-all route.
pub(crate) fn config(base_url: &str, oauth_extra: &str) -> Arc<Config> {
    let yaml = format!(
        "server: {{ listen: 127.0.0.1:0 }}\n\
         upstreams:\n  zuora:\n    base_url: {base_url}\n    timeouts: {{ connect: 1s, request: 5s }}\n    \
         oauth: {{ client_id: \"{CLIENT_ID}\", client_secret: \"{CLIENT_SECRET}\" {oauth_extra} }}\n\
         callers: {{ trusted_identity: svc }}\n\
         routes:\n  - {{ name: all, path: /v1/**, upstream: zuora, allow_callers: [\"*\"] }}\n"
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let none = |_: &str| -> Option<String> { None };
    Arc::new(Config::from_yaml(&yaml, std::path::Path::new("test.yaml"), dir, &none).unwrap())
}

/// A started cache for `endpoint`, its readiness flag and metrics registry.
pub(crate) struct Harness {
    pub(crate) cache: TokenCache,
    pub(crate) ready: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) registry: Registry,
    pub(crate) config: Arc<Config>,
}

/// Builds (does not start) a cache against `token_url` with extra `oauth:` keys.
pub(crate) fn harness(base_url: &str, token_url: http::Uri, oauth_extra: &str) -> Harness {
    let config = config(base_url, oauth_extra);
    let upstream = config.upstreams["zuora"].clone();
    let client = crate::upstream::build_client(&upstream).unwrap();
    let mut registry = Registry::default();
    let metrics = OAuthMetrics::new(&mut registry);
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cache = TokenCache::new(&upstream, token_url, client, ready.clone(), metrics);
    Harness {
        cache,
        ready,
        registry,
        config,
    }
}

impl Harness {
    /// The registry in Prometheus text format.
    pub(crate) fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}
