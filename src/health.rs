//! Liveness and readiness facts, set by the parts that know them and read
//! by `/readyz`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared readiness state.
#[derive(Debug, Default)]
pub struct Health {
    config_loaded: AtomicBool,
    draining: AtomicBool,
    /// One flag per upstream: a usable Zuora token is held.
    tokens: BTreeMap<String, Arc<AtomicBool>>,
}

impl Health {
    /// Readiness for these upstreams (each starts without a token).
    pub fn new<'a>(upstreams: impl IntoIterator<Item = &'a String>) -> Self {
        Health {
            config_loaded: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            tokens: upstreams
                .into_iter()
                .map(|u| (u.clone(), Arc::new(AtomicBool::new(false))))
                .collect(),
        }
    }

    /// The flag the token cache of `upstream` sets while it holds a usable token.
    pub fn token_flag(&self, upstream: &str) -> Option<Arc<AtomicBool>> {
        self.tokens.get(upstream).cloned()
    }

    /// Marks the configuration loaded.
    pub fn set_config_loaded(&self) {
        self.config_loaded.store(true, Ordering::Release);
    }

    /// Marks the process as shutting down (readiness goes false at once).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ready to serve: config loaded, not draining, every upstream has a token.
    /// Returns the reasons when not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if !self.config_loaded.load(Ordering::Acquire) {
            reasons.push("configuration not loaded".to_owned());
        }
        if self.is_draining() {
            reasons.push("shutting down".to_owned());
        }
        for (name, flag) in &self.tokens {
            if !flag.load(Ordering::Acquire) {
                reasons.push(format!("no Zuora access token yet for upstream `{name}`"));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}
