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
//! The output's row blocks are spread over the thread pool. Without AVX-512 (or off x86-64)
//! [`few_rows_matmul`] answers `None` and callers keep gemm.
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
    by_kernel(x, rows, weights, inner, rows <= DOT_MAX_ROWS)
}

/// [`few_rows_matmul_many`] with the kernel chosen: dot products or broadcasts.
fn by_kernel(
    x: &[f32],
    rows: usize,
    weights: &[(&[f32], usize)],
    inner: usize,
    dot_products: bool,
) -> Option<Vec<Vec<f32>>> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        let rows_w = rows.max(1);
        // For the broadcast kernel: x^T with each column padded to whole vectors by zeros,
        // built column by column so the writes are contiguous.
        let vectors = rows.div_ceil(16);
        let lanes = 16 * vectors;
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
            let w = &w[o0 * inner..(o0 + n) * inner];
            // This task's block of y^T, (n, stride) (the broadcasts keep their padded lanes),
            // then written into columns o0..o0+n of y.
            let stride = if dot_products { rows_w } else { lanes };
            let mut block = [0f32; TASK_ROWS * MAX_ROWS];
            let block = &mut block[..n * stride];
            // SAFETY: avx512f is present (checked above); `n` weight rows from `o0` and all
            // `rows` of x (or of `x_t`, `(inner, lanes)` with `lanes >= rows`) are in bounds.
            unsafe {
                if dot_products {
                    avx512::rows_block(x, rows, w, n, inner, block)
                } else {
                    avx512::lanes_block(&x_t, vectors, w, n, inner, block)
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
        return Some(ys);
    }
    let _ = (x, rows, weights, inner, dot_products);
    None
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
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

    /// `dst[o * 16 vectors + i] = w_o . x_i` for the `n` weight rows of `w`, from `x_t: (inner,
    /// 16 * vectors)` (x transposed, padded with zeros); `dst` holds `(n, 16 * vectors)`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn lanes_block(
        x_t: &[f32],
        vectors: usize,
        w: &[f32],
        n: usize,
        inner: usize,
        dst: &mut [f32],
    ) {
        // Weight rows per tile: at most 24 accumulators, as many as fit.
        match vectors {
            1 => lanes_rows::<1, 16>(x_t, w, n, inner, dst),
            2 => lanes_rows::<2, 12>(x_t, w, n, inner, dst),
            3 => lanes_rows::<3, 8>(x_t, w, n, inner, dst),
            _ => unreachable!("lanes_block: at most 48 rows"),
        }
    }

    /// Steps of `k` per pass over a task's tiles: a chunk of `x^T` (at most 128 x 48 floats,
    /// 24 KiB) stays in L1 while the tiles' weights stream by; the partial sums wait in
    /// `dst` between chunks, so each output is still one running sum in `k` order.
    const KC: usize = 128;

    #[target_feature(enable = "avx512f")]
    unsafe fn lanes_rows<const V: usize, const NO: usize>(
        x_t: &[f32],
        w: &[f32],
        n: usize,
        inner: usize,
        partial: &mut [f32],
    ) {
        assert!(
            partial.len() >= n * 16 * V,
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

    /// Rows `o..o+NO` of `partial (n, 16 V)` plus `sum_{k0 <= k < k1} w[o + r, k] x^T[k, :]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn lanes_tile<const V: usize, const NO: usize>(
        x_t: &[f32],
        w: &[f32],
        o: usize,
        inner: usize,
        (k0, k1): (usize, usize),
        partial: &mut [f32],
    ) {
        let lanes = 16 * V;
        let pp = partial.as_mut_ptr().add(o * lanes);
        let mut acc = [[_mm512_setzero_ps(); V]; NO];
        if k0 > 0 {
            for (r, a) in acc.iter_mut().enumerate() {
                for (j, aj) in a.iter_mut().enumerate() {
                    *aj = _mm512_loadu_ps(pp.add(r * lanes + 16 * j));
                }
            }
        }
        let wp = w.as_ptr().add(o * inner);
        // One base pointer per weight row, so each broadcast is a single addressed operand.
        let w_rows: [*const f32; NO] = std::array::from_fn(|r| wp.add(r * inner));
        // The next tile's part of this chunk (its rows are short streams the hardware
        // prefetcher barely ramps up on), one cache line per step; prefetching never faults,
        // so past the last tile the addresses need not be valid.
        let lines_per_row = (k1 - k0).div_ceil(16);
        let (mut pf_row, mut pf_line, mut pf_left) = (
            wp.wrapping_add(NO * inner + k0) as *const i8,
            0,
            NO * lines_per_row,
        );
        let xp = x_t.as_ptr();
        for k in k0..k1 {
            if pf_left > 0 {
                _mm_prefetch::<_MM_HINT_T0>(pf_row.wrapping_add(64 * pf_line));
                pf_line += 1;
                if pf_line == lines_per_row {
                    (pf_line, pf_row) = (0, pf_row.wrapping_add(4 * inner));
                }
                pf_left -= 1;
            }
            let mut xv = [_mm512_setzero_ps(); V];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add(k * lanes + 16 * j));
            }
            for (a, row) in acc.iter_mut().zip(&w_rows) {
                let b = _mm512_set1_ps(*row.add(k));
                for (j, aj) in a.iter_mut().enumerate() {
                    *aj = _mm512_fmadd_ps(b, xv[j], *aj);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (j, aj) in a.iter().enumerate() {
                _mm512_storeu_ps(pp.add(r * lanes + 16 * j), *aj);
            }
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
                let Some(y) =
                    by_kernel(&x, rows, &[(&w, out)], inner, dot_products).map(|mut y| y.remove(0))
                else {
                    eprintln!("no AVX-512 here: the kernels are not exercised");
                    return;
                };
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
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| by_kernel(&x, rows, &[(&w, out)], inner, false))
        };
        let one = run(1);
        if one.is_none() {
            eprintln!("no AVX-512 here: the kernel is not exercised");
            return;
        }
        assert_eq!(one, run(3));
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
                let dot = time(&|w| {
                    by_kernel(&x, rows, &[(w, out)], inner, true)
                        .unwrap()
                        .remove(0)
                });
                let lanes = time(&|w| {
                    by_kernel(&x, rows, &[(w, out)], inner, false)
                        .unwrap()
                        .remove(0)
                });
                let gemm = time(&|w| {
                    crate::ops::transpose(
                        &crate::fused::weight_rows_times_x_t(w, out, inner, &x, rows),
                        out,
                        rows,
                    )
                });
                println!(
                    "{out:>6} x {inner:>4}, {rows:>2} rows: dot {dot:.3} ms, broadcast {lanes:.3} ms, gemm {gemm:.3} ms"
                );
            }
        }
    }
}
