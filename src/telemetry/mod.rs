//! Telemetry: structured logs (with the per-request access log), OpenTelemetry
//! traces exported over OTLP/HTTP, request metrics, and the `/debug/requests`
//! ring of decision trails — all keyed by the request's `Zuora-Track-Id`.
//!
//! Startup: [`Telemetry::init`] (inside the tokio runtime) installs the global
//! `tracing` subscriber — a fmt layer on stdout filtered by
//! `telemetry.log_level` / `RUST_LOG`, plus, only when an OTLP endpoint is
//! configured, the `tracing-opentelemetry` layer feeding the pipeline in
//! [`otel`]. The request path uses a [`Recorder`] (debug ring + metrics)
//! through [`crate::layers::track_id`] and [`crate::layers::trace`].
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
pub mod trail;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanExporter as _};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer as _, Registry as TracingRegistry};

pub use access::Recorder;
pub use debug::{DebugRing, debug_requests_response};
pub use trail::DecisionTrail;

use crate::config::{LogFormat, TelemetryConfig};

/// Timeout of one export request to the collector.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

static OTEL_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether OTLP export is on in this process (the trace layer builds full
/// spans only then; otherwise it does no OpenTelemetry work at all).
pub fn otel_active() -> bool {
    OTEL_ACTIVE.load(Ordering::Relaxed)
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
    /// The OTLP pipeline needs a tokio runtime.
    #[error("telemetry must be initialised inside the tokio runtime")]
    NoRuntime,
    /// A global subscriber is already installed.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Telemetry's own metrics.
#[derive(Debug, Clone, Default)]
pub struct TelemetryMetrics {
    /// Spans not exported: queue full, undecided-trace buffer full, or a
    /// failed export (`gateway_spans_dropped_total`).
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
    provider: SdkTracerProvider,
    queue: mpsc::Sender<otel::Msg>,
    worker: tokio::task::JoinHandle<()>,
    endpoint: String,
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
        let (otel, otel_layer) = match endpoint {
            None => (None, None),
            Some(endpoint) => {
                let (pipeline, tracer) = build_pipeline(cfg, endpoint, &metrics)?;
                (Some(pipeline), Some(otel_layer(tracer)))
            }
        };
        // JSON access lines get their own writer unless `access` is filtered out.
        let access_json = cfg.log_format == LogFormat::Json && access_enabled(&directives);
        let subscriber = TracingRegistry::default().with(fmt).with(otel_layer);
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|_| TelemetryError::AlreadyInstalled)?;
        if access_json {
            access::install_json_writer();
        }
        OTEL_ACTIVE.store(otel.is_some(), Ordering::Relaxed);
        if let Some(o) = &otel {
            tracing::info!(endpoint = %o.endpoint, ratio = cfg.sampling_ratio, "exporting traces over OTLP/HTTP");
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
        let (ack, done) = oneshot::channel();
        let flushed = tokio::time::timeout(timeout, async {
            if o.queue.send(otel::Msg::Flush(ack)).await.is_ok() {
                let _ = done.await;
            }
        })
        .await;
        if flushed.is_err() {
            tracing::warn!("span export did not finish before shutdown; remaining spans dropped");
        }
        o.worker.abort();
        let _ = o.provider.shutdown();
    }
}

/// The `tracing` → OpenTelemetry bridge: the gateway's own spans become
/// OTel spans and its INFO+ events inside them become span events.
fn otel_layer<S>(tracer: SdkTracer) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        // Only the gateway's own spans and events, INFO and up, plus the
        // DEBUG events of the Zuora call (retries) and the 401 token replay.
        .with_filter(
            Targets::new()
                .with_target("zuora_gateway", LevelFilter::INFO)
                .with_target("zuora_gateway::upstream::forward", LevelFilter::DEBUG)
                .with_target("zuora_gateway::layers::token", LevelFilter::DEBUG),
        )
}

fn build_pipeline(
    cfg: &TelemetryConfig,
    endpoint: String,
    metrics: &TelemetryMetrics,
) -> Result<(OtelPipeline, SdkTracer), TelemetryError> {
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};

    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    let err = |message: String| TelemetryError::Exporter {
        endpoint: endpoint.clone(),
        message,
    };
    let tls = crate::upstream::client::tls_config(None).map_err(err)?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = opentelemetry_http::hyper::HyperClient::new(connector, EXPORT_TIMEOUT, None);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let resource = Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .build();
    exporter.set_resource(&resource);

    let capacity = cfg.export_queue.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let processor = otel::GatewayProcessor::new(
        cfg.sampling_ratio,
        capacity,
        tx.clone(),
        metrics.spans_dropped.clone(),
    );
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("zuora-gateway");
    let worker = tokio::spawn(otel::run_worker(
        exporter,
        rx,
        otel::BatchConfig::from_env(),
        otel::WorkerMetrics {
            dropped: metrics.spans_dropped.clone(),
            exported: metrics.spans_exported.clone(),
        },
    ));
    Ok((
        OtelPipeline {
            provider,
            queue: tx,
            worker,
            endpoint,
        },
        tracer,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn events_inside_a_request_span_become_span_events_and_children_link() {
        let (tx, mut rx) = mpsc::channel(16);
        let processor = otel::GatewayProcessor::new(1.0, 16, tx, Counter::default());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        let subscriber = TracingRegistry::default().with(otel_layer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", otel.kind = "server");
            let _entered = span.enter();
            tracing::info!(limit = "stop-per-job", "rate limit: denied");
            tracing::debug!("below INFO: not exported");
            // What the token cache does when it fetches inside a request.
            let fetch = tracing::info_span!("zuora.token_fetch");
            drop(fetch.enter());
        });
        let mut spans = Vec::new();
        while let Ok(otel::Msg::Span(s)) = rx.try_recv() {
            spans.push(*s);
        }
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let fetch = spans
            .iter()
            .find(|s| s.name == "zuora.token_fetch")
            .unwrap();
        let request = spans.iter().find(|s| s.name == "request").unwrap();
        assert_eq!(fetch.parent_span_id, request.span_context.span_id());
        assert_eq!(
            fetch.span_context.trace_id(),
            request.span_context.trace_id()
        );
        let events: Vec<_> = request.events.iter().map(|e| e.name.to_string()).collect();
        assert_eq!(events, ["rate limit: denied"]);
    }

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
