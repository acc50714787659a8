//! Rotary position embedding, fused: forward and backward written out from the formula.
use super::*;

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
