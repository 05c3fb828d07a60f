//! One issued Zuora access token and the times that govern its use.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::secret::Secret;

/// Longest lifetime believed, whatever `expires_in` says (keeps the
/// `Instant` arithmetic far from overflow and a bogus answer from pinning a
/// token for years).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The most a token is considered unusable before its expiry.
const MAX_MARGIN: Duration = Duration::from_secs(5);

/// When a token expires, stops being handed out, and is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    /// When the token request was sent.
    pub(crate) issued_at: Instant,
    /// Zuora's expiry, counted from when the token request was sent.
    pub(crate) expires_at: Instant,
    /// Not handed to requests from here on (5 s or 10 % of the lifetime
    /// before expiry, whichever is less), so none reaches Zuora expired.
    pub(crate) usable_until: Instant,
    /// The background refresh starts here.
    pub(crate) refresh_at: Instant,
}

impl Schedule {
    /// The schedule of a token requested at `sent_at` that lives `lifetime`.
    /// `refresh_before` (config) is clamped to at most half the lifetime and
    /// at least twice the safety margin, so the refresh always starts while
    /// the old token is still handed out.
    pub(crate) fn new(sent_at: Instant, lifetime: Duration, refresh_before: Duration) -> Schedule {
        let lifetime = lifetime.min(MAX_LIFETIME);
        let margin = (lifetime / 10).min(MAX_MARGIN);
        let refresh_before = refresh_before.min(lifetime / 2).max(margin * 2);
        let expires_at = sent_at + lifetime;
        Schedule {
            issued_at: sent_at,
            expires_at,
            usable_until: expires_at - margin,
            refresh_at: expires_at - refresh_before,
        }
    }
}

/// The shared state of one issued token.
pub(crate) struct Issued {
    pub(crate) value: Secret,
    /// `Bearer <token>`, marked sensitive, built once.
    pub(crate) header: HeaderValue,
    pub(crate) generation: u64,
    pub(crate) schedule: Schedule,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("generation", &self.generation)
            .field("value", &self.value)
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// Whether requests may still use the token at `now`.
    pub(crate) fn usable_at(&self, now: Instant) -> bool {
        now < self.schedule.usable_until
    }
}

/// A Zuora bearer token handed to a request: cheap to clone (one `Arc`),
/// never printed (its `Debug` shows only the generation and expiry).
#[derive(Clone)]
pub struct BearerToken(pub(crate) Arc<Issued>);

impl BearerToken {
    /// The `Authorization` header value, `Bearer <token>`, marked sensitive
    /// (HPACK never indexes it; `Debug` hides it). No allocation.
    pub fn header_value(&self) -> HeaderValue {
        self.0.header.clone()
    }

    /// The token itself.
    pub fn secret(&self) -> &Secret {
        &self.0.value
    }

    /// When Zuora considers the token expired.
    pub fn expires_at(&self) -> Instant {
        self.0.schedule.expires_at
    }

    /// Which fetch produced this token (1 for the first, counting up).
    pub fn generation(&self) -> u64 {
        self.0.generation
    }

    /// Whether this is the same issued token as `other`.
    pub fn same_as(&self, other: &BearerToken) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken")
            .field("generation", &self.0.generation)
            .field(
                "expires_in",
                &self
                    .0
                    .schedule
                    .expires_at
                    .saturating_duration_since(Instant::now()),
            )
            .field("value", &self.0.value)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hour_token_is_refreshed_at_the_configured_lead_and_unusable_5s_before_expiry() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, Duration::from_secs(3600), Duration::from_secs(300));
        assert_eq!(s.expires_at - t0, Duration::from_secs(3600));
        assert_eq!(s.usable_until - t0, Duration::from_secs(3595));
        assert_eq!(s.refresh_at - t0, Duration::from_secs(3300));
    }

    #[test]
    fn refresh_lead_is_clamped_to_half_the_lifetime() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, Duration::from_secs(4), Duration::from_secs(300));
        assert_eq!(s.refresh_at - t0, Duration::from_secs(2));
        assert_eq!(s.usable_until - t0, Duration::from_millis(3600));
    }

    #[test]
    fn refresh_always_starts_before_the_token_stops_being_usable() {
        let t0 = Instant::now();
        for (life, lead) in [(3600, 0), (4, 0), (1, 0), (60, 1), (10, 100)] {
            let s = Schedule::new(t0, Duration::from_secs(life), Duration::from_secs(lead));
            assert!(
                s.refresh_at < s.usable_until,
                "lifetime {life}, lead {lead}"
            );
            assert!(s.usable_until < s.expires_at);
        }
    }

    #[test]
    fn absurd_lifetimes_are_capped_without_overflow() {
        let t0 = Instant::now();
        let s = Schedule::new(
            t0,
            Duration::from_secs(u64::MAX / 4),
            Duration::from_secs(300),
        );
        assert_eq!(s.expires_at - t0, MAX_LIFETIME);
    }
}
