//! RMSNorm, fused: forward and backward written out from the formula.
use super::*;

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
