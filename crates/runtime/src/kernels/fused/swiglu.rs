//! The gated MLP product `silu(a) * u`, fused: forward and backward written out from the formula.
use super::*;

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
