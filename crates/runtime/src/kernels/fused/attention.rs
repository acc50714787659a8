//! Attention's scaled, masked softmax, fused: forward and backward written out from the formula.
use super::*;

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
