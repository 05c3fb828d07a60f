//! The gateway's allocator, and the calls into it that need `unsafe`.
//!
//! zuora-gateway is `#![forbid(unsafe_code)]`; this crate holds the foreign
//! calls it needs so that the gateway crate keeps that promise: the global
//! allocator ([`MiMalloc`]), and [`release_free_memory`], which asks mimalloc
//! to hand the calling thread's freed pages back to the operating system now
//! instead of on its next allocations (see `zuora_gateway::memory` for when
//! the gateway calls it).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// mimalloc as Rust's global allocator.
///
/// The `mimalloc` crate's allocator passes every request through
/// `mi_malloc_aligned`, which takes its fast path only for blocks of at most
/// 1 KiB whose free block happens to be aligned, and its generic path (about
/// 70 instructions a call, 40 calls per proxied request) otherwise. Every
/// mimalloc block is at least word-aligned (block sizes are whole words), so
/// requests aligned to a word or less go to plain `mi_malloc` (mimalloc's own
/// `mi_realloc_aligned` takes the same shortcut); only larger alignments
/// (tokio's cache-line-aligned task cells) take the aligned calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct MiMalloc;

/// The alignment every mimalloc block has.
const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: every method hands mimalloc's pointers through unchanged, and
// asks for at least the layout's size and alignment: plain calls only when
// the alignment is at most a word, which every mimalloc block has;
// `mi_free` accepts any pointer either kind of call returned.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl; `layout.size()` is non-zero (GlobalAlloc).
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (GlobalAlloc's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; the new
        // block keeps `layout`'s alignment (GlobalAlloc's contract).
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

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

    #[test]
    fn every_block_has_its_layouts_alignment_and_keeps_its_bytes() {
        let a = MiMalloc;
        let mut blocks = Vec::new();
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 3, 8, 24, 40, 100, 1000, 1025, 8192, 70_000] {
                let size = size.max(align);
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; the block is freed below.
                let (p, z) = unsafe { (a.alloc(layout), a.alloc_zeroed(layout)) };
                assert!(!p.is_null() && !z.is_null());
                assert_eq!(p as usize % align, 0, "alloc {size}/{align}");
                assert_eq!(z as usize % align, 0, "alloc_zeroed {size}/{align}");
                // SAFETY: `z` has `size` bytes.
                assert!(
                    unsafe { std::slice::from_raw_parts(z, size) }
                        .iter()
                        .all(|b| *b == 0)
                );
                // SAFETY: `p` has `size` bytes.
                unsafe { std::ptr::write_bytes(p, 0xA5, size) };
                blocks.push((p, layout));
                blocks.push((z, layout));
            }
        }
        for (p, layout) in blocks {
            // SAFETY: `p` came from `alloc`/`alloc_zeroed` with `layout`.
            let grown = unsafe { a.realloc(p, layout, layout.size() * 3) };
            assert!(!grown.is_null());
            assert_eq!(grown as usize % layout.align(), 0, "realloc {layout:?}");
            // SAFETY: `grown` has at least the old size, the new one with it.
            unsafe {
                let old = std::slice::from_raw_parts(grown, layout.size());
                assert!(old.iter().all(|b| *b == 0xA5) || old.iter().all(|b| *b == 0));
                let grown_layout =
                    Layout::from_size_align(layout.size() * 3, layout.align()).unwrap();
                a.dealloc(grown, grown_layout);
            }
        }
    }

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
