//! The gateway's allocator, and the one call into it that needs `unsafe`.
//!
//! zuora-gateway is `#![forbid(unsafe_code)]`; this crate holds the single
//! foreign call it needs so that the gateway crate keeps that promise:
//! [`release_free_memory`], which asks mimalloc to hand the calling thread's
//! freed pages back to the operating system now instead of on its next
//! allocations (see `zuora_gateway::memory` for when the gateway calls it).

pub use mimalloc::MiMalloc;

/// Returns the calling thread's free memory to the operating system:
/// mimalloc's `mi_collect(true)`. Freed pages of this thread's heap go back
/// to the arenas and the arenas' free ranges are decommitted at once,
/// instead of after mimalloc's purge delay, which only elapses while the
/// thread keeps allocating. Costs a few system calls; the gateway calls it
/// when a serving thread goes idle after a burst, never per request.
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers and has no preconditions: it
    // walks the calling thread's own heap and mimalloc's internally
    // synchronised arenas, and may be called at any time from any thread
    // (mimalloc's API docs: "Eagerly free memory").
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static GLOBAL: MiMalloc = MiMalloc;

    /// Resident set size of this process, in KiB, from `/proc/self/status`.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn freed_memory_goes_back_to_the_os_only_when_asked() {
        // 64 MiB in 4 KiB blocks, touched, then freed: mimalloc keeps the
        // pages (its purge delay only runs down while this thread allocates).
        let blocks: Vec<Vec<u8>> = (0..16 * 1024).map(|_| vec![1u8; 4096]).collect();
        let loaded = rss_kib();
        drop(blocks);
        let freed = rss_kib();
        release_free_memory();
        let released = rss_kib();
        assert!(
            loaded > 60 * 1024,
            "the blocks were not resident: {loaded} KiB"
        );
        assert!(
            freed > loaded - 16 * 1024,
            "mimalloc returned the memory by itself ({loaded} → {freed} KiB): \
             the release is not needed, or this test measures nothing"
        );
        assert!(
            released + 48 * 1024 < freed,
            "release_free_memory returned too little: {freed} → {released} KiB"
        );
    }
}
