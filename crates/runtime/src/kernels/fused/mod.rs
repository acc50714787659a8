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

mod attention;
mod heads;
mod linear;
mod loss;
mod norm;
mod rope;
mod softmax;
mod swiglu;

pub use attention::scaled_masked_softmax;
pub use heads::{merge_heads, split_heads};
pub use linear::{lora_linear, lora_linear_no_grad, trainable_linear};
pub use loss::target_log_probs;
pub use norm::rms_norm;
pub use rope::rope;
pub use softmax::{log_softmax_last, softmax_last};
pub use swiglu::swiglu;

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

#[cfg(test)]
mod tests;
