//! A memory bound for untrusted work. minijinja has no memory limit, and a chat template can
//! double a string once per loop turn (`{% set ns.s = ns.s ~ ns.s %}`) or grow it with nested
//! `join`s, so fuel and recursion limits alone do not bound memory: 40 cheap turns ask for a
//! terabyte.
//!
//! A program that installs [`Guarded`] as its global allocator (the `safegeo` binary does) gets a
//! per-thread budget: inside [`bounded`], an allocation that would take the thread's live
//! allocations past the budget is never made; the process prints what ran out and how to fix it,
//! and exits with code 2 (bad input). Failing one allocation softly is impossible (Rust aborts on
//! a failed allocation, and an allocator must not unwind), so the exit is the clean way out;
//! results written so far are on disk already. Without [`Guarded`], [`bounded`] only runs `f`.
use crate::kernels::block_cache;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    // 0 = no budget on this thread.
    static LIMIT: Cell<usize> = const { Cell::new(0) };
    static USED: Cell<usize> = const { Cell::new(0) };
    static WHAT: Cell<(&'static str, &'static str)> = const { Cell::new(("", "")) };
}

/// The system allocator with an optional per-thread budget (see the module docs).
pub struct Guarded;

fn limit() -> usize {
    // `try_with`: never panic in the allocator, even while the thread is being torn down.
    LIMIT.try_with(Cell::get).unwrap_or(0)
}

/// Take `n` bytes from the budget, or stop the process if they do not fit.
fn charge(n: usize) {
    let lim = limit();
    if lim == 0 {
        return;
    }
    let used = USED.with(Cell::get).saturating_add(n);
    if used > lim {
        LIMIT.with(|l| l.set(0)); // the message below allocates
        exceeded(WHAT.with(Cell::get), lim);
    }
    USED.with(|u| u.set(used));
}

fn refund(n: usize) {
    if limit() != 0 {
        USED.with(|u| u.set(u.get().saturating_sub(n)));
    }
}

#[cold]
fn exceeded((what, fix): (&str, &str), lim: usize) -> ! {
    eprintln!(
        "error: {what} needs more than {} MiB of memory; stopped before taking it\n  fix: {fix}",
        lim >> 20
    );
    std::process::exit(2)
}

// Large blocks go through `block_cache` (reuse instead of mmap/munmap per tensor).
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        if block_cache::serves(layout) {
            block_cache::alloc(layout, false)
        } else {
            System.alloc(layout)
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        if block_cache::serves(layout) {
            block_cache::alloc(layout, true)
        } else {
            System.alloc_zeroed(layout)
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        refund(layout.size());
        if block_cache::serves(layout) {
            block_cache::dealloc(ptr, layout)
        } else {
            System.dealloc(ptr, layout)
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        if block_cache::serves(layout) || block_cache::serves(new_layout) {
            // Moves between the cache and glibc: copy through our own paths.
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            return new;
        }
        if new_size > layout.size() {
            charge(new_size - layout.size());
        } else {
            refund(layout.size() - new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// Run `f` with at most `budget` bytes of live allocations on this thread (enforced only under
/// [`Guarded`]); `what` names the work and `fix` tells the user what to do, in the message.
/// Budgets do not nest: an inner call replaces the outer budget until it returns.
pub fn bounded<T>(
    budget: usize,
    what: &'static str,
    fix: &'static str,
    f: impl FnOnce() -> T,
) -> T {
    struct Restore(usize, usize, (&'static str, &'static str));
    impl Drop for Restore {
        fn drop(&mut self) {
            LIMIT.with(|l| l.set(self.0));
            USED.with(|u| u.set(self.1));
            WHAT.with(|w| w.set(self.2));
        }
    }
    let _restore = Restore(limit(), USED.with(Cell::get), WHAT.with(Cell::get));
    // Set the limit last: the bookkeeping above must not count against it.
    USED.with(|u| u.set(0));
    WHAT.with(|w| w.set((what, fix)));
    LIMIT.with(|l| l.set(budget.max(1)));
    f()
}

/// Bytes this thread has live under the current budget (0 outside [`bounded`]).
pub fn used() -> usize {
    if limit() == 0 {
        0
    } else {
        USED.with(Cell::get)
    }
}
