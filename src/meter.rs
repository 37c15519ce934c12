//! Memory metering for rule runs: the process's allocator (mimalloc, which
//! costs less per allocation than glibc's under the many small, short-lived
//! allocations of a request), which also
//! counts, on a thread that asked for it, the bytes allocated and not yet
//! freed. A rule run is metered so that all its strings, arrays and maps
//! together stay within a budget (rhai's own limits are per container).
//!
//! The count is per thread because a rule run is synchronous on one
//! thread; off a metered run, the allocator costs one thread-local read.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};

/// The allocator underneath: mimalloc, or the system's in fuzzing builds,
/// whose address sanitizer watches the system allocator.
#[cfg(fuzzing)]
use std::alloc::System as Inner;

#[cfg(not(fuzzing))]
use mimalloc::MiMalloc as Inner;
use std::cell::Cell;

/// mimalloc, with per-thread counting while a run is metered.
pub struct Metered;

thread_local! {
    /// Bytes live since the metered run started (negative when it freed
    /// more than it allocated), or `None` when this thread is not metered.
    static LIVE: Cell<Option<isize>> = const { Cell::new(None) };
}

fn note(delta: isize) {
    // `try_with`: an allocation during thread teardown is simply not counted.
    let _ = LIVE.try_with(|live| {
        if let Some(n) = live.get() {
            live.set(Some(n.saturating_add(delta)));
        }
    });
}

fn signed(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

// SAFETY: every call is passed to `Inner` unchanged; the counting touches
// only a const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Metered {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is `Inner.alloc`'s.
        let p = unsafe { Inner.alloc(layout) };
        if !p.is_null() {
            note(signed(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { Inner.alloc_zeroed(layout) };
        if !p.is_null() {
            note(signed(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `Inner`.
        unsafe { Inner.dealloc(ptr, layout) };
        note(-signed(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, with `realloc`'s contract passed on.
        let p = unsafe { Inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(signed(new_size) - signed(layout.size()));
        }
        p
    }
}

/// Runs `f` with this thread's allocations counted from zero.
pub fn metered<R>(f: impl FnOnce() -> R) -> R {
    let outer = LIVE.with(|l| l.replace(Some(0)));
    let out = f();
    LIVE.with(|l| l.set(outer));
    out
}

/// Bytes the current metered run holds (0 when not metered).
pub fn live() -> usize {
    LIVE.with(|l| l.get().map_or(0, |n| n.max(0) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metered_run_counts_what_it_holds_and_not_what_it_freed() {
        assert_eq!(live(), 0, "not metered");
        metered(|| {
            let kept = vec![0u8; 1 << 20];
            let freed = vec![0u8; 4 << 20];
            drop(freed);
            assert!((1 << 20..2 << 20).contains(&live()), "{}", live());
            drop(kept);
            assert!(live() < 1024, "{}", live());
        });
        assert_eq!(live(), 0);
    }
}
