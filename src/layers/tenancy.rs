//! Tenancy: sets `Zuora-Entity-Ids` / `Zuora-Org-Ids` from the first
//! matching tenancy rule, with header values built at config load. The
//! caller's own values are always removed — unless the rule says
//! `caller_may_narrow`, in which case a subset of the rule's IDs is kept and
//! anything else is `Forbidden` (403).

use std::task::{Context, Poll};

use futures_util::future::Either;
use http::Request;
use tower::{Layer, Service};

use super::{RejectOr, Req, Resp, reject};
use crate::context::{Caller, RouteMatch};
use crate::error::GatewayError;
use crate::telemetry::trail::DecisionTrail;

/// Builds [`Tenancy`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TenancyLayer;

impl<S> Layer<S> for TenancyLayer {
    type Service = Tenancy<S>;
    fn layer(&self, inner: S) -> Tenancy<S> {
        Tenancy { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Tenancy<S> {
    inner: S,
}

/// `tenancy[i]`, without formatting for the first rules (one note per request).
fn rule_label(i: usize) -> std::borrow::Cow<'static, str> {
    const LABELS: [&str; 8] = [
        "tenancy[0]",
        "tenancy[1]",
        "tenancy[2]",
        "tenancy[3]",
        "tenancy[4]",
        "tenancy[5]",
        "tenancy[6]",
        "tenancy[7]",
    ];
    match LABELS.get(i) {
        Some(label) => (*label).into(),
        None => format!("tenancy[{i}]").into(),
    }
}

impl<S> Service<Req> for Tenancy<S>
where
    S: Service<Req, Response = Resp, Error = GatewayError>,
{
    type Response = Resp;
    type Error = GatewayError;
    type Future = RejectOr<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // Split so the headers can be rewritten while the extensions are read.
        let (mut parts, body) = req.into_parts();
        let outcome = match (
            parts.extensions.get::<RouteMatch>(),
            parts.extensions.get::<Caller>(),
        ) {
            (Some(m), Some(caller)) => m.policy.tenancy.apply(&mut parts.headers, caller, m.route),
            _ => Err(GatewayError::Internal(
                "tenancy layer reached without a route match and a caller".to_owned(),
            )),
        };
        match outcome {
            Ok(rule) => {
                if let Some(trail) = parts.extensions.get::<DecisionTrail>() {
                    match rule {
                        Some(i) => trail.note("tenancy", rule_label(i)),
                        None => trail.note("tenancy", "no rule matched: no entity/org headers"),
                    }
                }
                Either::Right(self.inner.call(Request::from_parts(parts, body)))
            }
            Err(e) => reject(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_labels_name_the_rule_index() {
        for i in 0..20 {
            assert_eq!(rule_label(i), format!("tenancy[{i}]"));
        }
    }
}
