//! Attention's head layout, fused: forward and backward written out from the formula.
use super::*;

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
