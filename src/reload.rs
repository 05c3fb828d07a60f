//! Hot reload of the configuration.
//!
//! SIGHUP, or a change to the config file (debounced by [`DEBOUNCE`]),
//! re-reads and validates the file. On success the newly compiled [`Policy`]
//! is swapped into the shared `ArcSwap` the route layer reads; requests in
//! flight finish under the policy they were routed with (their
//! [`RouteMatch`](crate::context::RouteMatch) holds it). On failure the old
//! policy stays, the error is logged with its key path, and
//! `gateway_config_reloads_total{outcome="failure"}` counts it.
//!
//! Routes, caller authentication, tenancy, validation and rate-limit
//! definitions take effect on reload; listeners, upstreams, Redis and
//! telemetry do not (a warning names what changed and needs a restart).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::policy::Policy;

/// Quiet time after the last file event before the file is re-read.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// Labels of `gateway_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `failure`.
    pub outcome: String,
}

/// Reload counters.
#[derive(Clone, Debug, Default)]
pub struct ReloadMetrics {
    /// Reloads by outcome.
    pub reloads: Family<ReloadLabels, Counter>,
}

impl ReloadMetrics {
    /// Registers `gateway_config_reloads_total{outcome}`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = ReloadMetrics::default();
        registry.register(
            "gateway_config_reloads",
            "Configuration reloads, by outcome (success or failure)",
            m.reloads.clone(),
        );
        m
    }

    fn count(&self, outcome: &str) {
        self.reloads
            .get_or_create(&ReloadLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Reloads counted with `outcome`.
    pub fn get(&self, outcome: &str) -> u64 {
        self.reloads
            .get_or_create(&ReloadLabels {
                outcome: outcome.to_owned(),
            })
            .get()
    }
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is unreadable or invalid (carries the key path).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The configuration is valid but could not be compiled.
    #[error("{0}")]
    Compile(String),
}

/// Called with every newly installed policy (e.g. to resize rate-limit state).
pub type ReloadHook = Box<dyn Fn(&Arc<Policy>) + Send + Sync>;

/// Re-reads the config file into the shared policy. See the module docs.
pub struct Reloader {
    path: PathBuf,
    policy: Arc<ArcSwap<Policy>>,
    metrics: ReloadMetrics,
    hooks: Vec<ReloadHook>,
    /// SHA-256 of the file as last read, so file events that do not change it are ignored.
    last_digest: Mutex<Option<[u8; 32]>>,
    watch: bool,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .field("hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Reloads `path` into `policy`.
    pub fn new(path: impl Into<PathBuf>, policy: Arc<ArcSwap<Policy>>) -> Self {
        let path = path.into();
        let last_digest = Mutex::new(file_digest(&path));
        Reloader {
            path,
            policy,
            metrics: ReloadMetrics::default(),
            hooks: Vec::new(),
            last_digest,
            watch: true,
        }
    }

    /// Counts reloads in `metrics` (see [`ReloadMetrics::new`]).
    pub fn with_metrics(mut self, metrics: ReloadMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Calls `hook` after each successful reload, with the new policy.
    pub fn on_reload(mut self, hook: impl Fn(&Arc<Policy>) + Send + Sync + 'static) -> Self {
        self.hooks.push(Box::new(hook));
        self
    }

    /// Whether changes to the file trigger a reload (default: yes; SIGHUP always does).
    pub fn watch_file(mut self, watch: bool) -> Self {
        self.watch = watch;
        self
    }

    /// The reload counters.
    pub fn metrics(&self) -> &ReloadMetrics {
        &self.metrics
    }

    /// Re-reads, validates and installs the configuration now. `trigger`
    /// names the cause in logs.
    pub async fn reload(&self, trigger: &str) -> Result<Arc<Policy>, ReloadError> {
        match self.try_reload().await {
            Ok(policy) => {
                self.metrics.count("success");
                tracing::info!(
                    trigger,
                    file = %self.path.display(),
                    routes = policy.config.routes.len(),
                    "configuration reloaded"
                );
                Ok(policy)
            }
            Err(e) => {
                self.metrics.count("failure");
                match &e {
                    ReloadError::Config(c) => tracing::error!(
                        trigger,
                        file = %c.file.display(),
                        key = %c.path,
                        error = %c.message,
                        "configuration reload failed; keeping the current configuration"
                    ),
                    ReloadError::Compile(msg) => tracing::error!(
                        trigger,
                        file = %self.path.display(),
                        error = %msg,
                        "configuration reload failed; keeping the current configuration"
                    ),
                }
                Err(e)
            }
        }
    }

    async fn try_reload(&self) -> Result<Arc<Policy>, ReloadError> {
        let path = self.path.clone();
        // Reading the file (and any `${file:…}` it references) is blocking I/O.
        let (config, digest) = tokio::task::spawn_blocking(move || {
            let digest = file_digest(&path);
            Config::load(&path).map(|c| (c, digest))
        })
        .await
        .map_err(|e| ReloadError::Compile(format!("the reload task failed: {e}")))??;
        let old = self.policy.load_full();
        let new = Arc::new(
            Policy::try_compile(Arc::new(config), Some(&old)).map_err(ReloadError::Compile)?,
        );
        if !Arc::ptr_eq(&new.authn, &old.authn) {
            // New caller keys: load the JWKS before the first request needs it.
            new.authn.start().await;
        }
        let restart = needs_restart(&old.config, &new.config);
        if !restart.is_empty() {
            tracing::warn!(
                changed = %restart.join(", "),
                "these settings changed but are only applied at restart; the rest of the new configuration is in effect"
            );
        }
        self.policy.store(new.clone());
        *self
            .last_digest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = digest;
        for hook in &self.hooks {
            hook(&new);
        }
        Ok(new)
    }

    /// Whether the file differs from what was last read (or cannot be read).
    fn file_changed(&self) -> bool {
        let now = file_digest(&self.path);
        let last = self
            .last_digest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        now.is_none() || now != *last
    }

    /// Runs until `shutdown` completes: reloads on SIGHUP and on changes
    /// to the config file. Must be called inside the runtime; the SIGHUP
    /// handler is installed before this returns.
    pub fn spawn(self, shutdown: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
        let this = Arc::new(self);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload on SIGHUP is off");
                None
            }
        };
        let (tx, mut changes) = mpsc::channel::<()>(1);
        let watcher = if this.watch {
            watch_file(&this.path, tx)
        } else {
            None
        };
        tokio::spawn(async move {
            // Kept alive for as long as this task runs.
            let _watcher = watcher;
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    Some(()) = async {
                        match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        let _ = this.reload("SIGHUP").await;
                    }
                    Some(()) = changes.recv() => {
                        // Debounce: editors and config-map updates write in several steps.
                        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, changes.recv()).await {}
                        let check = this.clone();
                        let changed = tokio::task::spawn_blocking(move || check.file_changed()).await.unwrap_or(true);
                        if changed {
                            let _ = this.reload("file change").await;
                        }
                    }
                }
            }
        })
    }
}

fn file_digest(path: &Path) -> Option<[u8; 32]> {
    let bytes = std::fs::read(path).ok()?;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Some(out)
}

/// Watches the file's directory (editors and Kubernetes replace files by
/// rename or symlink swap) and signals `tx` on events that touch the file.
fn watch_file(path: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let name = path.file_name()?.to_owned();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|f| f == name.as_os_str() || f.to_string_lossy().starts_with(".."))
        });
        if relevant {
            // A full channel already holds a pending change: dropping this one is fine.
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload on file change is off (SIGHUP still works)");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; reload on file change is off");
        return None;
    }
    Some(watcher)
}

/// The settings that differ between `old` and `new` but are only applied at
/// startup.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (&old.server, &new.server);
    macro_rules! server_fields {
        ($($f:ident),*) => {
            $( if a.$f != b.$f { out.push(concat!("server.", stringify!($f)).to_owned()); } )*
        };
    }
    server_fields!(
        listen,
        admin_listen,
        shutdown_grace,
        header_read_timeout,
        max_connections,
        max_in_flight,
        max_header_count,
        max_header_bytes,
        max_uri_bytes,
        http2_max_concurrent_streams,
        worker_threads,
        work_stealing
    );
    for (name, up) in &old.upstreams {
        match new.upstreams.get(name) {
            None => out.push(format!("upstreams.{name} (removed)")),
            Some(n) => {
                let same = format!("{up:?}") == format!("{n:?}")
                    && up.oauth.client_id == n.oauth.client_id
                    && up.oauth.client_secret == n.oauth.client_secret;
                if !same {
                    out.push(format!("upstreams.{name}"));
                }
            }
        }
    }
    for name in new.upstreams.keys() {
        if !old.upstreams.contains_key(name) {
            out.push(format!("upstreams.{name} (added)"));
        }
    }
    // `redis:` is applied by the rate limiter on reload (it reconnects), so it is not listed.
    if format!("{:?}", old.telemetry) != format!("{:?}", new.telemetry) {
        out.push("telemetry".to_owned());
    }
    out
}
