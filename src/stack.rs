//! The request path, assembled in one place. Order matters: each layer's
//! comment says why it sits where it does. Outermost first.

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use tower::ServiceBuilder;
use tower::util::BoxCloneService;

use crate::body::Body;
use crate::layers::authn::AuthnLayer;
use crate::layers::coalesce::CoalesceLayer;
use crate::layers::in_flight::InFlightLimitLayer;
use crate::layers::observe::ObserveLayer;
use crate::layers::rate_limit::RateLimitLayer;
use crate::layers::rescue::RescueLayer;
use crate::layers::route::RouteLayer;
use crate::metrics::RequestMetrics;
use crate::policy::Policy;
use crate::ratelimit::LimiterRegistry;
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
    /// Request metrics.
    pub metrics: RequestMetrics,
    /// `server.max_in_flight`.
    pub max_in_flight: usize,
    /// Rate-limiter state, kept across reloads.
    pub rate_limits: Arc<LimiterRegistry>,
}

/// Builds the request path.
pub fn build(parts: &StackParts) -> GatewayService {
    let svc = ServiceBuilder::new()
        // Observe: outside rescue so refusals are counted with their status too.
        .layer(ObserveLayer::new(parts.metrics.clone()))
        // Rescue: the one edge where GatewayError becomes a Zuora-shaped response.
        .layer(RescueLayer)
        // In-flight limit: shed load with 503 before doing any work.
        .layer(InFlightLimitLayer::new(parts.max_in_flight))
        // Route: refuse unsafe paths, match (deny by default), pin the policy snapshot.
        .layer(RouteLayer::new(parts.policy.clone()))
        // Authn: who is calling; the caller's Authorization never goes further.
        .layer(AuthnLayer)
        // Coalesce: a duplicate of an in-flight stop joins it (one Zuora call) and spends no rate budget.
        .layer(CoalesceLayer::new())
        // Rate limit: every limit of the route must admit (429 otherwise); Zuora's 429s hold the key.
        .layer(RateLimitLayer::new(parts.rate_limits.clone()))
        // Forward: the Zuora call itself.
        .service(Forward::new(parts.upstreams.clone()));
    BoxCloneService::new(svc)
}
