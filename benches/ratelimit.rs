//! Rate-limit decision cost.
//!
//! - Local keyed limiting: the gateway's limiter (`KeyedGcra`: check / commit
//!   / refund on governor's dashmap state store), governor's stock keyed
//!   dashmap limiter (`check_key`), and a naive `Mutex<HashMap>` GCRA
//!   baseline, in the same run: one thread, and two threads on shared keys.
//! - A route with two limits (`admit_all`: check, then commit).
//! - Redis decisions over loopback: one at a time (latency) and 32 in flight
//!   (throughput). Skipped, with a note, when `redis-server` is absent.
//!
//! `cargo bench --bench ratelimit`
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use zuora_gateway::config::Config;
use zuora_gateway::context::RouteMatch;
use zuora_gateway::policy::Policy;
use zuora_gateway::ratelimit::clock::{Clock, MonotonicClock};
use zuora_gateway::ratelimit::gcra::{KeyedGcra, Rate, admit_all};
use zuora_gateway::ratelimit::testing::RedisServer;
use zuora_gateway::ratelimit::{LimiterRegistry, RateLimitMetrics};

const KEYS: usize = 1024;

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("{i:032x}")).collect()
}

/// A rate high enough that (almost) every decision admits: measures the
/// bookkeeping, not the refusal path.
fn rate() -> Rate {
    Rate::new(Duration::from_nanos(1), 1_000_000)
}

/// The naive baseline: the same GCRA behind one global mutex.
struct MutexGcra {
    rate: Rate,
    map: Mutex<HashMap<String, u64>>,
}

impl MutexGcra {
    fn admit(&self, key: &str, now: u64) -> bool {
        let mut map = self.map.lock().unwrap();
        let tat = match map.get_mut(key) {
            Some(t) => t,
            None => map.entry(key.to_owned()).or_insert(0),
        };
        let base = (*tat).max(now);
        if base - now > self.rate.tolerance {
            return false;
        }
        *tat = base + self.rate.interval;
        true
    }
}

type Governor = governor::DefaultKeyedRateLimiter<String>;

/// Governor's stock keyed limiter at the same rate as [`rate`].
fn governor() -> Governor {
    let quota = governor::Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap())
        .allow_burst(NonZeroU32::new(1_000_000).unwrap());
    assert_eq!(Rate::from_quota(quota), rate());
    governor::RateLimiter::dashmap(quota)
}

/// Noise-robust ratios on a shared machine: the implementations take turns in
/// short batches, and each one's best batch (least disturbed) is compared.
fn interleaved_summary() {
    const BATCH: u32 = 20_000;
    let keys = keys();
    let clock = MonotonicClock::new();
    let ours = KeyedGcra::new(rate());
    let gov = governor();
    let naive = MutexGcra {
        rate: rate(),
        map: Mutex::new(HashMap::new()),
    };
    let time = |f: &dyn Fn(&str) -> bool| {
        let start = Instant::now();
        for i in 0..BATCH as usize {
            black_box(f(&keys[i % KEYS]));
        }
        start.elapsed() / BATCH
    };
    let mut best = [Duration::MAX; 3];
    for _ in 0..300 {
        best[0] = best[0].min(time(&|k| ours.admit(k, clock.now_nanos()).is_ok()));
        best[1] = best[1].min(time(&|k| gov.check_key(&k.to_owned()).is_ok()));
        best[2] = best[2].min(time(&|k| naive.admit(k, clock.now_nanos())));
    }
    let ns = |d: Duration| d.as_nanos() as f64;
    println!(
        "interleaved best-of-300 per decision: gateway_gcra {:?}, governor_dashmap {:?} (key cloned per call), mutex_hashmap_baseline {:?}; gateway/baseline = {:.2}, governor/baseline = {:.2}",
        best[0],
        best[1],
        best[2],
        ns(best[0]) / ns(best[2]),
        ns(best[1]) / ns(best[2]),
    );
}

fn local(c: &mut Criterion) {
    interleaved_summary();
    let keys = keys();
    let clock = MonotonicClock::new();
    let mut g = c.benchmark_group("local_decision");
    g.throughput(Throughput::Elements(1));

    let ours = KeyedGcra::new(rate());
    let mut i = 0usize;
    g.bench_function("gateway_gcra", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(ours.admit(&keys[i], clock.now_nanos()).is_ok())
        })
    });

    let gov = governor();
    g.bench_function("governor_dashmap", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(gov.check_key(&keys[i]).is_ok())
        })
    });

    let naive = MutexGcra {
        rate: rate(),
        map: Mutex::new(HashMap::new()),
    };
    g.bench_function("mutex_hashmap_baseline", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(naive.admit(&keys[i], clock.now_nanos()))
        })
    });

    let per_caller = KeyedGcra::new(rate());
    g.bench_function("gateway_gcra_two_limits", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let now = clock.now_nanos();
            black_box(admit_all([(&per_caller, "alice"), (&ours, keys[i].as_str())], now).is_ok())
        })
    });
    g.finish();
}

/// `threads` threads each making `iters / threads` decisions over the shared key set.
fn contended<F>(threads: usize, iters: u64, decide: Arc<F>) -> Duration
where
    F: Fn(&str) -> bool + Send + Sync + 'static,
{
    let keys = Arc::new(keys());
    let barrier = Arc::new(Barrier::new(threads + 1));
    let per = iters / threads as u64 + 1;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (keys, barrier, decide) = (keys.clone(), barrier.clone(), decide.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut k = t * 7;
                for _ in 0..per {
                    k = (k + 1) % KEYS;
                    black_box(decide(&keys[k]));
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

fn local_contended(c: &mut Criterion) {
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(2)
        .max(2);
    let mut g = c.benchmark_group(format!("local_decision_{threads}_threads"));
    g.throughput(Throughput::Elements(1));
    let clock = MonotonicClock::new();

    let ours = Arc::new(KeyedGcra::new(rate()));
    let f = Arc::new(move |k: &str| ours.admit(k, clock.now_nanos()).is_ok());
    g.bench_function("gateway_gcra", |b| {
        b.iter_custom(|n| contended(threads, n, f.clone()))
    });

    let gov = Arc::new(governor());
    let f = Arc::new(move |k: &str| gov.check_key(&k.to_owned()).is_ok());
    g.bench_function("governor_dashmap", |b| {
        b.iter_custom(|n| contended(threads, n, f.clone()))
    });

    let naive = Arc::new(MutexGcra {
        rate: rate(),
        map: Mutex::new(HashMap::new()),
    });
    let f = Arc::new(move |k: &str| naive.admit(k, clock.now_nanos()));
    g.bench_function("mutex_hashmap_baseline", |b| {
        b.iter_custom(|n| contended(threads, n, f.clone()))
    });
    g.finish();
}

fn redis(c: &mut Criterion) {
    if !RedisServer::available() {
        println!("note: redis-server is not installed; skipping the Redis decision benchmarks");
        return;
    }
    let server = RedisServer::start().expect("start redis-server");
    let yaml = format!(
        "server: {{ listen: 127.0.0.1:8080 }}\nupstreams: {{ zuora: {{ base_url: simulator }} }}\ncallers: {{ trusted_identity: svc }}\nroutes:\n  - {{ name: stop, method: PUT, path: '/v1/jobs/{{jobId}}', upstream: zuora, rate_limits: [per-job] }}\nrate_limits:\n  per-job: {{ key: jobId, rate: 1000000/second, burst: 1000000, store: redis, on_store_error: deny }}\nredis: {{ url: '{}', timeout: 1s }}\n",
        server.url()
    );
    let config = Config::from_yaml(
        &yaml,
        Path::new("bench.yaml"),
        Path::new("."),
        &|_: &str| None,
    )
    .unwrap();
    let policy = Arc::new(Policy::compile(Arc::new(config)));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = LimiterRegistry::new(RateLimitMetrics::default());
    let route = RouteMatch {
        policy,
        route: 0,
        params: vec!["job".into()],
    };
    let limits = registry.route_limits(&route);
    let keys = Arc::new(keys());
    // Warm the connection and load the script.
    rt.block_on(registry.decide(&limits, &keys[..1])).unwrap();

    let mut g = c.benchmark_group("redis_decision");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("sequential", |b| {
        b.iter_custom(|n| {
            let (registry, limits, keys) = (registry.clone(), limits.clone(), keys.clone());
            rt.block_on(async move {
                let start = Instant::now();
                for i in 0..n as usize {
                    registry
                        .decide(&limits, &keys[i % KEYS..i % KEYS + 1])
                        .await
                        .unwrap();
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("32_in_flight", |b| {
        b.iter_custom(|n| {
            let (registry, limits, keys) = (registry.clone(), limits.clone(), keys.clone());
            rt.block_on(async move {
                let start = Instant::now();
                let tasks: Vec<_> = (0..32usize)
                    .map(|t| {
                        let (registry, limits, keys) =
                            (registry.clone(), limits.clone(), keys.clone());
                        tokio::spawn(async move {
                            for i in (t..n as usize).step_by(32) {
                                registry
                                    .decide(&limits, &keys[i % KEYS..i % KEYS + 1])
                                    .await
                                    .unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    drop(server);
}

criterion_group!(benches, local, local_contended, redis);
criterion_main!(benches);
