//! An optional system OpenBLAS for the large f32 products (prompt passes, training).
//!
//! The `gemm` crate is the default and always present. Where OpenBLAS carries hand-tuned
//! kernels for the CPU and `gemm` does not, its `sgemm` is faster: on a 2-core AMD EPYC (AVX2)
//! Debian's `libopenblas0-pthread` 0.3.21 measured 1.10-1.21x `gemm`'s GFLOP/s on the shapes of
//! a prompt pass (2048 x 576 x 576 ... 2048 x 3072 x 576; 1024^3: 135.5 against 112.3). So it is
//! loaded at run time when the system has it (no build-time dependency): `SAFEGEO_BLAS=off`
//! keeps `gemm`, `SAFEGEO_BLAS=/path/libopenblas.so` picks a file (used on any CPU), and
//! otherwise `libopenblas.so.0` is tried and used on AVX2 CPUs without AVX-512 when it runs its
//! Haswell or Zen kernels. On AVX-512 `gemm`'s own kernels measured as fast as OpenBLAS's on an
//! Intel CPU and faster on an AMD Zen 4 (1024^3: 283-320 against 195-208 GFLOP/s), so it stays
//! there.
//!
//! OpenBLAS runs single-threaded here, one call per tile of the output on this crate's thread
//! pool: its own threads would spin between calls while the pool runs the element-wise work.
//! The tiles follow the shape and the machine's hardware threads, never the pool's size, and
//! every output element is one call's sum over all of `k`, so `--threads 1` and `--threads 2`
//! give the same bits.
use std::ffi::c_int;
use std::sync::OnceLock;

/// `cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type CblasSgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// Fewer multiply-adds than this stay with `gemm` (a call's fixed cost is not worth it).
const MIN_WORK: usize = 1 << 21;

/// Products with fewer output rows or columns than this stay with `gemm`.
const MIN_SIDE: usize = 32;

/// The machine's hardware threads: the tiles follow it, not the pool's size, so a product has
/// the same bits with `--threads 1` and `--threads 2`.
fn hardware_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A loaded OpenBLAS.
pub struct Blas {
    sgemm: CblasSgemm,
    /// What was loaded (file name and OpenBLAS's own description of its build and core).
    pub description: String,
    /// The kernel family OpenBLAS chose for this CPU (`Zen`, `Haswell`, `SkylakeX`, ...).
    core: String,
    _lib: libloading::Library,
}

/// The system OpenBLAS, when present and not switched off (see the module docs). A library
/// named by `SAFEGEO_BLAS` that cannot be loaded is reported once on stderr, and `gemm` is used.
pub fn get() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let choice = std::env::var("SAFEGEO_BLAS").ok();
        match choice.as_deref() {
            Some("off") | Some("0") | Some("gemm") => None,
            Some(path) if !path.is_empty() => match load(path) {
                Ok(b) => Some(b),
                Err(e) => {
                    eprintln!(
                        "warning: SAFEGEO_BLAS={path}: {e}; using the built-in gemm (install \
                         OpenBLAS, e.g. `apt-get install libopenblas0-pthread`, or unset \
                         SAFEGEO_BLAS)"
                    );
                    None
                }
            },
            _ => load("libopenblas.so.0").ok().filter(worth_it_here),
        }
    })
    .as_ref()
}

/// Which library runs the large f32 products.
pub fn backend() -> String {
    match get() {
        Some(b) => b.description.clone(),
        None => "gemm crate (built in)".into(),
    }
}

/// Whether a found OpenBLAS is used without being asked for: only where it was measured faster
/// than `gemm`, i.e. on AVX2 CPUs without AVX-512 (there `gemm`'s AVX-512 kernels matched it),
/// and only when OpenBLAS runs its own AVX2 kernels (Debian's 0.3.21 takes CPUs newer than it
/// knows for a Prescott and runs SSE3 code).
fn worth_it_here(b: &Blas) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2_kernels = ["haswell", "zen"].contains(&b.core.to_ascii_lowercase().as_str());
        !std::is_x86_feature_detected!("avx512f") && avx2_kernels
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = b;
        false
    }
}

fn load(path: &str) -> Result<Blas, String> {
    // SAFETY: loading a shared library runs its initializers; OpenBLAS's only set up its
    // thread pool and buffers. The symbols are taken with OpenBLAS's documented C signatures.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| format!("cannot load: {e}"))?;
        let sgemm = *lib
            .get::<CblasSgemm>(b"cblas_sgemm\0")
            .map_err(|_| "no cblas_sgemm in it".to_string())?;
        let set_threads = *lib
            .get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")
            .map_err(|_| "not OpenBLAS (no openblas_set_num_threads)".to_string())?;
        set_threads(1);
        let text = |name: &[u8]| -> Option<String> {
            let f = lib
                .get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(name)
                .ok()?;
            let p = f();
            (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        let config = text(b"openblas_get_config\0").unwrap_or_default();
        let core = text(b"openblas_get_corename\0").unwrap_or_default();
        Ok(Blas {
            sgemm,
            description: format!("OpenBLAS ({path}; {} core {core})", config.trim()),
            core,
            _lib: lib,
        })
    }
}

/// How a matrix with strides `(column, row)` is handed to cblas: transposed or not, and its
/// leading dimension; `None` when neither stride is 1 (or the other is too small).
fn cblas_layout((cs, rs): (isize, isize), rows: usize, cols: usize) -> Option<(c_int, c_int)> {
    let fits = |ld: isize, min: usize| ld >= min.max(1) as isize && ld <= c_int::MAX as isize;
    if cs == 1 && fits(rs, cols) {
        Some((NO_TRANS, rs as c_int))
    } else if rs == 1 && fits(cs, rows) {
        Some((TRANS, cs as c_int))
    } else {
        None
    }
}

impl Blas {
    /// `dst (m, n) = a b`, or `dst += scale a b` with `accumulate = Some(scale)`, for row-major
    /// `dst` and `a (m, k)`, `b (k, n)` with strides `(column, row)`; spread over the thread pool
    /// when `threaded`. `false` (nothing written) when the product is small or a layout is not
    /// one cblas takes: the caller then uses `gemm`.
    ///
    /// # Safety
    /// `dst` points to `m * n` writable f32, initialized when accumulating; `a` and `b` hold
    /// every element their strides address.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sgemm(
        &self,
        dst: *mut f32,
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        a_strides: (isize, isize),
        b: &[f32],
        b_strides: (isize, isize),
        accumulate: Option<f32>,
        threaded: bool,
    ) -> bool {
        // Thin products (a few rows or columns, as in decoding) stay with `gemm`, whose
        // matrix-vector path is faster (measured: batch-1 decoding 17 tok/s through OpenBLAS's
        // sgemm against 20-22).
        let small = m.saturating_mul(n).saturating_mul(k) < MIN_WORK || m.min(n) < MIN_SIDE;
        let fits_int = [m, n, k].iter().all(|&d| d <= c_int::MAX as usize);
        if small || !fits_int {
            return false;
        }
        let (Some((ta, lda)), Some((tb, ldb))) =
            (cblas_layout(a_strides, m, k), cblas_layout(b_strides, k, n))
        else {
            return false;
        };
        let (alpha, beta) = match accumulate {
            Some(s) => (s, 1.0),
            None => (1.0, 0.0),
        };
        // One tile per hardware thread, cut along the longer side of the output in whole
        // 16-row (or column) panels: each tile packs its share of the other operand once
        // (256-row tiles packed the weight 8 times in a 2048-row prompt pass: 8% of its time).
        let parts = if threaded { hardware_threads() } else { 1 };
        let (tile_rows, tile_cols) = if m >= n {
            (m.div_ceil(parts).next_multiple_of(16).min(m), n)
        } else {
            (m, n.div_ceil(parts).next_multiple_of(16).min(n))
        };
        let tiles: Vec<(usize, usize)> = (0..m)
            .step_by(tile_rows)
            .flat_map(|i0| (0..n).step_by(tile_cols).map(move |j0| (i0, j0)))
            .collect();
        let (a_ptr, b_ptr, dst_addr) = (a.as_ptr() as usize, b.as_ptr() as usize, dst as usize);
        let run = |&(i0, j0): &(usize, usize)| {
            let (mt, nt) = (tile_rows.min(m - i0), tile_cols.min(n - j0));
            // SAFETY: the caller's contract; row i0 of `a` starts i0 row strides in, column j0
            // of `b` j0 column strides in, and tiles write disjoint parts of `dst`.
            unsafe {
                (self.sgemm)(
                    ROW_MAJOR,
                    ta,
                    tb,
                    mt as c_int,
                    nt as c_int,
                    k as c_int,
                    alpha,
                    (a_ptr as *const f32).offset(i0 as isize * a_strides.1),
                    lda,
                    (b_ptr as *const f32).offset(j0 as isize * b_strides.0),
                    ldb,
                    beta,
                    (dst_addr as *mut f32).add(i0 * n + j0),
                    n as c_int,
                )
            }
        };
        if threaded && tiles.len() > 1 {
            use rayon::prelude::*;
            crate::engine::model::on_thread_pool(|| tiles.par_iter().for_each(run));
        } else {
            tiles.iter().for_each(run);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        (acs, ars): (isize, isize),
        b: &[f32],
        (bcs, brs): (isize, isize),
    ) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|l| {
                        a[(i as isize * ars + l as isize * acs) as usize] as f64
                            * b[(l as isize * brs + j as isize * bcs) as usize] as f64
                    })
                    .sum();
            }
        }
        y
    }

    #[test]
    fn layouts_tiles_and_accumulation_match_a_plain_product() {
        let Ok(blas) = load("libopenblas.so.0") else {
            eprintln!("no OpenBLAS on this machine: the BLAS path is not exercised");
            return;
        };
        // Row-major and transposed operands; shapes with one tile, row tiles, column tiles and
        // ragged edges.
        for (m, n, k) in [(300, 70, 200), (1030, 33, 64), (40, 700, 90), (600, 600, 8)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            for (a_s, b_s) in [
                ((1, k as isize), (1, n as isize)),
                ((m as isize, 1), (1, n as isize)),
                ((1, k as isize), (k as isize, 1)),
                ((m as isize, 1), (k as isize, 1)),
            ] {
                let want = reference((m, n, k), &a, a_s, &b, b_s);
                let mut y = vec![0.5f32; m * n];
                let close = |y: &[f32], want: &dyn Fn(usize) -> f64| {
                    y.iter()
                        .enumerate()
                        .all(|(i, &v)| (v as f64 - want(i)).abs() <= 1e-4 * (1.0 + want(i).abs()))
                };
                let done =
                    unsafe { blas.sgemm(y.as_mut_ptr(), (m, n, k), &a, a_s, &b, b_s, None, true) };
                if m * n * k < MIN_WORK {
                    assert!(!done, "a small product went to BLAS");
                    continue;
                }
                assert!(done, "{m}x{n}x{k} {a_s:?} {b_s:?} not taken");
                assert!(close(&y, &|i| want[i]), "{m}x{n}x{k} {a_s:?} {b_s:?}");
                let before = y.clone();
                let acc = unsafe {
                    blas.sgemm(
                        y.as_mut_ptr(),
                        (m, n, k),
                        &a,
                        a_s,
                        &b,
                        b_s,
                        Some(-2.0),
                        true,
                    )
                };
                assert!(acc);
                assert!(close(&y, &|i| before[i] as f64 - 2.0 * want[i]));
            }
        }
        // A thin product (one row, as in decoding): not taken.
        let (a1, b1) = (vec![1f32; 1024], vec![1f32; 1024 * 4096]);
        let mut y1 = vec![0f32; 4096];
        let thin = (1, 4096, 1024);
        let (sa, sb) = ((1, 1024), (1, 4096));
        assert!(!unsafe { blas.sgemm(y1.as_mut_ptr(), thin, &a1, sa, &b1, sb, None, true) });
        // Neither stride 1: not taken.
        let v = vec![0f32; 64 * 64 * 4];
        let mut y = vec![0f32; 512 * 512];
        assert!(!unsafe {
            blas.sgemm(
                y.as_mut_ptr(),
                (64, 64, 64),
                &v,
                (2, 128),
                &v,
                (1, 64),
                None,
                true,
            )
        });
    }

    #[test]
    fn the_bits_do_not_depend_on_the_thread_count() {
        let Ok(blas) = load("libopenblas.so.0") else {
            eprintln!("no OpenBLAS on this machine: the BLAS path is not exercised");
            return;
        };
        for (m, n, k) in [(2048, 200, 96), (100, 900, 300)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.013).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.7).cos()).collect();
            let run = |threads: usize| {
                crate::testing::with_threads(threads, || {
                    let mut y = vec![0f32; m * n];
                    let (a_s, b_s) = ((1, k as isize), (1, n as isize));
                    let done = unsafe {
                        blas.sgemm(y.as_mut_ptr(), (m, n, k), &a, a_s, &b, b_s, None, true)
                    };
                    assert!(done);
                    y
                })
            };
            assert_eq!(run(1), run(3));
        }
    }

    #[test]
    fn a_missing_or_foreign_library_is_a_named_error() {
        let e = load("/nonexistent/libopenblas.so").err().unwrap();
        assert!(e.contains("cannot load"), "{e}");
        // libm is a shared library without cblas_sgemm.
        if let Err(e) = load("libm.so.6") {
            assert!(e.contains("cblas_sgemm"), "{e}");
        }
    }
}
