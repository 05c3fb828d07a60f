//! Telemetry: structured logs (with the per-request access log), OpenTelemetry
//! traces exported over OTLP/HTTP, request metrics, and the `/debug/requests`
//! ring of decision trails — all keyed by the request's `Zuora-Track-Id`.
//!
//! Startup: [`Telemetry::init`] installs the global `tracing` subscriber — a
//! fmt layer on stdout filtered by `telemetry.log_level` / `RUST_LOG`, plus,
//! only when an OTLP endpoint is configured, the [`otel::CaptureLayer`] and
//! the export thread of [`otlp`]. The request path uses a [`Recorder`]
//! (debug ring + metrics) through [`crate::layers::track_id`] and
//! [`crate::layers::trace`]; the trace layer also keeps the few facts a span
//! needs and builds spans only for traces that are exported (see [`otel`]).
//!
//! Hooks for other modules:
//! - [`DecisionTrail`] (request extension): `trail.note("rate_limit", "…")`.
//! - Spans and events: any `tracing` span opened inside a request (for
//!   example `tracing::info_span!("zuora.token_fetch")`) becomes a child span
//!   of the request's trace, and INFO+ events inside it become span events,
//!   when OTLP export is on.
//! - [`upstream::CallTrace`]: the span and trail entry of a Zuora call.

pub mod access;
pub mod debug;
pub mod otel;
pub mod otlp;
pub mod trail;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer as _, Registry as TracingRegistry};

pub use access::Recorder;
pub use debug::{DebugRing, debug_requests_response};
pub use trail::DecisionTrail;

use crate::config::{LogFormat, TelemetryConfig};

/// Whether OTLP export is on in this process (the trace layer keeps span
/// facts only then; otherwise it does no OpenTelemetry work at all).
pub fn otel_active() -> bool {
    otel::installed().is_some()
}

/// Failures setting up telemetry (the process should refuse to start).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` or `telemetry.log_level` is not a valid filter.
    #[error("invalid log filter `{filter}`: {message}")]
    Filter {
        /// The filter text.
        filter: String,
        /// The parser's complaint.
        message: String,
    },
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter for `{endpoint}`: {message}")]
    Exporter {
        /// The traces URL.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// A global subscriber is already installed.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Telemetry's own metrics.
#[derive(Debug, Clone, Default)]
pub struct TelemetryMetrics {
    /// Spans meant for export but not exported: queue full, more child
    /// spans than a trace keeps, or a failed export
    /// (`gateway_spans_dropped_total`).
    pub spans_dropped: Counter,
    /// Spans accepted by the collector (`gateway_spans_exported_total`).
    pub spans_exported: Counter,
}

impl TelemetryMetrics {
    /// Registers the span counters (they may already be counting).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gateway_spans_dropped",
            "Spans dropped: export queue full, collector slow or down",
            self.spans_dropped.clone(),
        );
        registry.register(
            "gateway_spans_exported",
            "Spans accepted by the OTLP collector",
            self.spans_exported.clone(),
        );
    }
}

struct OtelPipeline {
    exporter: otel::Exporter,
    endpoint: String,
    /// Invalid `OTEL_EXPORTER_OTLP_*HEADERS` entries (warned once installed).
    skipped_headers: usize,
}

/// The installed telemetry: debug ring, metrics, and the OTLP pipeline when on.
pub struct Telemetry {
    ring: Arc<DebugRing>,
    metrics: TelemetryMetrics,
    otel: Option<OtelPipeline>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("debug_requests", &self.ring.capacity())
            .field(
                "otlp_traces_endpoint",
                &self.otel.as_ref().map(|o| o.endpoint.as_str()),
            )
            .finish()
    }
}

/// The log filter: `RUST_LOG` when set, else `telemetry.log_level`; the
/// access log stays on at `info` unless the filter names `access` itself.
pub fn log_filter_directives(log_level: &str, rust_log: Option<&str>) -> String {
    let base = rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(log_level);
    if base
        .split(',')
        .any(|d| d.trim_start().starts_with("access"))
    {
        base.to_owned()
    } else if base.trim().is_empty() {
        "access=info".to_owned()
    } else {
        format!("{base},access=info")
    }
}

/// Whether `directives` let INFO events of target `access` through (asked of
/// a throwaway subscriber, before the global one is installed).
fn access_enabled(directives: &str) -> bool {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(directives)
        .is_ok_and(|filter| {
            let probe = TracingRegistry::default().with(filter);
            tracing::subscriber::with_default(
                probe,
                || tracing::enabled!(target: "access", tracing::Level::INFO),
            )
        })
}

impl Telemetry {
    /// Installs the global subscriber and, when an endpoint is configured
    /// (`telemetry.otlp_endpoint` or the `OTEL_EXPORTER_OTLP_*` variables),
    /// the OTLP pipeline. Call once, inside the tokio runtime; register the
    /// span counters with [`Telemetry::register_metrics`].
    pub fn init(cfg: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        let rust_log = std::env::var("RUST_LOG").ok();
        let directives = log_filter_directives(&cfg.log_level, rust_log.as_deref());
        let filter = EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .parse(&directives)
            .map_err(|e| TelemetryError::Filter {
                filter: directives.clone(),
                message: e.to_string(),
            })?;
        let fmt = match cfg.log_format {
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stdout)
                .boxed(),
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .with_writer(std::io::stdout)
                .boxed(),
        }
        .with_filter(filter);

        let metrics = TelemetryMetrics::default();
        let endpoint =
            otel::resolve_traces_endpoint(cfg.otlp_endpoint.as_ref(), |k| std::env::var(k).ok());
        let (otel, capture) = match endpoint {
            None => (None, None),
            Some(endpoint) => {
                let pipeline = build_pipeline(cfg, endpoint, &metrics)?;
                let capture = capture_layer(pipeline.exporter.clone());
                (Some(pipeline), Some(capture))
            }
        };
        let skipped_headers = otel.as_ref().map_or(0, |o| o.skipped_headers);
        // JSON access lines get their own writer unless `access` is filtered out.
        let access_json = cfg.log_format == LogFormat::Json && access_enabled(&directives);
        let subscriber = TracingRegistry::default().with(fmt).with(capture);
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|_| TelemetryError::AlreadyInstalled)?;
        if access_json {
            access::install_json_writer();
        }
        if let Some(o) = &otel {
            if !otel::install(o.exporter.clone()) {
                return Err(TelemetryError::AlreadyInstalled);
            }
            tracing::info!(endpoint = %o.endpoint, ratio = cfg.sampling_ratio, "exporting traces over OTLP/HTTP");
            if skipped_headers > 0 {
                // Never the values: they are usually API keys.
                tracing::warn!(
                    skipped = skipped_headers,
                    "invalid OTEL_EXPORTER_OTLP_*HEADERS entries ignored"
                );
            }
        }
        Ok(Telemetry {
            ring: Arc::new(DebugRing::new(cfg.debug_requests)),
            metrics,
            otel,
        })
    }

    /// Telemetry without a global subscriber or OTLP export (in-process
    /// tests, tools): the debug ring and the span counters only.
    pub fn detached(cfg: &TelemetryConfig) -> Telemetry {
        Telemetry {
            ring: Arc::new(DebugRing::new(cfg.debug_requests)),
            metrics: TelemetryMetrics::default(),
            otel: None,
        }
    }

    /// The debug ring (for the admin `/debug/requests` handler).
    pub fn debug_ring(&self) -> Arc<DebugRing> {
        self.ring.clone()
    }

    /// The recorder the track-ID and trace layers share.
    pub fn recorder(&self, metrics: Option<crate::metrics::RequestMetrics>) -> Arc<Recorder> {
        Arc::new(Recorder::new(self.ring.clone(), metrics))
    }

    /// Telemetry's own metrics.
    pub fn metrics(&self) -> &TelemetryMetrics {
        &self.metrics
    }

    /// Registers telemetry's own metrics (`gateway_spans_*`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    /// The traces URL when OTLP export is on.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otel.as_ref().map(|o| o.endpoint.as_str())
    }

    /// Exports what is queued (waiting at most `timeout`), then stops the
    /// pipeline. Call after the server has drained.
    pub async fn shutdown(self, timeout: Duration) {
        // Access-log lines still queued for stdout go out first.
        access::flush(timeout).await;
        let Some(o) = self.otel else { return };
        let done = o.exporter.flush();
        if tokio::time::timeout(timeout, done).await.is_err() {
            tracing::warn!("span export did not finish before shutdown; remaining spans dropped");
        }
        o.exporter.stop();
    }
}

/// The `tracing` → span bridge: the gateway's own INFO+ spans and events,
/// plus the DEBUG events of the Zuora call (retries) and the 401 token replay.
fn capture_layer<S>(exporter: otel::Exporter) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    otel::CaptureLayer::new(exporter).with_filter(otel::capture_filter())
}

/// The exporter and its thread.
fn build_pipeline(
    cfg: &TelemetryConfig,
    endpoint: String,
    metrics: &TelemetryMetrics,
) -> Result<OtelPipeline, TelemetryError> {
    let err = |message: String| TelemetryError::Exporter {
        endpoint: endpoint.clone(),
        message,
    };
    let env = |k: &str| std::env::var(k).ok();
    let (headers, skipped_headers) = otlp::export_headers(env);
    let sink = otlp::HttpSink::new(&endpoint, headers).map_err(err)?;
    let (exporter, queue) = otel::Exporter::new(
        cfg.sampling_ratio,
        cfg.export_queue.max(1),
        metrics.spans_dropped.clone(),
    );
    otlp::spawn(
        queue,
        sink,
        otlp::resource_attributes(&cfg.service_name, env),
        otel::BatchConfig::from_env(),
        otlp::WorkerMetrics {
            dropped: metrics.spans_dropped.clone(),
            exported: metrics.spans_exported.clone(),
        },
    )
    .map_err(|e| err(format!("cannot start the export thread: {e}")))?;
    Ok(OtelPipeline {
        exporter,
        endpoint,
        skipped_headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_target_is_probed_from_the_filter() {
        assert!(access_enabled(&log_filter_directives("warn", None)));
        assert!(access_enabled(&log_filter_directives("info", Some("off"))));
        assert!(!access_enabled(&log_filter_directives(
            "info",
            Some("warn,access=off")
        )));
        assert!(!access_enabled("access=warn"));
    }

    #[test]
    fn access_log_stays_on_unless_named() {
        assert_eq!(log_filter_directives("info", None), "info,access=info");
        assert_eq!(
            log_filter_directives("info", Some("warn")),
            "warn,access=info"
        );
        assert_eq!(
            log_filter_directives("info", Some("  ")),
            "info,access=info"
        );
        assert_eq!(
            log_filter_directives("info", Some("warn,access=off")),
            "warn,access=off"
        );
    }
}
