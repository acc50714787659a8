//! Softmax and log-softmax over the last dimension, fused: forward and backward written out from
//! the formula.
use super::*;

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
