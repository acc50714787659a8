//! Differentiable fused kernels for training on CPU (f32): RMSNorm, softmax, log-softmax, RoPE,
//! the SwiGLU product, attention's head layout and its scaled, masked softmax, each one pass
//! forward and one pass backward.
//!
//! The composite forms in `ops.rs` are exact but build 5-12 graph nodes each, and candle's
//! backward pays a zeroed allocation and an extra full pass per node; over the vocabulary
//! (`log_softmax` of `(rows, 49152)` logits) that is most of the cost of the loss. These ops are
//! single nodes whose backward is written out from the formula. `ops.rs` picks them for f32
//! tensors on the CPU when a gradient is wanted; every other case keeps the composites, which the
//! finite-difference tests (f64) also use. Tests here check values and gradients against them.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `n` zeros, written by every thread. `vec![0.0; n]` zeroes on the calling thread alone (a
/// large block the allocator keeps is memset there), and the other core sat idle meanwhile:
/// ~4% of a prefill's time in a profile, between every pair of parallel kernels.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    if n < 2 * CHUNK {
        return vec![0f32; n];
    }
    let mut v = Vec::<f32>::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the loop above wrote all `n` elements.
    unsafe { v.set_len(n) };
    v
}

/// Run `f` on the contiguous f32 data of `t` (copying only if `t` is strided).
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            f(&v[start..start + t.elem_count()])
        }
        _ => candle_core::bail!("fused op: expected an f32 CPU tensor"),
    }
}

/// The f32 slice of a contiguous storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: non-contiguous input")))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// Element counts below which the ops that also serve inference stay on the calling thread:
/// decoding's attention is a few hundred elements per layer, less than a rayon wake-up costs.
const SEQUENTIAL_BELOW: usize = 1 << 15;

fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// Whether the fused kernels serve `t` (f32 on the CPU).
pub fn serves(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `e^x` in f32 without a libm call (Cephes' `expf`: `x = n ln 2 + r`, a degree-7 polynomial
/// for `e^r`, `2^n` from the exponent bits; relative error below 2e-7). Branch-free, so loops of
/// it vectorize: the libm call per element was 6% of a prefill (softmax and SiLU). Below
/// -87.3 the result is 0 (masked scores), above 88.3 it is clamped to `e^88.3`; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r * r + r + 1.0;
    let two_n = f32::from_bits(((t.to_bits() as i32 - 0x4B40_0000 + 127) as u32) << 23);
    let y = er * two_n;
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x * r * w, r = 1 / sqrt(mean(x^2) + eps), per row of length n.
// dx = r * (g*w) - x * r^3 * sum(g*w*x) / n;  dw = sum over rows of g * x * r.

struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let n = w.len();
        let mut y = zeroed(x.len());
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(yr, xr)| {
                let r = inv_rms(xr, self.eps);
                for ((yi, xi), wi) in yr.iter_mut().zip(xr).zip(w) {
                    *yi = xi * r * wi;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let (dx, dw) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(g, |g| {
                    let mut dx = zeroed(x.len());
                    let rows = x.len() / n;
                    // Per-chunk partial sums of dw, reduced after (rows split over threads).
                    let chunk = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
                    let partial: Vec<Vec<f32>> = dx
                        .par_chunks_mut(chunk * n)
                        .enumerate()
                        .map(|(c, dxc)| {
                            let mut dw = vec![0f32; n];
                            for (k, dxr) in dxc.chunks_mut(n).enumerate() {
                                let at = (c * chunk + k) * n;
                                let (xr, gr) = (&x[at..at + n], &g[at..at + n]);
                                let r = inv_rms(xr, self.eps);
                                let dot: f32 =
                                    xr.iter().zip(gr).zip(w).map(|((a, b), c)| a * b * c).sum();
                                let coef = r * r * r * dot / n as f32;
                                for i in 0..n {
                                    dxr[i] = r * gr[i] * w[i] - xr[i] * coef;
                                    dw[i] += gr[i] * xr[i] * r;
                                }
                            }
                            dw
                        })
                        .collect();
                    let mut dw = vec![0f32; n];
                    for p in partial {
                        for (a, b) in dw.iter_mut().zip(p) {
                            *a += b;
                        }
                    }
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((Some(tensor(dx, x.dims())?), Some(tensor(dw, w.dims())?)))
    }
}

/// Fused, differentiable RMSNorm over the last dimension of `x` with weight `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// Log-softmax over the last dimension: dx = g - exp(y) * sum(g). (Softmax is the scaled, masked
// softmax below with scale 1 and no mask.)

struct LogSoftmax;

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "fused-log-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let n = *l.dims().last().unwrap_or(&1);
        let mut y = zeroed(x.len());
        y.par_chunks_mut(n.max(1))
            .zip(x.par_chunks(n.max(1)))
            .for_each(|(yr, xr)| {
                let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = xr.iter().map(|xi| exp(xi - max)).sum();
                let lse = max + sum.ln();
                for (yi, xi) in yr.iter_mut().zip(xr) {
                    *yi = xi - lse;
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let n = *x.dims().last().unwrap_or(&1);
        let dx = with_data(y, |y| {
            with_data(g, |g| {
                let mut dx = zeroed(y.len());
                dx.par_chunks_mut(n.max(1))
                    .zip(y.par_chunks(n.max(1)).zip(g.par_chunks(n.max(1))))
                    .for_each(|(dr, (yr, gr))| {
                        let s: f32 = gr.iter().sum();
                        for i in 0..dr.len() {
                            dr[i] = gr[i] - exp(yr[i]) * s;
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, x.dims())?))
    }
}

/// Fused, differentiable softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    scaled_masked_softmax(x, None, 1.0)
}

/// Fused, differentiable log-softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(LogSoftmax)
}

// ---------------------------------------------------------------------------------------------
// RoPE on x: (b, h, t, hd) with tables cos, sin: (b, t, hd/2). A rotation by angle theta per
// pair; its backward is the rotation by -theta (sin negated). No gradient for the tables.

struct Rope {
    interleaved: bool,
    negate_sin: bool,
}

impl Rope {
    /// Rotate every (b, h, t) row of `x` into `y`.
    fn apply(
        &self,
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
        dims: (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let (_b, h, t, hd) = dims;
        let half = hd / 2;
        let sign = if self.negate_sin { -1.0 } else { 1.0 };
        let mut y = zeroed(x.len());
        y.par_chunks_mut(hd)
            .zip(x.par_chunks(hd))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let (bi, ti) = (row / (h * t), row % t);
                let table = (bi * t + ti) * half;
                let (c, s) = (&cos[table..table + half], &sin[table..table + half]);
                for i in 0..half {
                    let (ci, si) = (c[i], sign * s[i]);
                    let (a, b) = if self.interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    yr[a] = xr[a] * ci - xr[b] * si;
                    yr[b] = xr[a] * si + xr[b] * ci;
                }
            });
        y
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            slice(s3, l3, self.name())?,
        );
        let d = l1.dims();
        let y = self.apply(x, cos, sin, (d[0], d[1], d[2], d[3]));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims4()?;
        let back = Rope {
            interleaved: self.interleaved,
            negate_sin: !self.negate_sin,
        };
        let dx = with_data(g, |g| {
            with_data(cos, |c| with_data(sin, |s| Ok(back.apply(g, c, s, dims))))
        })?;
        Ok((Some(tensor(dx, x.dims())?), None, None))
    }
}

/// Fused, differentiable RoPE (gradient for `x` only; the tables are constants).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (b, _h, t, hd) = x.dims4()?;
    if cos.dims() != [b, t, hd / 2] || sin.dims() != [b, t, hd / 2] || hd % 2 != 0 {
        candle_core::bail!(
            "rope: tables must be (b, t, hd/2) for x of shape {:?}",
            x.dims()
        );
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope {
            interleaved,
            negate_sin: false,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// SwiGLU product y = silu(a) * u, silu(a) = a * sigmoid(a).
// da = g * u * sigmoid(a) * (1 + a * (1 - sigmoid(a)));  du = g * silu(a).

struct SwiGlu;

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + exp(-a))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, u) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let mut y = zeroed(a.len());
        const CHUNK: usize = 4096;
        y.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(yc, (ac, uc))| {
                for i in 0..yc.len() {
                    yc[i] = ac[i] * sigmoid(ac[i]) * uc[i];
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        const CHUNK: usize = 4096;
        let (da, du) = with_data(a, |a| {
            with_data(u, |u| {
                with_data(g, |g| {
                    let mut da = zeroed(a.len());
                    let mut du = zeroed(a.len());
                    da.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(c, (dac, duc))| {
                            let at = c * CHUNK;
                            for i in 0..dac.len() {
                                let (ai, ui, gi) = (a[at + i], u[at + i], g[at + i]);
                                let s = sigmoid(ai);
                                dac[i] = gi * ui * s * (1.0 + ai * (1.0 - s));
                                duc[i] = gi * ai * s;
                            }
                        });
                    Ok((da, du))
                })
            })
        })?;
        Ok((Some(tensor(da, a.dims())?), Some(tensor(du, u.dims())?)))
    }
}

/// Fused, differentiable `silu(a) * u` (the gated MLP's product).
pub fn swiglu(a: &Tensor, u: &Tensor) -> Result<Tensor> {
    if a.dims() != u.dims() {
        candle_core::bail!("swiglu: shapes {:?} and {:?} differ", a.dims(), u.dims());
    }
    a.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

// ---------------------------------------------------------------------------------------------
// Attention head layout. split: (b, t, n*hd) -> (b, n, t, hd); merge is its inverse, and each
// one's backward is the other. As candle ops these are reshape + transpose + contiguous (three
// graph nodes, one of them a strided add of the gradient); here one node each.

struct Heads {
    /// Number of heads.
    n: usize,
    /// true: (b, t, n*hd) -> (b, n, t, hd); false: the inverse.
    split: bool,
    /// `Some(b)`: the merged side is flat, `(b*t, n*hd)` (the same memory as `(b, t, n*hd)`).
    flat_batch: Option<usize>,
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        if self.split {
            "fused-split-heads"
        } else {
            "fused-merge-heads"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let n = self.n;
        let (t, hd, out_shape) = if self.split {
            let (b, t, nhd) = match self.flat_batch {
                Some(b) => {
                    let (rows, nhd) = l.shape().dims2()?;
                    if b == 0 || !rows.is_multiple_of(b) {
                        candle_core::bail!("split_heads: {rows} rows do not split into {b}");
                    }
                    (b, rows / b, nhd)
                }
                None => l.shape().dims3()?,
            };
            if !nhd.is_multiple_of(n) {
                candle_core::bail!("split_heads: width {nhd} is not a multiple of {n} heads");
            }
            (t, nhd / n, Shape::from((b, n, t, nhd / n)))
        } else {
            let (b, heads, t, hd) = l.shape().dims4()?;
            if heads != n {
                candle_core::bail!("merge_heads: {heads} heads, expected {n}");
            }
            let shape = match self.flat_batch {
                Some(_) => Shape::from((b * t, n * hd)),
                None => Shape::from((b, t, n * hd)),
            };
            (t, hd, shape)
        };
        let mut y = Vec::<f32>::with_capacity(x.len());
        // SAFETY: every element is written below before the buffer is read (the index maps are
        // bijections of 0..len); f32 has no invalid bit patterns.
        #[allow(clippy::uninit_vec)]
        unsafe {
            y.set_len(x.len())
        };
        // Split: one (batch, head) block of t x hd at a time; merge: one (batch, token) row of
        // n pieces of hd.
        let row_len = n * hd;
        let split = |(bh, out): (usize, &mut [f32])| {
            let (bi, h) = (bh / n, bh % n);
            for ti in 0..t {
                let src = (bi * t + ti) * row_len + h * hd;
                out[ti * hd..(ti + 1) * hd].copy_from_slice(&x[src..src + hd]);
            }
        };
        let merge = |(bt, out): (usize, &mut [f32])| {
            let (bi, ti) = (bt / t, bt % t);
            for h in 0..n {
                let src = ((bi * n + h) * t + ti) * hd;
                out[h * hd..(h + 1) * hd].copy_from_slice(&x[src..src + hd]);
            }
        };
        match (self.split, x.len() < SEQUENTIAL_BELOW) {
            (true, true) => y.chunks_mut(t * hd).enumerate().for_each(split),
            (true, false) => y.par_chunks_mut(t * hd).enumerate().for_each(split),
            (false, true) => y.chunks_mut(row_len).enumerate().for_each(merge),
            (false, false) => y.par_chunks_mut(row_len).enumerate().for_each(merge),
        }
        Ok((CpuStorage::F32(y), out_shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Heads {
            n: self.n,
            split: !self.split,
            flat_batch: self.flat_batch,
        };
        Ok(Some(g.contiguous()?.apply_op1(inverse)?))
    }
}

/// Fused, differentiable `(b, t, n*hd) -> (b, n, t, hd)` (contiguous); with `flat_batch =
/// Some(b)` the input is `(b*t, n*hd)`.
pub fn split_heads(x: &Tensor, n: usize, flat_batch: Option<usize>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Heads {
        n,
        split: true,
        flat_batch,
    })
}

/// Fused, differentiable `(b, n, t, hd) -> (b, t, n*hd)`, or `(b*t, n*hd)` when `flat`.
pub fn merge_heads(x: &Tensor, flat: bool) -> Result<Tensor> {
    let (b, n) = (x.dim(0)?, x.dim(1)?);
    x.contiguous()?.apply_op1(Heads {
        n,
        split: false,
        flat_batch: flat.then_some(b),
    })
}

// ---------------------------------------------------------------------------------------------
// Attention probabilities: y = softmax(scale * s + m) per row of the scores s: (b, .., rows, T),
// the additive mask m: (b, t, T) shared by every head (row r of batch entry i reads mask row
// (i, r mod t): query heads sharing a kv head are stacked along the token axis).
// ds = scale * y * (g - sum(g*y)); the mask gets no gradient. As candle ops this is an affine,
// a broadcast add between two reshapes and the softmax: five score-sized nodes, one here.

struct ScaledMaskedSoftmax {
    scale: f32,
}

impl ScaledMaskedSoftmax {
    fn forward(&self, s: &[f32], dims: &[usize], mask: Option<(&[f32], usize)>) -> Vec<f32> {
        let n = (*dims.last().unwrap_or(&1)).max(1);
        let b = dims.first().copied().unwrap_or(1).max(1);
        let rows_per_entry = s.len() / n / b;
        let mut y = zeroed(s.len());
        let row = |(r, (yr, sr)): (usize, (&mut [f32], &[f32]))| {
            let m = mask.map(|(m, t)| {
                let (bi, q) = (r / rows_per_entry, (r % rows_per_entry) % t);
                &m[(bi * t + q) * n..(bi * t + q + 1) * n]
            });
            let mut max = f32::NEG_INFINITY;
            for (i, (yi, si)) in yr.iter_mut().zip(sr).enumerate() {
                *yi = si * self.scale + m.map_or(0.0, |m| m[i]);
                max = max.max(*yi);
            }
            if max == f32::NEG_INFINITY {
                yr.fill(0.0); // a fully masked row attends to nothing
                return;
            }
            for yi in yr.iter_mut() {
                *yi = exp(*yi - max);
            }
            let sum: f32 = yr.iter().sum();
            let inv = 1.0 / sum;
            yr.iter_mut().for_each(|v| *v *= inv);
        };
        if s.len() < SEQUENTIAL_BELOW {
            y.chunks_mut(n).zip(s.chunks(n)).enumerate().for_each(row);
        } else {
            y.par_chunks_mut(n)
                .zip(s.par_chunks(n))
                .enumerate()
                .for_each(row);
        }
        y
    }

    fn backward(&self, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let n = (*y.dims().last().unwrap_or(&1)).max(1);
        let scale = self.scale;
        let ds = with_data(y, |y| {
            with_data(g, |g| {
                let mut ds = zeroed(y.len());
                ds.par_chunks_mut(n)
                    .zip(y.par_chunks(n).zip(g.par_chunks(n)))
                    .for_each(|(dr, (yr, gr))| {
                        let dot: f32 = gr.iter().zip(yr).map(|(a, b)| a * b).sum();
                        for i in 0..dr.len() {
                            dr[i] = scale * yr[i] * (gr[i] - dot);
                        }
                    });
                Ok(ds)
            })
        })?;
        tensor(ds, y.dims())
    }
}

impl CustomOp1 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-scaled-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "fused-scaled-softmax")?;
        let y = self.forward(x, l.dims(), None);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(y, g)?))
    }
}

impl CustomOp2 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "fused-scaled-masked-softmax")?;
        let mask = slice(m, ml, "fused-scaled-masked-softmax")?;
        let (mb, t, n) = ml.shape().dims3()?;
        let dims = l.dims();
        let rows_per_entry = x.len() / n.max(1) / mb.max(1);
        if dims.first() != Some(&mb)
            || dims.last() != Some(&n)
            || t == 0
            || !rows_per_entry.is_multiple_of(t)
            || !dims[dims.len() - 2].is_multiple_of(t)
        {
            candle_core::bail!(
                "scaled_masked_softmax: scores {dims:?} do not fit the mask {:?}",
                ml.dims()
            );
        }
        let y = self.forward(x, dims, Some((mask, t)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _m: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.backward(y, g)?), None))
    }
}

/// Fused, differentiable `softmax(scale * scores + mask)` over the last dimension, for scores
/// `(b, .., rows, T)` whose rows cycle through the mask's `t` query rows, and an additive mask
/// `(b, t, T)` (no gradient). Fully masked rows give zeros.
pub fn scaled_masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let op = ScaledMaskedSoftmax {
        scale: scale as f32,
    };
    match mask {
        Some(m) => scores.contiguous()?.apply_op2(&m.contiguous()?, op),
        None => scores.contiguous()?.apply_op1(op),
    }
}

// ---------------------------------------------------------------------------------------------
// Log-probability of each row's label: y_r = x_r[l_r] - lse(x_r) for logits x: (n, V).
// dx_r = g_r (onehot(l_r) - softmax(x_r)). As log-softmax + gather this is two vocabulary-sized
// nodes whose backward writes four vocabulary-sized buffers (two of them zeroed first); here
// the backward writes one.

struct TargetLogProbs {
    labels: Vec<u32>,
    /// Each row's log-sum-exp, kept from the forward for the backward.
    lse: std::sync::OnceLock<Vec<f32>>,
}

impl CustomOp1 for TargetLogProbs {
    fn name(&self) -> &'static str {
        "fused-target-log-probs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "fused-target-log-probs")?;
        let (n, v) = l.shape().dims2()?;
        if self.labels.len() != n {
            candle_core::bail!(
                "target_log_probs: {} labels for {n} rows",
                self.labels.len()
            );
        }
        if let Some(&bad) = self.labels.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("target_log_probs: label {bad} outside the vocabulary of {v}");
        }
        let lse: Vec<f32> = x
            .par_chunks(v.max(1))
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                max + row.iter().map(|&a| exp(a - max)).sum::<f32>().ln()
            })
            .collect();
        let y: Vec<f32> = (0..n)
            .map(|r| x[r * v + self.labels[r] as usize] - lse[r])
            .collect();
        let _ = self.lse.set(lse);
        Ok((CpuStorage::F32(y), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (n, v) = x.dims2()?;
        let lse = self
            .lse
            .get()
            .ok_or_else(|| candle_core::Error::Msg("target_log_probs: no forward".into()))?;
        let dx = with_data(x, |x| {
            with_data(g, |g| {
                let mut dx = Vec::<f32>::with_capacity(n * v);
                // SAFETY: every element of each row is written below before it is read.
                #[allow(clippy::uninit_vec)]
                unsafe {
                    dx.set_len(n * v)
                };
                dx.par_chunks_mut(v.max(1))
                    .zip(x.par_chunks(v.max(1)))
                    .enumerate()
                    .for_each(|(r, (dr, xr))| {
                        let (gr, m) = (g[r], lse[r]);
                        for (d, &a) in dr.iter_mut().zip(xr) {
                            *d = -gr * exp(a - m);
                        }
                        dr[self.labels[r] as usize] += gr;
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, &[n, v])?))
    }
}

/// Fused, differentiable `log_softmax(logits)[r, labels[r]]` for `logits: (n, V)`: `(n,)`.
pub fn target_log_probs(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(TargetLogProbs {
        labels: labels.to_vec(),
        lse: std::sync::OnceLock::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Linear layer with a trainable weight: y = x W^T, x: (rows, in), W: (out, in).
// dx = g W;  dW = g^T x, written straight in W's (out, in) layout. candle's matmul backward
// computes dW^T = x^T g and transposes it back through two more graph nodes, each a zeroed
// buffer plus a strided add the size of the weight (the tied 49152 x 576 embedding included).

struct TrainableLinear;

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
fn gemm_acc(
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

impl CustomOp2 for TrainableLinear {
    fn name(&self) -> &'static str {
        "fused-trainable-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let (rows, inner) = l1.shape().dims2()?;
        let (out, _) = l2.shape().dims2()?;
        // y (rows, out) = x (rows, in) * W^T (in, out); W^T[i, o] = w[o * in + i].
        let y = gemm_new(
            (rows, out, inner),
            x,
            (1, inner as isize),
            w,
            (inner as isize, 1),
        );
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, inner) = x.dims2()?;
        let (out, _) = w.dims2()?;
        let (dx, dw) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(g, |g| {
                    // dx (rows, in) = g (rows, out) * W (out, in)
                    let dx = gemm_new(
                        (rows, inner, out),
                        g,
                        (1, out as isize),
                        w,
                        (1, inner as isize),
                    );
                    // dW (out, in) = g^T (out, rows) * x (rows, in); g^T[o, r] = g[r * out + o]
                    let dw = gemm_new(
                        (out, inner, rows),
                        g,
                        (out as isize, 1),
                        x,
                        (1, inner as isize),
                    );
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            Some(tensor(dx, &[rows, inner])?),
            Some(tensor(dw, &[out, inner])?),
        ))
    }
}

/// Fused, differentiable `x W^T` for `x: (rows, in)` and a trainable `W: (out, in)`.
pub fn trainable_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, TrainableLinear)
}

// ---------------------------------------------------------------------------------------------
// Linear layer with a frozen weight and a LoRA adapter: y = x W^T + s (x A^T) B^T for
// x: (rows, in), W: (out, in) frozen, A: (r, in), B: (out, r). With h = x A^T and gB = g B:
// dx = g W + s gB A;  dA = s gB^T x;  dB = s g^T h. As candle ops this is five graph nodes
// (frozen product, two adapter products, scale, add), each a zeroed buffer and an extra pass in
// backward; here one.

struct LoraLinear {
    w: Tensor,
    scale: f32,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "fused-lora-linear";
        let (x, a, b) = (
            slice(s1, l1, name)?,
            slice(s2, l2, name)?,
            slice(s3, l3, name)?,
        );
        let (rows, inner) = l1.shape().dims2()?;
        let (r, a_in) = l2.shape().dims2()?;
        let (out, b_r) = l3.shape().dims2()?;
        let (w_out, w_in) = self.w.dims2()?;
        if a_in != inner || b_r != r || w_in != inner || w_out != out {
            candle_core::bail!(
                "lora_linear: x {:?}, W {:?}, A {:?}, B {:?} do not fit",
                l1.dims(),
                self.w.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let y = with_data(&self.w, |w| {
            let mut y = crate::ops::x_w_t(x, rows, w, out, inner);
            let h = gemm_new(
                (rows, r, inner),
                x,
                (1, inner as isize),
                a,
                (inner as isize, 1),
            );
            gemm_acc(
                &mut y,
                (rows, out, r),
                &h,
                (1, r as isize),
                b,
                (r as isize, 1),
                self.scale,
            );
            Ok(y)
        })?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inner) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (out, _) = b.dims2()?;
        let s = self.scale;
        let (dx, da, db) = with_data(x, |x| {
            with_data(a, |a| {
                with_data(b, |b| {
                    with_data(g, |g| {
                        with_data(&self.w, |w| {
                            // gB (rows, r) = g (rows, out) B (out, r); h (rows, r) = x A^T
                            let gb =
                                gemm_new((rows, r, out), g, (1, out as isize), b, (1, r as isize));
                            let h = gemm_new(
                                (rows, r, inner),
                                x,
                                (1, inner as isize),
                                a,
                                (inner as isize, 1),
                            );
                            let mut dx = gemm_new(
                                (rows, inner, out),
                                g,
                                (1, out as isize),
                                w,
                                (1, inner as isize),
                            );
                            gemm_acc(
                                &mut dx,
                                (rows, inner, r),
                                &gb,
                                (1, r as isize),
                                a,
                                (1, inner as isize),
                                s,
                            );
                            // dA (r, in) = s gB^T (r, rows) x (rows, in)
                            let mut da = gemm_new(
                                (r, inner, rows),
                                &gb,
                                (r as isize, 1),
                                x,
                                (1, inner as isize),
                            );
                            da.iter_mut().for_each(|v| *v *= s);
                            // dB (out, r) = s g^T (out, rows) h (rows, r)
                            let mut db =
                                gemm_new((out, r, rows), g, (out as isize, 1), &h, (1, r as isize));
                            db.iter_mut().for_each(|v| *v *= s);
                            Ok((dx, da, db))
                        })
                    })
                })
            })
        })?;
        Ok((
            Some(tensor(dx, &[rows, inner])?),
            Some(tensor(da, &[r, inner])?),
            Some(tensor(db, &[out, r])?),
        ))
    }
}

/// Fused, differentiable `x W^T + scale (x A^T) B^T` for `x: (rows, in)`, a frozen `W: (out, in)`
/// and LoRA factors `A: (r, in)`, `B: (out, r)`.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let op = LoraLinear {
        w: w.contiguous()?.detach(),
        scale: scale as f32,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// [`lora_linear`] for inference: the same single pass, no graph node (the factors, trainable
/// or not, are not recorded).
pub fn lora_linear_no_grad(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = LoraLinear {
        w: w.contiguous()?.detach(),
        scale: scale as f32,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&a.contiguous()?, &b.contiguous()?, &op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var, D};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::testing::random_tensor(shape, seed, 2.0)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        use crate::testing::max_abs;
        (max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-6)) as f32
    }

    /// Values and gradients of `fused` equal those of `composite` (candle ops, candle backward)
    /// for a random weighting of the outputs, so every output element's gradient is exercised.
    fn same_values_and_grads(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composite: impl Fn(&[Tensor]) -> Result<Tensor>,
        grad_inputs: usize,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (yf, yc) = (fused(&ts).unwrap(), composite(&ts).unwrap());
        assert!(
            max_rel(&yf, &yc) < 1e-5,
            "values differ: {}",
            max_rel(&yf, &yc)
        );
        let weights = rand(yf.dims(), 99);
        let gf = (&yf * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&yc * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, t) in ts.iter().enumerate().take(grad_inputs) {
            let (a, b) = (gf.get(t).unwrap(), gc.get(t).unwrap());
            assert!(
                max_rel(a, b) < 1e-4,
                "gradient {i} differs: {}",
                max_rel(a, b)
            );
        }
    }

    #[test]
    fn rms_norm_matches_composite() {
        let inputs = [rand(&[3, 5, 16], 1), rand(&[16], 2)];
        same_values_and_grads(
            &inputs,
            |t| rms_norm(&t[0], &t[1], 1e-5),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5),
            2,
        );
    }

    #[test]
    fn softmaxes_match_composites() {
        let inputs = [rand(&[4, 3, 37], 3)];
        same_values_and_grads(
            &inputs,
            |t| softmax_last(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
            1,
        );
        same_values_and_grads(
            &inputs,
            |t| log_softmax_last(&t[0]),
            |t| crate::ops::log_softmax_composite(&t[0]),
            1,
        );
    }

    #[test]
    fn rope_matches_composite_both_layouts() {
        let (cos, sin) = (rand(&[2, 5, 4], 4), rand(&[2, 5, 4], 5));
        for interleaved in [true, false] {
            let inputs = [rand(&[2, 3, 5, 8], 6), cos.clone(), sin.clone()];
            same_values_and_grads(
                &inputs,
                |t| rope(&t[0], &t[1], &t[2], interleaved),
                |t| crate::ops::rope_composite(&t[0], &t[1], &t[2], interleaved),
                1,
            );
        }
    }

    #[test]
    fn swiglu_matches_composite() {
        let inputs = [rand(&[3, 7, 11], 7), rand(&[3, 7, 11], 8)];
        same_values_and_grads(
            &inputs,
            |t| swiglu(&t[0], &t[1]),
            |t| t[0].silu()? * &t[1],
            2,
        );
    }

    #[test]
    fn split_and_merge_heads_match_reshape_transpose() {
        let inputs = [rand(&[2, 5, 12], 12)];
        same_values_and_grads(
            &inputs,
            |t| split_heads(&t[0], 3, None),
            |t| t[0].reshape((2, 5, 3, 4))?.transpose(1, 2)?.contiguous(),
            1,
        );
        let inputs = [rand(&[2, 3, 5, 4], 13)];
        same_values_and_grads(
            &inputs,
            |t| merge_heads(&t[0], false),
            |t| t[0].transpose(1, 2)?.reshape((2, 5, 12)),
            1,
        );
        // Large enough for the parallel copies.
        let inputs = [rand(&[2, 64, 512], 17)];
        assert!(inputs[0].elem_count() >= SEQUENTIAL_BELOW);
        same_values_and_grads(
            &inputs,
            |t| split_heads(&t[0], 8, None),
            |t| t[0].reshape((2, 64, 8, 64))?.transpose(1, 2)?.contiguous(),
            1,
        );
        let x = rand(&[2, 5, 12], 14);
        let back = merge_heads(&split_heads(&x, 3, None).unwrap(), false).unwrap();
        assert_eq!(max_rel(&back, &x), 0.0);
        assert!(split_heads(&x, 5, None).is_err());
        // The flat forms: (b*t, n*hd) in, (b*t, n*hd) out.
        let inputs = [rand(&[10, 12], 19)];
        same_values_and_grads(
            &inputs,
            |t| merge_heads(&split_heads(&t[0], 3, Some(2))?.affine(2.0, 0.0)?, true),
            |t| t[0].affine(2.0, 0.0),
            1,
        );
        same_values_and_grads(
            &inputs,
            |t| split_heads(&t[0], 3, Some(2)),
            |t| t[0].reshape((2, 5, 3, 4))?.transpose(1, 2)?.contiguous(),
            1,
        );
        assert!(split_heads(&inputs[0], 3, Some(3)).is_err());
    }

    #[test]
    fn scaled_masked_softmax_matches_composite_with_grouped_heads() {
        // (b, kv heads, n_rep * t, T) scores against a (b, t, T) causal mask with one fully
        // masked row (a left pad), as `attend` lays them out.
        let (b, kvh, n_rep, t, total) = (2, 2, 3, 4, 6);
        let mut m = vec![0f32; b * t * total];
        for bi in 0..b {
            for q in 0..t {
                for k in 0..total {
                    if k > q + (total - t) || (bi == 1 && q == 0) {
                        m[(bi * t + q) * total + k] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, t, total), &candle_core::Device::Cpu).unwrap();
        let inputs = [rand(&[b, kvh, n_rep * t, total], 15)];
        let composite = |t: &[Tensor]| -> Result<Tensor> {
            let s = (&t[0] * 0.37)?
                .reshape((b, kvh, n_rep, 4, total))?
                .broadcast_add(&mask.reshape((b, 1, 1, 4, total))?)?
                .reshape((b, kvh, n_rep * 4, total))?;
            softmax_last(&s)
        };
        same_values_and_grads(
            &inputs,
            |t| scaled_masked_softmax(&t[0], Some(&mask), 0.37),
            composite,
            1,
        );
        same_values_and_grads(
            &inputs,
            |t| scaled_masked_softmax(&t[0], None, 0.37),
            |t| softmax_last(&(&t[0] * 0.37)?),
            1,
        );
        // Large enough for the parallel rows.
        let inputs = [rand(&[1, 3, 3 * 40, 300], 18)];
        assert!(inputs[0].elem_count() >= SEQUENTIAL_BELOW);
        same_values_and_grads(
            &inputs,
            |t| scaled_masked_softmax(&t[0], None, 0.5),
            |t| softmax_last(&(&t[0] * 0.5)?),
            1,
        );
        let wrong = rand(&[b, kvh, n_rep * t + 1, total], 16);
        assert!(scaled_masked_softmax(&wrong, Some(&mask), 1.0).is_err());
    }

    #[test]
    fn batched_products_match_candle_matmul_with_b_as_is_or_transposed() {
        use crate::ops::{batched_matmul, batched_matmul_bt};
        // One and many batch elements (the few-element path runs each gemm on every thread).
        for batch in [1, 6] {
            let inputs = [rand(&[batch, 2, 5, 8], 20), rand(&[batch, 2, 8, 3], 21)];
            same_values_and_grads(
                &inputs,
                |t| batched_matmul(&t[0], &t[1], true),
                |t| t[0].matmul(&t[1]),
                2,
            );
            let inputs = [rand(&[batch, 2, 5, 8], 22), rand(&[batch, 2, 7, 8], 23)];
            same_values_and_grads(
                &inputs,
                |t| batched_matmul_bt(&t[0], &t[1], true),
                |t| t[0].matmul(&t[1].t()?),
                2,
            );
        }
        // A strided left operand (a transposed view) is read in place.
        let inputs = [rand(&[2, 3, 8, 5], 24), rand(&[2, 3, 7, 8], 25)];
        same_values_and_grads(
            &inputs,
            |t| batched_matmul_bt(&t[0].t()?, &t[1], true),
            |t| t[0].t()?.matmul(&t[1].t()?),
            2,
        );
    }

    #[test]
    fn exp_is_within_two_ulps_and_its_edges_hold() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
            x += 0.000_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::INFINITY).is_finite() && exp(f32::INFINITY) > 1e38);
    }

    #[test]
    fn lora_linear_matches_its_composite() {
        let w = rand(&[6, 5], 30);
        let inputs = [rand(&[7, 5], 31), rand(&[3, 5], 32), rand(&[6, 3], 33)];
        same_values_and_grads(
            &inputs,
            |t| lora_linear(&t[0], &w, &t[1], &t[2], 0.7),
            |t| t[0].matmul(&w.t()?)? + (t[0].matmul(&t[1].t()?)?.matmul(&t[2].t()?)? * 0.7)?,
            3,
        );
        assert!(lora_linear(&inputs[0], &w, &inputs[2], &inputs[1], 1.0).is_err());
        // The inference form: same values, and trainable factors leave no graph behind.
        let a = Var::from_tensor(&inputs[1]).unwrap();
        let b = Var::from_tensor(&inputs[2]).unwrap();
        let y = lora_linear_no_grad(&inputs[0], &w, a.as_tensor(), b.as_tensor(), 0.7).unwrap();
        let want = lora_linear(&inputs[0], &w, &inputs[1], &inputs[2], 0.7).unwrap();
        assert_eq!(max_rel(&y, &want), 0.0);
        assert!(!y.track_op());
    }

    #[test]
    fn target_log_probs_match_log_softmax_and_gather() {
        let labels = [3u32, 0, 36, 7];
        let idx = Tensor::new(&labels, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((4, 1))
            .unwrap();
        let inputs = [rand(&[4, 37], 40)];
        same_values_and_grads(
            &inputs,
            |t| target_log_probs(&t[0], &labels),
            |t| {
                crate::ops::log_softmax_composite(&t[0])?
                    .gather(&idx, 1)?
                    .squeeze(1)
            },
            1,
        );
        assert!(target_log_probs(&inputs[0], &[1, 2]).is_err());
        assert!(target_log_probs(&inputs[0], &[1, 2, 3, 37]).is_err());
    }

    #[test]
    fn trainable_linear_matches_matmul() {
        let inputs = [rand(&[7, 5], 10), rand(&[3, 5], 11)];
        same_values_and_grads(
            &inputs,
            |t| trainable_linear(&t[0], &t[1]),
            |t| t[0].matmul(&t[1].t()?),
            2,
        );
    }

    #[test]
    fn strided_inputs_are_made_contiguous() {
        let x = rand(&[6, 4], 9).t().unwrap();
        let a = softmax_last(&x).unwrap();
        let b = candle_nn::ops::softmax(&x.contiguous().unwrap(), D::Minus1).unwrap();
        assert!(max_rel(&a, &b) < 1e-6);
        assert!(!serves(&x.to_dtype(DType::F64).unwrap()));
    }
}
