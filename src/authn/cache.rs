//! Verified tokens by SHA-256 of the token, kept until the token's `exp`, so
//! that a repeat caller costs one hash and one lookup instead of a signature
//! check. Bounded: when full, expired entries go first, then arbitrary ones.

use std::collections::HashMap;
use std::sync::Mutex;

use aws_lc_rs::digest;

use crate::context::Caller;

/// SHA-256 of a token.
pub(crate) type TokenHash = [u8; 32];

/// Hashes a token (the token itself is never stored).
pub(crate) fn token_hash(token: &str) -> TokenHash {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

struct Entry {
    caller: Caller,
    /// Unix seconds after which the entry is no longer served.
    exp: u64,
}

/// See the module docs.
pub(crate) struct TokenCache {
    capacity: usize,
    map: Mutex<HashMap<TokenHash, Entry>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl TokenCache {
    /// A cache of at most `capacity` tokens (0 disables caching).
    pub(crate) fn new(capacity: usize) -> Self {
        TokenCache {
            capacity,
            map: Mutex::new(HashMap::with_capacity(capacity.min(1024))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TokenHash, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The caller of a cached, unexpired token.
    pub(crate) fn get(&self, hash: &TokenHash, now: u64) -> Option<Caller> {
        if self.capacity == 0 {
            return None;
        }
        let mut map = self.lock();
        match map.get(hash) {
            Some(e) if now < e.exp => Some(e.caller.clone()),
            Some(_) => {
                map.remove(hash);
                None
            }
            None => None,
        }
    }

    /// Remembers a verified token until `exp` (ignored when already expired).
    pub(crate) fn insert(&self, hash: TokenHash, caller: Caller, exp: u64, now: u64) {
        if self.capacity == 0 || exp <= now {
            return;
        }
        let mut map = self.lock();
        if map.len() >= self.capacity && !map.contains_key(&hash) {
            map.retain(|_, e| now < e.exp);
            while map.len() >= self.capacity {
                let Some(victim) = map.keys().next().copied() else {
                    break;
                };
                map.remove(&victim);
            }
        }
        map.insert(hash, Entry { caller, exp });
    }

    /// Forgets every token (a key was withdrawn).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// Number of cached tokens.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_served_until_exp_only() {
        let c = TokenCache::new(10);
        let h = token_hash("a.b.c");
        c.insert(h, Caller::named("svc"), 100, 50);
        assert_eq!(&*c.get(&h, 99).unwrap().identity, "svc");
        assert!(c.get(&h, 100).is_none());
        assert_eq!(c.len(), 0, "an expired entry is dropped on lookup");
        c.insert(h, Caller::named("svc"), 100, 100);
        assert_eq!(c.len(), 0, "an already expired token is not cached");
    }

    #[test]
    fn the_cache_never_grows_beyond_its_capacity() {
        let c = TokenCache::new(3);
        for i in 0..10u64 {
            c.insert(
                token_hash(&i.to_string()),
                Caller::named("svc"),
                1000 + i,
                0,
            );
            assert!(c.len() <= 3);
        }
        assert!(
            c.get(&token_hash("9"), 1).is_some(),
            "the newest entry is kept"
        );
        // Expired entries are evicted before live ones.
        let c = TokenCache::new(2);
        c.insert(token_hash("old"), Caller::named("a"), 10, 0);
        c.insert(token_hash("live"), Caller::named("b"), 1000, 0);
        c.insert(token_hash("new"), Caller::named("c"), 1000, 20);
        assert!(c.get(&token_hash("live"), 21).is_some());
        assert!(c.get(&token_hash("new"), 21).is_some());
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let c = TokenCache::new(0);
        c.insert(token_hash("x"), Caller::named("a"), 1000, 0);
        assert!(c.get(&token_hash("x"), 1).is_none());
    }

    #[test]
    fn hashes_differ_for_different_tokens() {
        assert_ne!(token_hash("a.b.c"), token_hash("a.b.d"));
        assert_eq!(token_hash("a.b.c"), token_hash("a.b.c"));
    }
}
