//! A counting global allocator for the tests that prove an I/O path allocates nothing.
//!
//! A test binary installs it and switches counting on around the code under test:
//!
//! ```text
//! #[global_allocator]
//! static GLOBAL: alloc_count::CountingAlloc = alloc_count::CountingAlloc;
//!
//! alloc_count::count_this_thread(true);
//! hot_path();
//! alloc_count::count_this_thread(false);
//! assert_eq!(alloc_count::take(), 0);
//! ```
//!
//! [`count_this_thread`] counts the calling thread only (other threads of the test, e.g. a
//! simulator, are not measured); [`count_all_threads`] counts every thread (for code under
//! test that runs on threads of its own). Allocations and reallocations are counted,
//! frees are not. Everything is forwarded to the system allocator unchanged.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static ALL_THREADS: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicU64 = AtomicU64::new(0);
thread_local! {
    static THIS_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The allocator: install it with `#[global_allocator]` in a test binary.
pub struct CountingAlloc;

fn note() {
    // `try_with`: the thread-local may already be gone while a thread exits.
    if ALL_THREADS.load(Ordering::Relaxed) || THIS_THREAD.try_with(Cell::get).unwrap_or(false) {
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator with the same arguments; the
// wrapper only increments a counter, which allocates nothing.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this wrapper with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as for `dealloc`, plus the caller's `realloc` contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Counts allocations of the calling thread while `on`.
pub fn count_this_thread(on: bool) {
    THIS_THREAD.with(|c| c.set(on));
}

/// Counts allocations of every thread while `on`.
pub fn count_all_threads(on: bool) {
    ALL_THREADS.store(on, Ordering::SeqCst);
}

/// Allocations counted so far.
pub fn count() -> u64 {
    COUNT.load(Ordering::SeqCst)
}

/// Allocations counted so far; resets the count.
pub fn take() -> u64 {
    COUNT.swap(0, Ordering::SeqCst)
}
