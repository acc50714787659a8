//! `y = x W^T` for a few rows of `x` (decoding: one row per sequence of the batch), streaming
//! the weight from memory once.
//!
//! A general gemm packs its right-hand side into panels on every call: for a batch-32 decoding
//! step that is every weight of the model read, written packed and read again, and the step is
//! bound by memory traffic, not arithmetic (batch 32 spends 2 FLOP per weight byte read). Here
//! the weight (stored `(out, in)`, rows contiguous) is read in place, once, by one of two
//! AVX-512 kernels:
//!
//! - up to [`DOT_MAX_ROWS`] rows, dot products: blocks of 4 weight rows stay in L1 while the rows
//!   of `x` pass by, 4 x 6 dot products at a time in 24 registers, each reduced at the end;
//! - beyond, broadcasts against `x^T`: `x` is transposed once per call into `(in, lanes)` with
//!   its rows padded to whole 16-lane vectors, and `y^T[o, :] = sum_k w[o, k] x^T[k, :]` takes
//!   8-16 weight rows at a time, each weight element broadcast into one FMA per 16 rows of `x`. No
//!   horizontal sums, and every output element is one running sum in `k` order, so the result
//!   does not depend on how the rows are split between threads.
//!
//! Measured on a 2-core AVX-512 machine, each call on a fresh weight (`cargo test --release -p
//! safegeo-runtime few_rows -- --ignored --nocapture` prints the table), 32 rows: 1536 x 576
//! 0.39 ms (gemm's blocked product 0.90), 576 x 1536 0.46 (0.73), 49152 x 576 10.0 (15.5); at 1-4
//! rows the dot products are as fast or faster (2 rows: 0.16 ms against the broadcasts' 0.37).
//!
//! With AVX2 and FMA but no AVX-512 (AMD Zen 1-3, older Intel) the broadcast kernel runs on
//! 8-lane vectors for every row count; it sums each output in the same order, so it gives the
//! AVX-512 kernel's bits. A kept Q4_1 weight ([`StreamWeight::Q4_1`]) is expanded to f32 a chunk
//! at a time inside the broadcast kernel: the same bits as its f32 copy, a sixth of the bytes.
//!
//! The output's row blocks are spread over the thread pool. Without AVX2 (or off x86-64)
//! [`few_rows_matmul`] answers `None` and callers keep gemm.
use crate::kernels::q4_1::{BlockQ4_1, BLOCK};
use rayon::prelude::*;

/// Most rows this module takes (beyond, gemm's packed panels are faster).
pub const MAX_ROWS: usize = 48;

/// Most rows for the dot-product kernel; more go to the broadcast kernel.
pub const DOT_MAX_ROWS: usize = 4;

/// Weight rows per task of the thread pool (a multiple of the kernels' weight tiles: 4, 8, 12
/// and 16).
const TASK_ROWS: usize = 48;

/// `y (rows, out) = x (rows, inner) W^T` with `w: (out, inner)` row-major, or `None` when this
/// CPU lacks the kernels' instructions or `rows` exceeds [`MAX_ROWS`].
pub fn few_rows_matmul(
    x: &[f32],
    rows: usize,
    w: &[f32],
    out: usize,
    inner: usize,
) -> Option<Vec<f32>> {
    few_rows_matmul_many(x, rows, &[(w, out)], inner).map(|mut ys| ys.remove(0))
}

/// The output's address, shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for writes to disjoint ranges (one task each).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `y_j = x W_j^T` for several weights `(w_j, out_j)` that read the same `x` (a block's query,
/// key and value projections; the MLP's gate and up): one pass of the thread pool and one `x^T`
/// for all of them, each result equal to [`few_rows_matmul`]'s. `None` as there.
pub fn few_rows_matmul_many(
    x: &[f32],
    rows: usize,
    weights: &[(&[f32], usize)],
    inner: usize,
) -> Option<Vec<Vec<f32>>> {
    assert_eq!(
        x.len(),
        rows * inner,
        "few_rows_matmul_many: x is not (rows, inner)"
    );
    for (w, out) in weights {
        assert_eq!(
            w.len(),
            out * inner,
            "few_rows_matmul_many: a weight is not (out, inner)"
        );
    }
    if rows > MAX_ROWS {
        return None;
    }
    let weights: Vec<(StreamWeight, usize)> = weights
        .iter()
        .map(|&(w, out)| (StreamWeight::F32(w), out))
        .collect();
    by_kernel(x, rows, &weights, inner, rows <= DOT_MAX_ROWS)
}

/// A weight the streaming kernels read: f32 rows, or the file's Q4_1 blocks turned into the
/// same f32 values on the fly (`d q + m`, exact in f32: `q < 16` times an f16 scale needs at
/// most 15 bits), so a product from blocks has the same bits as one from the f32 copy while
/// reading 20 bytes per 32 weights instead of 128.
#[derive(Clone, Copy)]
pub enum StreamWeight<'a> {
    /// Row-major `(out, inner)`.
    F32(&'a [f32]),
    /// `out` rows of `inner / 32` blocks each.
    Q4_1(&'a [BlockQ4_1]),
}

/// [`few_rows_matmul_many`] over f32 or Q4_1 weights: `None` where that answers `None`, and
/// also for Q4_1 weights at up to [`DOT_MAX_ROWS`] rows (the dot-product kernel reads f32 rows)
/// or with `inner` not a multiple of 32. Every result has the bits the same product from the
/// dequantized f32 weight would have.
pub fn few_rows_matmul_streams(
    x: &[f32],
    rows: usize,
    weights: &[(StreamWeight, usize)],
    inner: usize,
) -> Option<Vec<Vec<f32>>> {
    assert_eq!(
        x.len(),
        rows * inner,
        "few_rows_matmul_streams: x is not (rows, inner)"
    );
    let mut any_blocks = false;
    for (w, out) in weights {
        let (len, want) = match w {
            StreamWeight::F32(w) => (w.len(), out * inner),
            StreamWeight::Q4_1(b) => {
                any_blocks = true;
                (b.len() * BLOCK, out * inner)
            }
        };
        assert_eq!(
            len, want,
            "few_rows_matmul_streams: a weight is not (out, inner)"
        );
    }
    let dot_products = rows <= DOT_MAX_ROWS;
    if rows > MAX_ROWS || (any_blocks && (dot_products || !inner.is_multiple_of(BLOCK))) {
        return None;
    }
    by_kernel(x, rows, weights, inner, dot_products)
}

/// The vector instructions the kernels run on.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Isa {
    /// 16 lanes, 32 registers: dot products for up to [`DOT_MAX_ROWS`] rows, broadcasts beyond.
    Avx512,
    /// 8 lanes, 16 registers (AMD Zen 1-3, Intel before Skylake-X): broadcasts for every count.
    Avx2,
}

impl Isa {
    fn detect() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
            *ISA.get_or_init(|| {
                if std::is_x86_feature_detected!("avx512f") {
                    Some(Isa::Avx512)
                } else if std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                {
                    Some(Isa::Avx2)
                } else {
                    None
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// f32 lanes per vector.
    fn width(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        }
    }
}

/// [`few_rows_matmul_many`] with the kernel chosen: dot products (AVX-512 only; elsewhere the
/// flag is ignored) or broadcasts.
fn by_kernel(
    x: &[f32],
    rows: usize,
    weights: &[(StreamWeight, usize)],
    inner: usize,
    dot_products: bool,
) -> Option<Vec<Vec<f32>>> {
    let isa = Isa::detect()?;
    if isa == Isa::Avx2 && rows < 2 {
        // One row: gemm's vector-matrix product is faster on 8 lanes (measured on a 2-core
        // AMD EPYC: the 49152 x 576 head 5.5 ms against 9.5, batch-1 decoding 10% slower).
        return None;
    }
    by_kernel_on(isa, x, rows, weights, inner, dot_products)
}

fn by_kernel_on(
    isa: Isa,
    x: &[f32],
    rows: usize,
    weights: &[(StreamWeight, usize)],
    inner: usize,
    dot_products: bool,
) -> Option<Vec<Vec<f32>>> {
    #[cfg(target_arch = "x86_64")]
    {
        let dot_products = dot_products && isa == Isa::Avx512;
        let rows_w = rows.max(1);
        // For the broadcast kernel: x^T with each column padded to whole vectors by zeros,
        // built column by column so the writes are contiguous.
        let vectors = rows.div_ceil(isa.width());
        let lanes = isa.width() * vectors;
        let x_t = if dot_products {
            Vec::new()
        } else {
            let mut x_t = vec![0f32; inner * lanes];
            for (k, col) in x_t.chunks_exact_mut(lanes).enumerate() {
                for (i, v) in col[..rows].iter_mut().enumerate() {
                    *v = x[i * inner + k];
                }
            }
            x_t
        };
        let mut ys: Vec<Vec<f32>> = weights
            .iter()
            .map(|&(_, out)| Vec::with_capacity(rows * out))
            .collect();
        let y_ptrs: Vec<SendPtr> = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
        // Tasks: (weight, first row) for every block of TASK_ROWS rows of every weight.
        let tasks: Vec<(usize, usize)> = weights
            .iter()
            .enumerate()
            .flat_map(|(j, &(_, out))| (0..out).step_by(TASK_ROWS).map(move |o0| (j, o0)))
            .collect();
        tasks.into_par_iter().for_each(|(j, o0)| {
            let (w, out) = weights[j];
            let n = TASK_ROWS.min(out - o0);
            // This task's block of y^T, (n, stride) (the broadcasts keep their padded lanes),
            // then written into columns o0..o0+n of y.
            let stride = if dot_products { rows_w } else { lanes };
            let mut block = [0f32; TASK_ROWS * MAX_ROWS];
            let block = &mut block[..n * stride];
            // SAFETY: the ISA's features are present (`Isa::detect`); `n` weight rows from
            // `o0` and all `rows` of x (or of `x_t`, `(inner, lanes)` with `lanes >= rows`) are
            // in bounds. Q4_1 weights come with `inner` a multiple of 32.
            unsafe {
                match (w, isa) {
                    (StreamWeight::F32(w), _) => {
                        let w = &w[o0 * inner..(o0 + n) * inner];
                        match isa {
                            _ if dot_products => avx512::rows_block(x, rows, w, n, inner, block),
                            Isa::Avx512 => avx512::lanes_block(&x_t, vectors, w, n, inner, block),
                            Isa::Avx2 => avx2::lanes_block(&x_t, vectors, w, n, inner, block),
                        }
                    }
                    (StreamWeight::Q4_1(b), _) => {
                        let per_row = inner / BLOCK;
                        let b = &b[o0 * per_row..(o0 + n) * per_row];
                        match isa {
                            Isa::Avx512 => {
                                avx512::lanes_block_q4_1(&x_t, vectors, b, n, inner, block)
                            }
                            Isa::Avx2 => avx2::lanes_block_q4_1(&x_t, vectors, b, n, inner, block),
                        }
                    }
                }
            }
            let y = y_ptrs[j];
            for i in 0..rows {
                // SAFETY: row i of y_j holds `out` elements; tasks write disjoint columns.
                let dst = unsafe { std::slice::from_raw_parts_mut(y.0.add(i * out + o0), n) };
                for (c, d) in dst.iter_mut().enumerate() {
                    *d = block[c * stride + i];
                }
            }
        });
        for (y, &(_, out)) in ys.iter_mut().zip(weights) {
            // SAFETY: the tasks cover columns 0..out of every row.
            unsafe { y.set_len(rows * out) };
        }
        Some(ys)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, x, rows, weights, inner, dot_products);
        None
    }
}

/// The broadcast kernels for one instruction set (`$feature`, vectors `$vec` of `$w` f32
/// lanes and their intrinsics): `lanes_rows` over f32 weight rows, `lanes_rows_q4_1` over Q4_1
/// blocks expanded by the module's own `dequantize`; both end in the same tile, so a weight
/// gives the same bits either way. `tiles` maps the vectors of `x^T` (1 per `$w` rows of x) to
/// the weight rows per tile; `lanes_block` and `lanes_block_q4_1` dispatch on it.
#[cfg(target_arch = "x86_64")]
macro_rules! lanes_kernels {
    ($feature:literal, $vec:ty, $w:literal, $zero:ident, $load:ident, $store:ident,
     $set1:ident, $fmadd:ident, tiles: [$($v:literal => $no:literal),+]) => {
        /// `dst[o * lanes * vectors + i] = w_o . x_i` for the `n` weight rows of `w`, from
        /// `x_t: (inner, lanes * vectors)` (x transposed, padded with zeros); `dst` holds
        /// `(n, lanes * vectors)`. Weight rows per tile: as many accumulators as the registers
        /// hold.
        #[target_feature(enable = $feature)]
        pub unsafe fn lanes_block(
            x_t: &[f32],
            vectors: usize,
            w: &[f32],
            n: usize,
            inner: usize,
            dst: &mut [f32],
        ) {
            match vectors {
                $($v => lanes_rows::<$v, $no>(x_t, w, n, inner, dst),)+
                _ => unreachable!("lanes_block: at most 48 rows"),
            }
        }

        /// [`lanes_block`] for `n` rows of Q4_1 blocks, `inner / 32` per row.
        #[target_feature(enable = $feature)]
        pub unsafe fn lanes_block_q4_1(
            x_t: &[f32],
            vectors: usize,
            blocks: &[BlockQ4_1],
            n: usize,
            inner: usize,
            dst: &mut [f32],
        ) {
            match vectors {
                $($v => lanes_rows_q4_1::<$v, $no>(x_t, blocks, n, inner, dst),)+
                _ => unreachable!("lanes_block_q4_1: at most 48 rows"),
            }
        }

        /// Steps of `k` per pass over a task's tiles: a chunk of `x^T` (at most 128 x 48
        /// floats, 24 KiB) stays in L1 while the tiles' weights stream by; the partial sums
        /// wait in `dst` between chunks, so each output is still one running sum in `k` order.
        const KC: usize = 128;

        /// Rows `0..n` of `partial (n, $w V)`: `w (n, inner)` times `x_t (inner, $w V)`.
        #[target_feature(enable = $feature)]
        unsafe fn lanes_rows<const V: usize, const NO: usize>(
            x_t: &[f32],
            w: &[f32],
            n: usize,
            inner: usize,
            partial: &mut [f32],
        ) {
            assert!(
                partial.len() >= n * $w * V,
                "lanes_rows: the output holds fewer than n x lanes"
            );
            for k0 in (0..inner).step_by(KC) {
                let k1 = (k0 + KC).min(inner);
                let mut o = 0;
                while o + NO <= n {
                    lanes_tile::<V, NO>(x_t, w, o, inner, (k0, k1), partial);
                    o += NO;
                }
                while o < n {
                    lanes_tile::<V, 1>(x_t, w, o, inner, (k0, k1), partial);
                    o += 1;
                }
            }
        }

        /// Rows `o..o+NO` of `partial` plus `sum_{k0 <= k < k1} w[o + r, k] x^T[k, :]`.
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn lanes_tile<const V: usize, const NO: usize>(
            x_t: &[f32],
            w: &[f32],
            o: usize,
            inner: usize,
            (k0, k1): (usize, usize),
            partial: &mut [f32],
        ) {
            let lanes = $w * V;
            let wp = w.as_ptr().add(o * inner);
            // One base pointer per weight row, so each broadcast is a single addressed operand.
            let w_rows: [*const f32; NO] = std::array::from_fn(|r| wp.add(r * inner + k0));
            // The next tile's part of this chunk (its rows are short streams the hardware
            // prefetcher barely ramps up on), one cache line per step; prefetching never
            // faults, so past the last tile the addresses need not be valid.
            let prefetch = Prefetch {
                row: wp.wrapping_add(NO * inner + k0) as *const i8,
                lines_per_row: (k1 - k0).div_ceil(16),
                row_bytes: 4 * inner,
                lines: NO * (k1 - k0).div_ceil(16),
            };
            lanes_tile_at::<V, NO>(
                x_t.as_ptr().add(k0 * lanes),
                w_rows,
                k1 - k0,
                partial.as_mut_ptr().add(o * lanes),
                k0 > 0,
                prefetch,
            );
        }

        /// Cache lines to prefetch while a tile runs: `lines` of them, `lines_per_row` from
        /// each row, rows `row_bytes` apart from `row` on.
        struct Prefetch {
            row: *const i8,
            lines_per_row: usize,
            row_bytes: usize,
            lines: usize,
        }

        /// `sum_{k < len} w_rows[r][k] xp[k, :]` into `pp`'s rows (`$w V` floats each), added
        /// to what `pp` holds when `accumulate`: each output one running sum in `k` order.
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn lanes_tile_at<const V: usize, const NO: usize>(
            xp: *const f32,
            w_rows: [*const f32; NO],
            len: usize,
            pp: *mut f32,
            accumulate: bool,
            prefetch: Prefetch,
        ) {
            let lanes = $w * V;
            let mut acc: [[$vec; V]; NO] = [[$zero(); V]; NO];
            if accumulate {
                for (r, a) in acc.iter_mut().enumerate() {
                    for (j, aj) in a.iter_mut().enumerate() {
                        *aj = $load(pp.add(r * lanes + $w * j));
                    }
                }
            }
            let (mut pf_row, mut pf_line, mut pf_left) = (prefetch.row, 0, prefetch.lines);
            for k in 0..len {
                if pf_left > 0 {
                    _mm_prefetch::<_MM_HINT_T0>(pf_row.wrapping_add(64 * pf_line));
                    pf_line += 1;
                    if pf_line == prefetch.lines_per_row {
                        (pf_line, pf_row) = (0, pf_row.wrapping_add(prefetch.row_bytes));
                    }
                    pf_left -= 1;
                }
                let mut xv: [$vec; V] = [$zero(); V];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = $load(xp.add(k * lanes + $w * j));
                }
                for (a, row) in acc.iter_mut().zip(&w_rows) {
                    let b = $set1(*row.add(k));
                    for (j, aj) in a.iter_mut().enumerate() {
                        *aj = $fmadd(b, xv[j], *aj);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (j, aj) in a.iter().enumerate() {
                    $store(pp.add(r * lanes + $w * j), *aj);
                }
            }
        }

        /// Rows `0..n` of `partial` from `n` rows of Q4_1 blocks (`inner / 32` each): every
        /// chunk of a tile's weights is expanded to f32 in an L1 scratch, then runs the f32
        /// tile, so each output has the bits the f32 weight would give it.
        #[target_feature(enable = $feature)]
        unsafe fn lanes_rows_q4_1<const V: usize, const NO: usize>(
            x_t: &[f32],
            blocks: &[BlockQ4_1],
            n: usize,
            inner: usize,
            partial: &mut [f32],
        ) {
            let lanes = $w * V;
            let per_row = inner / BLOCK;
            assert!(
                partial.len() >= n * lanes
                    && blocks.len() == n * per_row
                    && KC % BLOCK == 0
                    && NO <= 16,
                "lanes_rows_q4_1: the output or the blocks do not fit n x inner"
            );
            let mut scratch = [0f32; 16 * KC];
            let no_prefetch = || Prefetch {
                row: std::ptr::null(),
                lines_per_row: 1,
                row_bytes: 0,
                lines: 0,
            };
            for k0 in (0..inner).step_by(KC) {
                let k1 = (k0 + KC).min(inner);
                let (b0, b1) = (k0 / BLOCK, k1 / BLOCK);
                let xp = x_t.as_ptr().add(k0 * lanes);
                let mut o = 0;
                while o < n {
                    let tile = NO.min(n - o);
                    for r in 0..tile {
                        let row = &blocks[(o + r) * per_row..(o + r + 1) * per_row];
                        dequantize(&row[b0..b1], &mut scratch[r * KC..r * KC + (k1 - k0)]);
                    }
                    let pp = partial.as_mut_ptr().add(o * lanes);
                    if tile == NO {
                        let w_rows = std::array::from_fn(|r| scratch.as_ptr().add(r * KC));
                        lanes_tile_at::<V, NO>(xp, w_rows, k1 - k0, pp, k0 > 0, no_prefetch());
                    } else {
                        for r in 0..tile {
                            let w_row = [scratch.as_ptr().add(r * KC)];
                            let pr = pp.add(r * lanes);
                            lanes_tile_at::<V, 1>(xp, w_row, k1 - k0, pr, k0 > 0, no_prefetch());
                        }
                    }
                    o += tile;
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::kernels::q4_1::{BlockQ4_1, BLOCK};
    use std::arch::x86_64::*;

    /// Rows of `x` taken together by the kernel.
    const NI: usize = 6;
    /// Weight rows taken together by the kernel.
    const NO: usize = 4;

    /// `dst[o * rows + i] = w_o . x_i` for the `n` weight rows of `w`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_block(
        x: &[f32],
        rows: usize,
        w: &[f32],
        n: usize,
        inner: usize,
        dst: &mut [f32],
    ) {
        let mut o = 0;
        while o + NO <= n {
            let mut i = 0;
            while i + NI <= rows {
                tile::<NI>(x, i, w, o, inner, rows, dst);
                i += NI;
            }
            match rows - i {
                0 => {}
                1 => tile::<1>(x, i, w, o, inner, rows, dst),
                2 => tile::<2>(x, i, w, o, inner, rows, dst),
                3 => tile::<3>(x, i, w, o, inner, rows, dst),
                4 => tile::<4>(x, i, w, o, inner, rows, dst),
                _ => tile::<5>(x, i, w, o, inner, rows, dst),
            }
            o += NO;
        }
        // Weight rows left over (out not a multiple of 4): one dot product at a time.
        for o in o..n {
            for i in 0..rows {
                dst[o * rows + i] = dot(
                    &w[o * inner..(o + 1) * inner],
                    &x[i * inner..(i + 1) * inner],
                );
            }
        }
    }

    /// The 4 x `M` dot products of weight rows `o..o+4` with rows `i..i+M` of `x`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const M: usize>(
        x: &[f32],
        i: usize,
        w: &[f32],
        o: usize,
        inner: usize,
        rows: usize,
        dst: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); NO]; M];
        let wp = w.as_ptr().add(o * inner);
        let xp = x.as_ptr().add(i * inner);
        let mut k = 0;
        while k + 16 <= inner {
            let w0 = _mm512_loadu_ps(wp.add(k));
            let w1 = _mm512_loadu_ps(wp.add(inner + k));
            let w2 = _mm512_loadu_ps(wp.add(2 * inner + k));
            let w3 = _mm512_loadu_ps(wp.add(3 * inner + k));
            for (m, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(m * inner + k));
                a[0] = _mm512_fmadd_ps(w0, xv, a[0]);
                a[1] = _mm512_fmadd_ps(w1, xv, a[1]);
                a[2] = _mm512_fmadd_ps(w2, xv, a[2]);
                a[3] = _mm512_fmadd_ps(w3, xv, a[3]);
            }
            k += 16;
        }
        if k < inner {
            // The last `inner - k < 16` lanes.
            let mask: __mmask16 = ((1u32 << (inner - k)) - 1) as u16;
            let w0 = _mm512_maskz_loadu_ps(mask, wp.add(k));
            let w1 = _mm512_maskz_loadu_ps(mask, wp.add(inner + k));
            let w2 = _mm512_maskz_loadu_ps(mask, wp.add(2 * inner + k));
            let w3 = _mm512_maskz_loadu_ps(mask, wp.add(3 * inner + k));
            for (m, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(m * inner + k));
                a[0] = _mm512_fmadd_ps(w0, xv, a[0]);
                a[1] = _mm512_fmadd_ps(w1, xv, a[1]);
                a[2] = _mm512_fmadd_ps(w2, xv, a[2]);
                a[3] = _mm512_fmadd_ps(w3, xv, a[3]);
            }
        }
        for (m, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate() {
                *dst.get_unchecked_mut((o + r) * rows + i + m) = _mm512_reduce_add_ps(*v);
            }
        }
    }

    lanes_kernels!(
        "avx512f",
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        // At most 24 accumulators of the 32 registers.
        tiles: [1 => 16, 2 => 12, 3 => 8]
    );

    /// Q4_1 blocks to their f32 weights, `d q + m` per weight (one rounding, as the loader's
    /// `q * d + m`, since `q * d` is exact).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dequantize(blocks: &[BlockQ4_1], out: &mut [f32]) {
        debug_assert_eq!(out.len(), blocks.len() * BLOCK);
        let low = _mm_set1_epi8(0x0F);
        for (b, blk) in blocks.iter().enumerate() {
            let (d, m) = blk.scale_and_min();
            let (d, m) = (_mm512_set1_ps(d), _mm512_set1_ps(m));
            let raw = _mm_loadu_si128(blk.packed().as_ptr() as *const __m128i);
            let lo = _mm_and_si128(raw, low);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), low);
            let q_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
            let q_hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
            let dst = out.as_mut_ptr().add(b * BLOCK);
            _mm512_storeu_ps(dst, _mm512_fmadd_ps(q_lo, d, m));
            _mm512_storeu_ps(dst.add(16), _mm512_fmadd_ps(q_hi, d, m));
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let mut k = 0;
        while k + 16 <= a.len() {
            acc = _mm512_fmadd_ps(
                _mm512_loadu_ps(a.as_ptr().add(k)),
                _mm512_loadu_ps(b.as_ptr().add(k)),
                acc,
            );
            k += 16;
        }
        let mut s = _mm512_reduce_add_ps(acc);
        for j in k..a.len() {
            s += a[j] * b[j];
        }
        s
    }
}

/// The broadcast kernels on 8-lane vectors with 16 registers: at most 12 accumulators per tile
/// (a weight tile of 8, 6, 3, 2 or 1 rows against 1-6 vectors of `x^T`).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::kernels::q4_1::{BlockQ4_1, BLOCK};
    use std::arch::x86_64::*;

    lanes_kernels!(
        "avx2,fma",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        // At most 12 accumulators of the 16 registers.
        tiles: [1 => 8, 2 => 6, 3 => 3, 4 => 2, 5 => 2, 6 => 1]
    );

    /// Q4_1 blocks to their f32 weights, `d q + m` per weight (one rounding, as the loader's
    /// `q * d + m`, since `q * d` is exact).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dequantize(blocks: &[BlockQ4_1], out: &mut [f32]) {
        debug_assert_eq!(out.len(), blocks.len() * BLOCK);
        let low = _mm_set1_epi8(0x0F);
        for (b, blk) in blocks.iter().enumerate() {
            let (d, m) = blk.scale_and_min();
            let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
            let raw = _mm_loadu_si128(blk.packed().as_ptr() as *const __m128i);
            let halves = [
                _mm_and_si128(raw, low),
                _mm_and_si128(_mm_srli_epi16::<4>(raw), low),
            ];
            let dst = out.as_mut_ptr().add(b * BLOCK);
            for (h, q) in halves.into_iter().enumerate() {
                // Bytes 0-7 and 8-15 of each half: weights 16 h .. 16 h + 16.
                let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
                let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(q)));
                _mm256_storeu_ps(dst.add(16 * h), _mm256_fmadd_ps(q0, d, m));
                _mm256_storeu_ps(dst.add(16 * h + 8), _mm256_fmadd_ps(q1, d, m));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], rows: usize, w: &[f32], out: usize, inner: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..inner)
                    .map(|k| x[r * inner + k] as f64 * w[o * inner + k] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn every_tile_and_edge_equals_the_plain_product() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        // Rows around the 6-row dot tile and the 16-lane vectors, out around the 4- and 8-row
        // weight tiles and the 48-row task, inner around the 16-lane vector; both kernels.
        for (rows, out, inner) in [
            (1, 4, 16),
            (2, 5, 17),
            (6, 64, 31),
            (7, 67, 576),
            (13, 130, 15),
            (16, 33, 40),
            (17, 8, 3),
            (31, 71, 64),
            (32, 192, 33),
            (33, 9, 1),
            (48, 9, 1),
            (48, 100, 577),
        ] {
            let x: Vec<f32> = (0..rows * inner).map(|_| next()).collect();
            let w: Vec<f32> = (0..out * inner).map(|_| next()).collect();
            let want = reference(&x, rows, &w, out, inner);
            for dot_products in [true, false] {
                let Some(isa) = Isa::detect() else {
                    eprintln!("no AVX2 here: the kernels are not exercised");
                    return;
                };
                let y = by_kernel_on(
                    isa,
                    &x,
                    rows,
                    &[(StreamWeight::F32(&w), out)],
                    inner,
                    dot_products,
                )
                .unwrap()
                .remove(0);
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{rows}x{out}x{inner} (dot products {dot_products}): {a} vs {b}"
                    );
                }
            }
        }
        assert!(few_rows_matmul(&[0.0; 49], 49, &[0.0; 1], 1, 1).is_none());
    }

    #[test]
    fn several_weights_at_once_equal_each_alone() {
        for rows in [3, 20] {
            let inner = 37;
            let x: Vec<f32> = (0..rows * inner).map(|i| (i as f32 * 0.3).sin()).collect();
            let outs = [100, 7, 49];
            let ws: Vec<Vec<f32>> = outs
                .iter()
                .map(|&o| {
                    (0..o * inner)
                        .map(|i| (i as f32 * 0.7 + o as f32).cos())
                        .collect()
                })
                .collect();
            let pairs: Vec<(&[f32], usize)> = ws
                .iter()
                .zip(outs)
                .map(|(w, o)| (w.as_slice(), o))
                .collect();
            let Some(many) = few_rows_matmul_many(&x, rows, &pairs, inner) else {
                return;
            };
            for ((w, out), y) in pairs.iter().zip(&many) {
                assert_eq!(few_rows_matmul(&x, rows, w, *out, inner).as_ref(), Some(y));
                let want = reference(&x, rows, w, *out, inner);
                assert!(y
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs())));
            }
        }
    }

    #[test]
    fn the_broadcast_kernel_does_not_depend_on_the_thread_count() {
        let (rows, out, inner) = (32, 1000, 96);
        let x: Vec<f32> = (0..rows * inner).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..out * inner).map(|i| (i as f32 * 0.11).cos()).collect();
        let run = |threads: usize| {
            crate::testing::with_threads(threads, || {
                by_kernel(&x, rows, &[(StreamWeight::F32(&w), out)], inner, false)
            })
        };
        let one = run(1);
        if one.is_none() {
            eprintln!("no AVX2 here: the kernel is not exercised");
            return;
        }
        assert_eq!(one, run(3));
    }

    #[test]
    fn both_instruction_sets_give_the_same_bits() {
        // Every output is one running sum in `k` order whatever the vector width and tiles.
        if Isa::detect() != Some(Isa::Avx512) {
            eprintln!("no AVX-512 here: only one instruction set to compare");
            return;
        }
        let inner = 300;
        let m = random_q4_1(70, 320, 3);
        for rows in [5, 9, 17, 25, 33, 41, 48] {
            let x: Vec<f32> = (0..rows * inner).map(|i| (i as f32 * 0.13).sin()).collect();
            let w: Vec<f32> = (0..70 * inner).map(|i| (i as f32 * 0.7).cos()).collect();
            let f = [(StreamWeight::F32(&w), 70)];
            let on = |isa, x: &[f32], ws: &[(StreamWeight, usize)], inner| {
                by_kernel_on(isa, x, rows, ws, inner, false).unwrap()
            };
            assert_eq!(on(Isa::Avx2, &x, &f, inner), on(Isa::Avx512, &x, &f, inner));
            let x: Vec<f32> = (0..rows * 320).map(|i| (i as f32 * 0.29).sin()).collect();
            let q = [(StreamWeight::Q4_1(m.blocks()), 70)];
            assert_eq!(on(Isa::Avx2, &x, &q, 320), on(Isa::Avx512, &x, &q, 320));
        }
    }

    /// Random Q4_1 blocks for `(out, inner)`: scales of both signs, some subnormal f16 ones,
    /// minimums of both signs.
    fn random_q4_1(out: usize, inner: usize, seed: u64) -> crate::kernels::q4_1::Q41Matrix {
        let mut state = seed;
        let mut bytes = Vec::with_capacity(out * inner / BLOCK * 20);
        for b in 0..out * inner / BLOCK {
            let mut next = || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as u32
            };
            // f16 bits: sign, exponent 0 (subnormal) every 7th block, else 9..18.
            let exp = if b % 7 == 0 { 0 } else { 9 + next() % 10 };
            let d = ((next() & 1) << 15) | (exp << 10) | (next() & 0x3FF);
            let m = ((next() & 1) << 15) | ((9 + next() % 10) << 10) | (next() & 0x3FF);
            bytes.extend_from_slice(&(d as u16).to_le_bytes());
            bytes.extend_from_slice(&(m as u16).to_le_bytes());
            for _ in 0..16 {
                bytes.push(next() as u8);
            }
        }
        crate::kernels::q4_1::Q41Matrix::from_gguf_bytes(&bytes, out, inner).unwrap()
    }

    #[test]
    fn q4_1_blocks_give_the_bits_of_their_f32_weights() {
        // Rows on both sides of each vector count; out around the weight tiles (16, 12, 8) and
        // the 48-row task; inner past one 128-wide chunk and not a multiple of it.
        for (rows, out, inner) in [
            (5, 17, 32),
            (16, 48, 160),
            (17, 61, 576),
            (32, 100, 96),
            (33, 9, 256),
            (48, 130, 64),
        ] {
            let m = random_q4_1(out, inner, rows as u64);
            let w = m.dequantize();
            let x: Vec<f32> = (0..rows * inner)
                .map(|i| ((i * 7919) as f32 * 1e-3).sin())
                .collect();
            let from_blocks =
                few_rows_matmul_streams(&x, rows, &[(StreamWeight::Q4_1(m.blocks()), out)], inner);
            let Some(from_blocks) = from_blocks else {
                eprintln!("no AVX2 here: the Q4_1 kernel is not exercised");
                return;
            };
            let from_f32 = few_rows_matmul(&x, rows, &w, out, inner).unwrap();
            assert_eq!(from_blocks[0], from_f32, "{rows}x{out}x{inner}");
            let want = reference(&x, rows, &w, out, inner);
            assert!(from_f32
                .iter()
                .zip(&want)
                .all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs())));
        }
        // Mixed with f32 weights in one call, and the rows the Q4_1 kernel does not take.
        let (m, inner) = (random_q4_1(40, 64, 9), 64);
        let w2: Vec<f32> = (0..24 * inner).map(|i| (i as f32 * 0.3).cos()).collect();
        let x: Vec<f32> = (0..20 * inner).map(|i| (i as f32 * 0.1).sin()).collect();
        let both = few_rows_matmul_streams(
            &x,
            20,
            &[
                (StreamWeight::Q4_1(m.blocks()), 40),
                (StreamWeight::F32(&w2), 24),
            ],
            inner,
        )
        .unwrap();
        assert_eq!(
            both[0],
            few_rows_matmul(&x, 20, &m.dequantize(), 40, inner).unwrap()
        );
        assert_eq!(both[1], few_rows_matmul(&x, 20, &w2, 24, inner).unwrap());
        let blocks = [(StreamWeight::Q4_1(m.blocks()), 40)];
        assert!(few_rows_matmul_streams(&x[..4 * inner], 4, &blocks, inner).is_none());
    }

    /// Not a test: times both kernels and gemm's blocked product on decode-sized products,
    /// each call on a fresh weight (as in a decoding step, where no weight is cache-resident).
    #[test]
    #[ignore]
    fn timing_against_gemm() {
        for (out, inner) in [(1536, 576), (576, 1536), (192, 576), (49152, 576)] {
            // SAFEGEO_TIMING_MB: the weights cycled through (256 MiB: more than most caches).
            let mb: usize = std::env::var("SAFEGEO_TIMING_MB")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256);
            let copies = (mb << 20) / (4 * out * inner);
            let ws: Vec<Vec<f32>> = (0..copies.max(2))
                .map(|c| {
                    (0..out * inner)
                        .map(|i| ((i + c) as f32 * 1e-3).sin())
                        .collect()
                })
                .collect();
            for rows in [1, 2, 4, 8, 16, 24, 32, 48] {
                let x: Vec<f32> = (0..rows * inner).map(|i| (i as f32).cos()).collect();
                // The best of five passes (this machine's neighbours make single ones noisy).
                let time = |f: &dyn Fn(&[f32]) -> Vec<f32>| {
                    (0..5)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            for w in &ws {
                                std::hint::black_box(f(w));
                            }
                            t.elapsed().as_secs_f64() * 1e3 / ws.len() as f64
                        })
                        .fold(f64::INFINITY, f64::min)
                };
                let dot = if Isa::detect() == Some(Isa::Avx512) {
                    time(&|w| {
                        by_kernel(&x, rows, &[(StreamWeight::F32(w), out)], inner, true)
                            .unwrap()
                            .remove(0)
                    })
                } else {
                    f64::NAN
                };
                let lanes = time(&|w| {
                    let isa = Isa::detect().unwrap();
                    by_kernel_on(isa, &x, rows, &[(StreamWeight::F32(w), out)], inner, false)
                        .unwrap()
                        .remove(0)
                });
                let blocks: Vec<crate::kernels::q4_1::Q41Matrix> = if rows > DOT_MAX_ROWS {
                    // As many bytes as the f32 copies: no more of them cache-resident.
                    let copies = (mb << 20) / (out * inner / BLOCK * 20);
                    (0..copies.max(2))
                        .map(|c| random_q4_1(out, inner, c as u64))
                        .collect()
                } else {
                    Vec::new()
                };
                let q4_1 = if blocks.is_empty() {
                    f64::NAN
                } else {
                    (0..5)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            for m in &blocks {
                                let w = [(StreamWeight::Q4_1(m.blocks()), out)];
                                std::hint::black_box(few_rows_matmul_streams(&x, rows, &w, inner));
                            }
                            t.elapsed().as_secs_f64() * 1e3 / blocks.len() as f64
                        })
                        .fold(f64::INFINITY, f64::min)
                };
                let gemm = time(&|w| {
                    crate::ops::transpose(
                        &crate::kernels::gemm::weight_rows_times_x_t(w, out, inner, &x, rows),
                        out,
                        rows,
                    )
                });
                println!(
                    "{out:>6} x {inner:>4}, {rows:>2} rows: dot {dot:.3} ms, broadcast {lanes:.3} ms, broadcast from Q4_1 {q4_1:.3} ms, gemm {gemm:.3} ms"
                );
            }
        }
    }
}
