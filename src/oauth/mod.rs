//! The Zuora OAuth token lifecycle: callers never see Zuora credentials; the
//! gateway holds them and keeps a valid bearer token ready.
//!
//! - [`TokenCache`] (one per upstream) obtains tokens with the
//!   client-credentials grant, refreshes them ahead of expiry in a background
//!   task, and hands the current token to requests without locking.
//! - Single flight: only the background task ever talks to the token
//!   endpoint, so however many requests arrive without a valid token, one
//!   token request is made and they all wait (a bounded time) for it.
//! - Failures are retried with jittered exponential backoff between 1 s and
//!   10 s (longer only when Zuora's `Retry-After` says so); a still-valid
//!   token keeps being used meanwhile.
//! - [`TokenCache::invalidate`] drops a token Zuora answered 401 to (only if
//!   it is still the current one, so a burst of 401s causes one refresh); the
//!   `token` layer ([`crate::layers::token`]) replays the request once.
//!
//! Token values and the client secret are [`crate::secret::Secret`]s: they
//! reach the token endpoint's form body and the `Authorization` header, and
//! nothing else (no log, metric, error message or span).

mod cache;
mod fetch;
mod metrics;
mod token;

pub use cache::TokenCache;
pub use metrics::OAuthMetrics;
pub use token::BearerToken;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod test_support;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
