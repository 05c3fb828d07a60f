//! The decision trail: a small per-request notebook that layers append to and
//! the trace layer reads when the request completes (for the access log, the
//! `/debug/requests` ring and the span).
//!
//! The trace layer puts a [`DecisionTrail`] into the request extensions before
//! the request enters the stack. Any layer may then write a note:
//!
//! ```
//! # use zuora_gateway::telemetry::DecisionTrail;
//! # let mut req = http::Request::new(());
//! # req.extensions_mut().insert(DecisionTrail::new());
//! if let Some(trail) = req.extensions().get::<DecisionTrail>() {
//!     trail.note("rate_limit", "stop-per-job: denied");
//! }
//! // or, equivalently, a no-op when there is no trail:
//! zuora_gateway::telemetry::trail::note(&req, "tenancy", "rule 2 (billing-*)");
//! ```
//!
//! The lock is a `std::sync::Mutex` held only for the push: never across an
//! `.await`. Notes are bounded (count and length) so a misbehaving layer cannot
//! grow a request's memory without limit.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::HeaderValue;

use crate::context::{Caller, RouteMatch};
use crate::policy::Policy;

/// Most notes kept per request; later notes are counted, not stored.
pub const MAX_NOTES: usize = 32;
/// Longest note text kept (bytes); longer texts are cut at a char boundary.
pub const MAX_NOTE_BYTES: usize = 256;

/// One note: what kind of decision (`rate_limit`, `tenancy`, `oauth`, …) and
/// what was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The deciding concern (a short static label).
    pub kind: &'static str,
    /// The decision, human-readable. Never a secret.
    pub text: Cow<'static, str>,
}

/// The route a request matched: the policy snapshot and the route's index
/// (cheap to hold; names are read when needed).
#[derive(Debug, Clone)]
pub struct RouteRef {
    /// The policy the request was routed with.
    pub policy: Arc<Policy>,
    /// Index into `policy.config.routes`.
    pub index: usize,
}

impl RouteRef {
    /// The route's name.
    pub fn name(&self) -> &str {
        self.policy
            .config
            .routes
            .get(self.index)
            .map_or("none", |r| r.name.as_str())
    }

    /// The route's path template (`/v1/uno/data-backfill/propagation/jobs/{jobId}`).
    pub fn template(&self) -> &str {
        self.policy
            .config
            .routes
            .get(self.index)
            .map_or("unmatched", |r| r.path.as_str())
    }
}

/// What the upstream (Zuora) call produced.
#[derive(Debug, Clone, Default)]
pub struct UpstreamFacts {
    /// HTTP status of Zuora's response (`None`: no response).
    pub status: Option<u16>,
    /// `Zuora-Request-Id` of Zuora's response.
    pub request_id: Option<HeaderValue>,
    /// Time to Zuora's response headers (all attempts).
    pub latency: Duration,
    /// Number of calls made (a 401 retry makes it 2).
    pub attempts: u32,
}

/// The facts collected for one request.
#[derive(Debug, Clone, Default)]
pub struct Trail {
    /// The matched route.
    pub route: Option<RouteRef>,
    /// The authenticated caller identity.
    pub caller: Option<Arc<str>>,
    /// `Zuora-Entity-Ids` sent upstream.
    pub entity_ids: Option<HeaderValue>,
    /// The upstream call.
    pub upstream: Option<UpstreamFacts>,
    /// Decisions, in order.
    pub notes: Vec<Note>,
    /// Notes that did not fit ([`MAX_NOTES`]).
    pub notes_dropped: u32,
}

/// Shared handle on a request's [`Trail`]; a request extension set by the
/// trace layer. Cloning is cheap.
#[derive(Debug, Clone, Default)]
pub struct DecisionTrail(Arc<Mutex<Trail>>);

impl DecisionTrail {
    /// An empty trail.
    pub fn new() -> Self {
        DecisionTrail::default()
    }

    fn lock(&self) -> MutexGuard<'_, Trail> {
        // A poisoned trail still holds usable notes: keep going.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a decision. `kind` is a short label (`rate_limit`,
    /// `tenancy`, `oauth`, `retry`); `text` says what was decided and must not
    /// contain secrets.
    pub fn note(&self, kind: &'static str, text: impl Into<Cow<'static, str>>) {
        let text = bounded(text.into());
        let mut t = self.lock();
        if t.notes.len() < MAX_NOTES {
            t.notes.push(Note { kind, text });
        } else {
            t.notes_dropped = t.notes_dropped.saturating_add(1);
        }
    }

    /// Records the matched route (set by the gateway's own stack).
    pub fn set_route(&self, m: &RouteMatch) {
        self.lock().route = Some(RouteRef {
            policy: m.policy.clone(),
            index: m.route,
        });
    }

    /// Records the authenticated caller (set by the gateway's own stack).
    pub fn set_caller(&self, c: &Caller) {
        self.lock().caller = Some(c.identity.clone());
    }

    /// Records the route and caller when known (one lock for both).
    pub fn observe(&self, route: Option<&RouteMatch>, caller: Option<&Caller>) {
        if route.is_none() && caller.is_none() {
            return;
        }
        let mut t = self.lock();
        if let Some(m) = route {
            t.route = Some(RouteRef {
                policy: m.policy.clone(),
                index: m.route,
            });
        }
        if let Some(c) = caller {
            t.caller = Some(c.identity.clone());
        }
    }

    /// Records the `Zuora-Entity-Ids` sent upstream.
    pub fn set_entity_ids(&self, v: &HeaderValue) {
        self.lock().entity_ids = Some(v.clone());
    }

    /// Records one upstream call's outcome (called once per attempt; the
    /// latest status and request ID win, latencies add up).
    pub fn record_upstream(
        &self,
        status: Option<u16>,
        request_id: Option<&HeaderValue>,
        latency: Duration,
    ) {
        let mut t = self.lock();
        let u = t.upstream.get_or_insert_with(UpstreamFacts::default);
        u.status = status;
        if let Some(id) = request_id {
            u.request_id = Some(id.clone());
        }
        u.latency += latency;
        u.attempts = u.attempts.saturating_add(1);
    }

    /// A copy of the trail so far.
    pub fn snapshot(&self) -> Trail {
        self.lock().clone()
    }

    /// Takes the trail out (leaving an empty one), at request completion.
    pub fn take(&self) -> Trail {
        std::mem::take(&mut *self.lock())
    }
}

/// Appends a note to `req`'s trail, if it has one.
pub fn note<B>(req: &http::Request<B>, kind: &'static str, text: impl Into<Cow<'static, str>>) {
    if let Some(t) = req.extensions().get::<DecisionTrail>() {
        t.note(kind, text);
    }
}

fn bounded(text: Cow<'static, str>) -> Cow<'static, str> {
    if text.len() <= MAX_NOTE_BYTES {
        return text;
    }
    let mut end = MAX_NOTE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(text[..end].to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_kept_in_order_and_bounded() {
        let t = DecisionTrail::new();
        t.note("rate_limit", "stop-per-job: allowed");
        t.note("tenancy", String::from("rule 1"));
        for _ in 0..100 {
            t.note("x", "y");
        }
        let trail = t.take();
        assert_eq!(trail.notes.len(), MAX_NOTES);
        assert_eq!(trail.notes[0].kind, "rate_limit");
        assert_eq!(trail.notes[1].text, "rule 1");
        assert_eq!(trail.notes_dropped, 102 - MAX_NOTES as u32);
        assert!(t.take().notes.is_empty(), "take leaves an empty trail");
    }

    #[test]
    fn long_notes_are_cut_at_a_char_boundary() {
        let t = DecisionTrail::new();
        t.note("x", "é".repeat(200));
        let text = &t.take().notes[0].text;
        assert!(text.len() <= MAX_NOTE_BYTES);
        assert!(text.chars().all(|c| c == 'é'));
    }

    #[test]
    fn upstream_attempts_accumulate() {
        let t = DecisionTrail::new();
        t.record_upstream(
            Some(401),
            Some(&HeaderValue::from_static("a")),
            Duration::from_millis(5),
        );
        t.record_upstream(Some(200), None, Duration::from_millis(7));
        let u = t.take().upstream.unwrap();
        assert_eq!(u.status, Some(200));
        assert_eq!(u.request_id.unwrap(), "a");
        assert_eq!(u.attempts, 2);
        assert_eq!(u.latency, Duration::from_millis(12));
    }

    #[test]
    fn note_helper_is_a_no_op_without_a_trail() {
        let req = http::Request::new(());
        note(&req, "x", "y");
    }
}
