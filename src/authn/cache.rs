//! Verified tokens, kept until the token's `exp`, so that a repeat caller
//! costs one fast hash, one shared read lock and one comparison instead of a
//! signature check. Bounded: when full, expired entries go first, then
//! arbitrary ones.
//!
//! Entries are found by a keyed 64-bit hash of the token (its length and its
//! tail, the signature) and served only if the whole token is byte-for-byte
//! the one that was verified: the hash picks the slot, the comparison decides. A collision (two verified tokens with one
//! hash) costs the older one a re-verification, never a wrong caller.
//!
//! The map is split into shards, each behind a [`RwLock`]: a hit takes only a
//! read lock, so concurrent requests never wait for each other; only inserts
//! (after a signature check) and the rare removal of an expired entry write.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::context::Caller;

/// Caches smaller than this many entries per shard use one shard, so that
/// small capacities keep exact "newest entries win" eviction.
const MIN_PER_SHARD: usize = 256;
/// At most this many shards (a power of two).
const MAX_SHARDS: usize = 16;

struct Entry {
    /// The verified token. Hits compare against it in full.
    token: Box<str>,
    caller: Caller,
    /// Unix seconds after which the entry is no longer served.
    exp: u64,
}

type Shard = HashMap<u64, Entry, BuildHasherDefault<PassThrough>>;

/// See the module docs.
pub(crate) struct TokenCache {
    capacity: usize,
    per_shard: usize,
    hasher: TokenHasher,
    shards: Box<[RwLock<Shard>]>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("capacity", &self.capacity)
            .field("shards", &self.shards.len())
            .field("len", &self.len())
            .finish()
    }
}

impl TokenCache {
    /// A cache of at most `capacity` tokens (0 disables caching).
    pub(crate) fn new(capacity: usize) -> Self {
        let shards = (capacity / MIN_PER_SHARD)
            .clamp(1, MAX_SHARDS)
            .next_power_of_two()
            .min(MAX_SHARDS);
        // Rounded down: the shards together never hold more than `capacity`.
        let per_shard = capacity / shards;
        TokenCache {
            capacity,
            per_shard,
            hasher: TokenHasher::new(),
            shards: (0..shards)
                .map(|_| RwLock::new(Shard::with_capacity_and_hasher(0, Default::default())))
                .collect(),
        }
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        // The high bits pick the shard; the map uses the low ones for buckets.
        let i = (hash >> 48) as usize & (self.shards.len() - 1);
        &self.shards[i]
    }

    // A panic while holding a lock cannot leave a map inconsistent: poisoning is ignored.
    fn read(shard: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
        shard
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(shard: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
        shard
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The caller of a cached, unexpired token.
    pub(crate) fn get(&self, token: &[u8], now: u64) -> Option<Caller> {
        if self.capacity == 0 {
            return None;
        }
        let hash = self.hasher.hash(token);
        let shard = self.shard(hash);
        {
            let map = Self::read(shard);
            let entry = map.get(&hash)?;
            // A plain (early-exit) comparison is deliberate: its timing can
            // only tell a caller how much of a cached token it already has.
            // It runs against the one entry the caller's own token hashes to,
            // under a per-process secret key, over the length and the tail
            // (the signature). Reaching a given cached token's slot takes that
            // token's signature, the only secret part of a JWT (header and
            // claims are readable base64), i.e. the credential itself; any
            // other guess lands in an unrelated slot, so there is no
            // byte-by-byte search to build on. (The slot lookup itself only
            // compares hashes.)
            if entry.token.as_bytes() != token {
                return None;
            }
            if now < entry.exp {
                return Some(entry.caller.clone());
            }
        }
        // Expired: drop it (if it is still that token) so it stops taking room.
        let mut map = Self::write(shard);
        if map
            .get(&hash)
            .is_some_and(|e| e.token.as_bytes() == token && now >= e.exp)
        {
            map.remove(&hash);
        }
        None
    }

    /// Remembers a verified token until `exp` (ignored when already expired).
    pub(crate) fn insert(&self, token: &str, caller: Caller, exp: u64, now: u64) {
        if self.capacity == 0 || exp <= now {
            return;
        }
        let hash = self.hasher.hash(token.as_bytes());
        let mut map = Self::write(self.shard(hash));
        if map.len() >= self.per_shard.max(1) && !map.contains_key(&hash) {
            map.retain(|_, e| now < e.exp);
            while map.len() >= self.per_shard.max(1) {
                let Some(victim) = map.keys().next().copied() else {
                    break;
                };
                map.remove(&victim);
            }
        }
        map.insert(
            hash,
            Entry {
                token: token.into(),
                caller,
                exp,
            },
        );
    }

    /// Forgets every token (a key was withdrawn).
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            Self::write(shard).clear();
        }
    }

    /// Number of cached tokens.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| Self::read(s).len()).sum()
    }
}

/// A keyed 64-bit hash of a token: its length and its last [`HASHED_TAIL`]
/// bytes, by a folded multiply over 16-byte blocks (the construction of
/// foldhash and wyhash), keyed with random values drawn once per cache from
/// the standard library's per-process random source.
///
/// Not cryptographic, and it need not be: it only picks a slot (hits compare
/// the whole token), and only verified tokens are ever inserted, so a caller
/// without a valid token cannot fill the map with collisions either. The tail
/// of a JWT is its signature (at least 43 characters), which differs between
/// any two tokens, so hashing only the tail keeps slots apart at a cost that
/// does not grow with the claims.
#[derive(Debug, Clone, Copy)]
struct TokenHasher {
    keys: [u64; 4],
}

impl TokenHasher {
    fn new() -> Self {
        let random = std::collections::hash_map::RandomState::new();
        TokenHasher {
            keys: std::array::from_fn(|i| random.hash_one(i as u64) | 1),
        }
    }

    fn hash(&self, bytes: &[u8]) -> u64 {
        let [k0, k1, k2, k3] = self.keys;
        let len = bytes.len() as u64;
        let tail = &bytes[bytes.len().saturating_sub(HASHED_TAIL)..];
        let mut h = k0 ^ len;
        let mut blocks = tail.chunks_exact(16);
        for block in &mut blocks {
            let (a, b) = block.split_at(8);
            h = folded_multiply(word(a) ^ k1, word(b) ^ h);
        }
        let rest = blocks.remainder();
        if !rest.is_empty() {
            let (a, b) = rest.split_at(rest.len().min(8));
            // Zero padding is unambiguous: the length is part of the seed.
            h = folded_multiply(word(a) ^ k2, word(b) ^ h);
        }
        folded_multiply(h ^ k3, len ^ k1)
    }
}

/// How many bytes at the end of a token are hashed.
const HASHED_TAIL: usize = 64;

/// Up to 8 bytes as a little-endian word (zero-padded).
fn word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    let n = bytes.len().min(8);
    w[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(w)
}

fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

/// The map's keys are already keyed hashes: used as they are.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; fold anything else in regardless.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_served_until_exp_only() {
        let c = TokenCache::new(10);
        c.insert("a.b.c", Caller::named("svc"), 100, 50);
        assert_eq!(&*c.get(b"a.b.c", 99).unwrap().identity, "svc");
        assert!(c.get(b"a.b.c", 100).is_none());
        assert_eq!(c.len(), 0, "an expired entry is dropped on lookup");
        c.insert("a.b.c", Caller::named("svc"), 100, 100);
        assert_eq!(c.len(), 0, "an already expired token is not cached");
    }

    #[test]
    fn the_cache_never_grows_beyond_its_capacity() {
        let c = TokenCache::new(3);
        for i in 0..10u64 {
            c.insert(&i.to_string(), Caller::named("svc"), 1000 + i, 0);
            assert!(c.len() <= 3);
        }
        assert!(c.get(b"9", 1).is_some(), "the newest entry is kept");
        // Expired entries are evicted before live ones.
        let c = TokenCache::new(2);
        c.insert("old", Caller::named("a"), 10, 0);
        c.insert("live", Caller::named("b"), 1000, 0);
        c.insert("new", Caller::named("c"), 1000, 20);
        assert!(c.get(b"live", 21).is_some());
        assert!(c.get(b"new", 21).is_some());
        // Large caches are sharded and still bounded.
        let c = TokenCache::new(5000);
        assert!(c.shards.len() > 1);
        for i in 0..6000u64 {
            c.insert(&format!("token-{i}"), Caller::named("svc"), 1000, 0);
        }
        assert!(c.len() <= 5000, "{}", c.len());
        assert!(c.get(b"token-5999", 1).is_some());
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let c = TokenCache::new(0);
        c.insert("x", Caller::named("a"), 1000, 0);
        assert!(c.get(b"x", 1).is_none());
    }

    #[test]
    fn only_the_exact_token_is_served() {
        let c = TokenCache::new(10);
        c.insert("a.b.c", Caller::named("svc"), 1000, 0);
        for other in ["a.b.d", "a.b.c.", "a.b", "", "A.b.c"] {
            assert!(c.get(other.as_bytes(), 1).is_none(), "{other:?}");
        }
    }

    #[test]
    fn a_hash_collision_serves_neither_token_to_the_other() {
        let c = TokenCache::new(10);
        c.insert("first", Caller::named("one"), 1000, 0);
        // Force the second token into the first one's slot: same hash, different bytes.
        let hash = c.hasher.hash(b"first");
        TokenCache::write(c.shard(hash)).insert(
            hash,
            Entry {
                token: "second".into(),
                caller: Caller::named("two"),
                exp: 1000,
            },
        );
        assert!(
            c.get(b"first", 1).is_none(),
            "the slot now holds another token"
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn the_hash_covers_the_tail_and_the_length() {
        let h = TokenHasher::new();
        let base = vec![b'x'; 300];
        let mut seen = std::collections::HashSet::new();
        assert!(seen.insert(h.hash(&base)));
        for i in base.len() - HASHED_TAIL..base.len() {
            let mut t = base.clone();
            t[i] = b'y';
            assert!(seen.insert(h.hash(&t)), "flipping byte {i} changed nothing");
        }
        for n in 0..base.len() {
            assert!(seen.insert(h.hash(&base[..n])), "prefix of {n} bytes");
        }
        // Before the tail only the length counts: such tokens share a slot, and
        // the full comparison keeps them apart.
        let mut head_differs = base.clone();
        head_differs[0] = b'y';
        assert_eq!(h.hash(&head_differs), h.hash(&base));
        let c = TokenCache::new(10);
        let (a, b) = (
            String::from_utf8(base.clone()).unwrap(),
            String::from_utf8(head_differs).unwrap(),
        );
        c.insert(&a, Caller::named("a"), 1000, 0);
        assert!(c.get(b.as_bytes(), 1).is_none());
        assert_eq!(&*c.get(a.as_bytes(), 1).unwrap().identity, "a");
        // Zero padding of the tail does not make lengths collide.
        assert_ne!(h.hash(b"ab"), h.hash(b"ab\0"));
        // Keys differ per cache: the same token hashes differently.
        assert_ne!(TokenHasher::new().hash(&base), h.hash(&base));
    }
}
