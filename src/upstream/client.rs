//! The pooled HTTP client used for Zuora (API calls and token requests):
//! hyper-util's legacy client over rustls with webpki roots plus the
//! upstream's `ca_file`, HTTP/1.1 and HTTP/2 by ALPN, plain http for the
//! simulator.
//!
//! Pool: at most `pool.max_idle_per_host` idle connections are kept (each
//! idle HTTP/1.1 connection holds about 30 KiB: buffers plus the client's
//! dispatch task), and an idle one is closed after `pool.idle_timeout`.
//! Busy connections are not capped here: the gateway's `max_in_flight`
//! bounds them (see the README's configuration reference).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;

use crate::body::{Body, BoxError};
use crate::config::UpstreamConfig;

/// The client type used for every upstream call.
pub type HttpClient = Client<Connector, Body>;

/// The connector: rustls (or plain http) over hyper-util's TCP connector.
/// Its connections report no `HttpInfo` (peer and local address), which the
/// stock connector attaches to every single response: one map allocation
/// per call that nothing here reads.
#[derive(Clone, Debug)]
pub struct Connector(HttpsConnector<HttpConnector>);

impl tower::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(Conn) })
    }
}

/// A connection made by [`Connector`].
#[derive(Debug)]
pub struct Conn(MaybeHttpsStream<TokioIo<TcpStream>>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let h2 = match &self.0 {
            MaybeHttpsStream::Http(_) => false,
            MaybeHttpsStream::Https(tls) => {
                tls.inner().get_ref().1.alpn_protocol() == Some(b"h2".as_slice())
            }
        };
        let connected = Connected::new();
        if h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

/// Errors building a client (only from bad CA material, which config
/// validation already checked, so this is a belt-and-braces path).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the TLS client for upstream `{upstream}`: {message}")]
pub struct ClientBuildError {
    upstream: String,
    message: String,
}

/// The rustls client config: webpki roots plus `extra_ca_pem`.
pub fn tls_config(extra_ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("invalid PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("unusable CA certificate: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Builds the pooled client for one upstream.
pub fn build_client(cfg: &UpstreamConfig) -> Result<HttpClient, ClientBuildError> {
    Ok(build_clients(cfg, 1)?.first().clone())
}

/// Builds `runtimes` pooled clients for one upstream, one per serving
/// runtime (at least one).
pub fn build_clients(cfg: &UpstreamConfig, runtimes: usize) -> Result<Clients, ClientBuildError> {
    let err = |message: String| ClientBuildError {
        upstream: cfg.name.clone(),
        message,
    };
    let tls = tls_config(cfg.ca_pem.as_deref().map(Vec::as_slice)).map_err(err)?;
    let clients = (0..runtimes.max(1))
        .map(|_| {
            https_client(
                tls.clone(),
                cfg.connect_timeout,
                cfg.pool_idle_timeout,
                cfg.pool_max_idle_per_host,
            )
        })
        .collect();
    Ok(Clients(clients))
}

thread_local! {
    /// Which serving runtime this thread drives (see [`set_runtime_index`]).
    static RUNTIME_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as the driver of serving runtime `index`, so
/// that requests served on it use that runtime's pool ([`Clients::current`]).
/// Threads never marked use the first pool.
pub fn set_runtime_index(index: usize) {
    RUNTIME_INDEX.with(|i| i.set(index));
}

/// One pooled client per serving runtime. With one current-thread runtime
/// per core, a pooled connection's dispatch task lives on the runtime that
/// made it; sharing one pool would have requests on one thread wake
/// connection tasks on another (a cross-thread wake-up both ways, every
/// request). Each runtime keeping its own pool avoids that; the upstream's
/// `max_concurrent_requests` slots stay shared.
#[derive(Clone, Debug)]
pub struct Clients(Arc<[HttpClient]>);

impl Clients {
    /// The pool of the runtime this thread serves.
    pub fn current(&self) -> &HttpClient {
        let i = RUNTIME_INDEX.with(std::cell::Cell::get);
        // `Clients` always holds at least one client (see `build_clients`).
        &self.0[i % self.0.len()]
    }

    /// The first pool (background work: token requests).
    pub fn first(&self) -> &HttpClient {
        &self.0[0]
    }

    /// How many pools (serving runtimes).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: there is always at least one pool.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A pooled HTTP/1.1 + HTTP/2 (by ALPN) client over rustls that also speaks
/// plain http (the simulator, a local JWKS).
pub fn https_client<B>(
    tls: rustls::ClientConfig,
    connect_timeout: std::time::Duration,
    idle_timeout: std::time::Duration,
    max_idle_per_host: usize,
) -> Client<Connector, B>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle_per_host)
        .build(Connector(connector))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, Version};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::client::legacy::connect::HttpInfo;

    use super::*;

    /// A `localhost` certificate signed by a fresh CA: (server config, CA PEM).
    fn pki(alpn: &[&[u8]]) -> (rustls::ServerConfig, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        (server, ca_cert.pem())
    }

    /// Serves over TLS, HTTP/2 only; answers with the version it was spoken to in.
    async fn h2_only_server(server: rustls::ServerConfig) -> u16 {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let answer = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let version = format!("{:?}", req.version());
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(version))))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), answer)
                        .await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn an_upstream_choosing_h2_by_alpn_is_spoken_to_in_http2_without_http_info() {
        let (server, ca_pem) = pki(&[b"h2"]);
        let port = h2_only_server(server).await;
        let client: Client<Connector, Full<Bytes>> = https_client(
            tls_config(Some(ca_pem.as_bytes())).unwrap(),
            Duration::from_secs(5),
            Duration::from_secs(30),
            4,
        );
        for _ in 0..2 {
            let uri: Uri = format!("https://localhost:{port}/v1/x").parse().unwrap();
            let resp = client.get(uri).await.unwrap();
            assert_eq!(resp.version(), Version::HTTP_2);
            assert!(resp.extensions().get::<HttpInfo>().is_none());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "HTTP/2.0");
        }
    }

    #[test]
    fn each_serving_runtime_thread_uses_its_own_pool() {
        let config = crate::oauth::test_support::config("http://127.0.0.1:9", "");
        let clients = build_clients(&config.upstreams["zuora"], 3).unwrap();
        assert_eq!(clients.len(), 3);
        let slot = |c: &Clients| (0..3).find(|&i| std::ptr::eq(c.current(), &c.0[i]));
        // Threads never marked (background tasks, tests) use the first pool.
        assert_eq!(slot(&clients), Some(0));
        assert!(std::ptr::eq(clients.first(), &clients.0[0]));
        for i in 0..3 {
            let c = clients.clone();
            let seen = std::thread::spawn(move || {
                set_runtime_index(i);
                slot(&c)
            })
            .join()
            .unwrap();
            assert_eq!(seen, Some(i));
        }
    }
}
