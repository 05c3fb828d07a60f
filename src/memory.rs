//! Giving memory back after a burst.
//!
//! mimalloc returns freed pages to the operating system only after a purge
//! delay that runs down while the thread keeps allocating. A serving thread
//! that goes idle right after a burst (1,000 callers gone at once) would
//! keep every page it used at the peak: measured, 41 MiB of anonymous memory
//! still resident minutes after the connections closed. Each serving
//! runtime therefore runs one small task that watches how busy its thread
//! was ([`Burst`]) and, once the thread was busy and is now idle, releases
//! the thread's free memory (`zuora_gateway_alloc::release_free_memory`).
//! Under steady load it never fires; a thread that goes idle fires once.
//! The same happens when idle keep-alive connections give their buffers
//! back ([`note_connection_state_freed`]): that happens a second or two
//! after the thread went quiet, after the release for the burst.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often a serving thread looks at its own busy time.
pub(crate) const TICK: Duration = Duration::from_secs(1);

/// Busy time per [`TICK`] from which a thread counts as busy: 2 % of one
/// core, well above the watcher's own wake-ups and an idle keep-alive
/// connection's timers, well below any real traffic.
pub(crate) const BUSY: Duration = Duration::from_millis(20);

/// The decision, apart from clocks and the allocator: fed the thread's total
/// busy time once per tick, it says when to release.
#[derive(Debug, Default)]
pub(crate) struct Burst {
    last_total: Duration,
    last_freed: u64,
    pending: bool,
}

impl Burst {
    /// Records the thread's total busy time and the count of freed
    /// connection states at a tick; true when the thread was busy, or
    /// connections freed their state, since the last release, and the
    /// thread was idle during this tick.
    pub(crate) fn tick(&mut self, busy_total: Duration, freed_total: u64) -> bool {
        let busy = busy_total.saturating_sub(self.last_total);
        self.last_total = busy_total;
        let freed = std::mem::replace(&mut self.last_freed, freed_total) != freed_total;
        self.pending |= freed;
        if busy >= BUSY {
            self.pending = true;
            false
        } else {
            std::mem::take(&mut self.pending)
        }
    }
}

/// Connection states freed so far (all threads).
static FREED: AtomicU64 = AtomicU64::new(0);

/// Notes that an idle connection gave its buffers back: the watchers
/// release their thread's free memory at their next quiet tick.
pub(crate) fn note_connection_state_freed() {
    FREED.fetch_add(1, Ordering::Relaxed);
}

/// Releases the calling thread's free memory (no-op without mimalloc).
fn release() {
    #[cfg(feature = "mimalloc")]
    zuora_gateway_alloc::release_free_memory();
}

/// Runs on a runtime until the runtime stops: releases free memory once the
/// runtime goes idle after work. On a current-thread runtime (the default,
/// one per serving thread) that is all of its thread's free memory. On
/// tokio's work-stealing runtime the watcher runs on one worker: it
/// releases that worker's pages and every page the others have already
/// handed back to mimalloc's shared arenas; the rest follows their own
/// next allocations.
pub(crate) async fn release_after_bursts() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut burst = Burst::default();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let busy = (0..metrics.num_workers())
            .map(|w| metrics.worker_total_busy_duration(w))
            .sum();
        if burst.tick(busy, FREED.load(Ordering::Relaxed)) {
            release();
            tracing::debug!("serving thread idle after a burst: free memory released");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn releases_once_when_a_busy_thread_goes_idle() {
        let mut b = Burst::default();
        assert!(!b.tick(Duration::ZERO, 0), "nothing happened yet");
        assert!(!b.tick(500 * MS, 0), "busy");
        assert!(!b.tick(1200 * MS, 0), "still busy");
        assert!(b.tick(1201 * MS, 0), "idle after busy: release");
        assert!(!b.tick(1202 * MS, 0), "already released");
        assert!(!b.tick(1210 * MS, 0), "idle stays quiet");
    }

    #[test]
    fn light_traffic_never_counts_as_a_burst() {
        let mut b = Burst::default();
        let mut total = Duration::ZERO;
        for _ in 0..100 {
            total += BUSY - MS;
            assert!(!b.tick(total, 0));
        }
    }

    #[test]
    fn connection_states_freed_while_idle_are_released_at_the_next_quiet_tick() {
        let mut b = Burst::default();
        assert!(!b.tick(500 * MS, 0), "busy");
        assert!(b.tick(501 * MS, 0), "idle after busy: release");
        assert!(!b.tick(502 * MS, 0), "quiet");
        assert!(
            b.tick(503 * MS, 7),
            "connections freed their state: release"
        );
        assert!(!b.tick(504 * MS, 7), "nothing new");
        assert!(!b.tick(900 * MS, 9), "freed while busy: wait");
        assert!(b.tick(901 * MS, 9), "then idle: release");
    }

    #[test]
    fn a_burst_that_ends_within_a_tick_still_releases() {
        let mut b = Burst::default();
        assert!(!b.tick(BUSY, 0), "exactly the threshold is busy");
        assert!(b.tick(BUSY, 0), "then idle");
    }
}
