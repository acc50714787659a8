//! Linear layers with a trainable weight or LoRA factors, fused: forward and backward written out
//! from the formula.
use super::*;
use crate::kernels::gemm::{gemm_acc, gemm_new};

// Linear layer with a trainable weight: y = x W^T, x: (rows, in), W: (out, in).
// dx = g W;  dW = g^T x, written straight in W's (out, in) layout. candle's matmul backward
// computes dW^T = x^T g and transposes it back through two more graph nodes, each a zeroed
// buffer plus a strided add the size of the weight (the tied 49152 x 576 embedding included).

struct TrainableLinear;
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
