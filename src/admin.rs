//! The admin listener: `/healthz` (live), `/readyz` (ready to serve),
//! `/metrics` (Prometheus text), `/debug/requests` (recent decision trails).
//! Never exposed to callers' port.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use prometheus_client::registry::Registry;

use crate::body::{Body, full};
use crate::health::Health;
use crate::telemetry::DebugRing;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    /// Readiness facts.
    pub health: Arc<Health>,
    /// The metrics registry (frozen after startup).
    pub registry: Arc<Registry>,
    /// The last requests' decision trails (`/debug/requests`).
    pub debug_ring: Arc<DebugRing>,
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

impl Admin {
    /// Serves one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Result<Response<Body>, Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n",
            ));
        }
        let resp = match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "application/json", r#"{"status":"live"}"#),
            "/readyz" => match self.health.readiness() {
                Ok(()) => text(StatusCode::OK, "application/json", r#"{"status":"ready"}"#),
                Err(reasons) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    serde_json::json!({ "status": "not ready", "reasons": reasons }).to_string(),
                ),
            },
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => text(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        out,
                    ),
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "encoding failed\n",
                    ),
                }
            }
            "/debug/requests" => {
                crate::telemetry::debug_requests_response(&self.debug_ring, req.uri().query())
            }
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        };
        Ok(resp)
    }
}
