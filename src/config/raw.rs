//! The configuration file as written: serde types, `deny_unknown_fields`, every
//! scalar that needs parsing kept as a string so that `${ENV}` / `${file:…}`
//! substitution and error messages with key paths happen in one place
//! (`config::validate`).

use std::collections::BTreeMap;

use serde::Deserialize;

/// A scalar that may be written as a string or a number in YAML
/// (`burst: 5` and `burst: "${BURST}"` are both accepted).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum Scalar {
    Int(u64),
    Float(f64),
    Bool(bool),
    Str(String),
}

/// A value or a list of values (`key: caller` or `key: [caller, jobId]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) server: RawServer,
    pub(crate) upstreams: BTreeMap<String, RawUpstream>,
    pub(crate) callers: RawCallers,
    #[serde(default)]
    pub(crate) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(crate) tenancy: Vec<RawTenancyRule>,
    #[serde(default)]
    pub(crate) rate_limits: BTreeMap<String, RawRateLimit>,
    #[serde(default)]
    pub(crate) redis: Option<RawRedis>,
    #[serde(default)]
    pub(crate) telemetry: Option<RawTelemetry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) listen: Scalar,
    pub(crate) admin_listen: Option<Scalar>,
    pub(crate) max_body_bytes: Option<Scalar>,
    pub(crate) shutdown_grace: Option<Scalar>,
    pub(crate) header_read_timeout: Option<Scalar>,
    pub(crate) body_read_timeout: Option<Scalar>,
    pub(crate) max_connections: Option<Scalar>,
    pub(crate) max_in_flight: Option<Scalar>,
    pub(crate) max_header_count: Option<Scalar>,
    pub(crate) max_header_bytes: Option<Scalar>,
    pub(crate) max_uri_bytes: Option<Scalar>,
    pub(crate) http2_max_concurrent_streams: Option<Scalar>,
    pub(crate) compress_responses_over: Option<Scalar>,
    pub(crate) allow_unauthenticated_network: Option<Scalar>,
    pub(crate) worker_threads: Option<Scalar>,
    pub(crate) work_stealing: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub(crate) base_url: Scalar,
    pub(crate) ca_file: Option<Scalar>,
    pub(crate) zuora_version: Option<Scalar>,
    pub(crate) compress_requests_over: Option<Scalar>,
    pub(crate) timeouts: Option<RawTimeouts>,
    pub(crate) oauth: Option<RawOAuth>,
    pub(crate) forward_traceparent: Option<Scalar>,
    pub(crate) max_concurrent_requests: Option<Scalar>,
    pub(crate) pool: Option<RawPool>,
    pub(crate) retry: Option<RawRetry>,
    pub(crate) circuit_breaker: Option<RawCircuitBreaker>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    pub(crate) connect: Option<Scalar>,
    pub(crate) request: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub(crate) idle_timeout: Option<Scalar>,
    pub(crate) max_idle_per_host: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub(crate) max_attempts: Option<Scalar>,
    pub(crate) backoff: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCircuitBreaker {
    pub(crate) failure_threshold: Option<Scalar>,
    pub(crate) open_for: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOAuth {
    pub(crate) client_id: Option<Scalar>,
    pub(crate) client_secret: Option<Scalar>,
    pub(crate) token_url: Option<Scalar>,
    pub(crate) refresh_before_expiry: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCallers {
    pub(crate) jwt: Option<RawJwt>,
    pub(crate) trusted_identity: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJwt {
    pub(crate) issuer: Option<Scalar>,
    pub(crate) audience: Option<OneOrMany>,
    pub(crate) identity_claim: Option<Scalar>,
    pub(crate) leeway: Option<Scalar>,
    #[serde(default)]
    pub(crate) keys: Vec<RawKey>,
    pub(crate) jwks_url: Option<Scalar>,
    pub(crate) jwks_refresh: Option<Scalar>,
    pub(crate) jwks_ca_file: Option<Scalar>,
    pub(crate) cache_entries: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKey {
    pub(crate) kid: Option<Scalar>,
    pub(crate) alg: Scalar,
    pub(crate) public_key_file: Option<Scalar>,
    pub(crate) secret: Option<Scalar>,
    pub(crate) jwk_file: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) name: Scalar,
    pub(crate) method: Option<OneOrMany>,
    pub(crate) path: Scalar,
    pub(crate) upstream: Scalar,
    #[serde(default)]
    pub(crate) allow_callers: Vec<String>,
    #[serde(default)]
    pub(crate) rate_limits: Vec<String>,
    pub(crate) validate: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenancyRule {
    #[serde(default)]
    pub(crate) callers: Vec<String>,
    #[serde(default)]
    pub(crate) routes: Vec<String>,
    #[serde(default)]
    pub(crate) claims: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) entity_ids: Vec<String>,
    #[serde(default)]
    pub(crate) org_ids: Vec<String>,
    pub(crate) caller_may_narrow: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub(crate) key: OneOrMany,
    pub(crate) rate: Scalar,
    pub(crate) burst: Option<Scalar>,
    pub(crate) store: Option<Scalar>,
    pub(crate) on_store_error: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedis {
    pub(crate) url: Scalar,
    pub(crate) timeout: Option<Scalar>,
    pub(crate) key_prefix: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTelemetry {
    pub(crate) service_name: Option<Scalar>,
    pub(crate) otlp_endpoint: Option<Scalar>,
    pub(crate) otlp_protocol: Option<Scalar>,
    pub(crate) sampling_ratio: Option<Scalar>,
    pub(crate) export_queue: Option<Scalar>,
    pub(crate) log_format: Option<Scalar>,
    pub(crate) log_level: Option<Scalar>,
    pub(crate) debug_requests: Option<Scalar>,
}
