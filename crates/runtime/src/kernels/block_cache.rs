//! Reuse of large freed blocks, below the global allocator.
//!
//! Tensor work allocates and frees the same large buffers over and over (a training step's
//! `(rows, vocab)` logits and their gradients are 50 MB each on the default model). glibc serves
//! anything above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it with
//! `munmap` on free, so every such buffer is page-faulted in and zeroed by the kernel again: a
//! quarter of a full forward+backward's time in a profile. Here freed blocks of at least
//! [`MIN_BLOCK`] are kept (up to a byte budget) and handed out again for requests of the same size
//! class (sizes rounded up to a multiple of 1/8 of their power of two, so batches of slightly
//! different lengths still hit; a request whose class has none takes a kept block up to twice its
//! size, which from then on counts as the smaller class). Memory kept here stays counted in the
//! process's RSS, up to the budget (up to twice it, for blocks serving smaller classes). Blocks
//! given back to the system carry the layout of the class they serve; `System` on Unix frees
//! with `free`, which reads the size from the block itself.
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
/// Largest power of two whose blocks are cached (2^47 = 128 TiB: everything, in practice).
const MAX_POW: u32 = 47;
/// Classes per power of two: `k/8` steps above it, `k = 0..=8`.
const PER_POW: usize = 9;
const CLASSES: usize = (MAX_POW as usize - 19) * PER_POW;
/// Blocks kept per class (a training step frees ~2,000 blocks of a dozen classes at once).
const DEPTH: usize = 512;
/// Every block is taken from the system with this alignment; larger requests bypass the cache.
/// 128 covers gemm's packing buffers (cache-line aligned, allocated on every call: at 16 they
/// went to glibc, which handed large ones back to the kernel and faulted them in again).
const ALIGN: usize = 128;
const DEFAULT_BUDGET: usize = 1 << 30;
const MAX_DEFAULT_BUDGET: usize = 4 << 30;

struct Cache {
    /// Addresses of kept blocks, a stack per class.
    stacks: [[usize; DEPTH]; CLASSES],
    len: [u16; CLASSES],
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    stacks: [[0; DEPTH]; CLASSES],
    len: [0; CLASSES],
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
        format!(
            "SAFEGEO_BLOCK_CACHE_MB={v:?} is not a whole number of MiB\n  fix: set it to the \
             MiB of freed large blocks to keep for reuse (e.g. 1024), 0 to turn the cache off, \
             or unset it for the default (a sixth of RAM, at most 4096)"
        )
    })?;
    BUDGET.store(mb.saturating_mul(1 << 20), Ordering::Relaxed);
    if mb == 0 {
        // Hand back what is already kept.
        let mut c = lock();
        for class in 0..CLASSES {
            let size = size_of_class(class);
            for i in 0..c.len[class] as usize {
                // SAFETY: every kept block came from System with exactly this layout.
                unsafe {
                    System.dealloc(
                        c.stacks[class][i] as *mut u8,
                        Layout::from_size_align_unchecked(size, ALIGN),
                    )
                };
            }
            c.len[class] = 0;
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

/// The class of a request of `size >= MIN_BLOCK` bytes: with `2^p <= size < 2^(p+1)`, the
/// size rounds up to `2^p + k 2^(p-3)`, `k = 0..=8` (at most 1/8 more).
fn class_of(size: usize) -> Option<usize> {
    let p = usize::BITS - 1 - size.leading_zeros();
    if !(20..=MAX_POW).contains(&p) {
        return None;
    }
    let step = 1usize << (p - 3);
    let k = size.div_ceil(step) - 8;
    Some((p as usize - 20) * PER_POW + k)
}

fn size_of_class(class: usize) -> usize {
    let (p, k) = (class / PER_POW + 20, class % PER_POW);
    (1usize << p) + k * (1usize << (p - 3))
}

fn lock() -> std::sync::MutexGuard<'static, Cache> {
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `layout` goes through the cache.
pub fn serves(layout: Layout) -> bool {
    layout.size() >= MIN_BLOCK
        && layout.align() <= ALIGN
        && class_of(layout.size()).is_some()
        && budget() > 0
}

/// A block for `layout` (which [`serves`]): a kept one of its class, or a new one.
///
/// # Safety
/// As `GlobalAlloc::alloc`; free it with [`dealloc`] and the same layout.
pub unsafe fn alloc(layout: Layout, zeroed: bool) -> *mut u8 {
    let Some(class) = class_of(layout.size()) else {
        return std::ptr::null_mut();
    };
    let size = size_of_class(class);
    let reused = {
        let mut c = lock();
        // Its own class first, else the next larger kept block up to twice the size: batches of
        // other lengths (every training step's) would otherwise miss every time and fault fresh
        // pages in (a quarter of a training step's time in a profile). The block then serves,
        // and comes back in, the smaller class; see the module note on the budget.
        let last = (class + PER_POW).min(CLASSES - 1);
        (class..=last).find(|&k| c.len[k] > 0).map(|k| {
            let n = c.len[k] as usize;
            c.len[k] -= 1;
            c.bytes -= size_of_class(k);
            c.stacks[k][n - 1] as *mut u8
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
            let l = Layout::from_size_align_unchecked(size, ALIGN);
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
    let Some(class) = class_of(layout.size()) else {
        return;
    };
    let size = size_of_class(class);
    let kept = {
        let mut c = lock();
        let n = c.len[class] as usize;
        if n < DEPTH && c.bytes + size <= budget() {
            c.stacks[class][n] = ptr as usize;
            c.len[class] += 1;
            c.bytes += size;
            true
        } else {
            false
        }
    };
    if !kept {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        System.dealloc(ptr, Layout::from_size_align_unchecked(size, ALIGN));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size a request of `size` bytes is served with.
    fn class_size(size: usize) -> usize {
        class_of(size).map_or(size, size_of_class)
    }

    #[test]
    fn classes_round_up_by_at_most_an_eighth_and_cover_their_requests() {
        assert_eq!(class_size(1 << 20), 1 << 20);
        assert_eq!(class_size((1 << 20) + 1), (1 << 20) + (1 << 17));
        assert_eq!(class_size((2 << 20) - 1), 2 << 20);
        for s in [
            1_000_000usize << 1,
            3_333_333,
            50_331_648,
            113_246_208,
            999_999_999,
        ] {
            let c = class_size(s);
            assert!(c >= s && (c - s) * 8 <= s, "{s} -> {c}");
            assert_eq!(size_of_class(class_of(s).unwrap()), c);
        }
        assert!(class_of(1 << 19).is_none());
    }

    #[test]
    fn a_freed_block_is_reused_for_its_class_and_zeroed_on_request() {
        let layout = Layout::from_size_align(3 << 20, 16).unwrap();
        assert!(serves(layout));
        assert!(serves(Layout::from_size_align(3 << 20, 128).unwrap()));
        assert!(!serves(Layout::from_size_align(3 << 20, 256).unwrap()));
        unsafe {
            let p = alloc(layout, false);
            std::ptr::write_bytes(p, 7, layout.size());
            dealloc(p, layout);
            // Another size of the same class takes the same block, zeroed.
            let other = Layout::from_size_align((3 << 20) - 100, 16).unwrap();
            let q = alloc(other, true);
            assert_eq!(p, q);
            assert!(std::slice::from_raw_parts(q, other.size())
                .iter()
                .all(|&b| b == 0));
            dealloc(q, other);
        }
    }

    #[test]
    fn a_request_without_a_kept_block_of_its_class_takes_a_larger_one() {
        // Sizes of their own (other tests share the cache), two classes apart.
        let big = Layout::from_size_align((45 << 20) + 12345, 16).unwrap();
        let small = Layout::from_size_align(33 << 20, 16).unwrap();
        assert!(class_of(small.size()).unwrap() + 2 <= class_of(big.size()).unwrap());
        unsafe {
            let p = alloc(big, false);
            std::ptr::write_bytes(p, 7, big.size());
            dealloc(p, big);
            let q = alloc(small, true);
            assert_eq!(p, q, "the larger kept block serves the smaller request");
            assert!(std::slice::from_raw_parts(q, small.size())
                .iter()
                .all(|&b| b == 0));
            dealloc(q, small);
            // More than twice the size apart: not taken.
            let tiny = Layout::from_size_align(16 << 20, 16).unwrap();
            let r = alloc(tiny, false);
            assert_ne!(r, q);
            dealloc(r, tiny);
        }
    }
}
