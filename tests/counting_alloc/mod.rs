//! The test suite's one counting allocator. It counts allocations made on
//! any thread while `COUNTING` is set (tests that start the server
//! in-process), those made by the calling thread inside [`counted`] (the
//! core's hot calls), and keeps the live heap in bytes at all times.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};

pub struct Counting;

/// Count allocations (and reallocations) while set.
pub static COUNTING: AtomicBool = AtomicBool::new(false);
/// Allocations counted while `COUNTING` was set.
pub static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated and not yet freed, on every thread.
pub static LIVE: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    static THREAD_COUNTING: Cell<bool> = const { Cell::new(false) };
    static THREAD_COUNT: Cell<usize> = const { Cell::new(0) };
}

fn note_allocation() {
    if COUNTING.load(Ordering::Relaxed) {
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
    // Const-initialised thread locals never allocate; `try_with` keeps a
    // thread that is being torn down out of trouble.
    let _ = THREAD_COUNTING.try_with(|on| {
        if on.get() {
            let _ = THREAD_COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

/// Runs `f` and says how many allocations this thread made meanwhile.
pub fn counted<R>(f: impl FnOnce() -> R) -> (R, usize) {
    THREAD_COUNT.with(|c| c.set(0));
    THREAD_COUNTING.with(|c| c.set(true));
    let r = f();
    THREAD_COUNTING.with(|c| c.set(false));
    (r, THREAD_COUNT.with(Cell::get))
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;
