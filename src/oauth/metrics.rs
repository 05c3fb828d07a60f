//! Token metrics: fetches by outcome, 401 recoveries, and the seconds left on
//! each upstream's current token (computed at scrape time).

use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwapOption;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::token::Issued;

/// Labels of `zuora_token_fetches`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FetchLabels {
    /// The upstream name.
    pub(crate) upstream: String,
    /// `success`, `connect_error`, `timeout`, `rate_limited`, `rejected`,
    /// `server_error` or `invalid_response`.
    pub(crate) outcome: &'static str,
}

/// Labels of `zuora_token_401_recoveries`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RecoveryLabels {
    /// The upstream name.
    pub(crate) upstream: String,
    /// `replayed` (sent again with a new token), `not_replayable` (body too
    /// large or streamed: the 401 was passed through) or `token_unavailable`
    /// (no new token in time: 503).
    pub(crate) outcome: &'static str,
}

/// The token metrics, registered once and shared by every [`super::TokenCache`].
#[derive(Clone, Debug)]
pub struct OAuthMetrics {
    pub(crate) fetches: Family<FetchLabels, Counter>,
    pub(crate) recoveries: Family<RecoveryLabels, Counter>,
    pub(crate) expiry: Arc<ExpiryCollector>,
}

impl OAuthMetrics {
    /// Registers `zuora_token_fetches_total{upstream,outcome}`,
    /// `zuora_token_401_recoveries_total{upstream,outcome}` and
    /// `zuora_token_expiry_seconds{upstream}`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = OAuthMetrics {
            fetches: Family::default(),
            recoveries: Family::default(),
            expiry: Arc::new(ExpiryCollector::default()),
        };
        registry.register(
            "zuora_token_fetches",
            "Zuora OAuth token requests, by upstream and outcome",
            m.fetches.clone(),
        );
        registry.register(
            "zuora_token_401_recoveries",
            "Zuora 401 answers handled by fetching a new token, by upstream and outcome",
            m.recoveries.clone(),
        );
        registry.register_collector(Box::new(m.expiry.clone()));
        m
    }

    /// Counts one 401 handled for `upstream`.
    pub(crate) fn recovery(&self, upstream: &str, outcome: &'static str) {
        self.recoveries
            .get_or_create(&RecoveryLabels {
                upstream: upstream.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Counts one token request for `upstream`.
    pub(crate) fn fetch(&self, upstream: &str, outcome: &'static str) {
        self.fetches
            .get_or_create(&FetchLabels {
                upstream: upstream.to_owned(),
                outcome,
            })
            .inc();
    }
}

/// Labels of `zuora_token_expiry_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

type Slot = Weak<ArcSwapOption<Issued>>;

/// Reads each cache's current token when scraped.
#[derive(Debug, Default)]
pub(crate) struct ExpiryCollector {
    // A std mutex: held only for a registration or one scrape, never across `.await`.
    caches: Mutex<Vec<(String, Slot)>>,
}

impl ExpiryCollector {
    /// Reports the token in `slot` as `upstream` (replacing an earlier cache of that name).
    pub(crate) fn watch(&self, upstream: &str, slot: Slot) {
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        caches.retain(|(name, s)| name != upstream && s.strong_count() > 0);
        caches.push((upstream.to_owned(), slot));
    }
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let mut metric = encoder.encode_descriptor(
            "zuora_token_expiry_seconds",
            "Seconds until the current Zuora token expires (0: none held), by upstream",
            None,
            MetricType::Gauge,
        )?;
        let now = Instant::now();
        for (upstream, slot) in caches.iter() {
            let Some(slot) = slot.upgrade() else { continue };
            let secs = slot.load().as_ref().map_or(0.0, |t| {
                t.schedule
                    .expires_at
                    .saturating_duration_since(now)
                    .as_secs_f64()
            });
            let labels = UpstreamLabels {
                upstream: upstream.clone(),
            };
            metric.encode_family(&labels)?.encode_gauge(&secs)?;
        }
        Ok(())
    }
}
