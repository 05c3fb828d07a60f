//! The pooled HTTP client used for Zuora (API calls and token requests):
//! hyper-util's legacy client over rustls with webpki roots plus the
//! upstream's `ca_file`, HTTP/1.1 and HTTP/2 by ALPN, plain http for the
//! simulator.

use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::body::Body;
use crate::config::UpstreamConfig;

/// The client type used for every upstream call.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

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
    let err = |message: String| ClientBuildError {
        upstream: cfg.name.clone(),
        message,
    };
    let tls = tls_config(cfg.ca_pem.as_deref().map(Vec::as_slice)).map_err(err)?;
    Ok(https_client(
        tls,
        cfg.connect_timeout,
        cfg.pool_idle_timeout,
        cfg.pool_max_idle_per_host,
    ))
}

/// A pooled HTTP/1.1 + HTTP/2 (by ALPN) client over rustls that also speaks
/// plain http (the simulator, a local JWKS).
pub fn https_client<B>(
    tls: rustls::ClientConfig,
    connect_timeout: std::time::Duration,
    idle_timeout: std::time::Duration,
    max_idle_per_host: usize,
) -> Client<HttpsConnector<HttpConnector>, B>
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
        .build(connector)
}
