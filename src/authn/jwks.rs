//! A JWKS document as a key source: fetched at startup, refreshed every
//! `jwks_refresh` in the background, and re-fetched when a token names an
//! unknown `kid` — at most once per [`MISS_FETCH_INTERVAL`], with concurrent
//! misses coalesced into one fetch. The last good key set is kept while the
//! endpoint is down or serves nothing usable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use jsonwebtoken::jwk::Jwk;

use super::cache::TokenCache;
use super::keys::{ClaimRules, VerifyKey};
use crate::upstream::client::{HttpClient, https_client, tls_config};

/// Fewest time between two fetches caused by unknown key IDs.
pub const MISS_FETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Whole-fetch timeout (connect, headers and body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The key set behind `callers.jwt.jwks_url`.
pub(crate) struct JwksSource {
    url: Uri,
    client: HttpClient,
    rules: ClaimRules,
    keys: ArcSwap<Vec<Arc<VerifyKey>>>,
    /// Bumped after every completed fetch attempt (success or not).
    generation: AtomicU64,
    /// Serialises fetches; waiters re-check `generation` instead of fetching again.
    fetch_lock: tokio::sync::Mutex<()>,
    last_miss_fetch: Mutex<Option<Instant>>,
    miss_interval: Duration,
    refresh_every: Duration,
    refresher_started: AtomicBool,
    loaded: AtomicBool,
    cache: Arc<TokenCache>,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("url", &self.url)
            .field("keys", &self.keys.load().len())
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl JwksSource {
    pub(crate) fn new(
        url: Uri,
        ca_pem: Option<&[u8]>,
        refresh_every: Duration,
        rules: ClaimRules,
        cache: Arc<TokenCache>,
    ) -> Result<Self, String> {
        let tls = tls_config(ca_pem).map_err(|e| format!("callers.jwt.jwks_ca_file: {e}"))?;
        let client = https_client(tls, Duration::from_secs(5), Duration::from_secs(30), 4);
        Ok(JwksSource {
            url,
            client,
            rules,
            keys: ArcSwap::from_pointee(Vec::new()),
            generation: AtomicU64::new(0),
            fetch_lock: tokio::sync::Mutex::new(()),
            last_miss_fetch: Mutex::new(None),
            miss_interval: MISS_FETCH_INTERVAL,
            refresh_every,
            refresher_started: AtomicBool::new(false),
            loaded: AtomicBool::new(false),
            cache,
        })
    }

    /// The current key set.
    pub(crate) fn keys(&self) -> Arc<Vec<Arc<VerifyKey>>> {
        self.keys.load_full()
    }

    /// Completed fetch attempts so far.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a key set was ever fetched successfully.
    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Fetches now (waiting for a fetch in progress instead of starting a
    /// second one). Returns the number of usable keys, or why it failed.
    pub(crate) async fn refresh(&self) -> Result<usize, String> {
        self.refresh_since(self.generation()).await
    }

    /// Like [`JwksSource::refresh`], unless a fetch completed after generation `seen`.
    pub(crate) async fn refresh_since(&self, seen: u64) -> Result<usize, String> {
        let _guard = self.fetch_lock.lock().await;
        if self.generation() != seen {
            // Someone else fetched while we waited: that answer is as fresh as ours would be.
            return Ok(self.keys.load().len());
        }
        self.fetch_and_swap().await
    }

    /// Called when a token names a `kid` that is not in the set as of
    /// generation `seen`: fetches unless another fetch finished since, or a
    /// miss-triggered fetch ran within the last `miss_interval`.
    pub(crate) async fn refresh_after_miss(&self, seen: u64) {
        let _guard = self.fetch_lock.lock().await;
        if self.generation() != seen {
            return;
        }
        {
            let mut last = self
                .last_miss_fetch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < self.miss_interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        // Errors are logged inside; the caller re-checks the key set either way.
        let _ = self.fetch_and_swap().await;
    }

    /// Starts the background refresher once (no-op outside a tokio runtime).
    /// The task holds only a weak reference: it ends when the source is dropped
    /// (a reload that changed `callers:`).
    pub(crate) fn ensure_refresher(self: &Arc<Self>, fetch_first: bool) {
        // The common case, once per request: one atomic load.
        if self.refresher_started.load(Ordering::Acquire)
            || tokio::runtime::Handle::try_current().is_err()
        {
            return;
        }
        if self.refresher_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<JwksSource> = Arc::downgrade(self);
        let every = self.refresh_every;
        tokio::spawn(async move {
            if !fetch_first {
                tokio::time::sleep(every).await;
            }
            loop {
                let Some(source) = weak.upgrade() else { break };
                let _ = source.refresh().await;
                drop(source);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// One fetch; on success with at least one usable key the set is
    /// replaced. Always bumps the generation.
    async fn fetch_and_swap(&self) -> Result<usize, String> {
        let outcome = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
        };
        let result = match outcome {
            Ok(keys) if keys.is_empty() => {
                Err("the document holds no usable signing key".to_owned())
            }
            Ok(keys) => {
                let old = self.keys.load_full();
                let withdrawn = old.iter().any(|o| {
                    !keys
                        .iter()
                        .any(|n| n.kid == o.kid && n.alg == o.alg && n.key.kind_eq(&o.key))
                });
                let count = keys.len();
                self.keys.store(Arc::new(keys));
                if withdrawn {
                    // A token verified with a key that is gone must be verified again.
                    self.cache.clear();
                }
                self.loaded.store(true, Ordering::Release);
                tracing::info!(url = %self.url, keys = count, "JWKS loaded");
                Ok(count)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            tracing::warn!(
                url = %self.url,
                error = %e,
                kept = self.keys.load().len(),
                "JWKS fetch failed; keeping the last good key set"
            );
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }

    async fn fetch(&self) -> Result<Vec<Arc<VerifyKey>>, String> {
        let req = Request::get(self.url.clone())
            .header(header::ACCEPT, "application/json")
            .body(crate::body::empty())
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("HTTP status {}", resp.status()));
        }
        let body: Bytes = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the document failed: {e}"))?
            .to_bytes();
        Ok(parse_jwks(&body, &self.rules)?
            .into_iter()
            .map(Arc::new)
            .collect())
    }
}

/// Parses a JWKS document; entries that cannot be used are skipped (and
/// logged) rather than failing the whole set.
pub(crate) fn parse_jwks(body: &[u8], rules: &ClaimRules) -> Result<Vec<VerifyKey>, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut out = Vec::with_capacity(doc.keys.len());
    for (i, value) in doc.keys.into_iter().enumerate() {
        let kid = value
            .get("kid")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_owned();
        let built = serde_json::from_value::<Jwk>(value)
            .map_err(|e| format!("not a JWK: {e}"))
            .and_then(|jwk| VerifyKey::from_jwk(&jwk, rules));
        match built {
            Ok(k) => out.push(k),
            Err(why) => tracing::warn!(index = i, kid = %kid, reason = %why, "JWKS key skipped"),
        }
    }
    Ok(out)
}

trait KindEq {
    fn kind_eq(&self, other: &Self) -> bool;
}

impl KindEq for jsonwebtoken::DecodingKey {
    fn kind_eq(&self, other: &Self) -> bool {
        use jsonwebtoken::DecodingKeyKind as K;
        match (self.kind(), other.kind()) {
            (K::SecretOrDer(a), K::SecretOrDer(b)) => a == b,
            (K::RsaModulusExponent { n: n1, e: e1 }, K::RsaModulusExponent { n: n2, e: e2 }) => {
                n1 == n2 && e1 == e2
            }
            _ => false,
        }
    }
}
