//! The shared limiter store: the same GCRA as [`super::gcra`], evaluated
//! atomically in Redis by one Lua script (one round trip per decision, the
//! server's `TIME` as the clock), so every gateway replica draws from one
//! budget exactly.
//!
//! The script also checks the Zuora holds ([`RedisStore::hold`]) of the
//! request's keys, so one replica's 429 from Zuora holds every replica.
//!
//! The Redis URL may carry a password: it is never logged, and neither is a
//! Redis error's text (only its kind).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::clock::{Clock, MonotonicClock};
use super::gcra::{Quota, Rate, Refusal};
use crate::config::RedisConfig;

/// After a failure, decisions skip Redis (and use the store-error policy)
/// for this long instead of each paying the timeout.
const BACKOFF: Duration = Duration::from_millis(500);

/// KEYS: n TAT keys, then n hold keys. ARGV: interval and tolerance (µs) per limit.
/// Returns {1, remaining₁, reset₁, …} (admitted), {0, i, retry_after_µs}
/// (limit i refused; nothing written) or {2, i, hold_µs} (key i is held).
const GCRA_LUA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS / 2
for i = 1, n do
  local ttl = redis.call('PTTL', KEYS[n + i])
  if ttl > 0 then return {2, i, ttl * 1000} end
end
local new = {}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local tol = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  if tat - now > tol then return {0, i, tat - tol - now} end
  new[i] = tat + interval
end
local out = {1}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local tol = tonumber(ARGV[2 * i])
  local ahead = new[i] - now
  redis.call('SET', KEYS[i], string.format('%d', new[i]), 'PX', string.format('%d', math.ceil(ahead / 1000) + 1))
  local remaining = 0
  if ahead <= tol then remaining = math.floor((tol - ahead) / interval) + 1 end
  out[#out + 1] = remaining
  out[#out + 1] = ahead
end
return out
";

/// One limit of a Redis decision.
#[derive(Debug, Clone, Copy)]
pub struct RedisLimit<'a> {
    /// The limit's name (part of the Redis key).
    pub name: &'a str,
    /// The request's key for this limit.
    pub key: &'a str,
    /// The limit's parameters.
    pub rate: Rate,
}

/// What Redis decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisVerdict {
    /// Every limit admitted; the tightest quota left.
    Admitted(Option<Quota>),
    /// A limit refused; nothing was consumed.
    Refused(Refusal),
    /// Zuora said 429 for this key recently; `retry_after` is what is left of the hold.
    Held {
        /// Index of the held limit.
        index: usize,
        /// Remaining hold.
        retry_after: Duration,
    },
}

/// Why Redis gave no decision (no details: they could carry connection facts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The decision did not complete within `redis.timeout`.
    #[error("timed out")]
    Timeout,
    /// Redis failed recently; not retried until the backoff ends.
    #[error("backing off after a recent failure")]
    Backoff,
    /// `redis.url` cannot be used.
    #[error("invalid redis configuration")]
    Config,
    /// Redis answered with an error or the connection failed.
    #[error("redis error ({0})")]
    Redis(&'static str),
}

fn kind(e: &RedisError) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        "connection"
    } else {
        "response"
    }
}

/// A Redis connection (reconnecting) plus the decision script.
pub struct RedisStore {
    config: RedisConfig,
    client: Option<redis::Client>,
    manager: OnceLock<ConnectionManager>,
    script: Script,
    clock: MonotonicClock,
    /// Clock nanos until which Redis is not tried (0: no backoff).
    down_until: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `redis::Client`'s Debug would show the URL (and its password).
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.config.key_prefix)
            .field("timeout", &self.config.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for `config`. Connects lazily (at the first decision), so the
    /// gateway starts even when Redis is down.
    pub fn new(config: &RedisConfig) -> RedisStore {
        let client = match redis::Client::open(config.url.expose()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(
                    kind = kind(&e),
                    "redis.url cannot be used; `store: redis` limits use their on_store_error policy"
                );
                None
            }
        };
        RedisStore {
            config: config.clone(),
            client,
            manager: OnceLock::new(),
            script: Script::new(GCRA_LUA),
            clock: MonotonicClock::new(),
            down_until: AtomicU64::new(0),
        }
    }

    /// Whether this store was built from the same settings as `config`.
    pub fn serves(&self, config: &RedisConfig) -> bool {
        self.config.url == config.url
            && self.config.timeout == config.timeout
            && self.config.key_prefix == config.key_prefix
    }

    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let now = self.clock.now_nanos();
        if now < self.down_until.load(Ordering::Relaxed) {
            return Err(StoreError::Backoff);
        }
        if let Some(m) = self.manager.get() {
            return Ok(m.clone());
        }
        let client = self.client.as_ref().ok_or(StoreError::Config)?;
        let timeout = self.config.timeout;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(timeout);
        // Lazy: nothing is awaited here; the first command connects.
        let m = ConnectionManager::new_lazy_with_config(client.clone(), cfg)
            .map_err(|e| StoreError::Redis(kind(&e)))?;
        Ok(self.manager.get_or_init(|| m).clone())
    }

    fn failed(&self, e: StoreError) -> StoreError {
        let until = self
            .clock
            .now_nanos()
            .saturating_add(u64::try_from(BACKOFF.as_nanos()).unwrap_or(u64::MAX));
        self.down_until.store(until, Ordering::Relaxed);
        e
    }

    fn tat_key(&self, name: &str, key: &str) -> String {
        format!("{}rl:{}:{name}:{key}", self.config.key_prefix, name.len())
    }

    fn hold_key(&self, name: &str, key: &str) -> String {
        format!("{}hold:{}:{name}:{key}", self.config.key_prefix, name.len())
    }

    /// Decides one request against all `limits` atomically: admitted by all
    /// (each consumes one), or refused/held (nothing consumed).
    pub async fn decide(&self, limits: &[RedisLimit<'_>]) -> Result<RedisVerdict, StoreError> {
        if limits.is_empty() {
            return Ok(RedisVerdict::Admitted(None));
        }
        let mut conn = self.connection()?;
        let mut inv = self.script.prepare_invoke();
        for l in limits {
            inv.key(self.tat_key(l.name, l.key));
        }
        for l in limits {
            inv.key(self.hold_key(l.name, l.key));
        }
        for l in limits {
            let interval = micros_ceil(l.rate.interval);
            inv.arg(interval)
                .arg(interval.saturating_mul(u64::from(l.rate.burst - 1)));
        }
        let reply: Vec<i64> =
            match tokio::time::timeout(self.config.timeout, inv.invoke_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(self.failed(StoreError::Redis(kind(&e)))),
                Err(_) => return Err(self.failed(StoreError::Timeout)),
            };
        parse_reply(&reply, limits)
            .ok_or_else(|| self.failed(StoreError::Redis("unexpected reply")))
    }

    /// Holds `key` of limit `name` for `duration` on every replica.
    pub async fn hold(&self, name: &str, key: &str, duration: Duration) -> Result<(), StoreError> {
        let mut conn = self.connection()?;
        let ms = u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.hold_key(name, key)).arg(1).arg("PX").arg(ms);
        match tokio::time::timeout(self.config.timeout, cmd.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.failed(StoreError::Redis(kind(&e)))),
            Err(_) => Err(self.failed(StoreError::Timeout)),
        }
    }
}

fn micros_ceil(nanos: u64) -> u64 {
    nanos.div_ceil(1000).max(1)
}

fn parse_reply(reply: &[i64], limits: &[RedisLimit<'_>]) -> Option<RedisVerdict> {
    let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    let index = |v: i64| {
        usize::try_from(v)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .filter(|i| *i < limits.len())
    };
    match reply {
        [1, rest @ ..] if rest.len() == 2 * limits.len() => {
            let mut tightest: Option<Quota> = None;
            for (pair, l) in rest.chunks_exact(2).zip(limits) {
                let q = Quota {
                    limit: l.rate.burst,
                    remaining: u32::try_from(pair[0]).unwrap_or(0).min(l.rate.burst),
                    reset: micros(pair[1]),
                };
                tightest = Some(tightest.map_or(q, |t| t.tighter(q)));
            }
            Some(RedisVerdict::Admitted(tightest))
        }
        [0, i, wait] => Some(RedisVerdict::Refused(Refusal {
            index: index(*i)?,
            retry_after: micros(*wait),
        })),
        [2, i, wait] => Some(RedisVerdict::Held {
            index: index(*i)?,
            retry_after: micros(*wait),
        }),
        _ => None,
    }
}
