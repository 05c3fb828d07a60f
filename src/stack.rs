//! The request path, assembled in one place. Order matters: each layer's
//! comment says why it sits where it does. Outermost first.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use tower::ServiceBuilder;
use tower::util::BoxCloneService;

use crate::body::Body;
use crate::compression::BodyMetrics;
use crate::layers::authn::AuthnLayer;
use crate::layers::authorize::AuthorizeLayer;
use crate::layers::coalesce::CoalesceLayer;
use crate::layers::compression::CompressionLayer;
use crate::layers::in_flight::InFlightLimitLayer;
use crate::layers::local_token::LocalTokenLayer;
use crate::layers::rate_limit::RateLimitLayer;
use crate::layers::request_body::RequestBodyLayer;
use crate::layers::rescue::RescueLayer;
use crate::layers::route::RouteLayer;
use crate::layers::tenancy::TenancyLayer;
use crate::layers::token::TokenLayer;
use crate::layers::trace::{RecordContextLayer, TraceLayer};
use crate::layers::track_id::TrackIdLayer;
use crate::layers::validate::ValidateLayer;
use crate::metrics::RequestMetrics;
use crate::oauth::TokenCache;
use crate::policy::Policy;
use crate::ratelimit::LimiterRegistry;
use crate::telemetry::{DebugRing, Recorder};
use crate::upstream::{Forward, Upstreams};

/// The whole gateway as one cloneable service; errors are already responses.
pub type GatewayService = BoxCloneService<Request<Body>, Response<Body>, Infallible>;

/// Everything the stack is built from (created once at startup).
#[derive(Clone)]
pub struct StackParts {
    /// The current policy; reloads swap it.
    pub policy: Arc<ArcSwap<Policy>>,
    /// Running upstreams by name.
    pub upstreams: Upstreams,
    /// The Zuora token cache of each upstream, by upstream name.
    pub tokens: Arc<HashMap<String, TokenCache>>,
    /// Request metrics.
    pub metrics: RequestMetrics,
    /// The `/debug/requests` ring (shared with the admin listener).
    pub debug_ring: Arc<DebugRing>,
    /// `server.max_in_flight`.
    pub max_in_flight: usize,
    /// Rate-limiter state, kept across reloads.
    pub rate_limits: Arc<LimiterRegistry>,
    /// Wire-byte counters of both sides (`gateway_body_bytes_total`).
    pub body_metrics: BodyMetrics,
}

/// Builds the request path.
pub fn build(parts: &StackParts) -> GatewayService {
    let recorder = Arc::new(Recorder::new(
        parts.debug_ring.clone(),
        Some(parts.metrics.clone()),
    ));
    let svc = ServiceBuilder::new()
        // Track ID: outermost, so every response (even a refusal) carries it and every log line has it.
        .layer(TrackIdLayer::new(recorder.clone()))
        // Trace: span, metrics, access log, debug ring; outside rescue so it sees every status.
        .layer(TraceLayer::new(recorder))
        // Rescue: the one edge where GatewayError becomes a Zuora-shaped response.
        .layer(RescueLayer)
        // In-flight limit: shed load with 503 before doing any work.
        .layer(InFlightLimitLayer::new(parts.max_in_flight))
        // Local token endpoint: SDKs' POST /oauth/token is answered here, never forwarded.
        .layer(LocalTokenLayer::new(parts.policy.clone()))
        // Route: refuse unsafe paths, match (deny by default), pin the policy snapshot.
        .layer(RouteLayer::new(parts.policy.clone()))
        // Record context: the route into the decision trail, even if authn refuses next.
        .layer(RecordContextLayer)
        // Authn: who is calling; the caller's Authorization never goes further.
        .layer(AuthnLayer)
        // Record context: the caller into the decision trail, before any later refusal.
        .layer(RecordContextLayer)
        // Authorize: the route's allow_callers must admit the caller (403 otherwise, deny by default).
        .layer(AuthorizeLayer)
        // Request body: size, encoding and read-time guards for admitted callers, before anything reads the body (413/415/408).
        .layer(RequestBodyLayer::new(&parts.policy.load().config.server))
        // Tenancy: Zuora-Entity-Ids / Zuora-Org-Ids from the first matching rule; the caller's are removed.
        .layer(TenancyLayer)
        // Validate: stop-job requests are checked (job ID, body) so nothing invalid reaches Zuora.
        .layer(ValidateLayer)
        // Coalesce: a duplicate of an in-flight stop joins it (one Zuora call) and spends no rate budget.
        .layer(CoalesceLayer::new())
        // Rate limit: every limit of the route must admit (429, never reaching Zuora); Zuora's 429s hold the key.
        .layer(RateLimitLayer::new(parts.rate_limits.clone()))
        // Compression: gzip towards Zuora always, only for requests that will be sent; the caller gets the encoding it asked for.
        .layer(CompressionLayer::new(parts.body_metrics.clone()))
        // Token: innermost, so a 401 replay re-sends exactly what Forward sent, with a new Zuora token.
        .layer(TokenLayer::new(parts.tokens.clone()))
        // Forward: the Zuora call itself.
        .service(Forward::new(parts.upstreams.clone()));
    BoxCloneService::new(svc)
}
