//! Reuse of large freed blocks, below the global allocator.
//!
//! Tensor work allocates and frees the same large buffers over and over (a training step's
//! `(rows, vocab)` logits and their gradients are 50 MB each on the default model). glibc serves
//! anything above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it with
//! `munmap` on free, so every such buffer is page-faulted in and zeroed by the kernel again: a
//! quarter of a full forward+backward's time in a profile. Here freed blocks of at least
//! [`MIN_BLOCK`] are kept (up to a byte budget) and handed out again for requests of the same size
//! class (sizes rounded up to 1/8 of their power of two, so batches of slightly different lengths
//! still hit). Memory kept here stays counted in the process's RSS, up to the budget.
//!
//! The budget is a sixth of physical memory, at most 4 GiB (a full fine-tuning step of the
//! default model frees ~3 GiB of large blocks; 1 GiB left a fifth of them to the kernel again).
//! `SAFEGEO_BLOCK_CACHE_MB` overrides it (0 turns the cache off); [`configure_from_env`] reads
//! both (the `safegeo` binary calls it first thing).
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Smallest block that is cached (smaller ones are glibc's business, and it does them well).
pub const MIN_BLOCK: usize = 1 << 20;
const SLOTS: usize = 512;
const DEFAULT_BUDGET: usize = 1 << 30;
const MAX_DEFAULT_BUDGET: usize = 4 << 30;

struct Cache {
    /// `(address, class size, align)`; address 0 = empty slot.
    slots: [(usize, usize, usize); SLOTS],
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    slots: [(0, 0, 0); SLOTS],
    bytes: 0,
});
static HITS: AtomicUsize = AtomicUsize::new(0);
static MISSES: AtomicUsize = AtomicUsize::new(0);
static DROPPED: AtomicUsize = AtomicUsize::new(0);
static BUDGET: AtomicUsize = AtomicUsize::new(DEFAULT_BUDGET);

fn budget() -> usize {
    BUDGET.load(Ordering::Relaxed)
}

/// Read `SAFEGEO_BLOCK_CACHE_MB` (not from inside the allocator: reading the environment
/// allocates). An unparsable value is an error naming it.
pub fn configure_from_env() -> Result<(), String> {
    let Ok(v) = std::env::var("SAFEGEO_BLOCK_CACHE_MB") else {
        if let Some(total) = physical_memory() {
            BUDGET.store((total / 6).min(MAX_DEFAULT_BUDGET), Ordering::Relaxed);
        }
        return Ok(());
    };
    let mb: usize = v.trim().parse().map_err(|_| {
        format!("SAFEGEO_BLOCK_CACHE_MB={v:?} is not a whole number of MiB (0 turns the cache off)")
    })?;
    BUDGET.store(mb.saturating_mul(1 << 20), Ordering::Relaxed);
    if mb == 0 {
        // Hand back what is already kept.
        let mut c = lock();
        for slot in c.slots.iter_mut() {
            if slot.0 != 0 {
                // SAFETY: every kept block came from System with exactly this layout.
                unsafe {
                    System.dealloc(
                        slot.0 as *mut u8,
                        Layout::from_size_align_unchecked(slot.1, slot.2),
                    )
                };
                *slot = (0, 0, 0);
            }
        }
        c.bytes = 0;
    }
    Ok(())
}

/// `MemTotal` from /proc/meminfo, in bytes.
fn physical_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The size class of a request: rounded up to a multiple of 1/8 of its power of two.
pub fn class_size(size: usize) -> usize {
    let step = (size.next_power_of_two() >> 3).max(4096);
    size.div_ceil(step) * step
}

fn lock() -> std::sync::MutexGuard<'static, Cache> {
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `layout` goes through the cache.
pub fn serves(layout: Layout) -> bool {
    layout.size() >= MIN_BLOCK && layout.align() <= 4096 && budget() > 0
}

/// A block for `layout` (which [`serves`]): a cached one of its class, or a new one.
///
/// # Safety
/// As `GlobalAlloc::alloc`; free it with [`dealloc`] and the same layout.
pub unsafe fn alloc(layout: Layout, zeroed: bool) -> *mut u8 {
    let class = class_size(layout.size());
    let reused = {
        let mut c = lock();
        let hit = c
            .slots
            .iter()
            .position(|&(p, s, a)| p != 0 && s == class && a == layout.align());
        hit.map(|i| {
            let p = c.slots[i].0;
            c.slots[i] = (0, 0, 0);
            c.bytes -= class;
            p as *mut u8
        })
    };
    match reused {
        Some(p) => {
            HITS.fetch_add(1, Ordering::Relaxed);
            if zeroed {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        }
        None => {
            MISSES.fetch_add(1, Ordering::Relaxed);
            let l = Layout::from_size_align_unchecked(class, layout.align());
            if zeroed {
                System.alloc_zeroed(l)
            } else {
                System.alloc(l)
            }
        }
    }
}

/// Return a block from [`alloc`]: kept for reuse if the budget allows, else freed.
///
/// # Safety
/// As `GlobalAlloc::dealloc`.
pub unsafe fn dealloc(ptr: *mut u8, layout: Layout) {
    let class = class_size(layout.size());
    let kept = {
        let mut c = lock();
        let room = c.bytes + class <= budget();
        match c.slots.iter().position(|&(p, _, _)| p == 0) {
            Some(i) if room => {
                c.slots[i] = (ptr as usize, class, layout.align());
                c.bytes += class;
                true
            }
            _ => false,
        }
    };
    if !kept {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        System.dealloc(
            ptr,
            Layout::from_size_align_unchecked(class, layout.align()),
        );
    }
}

/// `(hits, misses, blocks freed for want of room)` since the start.
pub fn stats() -> (usize, usize, usize) {
    (
        HITS.load(Ordering::Relaxed),
        MISSES.load(Ordering::Relaxed),
        DROPPED.load(Ordering::Relaxed),
    )
}

/// Bytes held for reuse right now.
pub fn cached_bytes() -> usize {
    lock().bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_by_at_most_an_eighth() {
        assert_eq!(class_size(1 << 20), 1 << 20);
        assert_eq!(class_size((1 << 20) + 1), (1 << 20) + (1 << 18));
        for s in [
            1_000_000usize,
            3_333_333,
            50_331_648,
            113_246_208,
            999_999_999,
        ] {
            let c = class_size(s);
            assert!(
                c >= s && (c - s) as f64 <= s as f64 / 8.0 + 4096.0,
                "{s} -> {c}"
            );
        }
    }

    #[test]
    fn a_freed_block_is_reused_for_its_class_and_zeroed_on_request() {
        let layout = Layout::from_size_align(3 << 20, 64).unwrap();
        assert!(serves(layout));
        unsafe {
            let p = alloc(layout, false);
            std::ptr::write_bytes(p, 7, layout.size());
            dealloc(p, layout);
            // Another size of the same class takes the same block, zeroed.
            let other = Layout::from_size_align((3 << 20) - 100, 64).unwrap();
            let q = alloc(other, true);
            assert_eq!(p, q);
            assert!(std::slice::from_raw_parts(q, other.size())
                .iter()
                .all(|&b| b == 0));
            dealloc(q, other);
        }
    }
}
