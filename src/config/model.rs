//! The validated configuration: real types (`SocketAddr`, `Duration`, `Uri`,
//! enums), every cross-reference checked. Nothing here is a string that
//! still needs parsing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Uri};

use crate::secret::Secret;

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages and reload).
    pub source: PathBuf,
    /// Listeners and caller-side limits.
    pub server: ServerConfig,
    /// Upstreams by name (usually just `zuora`).
    pub upstreams: BTreeMap<String, Arc<UpstreamConfig>>,
    /// How callers are authenticated.
    pub callers: CallerAuthConfig,
    /// Routing rules, in file order.
    pub routes: Vec<RouteConfig>,
    /// Tenancy rules, first match wins.
    pub tenancy: Vec<TenancyRuleConfig>,
    /// Named rate limits.
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    /// The shared limiter store, if any limit uses `store: redis`.
    pub redis: Option<RedisConfig>,
    /// Tracing, logs and metrics.
    pub telemetry: TelemetryConfig,
}

/// `server:` — the caller-facing side.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The one internal URL callers use.
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics`, `/debug/requests`.
    pub admin_listen: SocketAddr,
    /// Largest request body accepted (also caps decompressed bodies).
    pub max_body_bytes: u64,
    /// How long in-flight requests get to finish on SIGTERM.
    pub shutdown_grace: Duration,
    /// Time allowed to receive a request's headers (slowloris guard).
    pub header_read_timeout: Duration,
    /// Time allowed to receive a request body.
    pub body_read_timeout: Duration,
    /// Concurrent caller connections; beyond it new connections wait in the backlog.
    pub max_connections: usize,
    /// Concurrent in-flight requests; beyond it: 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Most request headers accepted.
    pub max_header_count: usize,
    /// Largest total request header size accepted.
    pub max_header_bytes: usize,
    /// Longest request URI accepted.
    pub max_uri_bytes: usize,
    /// HTTP/2 concurrent streams per connection.
    pub http2_max_concurrent_streams: u32,
    /// Compress uncompressed upstream responses above this size for callers
    /// that accept gzip (`None`: never).
    pub compress_responses_over: Option<u64>,
    /// Permit `trusted_identity` on a non-loopback listener.
    pub allow_unauthenticated_network: bool,
    /// Serving threads; `None`: one per CPU the process may use (cgroup
    /// quota included). `Some(1)` runs everything on one thread (a
    /// current-thread runtime).
    pub worker_threads: Option<usize>,
    /// With several threads: `false` (the default) runs one current-thread
    /// runtime per thread, each serving its share of the caller connections
    /// with its own Zuora connection pool; `true` runs tokio's work-stealing
    /// runtime instead (threads help each other, at the price of cross-thread
    /// wake-ups on every request).
    pub work_stealing: bool,
}

/// Where an upstream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// A real base URL (`https://rest.apisandbox.zuora.com`).
    Url(Uri),
    /// Start the embedded simulator and use it.
    Simulator,
}

/// `upstreams.<name>:`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The key under `upstreams:`.
    pub name: String,
    /// Base URL or the embedded simulator.
    pub target: UpstreamTarget,
    /// Extra PEM trust roots, already read from disk.
    pub ca_pem: Option<Arc<Vec<u8>>>,
    /// Where `ca_pem` came from (for messages).
    pub ca_file: Option<PathBuf>,
    /// `Zuora-Version` sent when the caller sends none.
    pub zuora_version: Option<HeaderValue>,
    /// Plain request bodies larger than this are gzip-compressed on the way.
    pub compress_requests_over: u64,
    /// TCP (+TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Whole upstream request timeout (until response headers).
    pub request_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// Requests in flight to this upstream at once; more wait (up to the
    /// connect timeout) for a slot, then get a 503. Bounds upstream
    /// connections (HTTP/1) and Zuora's per-tenant concurrency.
    pub max_concurrent_requests: usize,
    /// OAuth client credentials for Zuora.
    pub oauth: OAuthConfig,
    /// Whether the caller's W3C `traceparent` is forwarded to this upstream.
    pub forward_traceparent: bool,
    /// Retries of safe requests.
    pub retry: RetryConfig,
    /// Circuit breaker.
    pub circuit_breaker: CircuitBreakerConfig,
}

/// `upstreams.<name>.oauth:`.
#[derive(Debug, Clone)]
pub struct OAuthConfig {
    /// The client ID (36 chars at Zuora).
    pub client_id: Secret,
    /// The client secret.
    pub client_secret: Secret,
    /// Token endpoint; `None` means `<base_url>/oauth/token`.
    pub token_url: Option<Uri>,
    /// Refresh this long before expiry (clamped to half the lifetime at run time).
    pub refresh_before_expiry: Duration,
}

/// `upstreams.<name>.retry:`.
#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    /// Total attempts including the first (1 = no retry).
    pub max_attempts: u32,
    /// Base backoff between attempts (doubled each time, with jitter).
    pub backoff: Duration,
}

/// `upstreams.<name>.circuit_breaker:`.
#[derive(Debug, Clone, Copy)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the breaker (0 = disabled).
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe is let through.
    pub open_for: Duration,
}

/// `callers:` — exactly one of JWT or trusted identity.
#[derive(Debug, Clone)]
pub enum CallerAuthConfig {
    /// Callers present `Authorization: Bearer <JWT>`.
    Jwt(Box<JwtConfig>),
    /// Sidecar mode: every request is this caller.
    TrustedIdentity(String),
}

/// `callers.jwt:`.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Accepted `aud` values, if set.
    pub audience: Vec<String>,
    /// The claim that names the caller (default `sub`).
    pub identity_claim: String,
    /// Clock skew allowed for `exp` / `nbf`.
    pub leeway: Duration,
    /// Static keys.
    pub keys: Vec<JwtKeyConfig>,
    /// A JWKS document to fetch keys from.
    pub jwks_url: Option<Uri>,
    /// How often the JWKS is re-fetched in the background.
    pub jwks_refresh: Duration,
    /// Extra PEM trust roots for an https `jwks_url`.
    pub jwks_ca_pem: Option<Arc<Vec<u8>>>,
    /// Verified tokens kept in the cache.
    pub cache_entries: usize,
}

/// One static verification key, bound to one algorithm.
#[derive(Debug, Clone)]
pub struct JwtKeyConfig {
    /// `kid` this key answers to (`None`: tokens without a `kid`, or any kid if it is the only key).
    pub kid: Option<String>,
    /// The only algorithm this key verifies.
    pub alg: jsonwebtoken::Algorithm,
    /// Key material, already read from disk.
    pub material: JwtKeyMaterial,
}

/// Key material as configured.
#[derive(Debug, Clone)]
pub enum JwtKeyMaterial {
    /// PEM public key (RS*, PS*, ES*, EdDSA).
    PublicKeyPem(Arc<Vec<u8>>),
    /// HMAC secret (HS*).
    Secret(Secret),
    /// One JWK as JSON text.
    Jwk(Arc<String>),
}

/// Which built-in request validation a route applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// No body validation.
    None,
    /// A Zuora "stop backfill job" request: 32-char `jobId`, body `{"status":"Stopping"}`.
    StopJob,
}

/// One routing rule.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Unique route name (metrics, logs, explain).
    pub name: String,
    /// Methods this route serves (`None`: any).
    pub methods: Option<Vec<Method>>,
    /// Path template: literal segments, `{param}` (one segment), trailing `**`.
    pub path: String,
    /// Name of the upstream (exists in `upstreams`).
    pub upstream: String,
    /// Caller globs allowed to use this route (deny by default).
    pub allow_callers: Vec<String>,
    /// Names of rate limits (exist in `rate_limits`).
    pub rate_limits: Vec<String>,
    /// Built-in validation (`StopJob` is inferred for the stop-job operations).
    pub validation: Validation,
}

/// One tenancy rule.
#[derive(Debug, Clone)]
pub struct TenancyRuleConfig {
    /// Caller globs this rule applies to.
    pub callers: Vec<String>,
    /// Route names this rule applies to (empty: all).
    pub routes: Vec<String>,
    /// Claim name → value or glob that must match.
    pub claims: BTreeMap<String, String>,
    /// Sent as `Zuora-Entity-Ids` (empty: header not sent).
    pub entity_ids: Vec<String>,
    /// Sent comma-joined as `Zuora-Org-Ids` (empty: header not sent).
    pub org_ids: Vec<String>,
    /// A caller value that is a subset of the rule's list is kept.
    pub caller_may_narrow: bool,
}

/// What a rate limit is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The authenticated caller identity.
    Caller,
    /// One bucket for everyone.
    Global,
    /// A path parameter of the route, by name.
    Param(String),
}

/// Where limiter state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitStore {
    /// In this process (governor).
    Local,
    /// In Redis, shared by all replicas.
    Redis,
}

/// What to do when the limiter store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorPolicy {
    /// Fall back to a local limiter at the same rate.
    Local,
    /// Admit the request.
    Allow,
    /// Refuse the request with 503.
    Deny,
}

/// `rate_limits.<name>:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimitConfig {
    /// The key under `rate_limits:`.
    pub name: String,
    /// The parts of the limiter key, in order.
    pub key: Vec<LimitKey>,
    /// Requests admitted per `per` in steady state.
    pub count: u32,
    /// The period of `count`.
    pub per: Duration,
    /// Bucket size.
    pub burst: u32,
    /// Local or Redis.
    pub store: LimitStore,
    /// Behaviour when the store fails.
    pub on_store_error: StoreErrorPolicy,
}

impl RateLimitConfig {
    /// The steady-state interval between two admitted requests.
    pub fn emission_interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

/// `redis:`.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db` (may carry a password: treated as a secret).
    pub url: Secret,
    /// Per-decision timeout.
    pub timeout: Duration,
    /// Prefix of every key the gateway writes.
    pub key_prefix: String,
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`/v1/traces`).
    HttpProtobuf,
}

/// Access log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Text,
}

/// Default `telemetry.sampling_ratio`: one successful request in ten.
pub const DEFAULT_SAMPLING_RATIO: f64 = 0.1;

/// `telemetry:`.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` resource attribute.
    pub service_name: String,
    /// Collector base URL (`None`: no span export, unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
    pub otlp_endpoint: Option<Uri>,
    /// Transport.
    pub otlp_protocol: OtlpProtocol,
    /// Head sampling ratio in 0..=1 (default [`DEFAULT_SAMPLING_RATIO`]);
    /// failed requests and callers whose `traceparent` is sampled are
    /// always kept.
    pub sampling_ratio: f64,
    /// Bounded export queue (spans beyond it are dropped and counted).
    pub export_queue: usize,
    /// Log line format.
    pub log_format: LogFormat,
    /// Default log filter (`RUST_LOG` overrides).
    pub log_level: String,
    /// Requests kept for `/debug/requests`.
    pub debug_requests: usize,
}
