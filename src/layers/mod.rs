//! The request-path middleware, one file per concern. Each file holds a
//! `FooLayer` (built once in [`crate::stack`]) and the `Foo<S>` service it
//! wraps around the next service.
//!
//! Conventions every layer follows:
//! - Inner services are `Service<Request<Body>, Response = Response<Body>, Error = GatewayError>`
//!   and `Clone + Send + 'static`.
//! - A refusal is `Err(GatewayError::…)`; the [`rescue`] layer turns it into
//!   the Zuora-shaped response at one edge. Layers never build error bodies.
//! - Facts for later layers go into typed request extensions
//!   ([`crate::context`]), set once.
//! - A synchronous refusal returns `Either::Left(ready(Err(..)))`; only layers
//!   with real async work box their future.

pub mod authn;
pub mod authorize;
pub mod coalesce;
pub mod compression;
pub mod in_flight;
pub mod local_token;
pub mod rate_limit;
pub mod request_body;
pub mod rescue;
pub mod route;
pub mod tenancy;
pub mod token;
pub mod trace;
pub mod track_id;
pub mod validate;

use std::future::Ready;

use futures_util::future::{BoxFuture, Either};
use http::{Request, Response};

use crate::body::Body;
use crate::error::GatewayError;

/// The request type inside the stack.
pub type Req = Request<Body>;
/// The response type inside the stack.
pub type Resp = Response<Body>;
/// The result every inner service produces.
pub type GwResult = Result<Resp, GatewayError>;
/// A future that is either an immediate refusal or the inner service's future.
pub type RejectOr<F> = Either<Ready<GwResult>, F>;
/// A boxed layer future (for layers with async work of their own).
pub type LayerFuture = BoxFuture<'static, GwResult>;

/// Refuses immediately with `err`.
pub fn reject<F>(err: GatewayError) -> RejectOr<F> {
    Either::Left(std::future::ready(Err(err)))
}
