//! General matrix products on f32 slices with explicit strides: a fresh buffer, an accumulate,
//! and the weight-rows-times-activations split the few-row products use. By the system OpenBLAS
//! where `crate::kernels::blas` found one and takes the product, else by the `gemm` crate.
use rayon::prelude::*;

/// `a (m, k) * b (k, n)` in a fresh row-major buffer, with explicit strides (column, row) for
/// `a` and `b`. gemm writes every element (it does not read `dst`), so the buffer is not zeroed
/// first: that memset was 3% of a prefill.
pub(crate) fn gemm_new(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    a_strides: (isize, isize),
    b: &[f32],
    b_strides: (isize, isize),
) -> Vec<f32> {
    if k == 0 || m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    let mut dst: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(m * n);
    // SAFETY: with k > 0 and read_dst = false, gemm stores `beta * a b` into every (row, col) of
    // the (m, n) row-major destination without reading it, so all m * n elements are
    // initialized when it returns; the buffer is then reinterpreted with its own capacity.
    unsafe {
        gemm_general(
            dst.as_mut_ptr() as *mut f32,
            (m, n, k),
            a,
            a_strides,
            b,
            b_strides,
            None,
            true,
        );
        dst.set_len(m * n);
        let mut dst = std::mem::ManuallyDrop::new(dst);
        Vec::from_raw_parts(dst.as_mut_ptr() as *mut f32, m * n, dst.capacity())
    }
}

/// `W (out, inner) x^T` for `x: (rows, inner)`, as `(out, rows)` row-major: the weight's rows
/// split in 8 contiguous blocks spread over the threads, each block a single-threaded gemm.
/// For a few dozen rows gemm's own threading costs more than the product (measured, 2 cores,
/// 32 rows, one block per thread: 1536 x 576 weight 0.30 ms vs 0.44 ms threaded inside,
/// 576 x 1536 0.24 vs 0.39, 192 x 576 0.05 vs 0.11; the 49152-row LM head the same).
pub(crate) fn weight_rows_times_x_t(
    w: &[f32],
    out: usize,
    inner: usize,
    x: &[f32],
    rows: usize,
) -> Vec<f32> {
    if inner == 0 || rows == 0 || out == 0 {
        return vec![0f32; out * rows];
    }
    // A fixed number of blocks of whole 16-row panels, not one per thread: gemm's blocking
    // follows the block's size, so blocks cut by the thread count made the low bits depend
    // on it (results must not: `--threads 1` and `2` give identical files).
    const BLOCKS: usize = 8;
    let block = out.div_ceil(BLOCKS).div_ceil(16) * 16;
    let inner_s = inner as isize;
    let mut y_t = Vec::<f32>::with_capacity(out * rows);
    y_t.spare_capacity_mut()[..out * rows]
        .par_chunks_mut(block * rows)
        .enumerate()
        .for_each(|(i, dst)| {
            let (o0, n) = (i * block, dst.len() / rows);
            // SAFETY: with k = inner > 0 and no accumulation, gemm writes every element of the
            // (n, rows) row-major block `dst` without reading it, from the `n` weight rows from
            // `o0` (in bounds) and all of `x`.
            unsafe {
                gemm_general(
                    dst.as_mut_ptr() as *mut f32,
                    (n, rows, inner),
                    &w[o0 * inner..],
                    (1, inner_s),
                    x,
                    (inner_s, 1),
                    None,
                    false,
                )
            };
        });
    // SAFETY: every element was written above (the blocks cover all `out` weight rows).
    unsafe { y_t.set_len(out * rows) };
    y_t
}

/// `dst (m, n) += scale * a (m, k) * b (k, n)` with explicit strides (column, row).
pub(crate) fn gemm_acc(
    dst: &mut [f32],
    mnk: (usize, usize, usize),
    a: &[f32],
    a_strides: (isize, isize),
    b: &[f32],
    b_strides: (isize, isize),
    scale: f32,
) {
    assert!(dst.len() >= mnk.0 * mnk.1);
    // SAFETY: `dst` holds the (m, n) row-major destination, initialized (it is read).
    unsafe {
        gemm_general(
            dst.as_mut_ptr(),
            mnk,
            a,
            a_strides,
            b,
            b_strides,
            Some(scale),
            true,
        )
    }
}

/// `dst = a b`, or with `accumulate = Some(s)` `dst += s a b`; on the calling thread alone
/// unless `threaded`. By the system OpenBLAS where `crate::kernels::blas` found one and takes the
/// product, else by the `gemm` crate.
///
/// # Safety
/// `dst` points to `m * n` writable f32 (row-major), and `a`, `b` hold every element their
/// strides address; with `accumulate`, `dst` must also be initialized.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_general(
    dst: *mut f32,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_cs, a_rs): (isize, isize),
    b: &[f32],
    (b_cs, b_rs): (isize, isize),
    accumulate: Option<f32>,
    threaded: bool,
) {
    if let Some(blas) = crate::kernels::blas::get() {
        // SAFETY: the same contract as this function's.
        let done = unsafe {
            blas.sgemm(
                dst,
                (m, n, k),
                a,
                (a_cs, a_rs),
                b,
                (b_cs, b_rs),
                accumulate,
                threaded,
            )
        };
        if done {
            return;
        }
    }
    let threads = candle_core::utils::get_num_threads();
    let par = if threaded && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let (read_dst, dst_factor, product_factor) = match accumulate {
        Some(s) => (true, 1.0, s),
        None => (false, 0.0, 1.0),
    };
    // SAFETY: the caller's contract (see above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            read_dst,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            dst_factor,
            product_factor,
            false,
            false,
            false,
            par,
        )
    }
}
