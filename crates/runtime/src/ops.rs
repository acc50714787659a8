//! The small core of tensor ops the models use, each in a fast form (fused candle kernels) and a
//! differentiable form. candle's fused `rms_norm`, `softmax_last_dim` and `rope*` return wrong
//! gradients, so `grad = true` must never reach them: it takes safegeo's own fused kernels with
//! written-out backward (`kernels/fused/`) for f32 on the CPU, and exact composites otherwise (f64
//! gradient checks, other devices).
use crate::kernels::fused;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor, Var, D};

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, grad: bool) -> Result<Tensor> {
    if grad && fused::serves(x) {
        fused::rms_norm(x, w, eps)
    } else if grad || x.dtype() == DType::F64 {
        // candle's fused kernel has no f64 form (f64 is for gradient checks).
        candle_nn::ops::rms_norm_slow(x, w, eps as f32)
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, grad: bool) -> Result<Tensor> {
    if grad && fused::serves(x) {
        fused::softmax_last(x)
    } else if grad {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// `log_softmax` over the last dimension (differentiable; one fused pass for f32 on the CPU).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused::serves(x) {
        fused::log_softmax_last(x)
    } else {
        log_softmax_composite(x)
    }
}

/// Log-probability `(n,)` of each row's label under `log_softmax(logits)`, `logits: (n, V)`
/// (one fused node for f32 on the CPU).
pub fn target_log_probs(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    if fused::serves(logits) {
        return fused::target_log_probs(logits, labels);
    }
    let n = labels.len();
    let idx = Tensor::new(labels, logits.device())?.reshape((n, 1))?;
    log_softmax_composite(logits)?.gather(&idx, 1)?.squeeze(1)
}

/// `log_softmax` as a composite of exact ops (any dtype, f64 included).
pub(crate) fn log_softmax_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Rotary embedding of `x: (b, h, t, hd)` with per-row tables `cos, sin: (b, t, hd/2)`.
/// `interleaved` rotates adjacent pairs (GGUF Llama layout); otherwise the two halves (HF layout).
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
    grad: bool,
) -> Result<Tensor> {
    if !grad {
        let x = x.contiguous()?;
        return if interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)
        };
    }
    if fused::serves(x) {
        return fused::rope(x, cos, sin, interleaved);
    }
    rope_composite(x, cos, sin, interleaved)
}

/// RoPE as a composite of exact ops (any dtype, f64 included).
pub(crate) fn rope_composite(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    let half = hd / 2;
    if interleaved {
        let cos = cos.reshape((b, 1, t, half, 1))?;
        let sin = sin.reshape((b, 1, t, half, 1))?;
        let x = x.reshape((b, h, t, half, 2))?;
        let x0 = x.narrow(D::Minus1, 0, 1)?;
        let x1 = x.narrow(D::Minus1, 1, 1)?;
        let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Tensor::cat(&[y0, y1], D::Minus1)?.reshape((b, h, t, hd))
    } else {
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// The gated MLP's product `silu(a) * u` (one fused pass with its backward for f32 on the CPU).
pub fn swiglu(a: &Tensor, u: &Tensor, grad: bool) -> Result<Tensor> {
    // Inference takes the fused pass too once the tensor is large (one pass and one buffer
    // instead of two); small ones stay with candle's ops, which run inline.
    if fused::serves(a) && (grad || a.elem_count() >= 1 << 16) {
        fused::swiglu(a, u)
    } else {
        a.silu()? * u
    }
}

/// `y (rows, out) = x (rows, inner) W^T` for `w: (out, inner)` row-major, by the fastest route
/// for the number of rows: the streaming kernels for a few (decoding), gemm otherwise. Every
/// frozen product takes it (with or without a LoRA adapter beside it), so the same input gives
/// the same bits whichever path a layer is on.
pub(crate) fn x_w_t(x: &[f32], rows: usize, w: &[f32], out: usize, inner: usize) -> Vec<f32> {
    let inner_s = inner as isize;
    let streamed = (rows <= crate::kernels::few_rows::MAX_ROWS)
        .then(|| crate::kernels::few_rows::few_rows_matmul(x, rows, w, out, inner))
        .flatten();
    if let Some(y) = streamed {
        y
    } else if rows > 1 && rows <= SMALL_ROWS {
        // y^T (out, rows) = W (out, in) * x^T (in, rows) in blocks of W, then transposed:
        // gemm's per-call cost is far lower this way round for a few rows.
        transpose(
            &crate::kernels::gemm::weight_rows_times_x_t(w, out, inner, x, rows),
            out,
            rows,
        )
    } else {
        // y (rows, out) = x (rows, in) * W^T (in, out); W^T[i, o] = w[o * in + i].
        crate::kernels::gemm::gemm_new((rows, out, inner), x, (1, inner_s), w, (inner_s, 1))
    }
}

/// `y = x W^T` by gemm straight between the storages, whose backward returns only `dL/dx`:
/// candle's matmul backward always computes `dW` as well, which is wasted work for frozen
/// weights (LoRA, GCG gradients). Inference runs it without a graph node.
struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // gemm straight from the input and weight storages into the output (no copies).
        let x = s.as_slice::<f32>()?;
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: non-contiguous input".into()))?;
        let x = &x[a..b];
        let (out, inner) = self.w.dims2()?;
        let rows = x.len() / inner.max(1);
        let w = self.w.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let candle_core::Storage::Cpu(wc) = &*ws else {
            candle_core::bail!("frozen-matmul: weight not on the CPU")
        };
        let w = &wc.as_slice::<f32>()?[wl.start_offset()..wl.start_offset() + out * inner];
        let y = x_w_t(x, rows, w, out, inner);
        let mut dims = l.dims().to_vec();
        *dims.last_mut().unwrap() = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// Batched matmul of many small matrices (attention scores and mixes): candle calls gemm once
/// per batch element with thread-pool parallelism inside each call, a fixed ~0.3 ms per call on
/// this CPU; 500 GCG candidates x 3 kv heads x 2 products x 30 layers made that 28 s per step.
/// Here the batch elements are spread over rayon and each gemm runs single-threaded.
struct ManySmallMatmuls;

/// The stride of a flattened batch when the batch dims collapse into one, else `None`.
fn flat_batch_stride(stride: &[usize], dims: &[usize]) -> Option<usize> {
    let nb = dims.len();
    if nb == 0 {
        return Some(0);
    }
    for i in 0..nb - 1 {
        if dims[i + 1] > 1 && stride[i] != stride[i + 1] * dims[i + 1] {
            return None;
        }
    }
    Some(stride[nb - 1])
}

/// `a @ b` over flattened batch dims for f32 CPU storages of any row/column strides.
fn many_small_matmuls(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    use rayon::prelude::*;
    let (a, b) = (s1.as_slice::<f32>()?, s2.as_slice::<f32>()?);
    let (da, db) = (l1.dims(), l2.dims());
    let r = da.len();
    if r < 2 || db.len() != r || da[r - 1] != db[r - 2] || da[..r - 2] != db[..r - 2] {
        candle_core::bail!("many-small-matmuls: shapes {da:?} and {db:?} do not multiply");
    }
    let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
    let batch: usize = da[..r - 2].iter().product();
    let (sa, sb) = (l1.stride(), l2.stride());
    let (Some(ba), Some(bb)) = (
        flat_batch_stride(&sa[..r - 2], &da[..r - 2]),
        flat_batch_stride(&sb[..r - 2], &db[..r - 2]),
    ) else {
        candle_core::bail!("many-small-matmuls: batch dims do not flatten");
    };
    let (a_ptr, b_ptr) = (
        a[l1.start_offset()..].as_ptr() as usize,
        b[l2.start_offset()..].as_ptr() as usize,
    );
    let threads = rayon::current_num_threads();
    // Few batch elements: one at a time, each gemm on every thread; many: one gemm per thread.
    let few = batch < 2 * threads;
    let inner = if few {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let total = batch * m * n;
    if k == 0 {
        let mut shape = da.to_vec();
        shape[r - 1] = n;
        return Ok((CpuStorage::F32(vec![0f32; total]), Shape::from(shape)));
    }
    let one = |i: usize, dst: &mut [std::mem::MaybeUninit<f32>]| {
        // SAFETY: the layouts were checked above; element (i, row, col) of each input lies
        // inside its storage, and each call writes only its own output chunk. With k > 0 and
        // read_dst = false, gemm stores every element of its (m, n) chunk without reading it.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr() as *mut f32,
                1,
                n as isize,
                false,
                (a_ptr as *const f32).add(i * ba),
                sa[r - 1] as isize,
                sa[r - 2] as isize,
                (b_ptr as *const f32).add(i * bb),
                sb[r - 1] as isize,
                sb[r - 2] as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                inner,
            )
        }
    };
    // Not zeroed first: gemm writes every element (see `one`).
    let mut out = Vec::<f32>::with_capacity(total);
    let chunks = &mut out.spare_capacity_mut()[..total];
    if few {
        chunks
            .chunks_mut((m * n).max(1))
            .enumerate()
            .for_each(|(i, dst)| one(i, dst));
    } else {
        chunks
            .par_chunks_mut((m * n).max(1))
            .enumerate()
            .for_each(|(i, dst)| one(i, dst));
    }
    // SAFETY: the chunks cover all `total` elements and each gemm wrote its whole chunk.
    unsafe { out.set_len(total) };
    let mut shape = da.to_vec();
    shape[r - 1] = n;
    Ok((CpuStorage::F32(out), Shape::from(shape)))
}

impl candle_core::CustomOp2 for ManySmallMatmuls {
    fn name(&self) -> &'static str {
        "many-small-matmuls"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        many_small_matmuls(s1, l1, s2, l2)
    }
}

/// `a @ b` over leading batch dims without a graph node (strided views are read in place when
/// their batch dims flatten).
fn bmm_no_bwd(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let flat = |t: &Tensor| {
        let r = t.rank();
        flat_batch_stride(&t.stride()[..r - 2], &t.dims()[..r - 2]).is_some()
    };
    let a = if flat(a) { a.clone() } else { a.contiguous()? };
    let b = if flat(b) { b.clone() } else { b.contiguous()? };
    a.apply_op2_no_bwd(&b, &ManySmallMatmuls)
}

/// Differentiable batched `a @ B` for f32 on the CPU, with `B = b` or, when `b_transposed`,
/// `B = b^T` read in place (attention's `q k^T` from `k` as it is). One graph node whose backward
/// writes `dA = G B^T` and `db` in `b`'s own layout (`A^T G`, or `G^T A` for a transposed `b`):
/// candle's matmul plus a transpose node would add a zeroed buffer and a strided add per product.
struct TrainableBmm {
    b_transposed: bool,
}

impl candle_core::CustomOp2 for TrainableBmm {
    fn name(&self) -> &'static str {
        "trainable-bmm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.b_transposed {
            let r = l2.dims().len();
            if r < 2 {
                candle_core::bail!("trainable-bmm: rank {r} < 2");
            }
            many_small_matmuls(s1, l1, s2, &l2.transpose(r - 2, r - 1)?)
        } else {
            many_small_matmuls(s1, l1, s2, l2)
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let t = |x: &Tensor| x.transpose(D::Minus2, D::Minus1);
        let (da, db) = if self.b_transposed {
            (bmm_no_bwd(g, b)?, bmm_no_bwd(&t(g)?, a)?)
        } else {
            (bmm_no_bwd(g, &t(b)?)?, bmm_no_bwd(&t(a)?, g)?)
        };
        Ok((Some(da), Some(db)))
    }
}

/// `a @ b^T` over leading batch dims, `b` given untransposed (attention scores `q k^T`).
pub fn batched_matmul_bt(a: &Tensor, b: &Tensor, grad: bool) -> Result<Tensor> {
    if trainable_bmm_serves(a, b, grad) {
        return a.apply_op2(b, TrainableBmm { b_transposed: true });
    }
    batched_matmul(a, &b.transpose(D::Minus2, D::Minus1)?, grad)
}

/// Whether a product under `grad` takes [`TrainableBmm`] (f32 on the CPU, batched).
fn trainable_bmm_serves(a: &Tensor, b: &Tensor, grad: bool) -> bool {
    grad && crate::kernels::fused::serves(a) && crate::kernels::fused::serves(b) && a.rank() >= 3
}

/// `a @ b` over leading batch dims. Inference on CPU/f32 with many batch elements takes the
/// rayon-over-batch path; everything else (gradients, other devices) is candle's matmul.
pub fn batched_matmul(a: &Tensor, b: &Tensor, grad: bool) -> Result<Tensor> {
    let dims = a.dims();
    let batch: usize = dims[..dims.len().saturating_sub(2)].iter().product();
    let fast = !grad
        && a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && dims.len() >= 3
        && batch >= 2 * rayon::current_num_threads()
        && a.dims()[..dims.len() - 2] == b.dims()[..dims.len() - 2]
        && flat_batch_stride(&a.stride()[..dims.len() - 2], &dims[..dims.len() - 2]).is_some()
        && flat_batch_stride(&b.stride()[..dims.len() - 2], &b.dims()[..dims.len() - 2]).is_some();
    if fast {
        a.apply_op2_no_bwd(b, &ManySmallMatmuls)
    } else if trainable_bmm_serves(a, b, grad) {
        a.apply_op2(
            b,
            TrainableBmm {
                b_transposed: false,
            },
        )
    } else {
        a.matmul(b)
    }
}

/// `a: (n, m)` row-major, transposed to `(m, n)`, in blocks of 16 rows of `a` so that each
/// output row is written 16 contiguous elements at a time (element by element, the strided
/// writes cost 6% of batch-32 decoding).
pub(crate) fn transpose(a: &[f32], n: usize, m: usize) -> Vec<f32> {
    const B: usize = 16;
    let mut t = vec![0f32; n * m];
    for o0 in (0..n).step_by(B) {
        let o1 = (o0 + B).min(n);
        for r in 0..m {
            let dst = &mut t[r * n + o0..r * n + o1];
            for (j, d) in dst.iter_mut().enumerate() {
                *d = a[(o0 + j) * m + r];
            }
        }
    }
    t
}

/// Most rows for which `x W^T` runs as `(W x^T)^T`.
const SMALL_ROWS: usize = 48;

/// `x W^T`. For a few rows candle's gemm pays a fixed cost per call that the transposed product
/// `(W x^T)^T` largely avoids (measured: 8-32 rows x 576 -> 1536 take 0.43-0.53 ms one way,
/// 0.25-0.28 ms the other); large batches keep the direct form.
fn small_rows_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let rows = x.dim(0)?;
    if rows > 1 && rows <= SMALL_ROWS && x.device().is_cpu() {
        w.matmul(&x.t()?.contiguous()?)?.t()?.contiguous()
    } else {
        x.matmul(&w.t()?)
    }
}

/// A LoRA adapter: `delta(x) = scale * (x A^T) B^T`, `A: (r, in)`, `B: (out, r)` (B starts at 0).
#[derive(Clone)]
pub struct Lora {
    /// Down projection.
    pub a: Var,
    /// Up projection.
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
}

/// Most rows for which a kept quantized weight is used (beyond, the f32 gemm is faster).
pub const QUANTIZED_MAX_ROWS: usize = 3;

/// Most rows for which kept Q4_1 blocks are streamed with the f32 bits. Up to 16 rows the
/// product waits on memory and a sixth of the bytes pays (1536 x 576 at 16 rows on a 2-core AMD
/// EPYC: 0.30-0.32 ms against 0.44-0.61 from f32); beyond, expanding the blocks costs more than
/// it saves (batch-32 decoding 209 tok/s against 256 from f32).
const Q4_1_STREAM_MAX_ROWS: usize = 16;

/// A linear layer `y = x W^T (+ b)`, optionally trainable or carrying a LoRA adapter.
#[derive(Clone)]
pub struct Linear {
    /// Weight `(out, in)`.
    pub w: Tensor,
    /// Optional bias `(out,)`.
    pub bias: Option<Tensor>,
    /// Whether `w` is a `Var` being trained (then its gradient is needed).
    pub trainable: bool,
    /// Optional LoRA adapter.
    pub lora: Option<Lora>,
    /// The original quantized weight, used for inference (no gradient, no LoRA) when kept.
    pub quantized: Option<std::sync::Arc<QuantizedWeight>>,
}

/// A kept GGUF weight for few-row inference.
pub enum QuantizedWeight {
    /// candle's quantized matmul (its SIMD kernels: Q4_0, Q8_0, the K-quants; any device).
    Candle(candle_core::quantized::QMatMul),
    /// Q4_1 in the file's blocks with this crate's kernel (CPU).
    Q4_1(crate::kernels::q4_1::Q41Matrix),
}

impl QuantizedWeight {
    /// `x (rows, in) -> (rows, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(q) => q.forward(x),
            Self::Q4_1(q) => q.forward(x),
        }
    }
}

impl Linear {
    /// A frozen linear layer.
    pub fn new(w: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            w,
            bias,
            trainable: false,
            lora: None,
            quantized: None,
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.w.dims()[0]
    }

    /// Apply to `x: (..., in)`.
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / inner.max(1);
        // Flat rows pass as they are: a reshape is a graph node even when it changes nothing.
        let x2 = if dims.len() == 2 {
            x.clone()
        } else {
            x.reshape((rows, inner))?
        };
        let frozen_path =
            grad && !self.trainable && x2.device().is_cpu() && x2.dtype() == DType::F32;
        // The kept GGUF weight serves plain inference only: a gradient, a trainable weight or a
        // LoRA adapter needs the f32 weight (edits drop the quantized copy where they happen).
        // candle's quantized matmul is a dot product per row, so it wins only for a few rows
        // (decoding at batch 1: 2.4-2.9x faster; at 32 rows 2.5x slower than f32 gemm).
        let quantized = self
            .quantized
            .as_ref()
            .filter(|_| !grad && !self.trainable && self.lora.is_none())
            .filter(|_| x2.dtype() == DType::F32 && rows <= QUANTIZED_MAX_ROWS);
        let inference = !grad && !self.trainable && fused::serves(&x2);
        if inference && self.q4_1_stream(rows).is_some() {
            if let Some(y) = Self::stream_few_rows(&[self], &x2.contiguous()?, rows, inner)? {
                let y = y.into_iter().next().expect("one output");
                return self.shaped_like(y, dims);
            }
        }
        let lora_fused = self.lora.as_ref().filter(|l| {
            (frozen_path || inference) && fused::serves(&self.w) && fused::serves(l.a.as_tensor())
        });
        let mut y = if let Some(l) = lora_fused {
            // Frozen product and adapter in one pass (and one graph node when differentiated).
            let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
            if grad {
                fused::lora_linear(&x2, &self.w, a, b, l.scale)?
            } else {
                fused::lora_linear_no_grad(&x2, &self.w, a, b, l.scale)?
            }
        } else if let Some(q) = quantized {
            q.forward(&x2.contiguous()?)?
        } else if frozen_path {
            x2.contiguous()?
                .apply_op1(FrozenMatmul { w: self.w.clone() })?
        } else if !grad && fused::serves(&x2) && fused::serves(&self.w) {
            // Inference: the same gemm straight between storages, without a graph node.
            x2.contiguous()?
                .apply_op1_no_bwd(&FrozenMatmul { w: self.w.clone() })?
        } else if grad && self.trainable && fused::serves(&x2) && fused::serves(&self.w) {
            fused::trainable_linear(&x2, &self.w)?
        } else {
            small_rows_matmul(&x2, &self.w)?
        };
        // Without a gradient, trainable tensors enter detached: a variable in the graph would
        // make every later node record its inputs, keeping a whole forward's activations alive
        // (GCG's candidate batches inside R2D2 training: gigabytes, and fresh pages each time).
        let param = |t: &Tensor| if grad { t.clone() } else { t.detach() };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&param(b))?;
        }
        // The adapter as separate nodes, unless the fused node above already applied it.
        if let Some(l) = self.lora.as_ref().filter(|_| lora_fused.is_none()) {
            let (a, b) = (&param(l.a.as_tensor()), &param(l.b.as_tensor()));
            let delta = if grad && fused::serves(&x2) && fused::serves(a) {
                fused::trainable_linear(&fused::trainable_linear(&x2, a)?, b)?
            } else {
                x2.matmul(&a.t()?)?.matmul(&b.t()?)?
            };
            y = (y + (delta * l.scale)?)?;
        }
        self.shaped_like(y, dims)
    }

    /// `x W_j^T (+ b_j)` for several linear layers that read the same `x` (a block's query, key
    /// and value; the MLP's gate and up). Decoding (a few rows, no gradient, plain f32 weights)
    /// runs them in one pass of the streaming kernels, with the same bits as one at a time;
    /// anything else is each layer's own [`Linear::forward`].
    pub fn forward_shared<const N: usize>(
        linears: [&Linear; N],
        x: &Tensor,
        grad: bool,
    ) -> Result<[Tensor; N]> {
        let ys = Self::forward_shared_vec(&linears, x, grad)?;
        Ok(ys.try_into().expect("one output per layer"))
    }

    fn forward_shared_vec(linears: &[&Linear], x: &Tensor, grad: bool) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let inner = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / inner.max(1);
        let plain = |l: &Linear| {
            !l.trainable
                && l.lora.is_none()
                && (l.quantized.is_none() || rows > QUANTIZED_MAX_ROWS)
                && fused::serves(&l.w)
        };
        let one_by_one = |x: &Tensor| linears.iter().map(|l| l.forward(x, grad)).collect();
        if grad
            || rows > crate::kernels::few_rows::MAX_ROWS
            || !fused::serves(x)
            || !linears.iter().all(|l| plain(l))
        {
            return one_by_one(x);
        }
        match Self::stream_few_rows(linears, &x.contiguous()?, rows, inner)? {
            Some(ys) => linears
                .iter()
                .zip(ys)
                .map(|(l, y)| l.shaped_like(y, dims.clone()))
                .collect(),
            None => one_by_one(x),
        }
    }

    /// The kept Q4_1 blocks, when a product of `rows` rows should stream them instead of the
    /// f32 weight (same bits, a sixth of the bytes): past the dot-product kernel's rows (which
    /// read f32, and where `--quantized` runs its own 8-bit kernel up to 3 rows) and up to
    /// [`Q4_1_STREAM_MAX_ROWS`], for a frozen weight without an adapter.
    fn q4_1_stream(&self, rows: usize) -> Option<&crate::kernels::q4_1::Q41Matrix> {
        match self.quantized.as_deref() {
            Some(QuantizedWeight::Q4_1(m))
                if rows > crate::kernels::few_rows::DOT_MAX_ROWS
                    && rows <= Q4_1_STREAM_MAX_ROWS
                    && !self.trainable
                    && self.lora.is_none() =>
            {
                Some(m)
            }
            _ => None,
        }
    }

    /// `x W_j^T (+ b_j)` for flat rows `x: (rows, inner)` (contiguous f32) in one pass of the
    /// streaming kernels, each weight as f32 or as its kept Q4_1 blocks ([`Self::q4_1_stream`]);
    /// `None` when the kernels do not serve this CPU or these rows.
    fn stream_few_rows(
        linears: &[&Linear],
        x: &Tensor,
        rows: usize,
        inner: usize,
    ) -> Result<Option<Vec<Tensor>>> {
        use crate::kernels::few_rows::StreamWeight;
        let ws: Vec<Tensor> = linears
            .iter()
            .map(|l| l.w.contiguous())
            .collect::<Result<_>>()?;
        let ys = {
            let (xs, xl) = x.storage_and_layout();
            let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
            fn f32s<'a>(s: &'a candle_core::Storage, l: &Layout, n: usize) -> Option<&'a [f32]> {
                match s {
                    candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
                        Some(&v[l.start_offset()..l.start_offset() + n])
                    }
                    _ => None,
                }
            }
            let (Some(xv), Some(streams)) = (
                f32s(&xs, xl, x.elem_count()),
                guards
                    .iter()
                    .zip(&ws)
                    .zip(linears)
                    .map(|(((s, l), w), lin)| {
                        let out = w.dims()[0];
                        match lin.q4_1_stream(rows) {
                            Some(m) => Some((StreamWeight::Q4_1(m.blocks()), out)),
                            None => f32s(s, l, w.elem_count()).map(|v| (StreamWeight::F32(v), out)),
                        }
                    })
                    .collect::<Option<Vec<_>>>(),
            ) else {
                candle_core::bail!("stream_few_rows: expected f32 CPU tensors")
            };
            crate::kernels::few_rows::few_rows_matmul_streams(xv, rows, &streams, inner)
        };
        let Some(ys) = ys else {
            return Ok(None);
        };
        linears
            .iter()
            .zip(ys)
            .map(|(l, y)| {
                let mut y = Tensor::from_vec(y, (rows, l.out_dim()), x.device())?;
                if let Some(b) = &l.bias {
                    y = y.broadcast_add(&b.detach())?;
                }
                Ok(y)
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `y: (rows, out)` in the input's leading dims (`in_dims`), unchanged when those are flat.
    fn shaped_like(&self, y: Tensor, in_dims: Vec<usize>) -> Result<Tensor> {
        if in_dims.len() == 2 {
            return Ok(y);
        }
        let mut out_dims = in_dims;
        *out_dims.last_mut().unwrap() = self.out_dim();
        y.reshape(out_dims)
    }
}

/// GGUF weight and bias names (within a block) of a projection named `q`, `k`, ... `down`.
pub fn gguf_names(linear: &str) -> (&'static str, &'static str) {
    match linear {
        "q" => ("attn_q.weight", "attn_q.bias"),
        "k" => ("attn_k.weight", "attn_k.bias"),
        "v" => ("attn_v.weight", "attn_v.bias"),
        "o" => ("attn_output.weight", "attn_output.bias"),
        "gate" => ("ffn_gate.weight", "ffn_gate.bias"),
        "up" => ("ffn_up.weight", "ffn_up.bias"),
        _ => ("ffn_down.weight", "ffn_down.bias"),
    }
}

impl Linear {
    /// The weight with any LoRA adapter merged in: `W + scale * B A`.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.w.detach();
        match &self.lora {
            None => Ok(w),
            Some(l) => {
                let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
                let dtype = w.dtype();
                w + delta.to_dtype(dtype)?
            }
        }
    }
}

/// The seven projections of a pre-norm block with a gated MLP, shared by every family.
#[derive(Clone)]
pub struct Projections {
    /// Query.
    pub q: Linear,
    /// Key.
    pub k: Linear,
    /// Value.
    pub v: Linear,
    /// Attention output.
    pub o: Linear,
    /// MLP gate.
    pub gate: Linear,
    /// MLP up.
    pub up: Linear,
    /// MLP down.
    pub down: Linear,
}

impl Projections {
    /// The projections by name (`q`, `k`, `v`, `o`, `gate`, `up`, `down`), for LoRA.
    pub fn named_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("q", &mut self.q),
            ("k", &mut self.k),
            ("v", &mut self.v),
            ("o", &mut self.o),
            ("gate", &mut self.gate),
            ("up", &mut self.up),
            ("down", &mut self.down),
        ]
    }

    /// Every weight and bias tensor with its GGUF name within the block (`attn_q.weight`, ...).
    pub fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut out = Vec::new();
        for (name, l) in self.named_mut() {
            let (w, b) = gguf_names(name);
            out.push((w, &mut l.w));
            if let Some(bias) = l.bias.as_mut() {
                out.push((b, bias));
            }
        }
        out
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::testing::random_tensor(shape, seed, 1.0)
    }

    /// Inference and the frozen gradient path run between storages: the streaming kernels up
    /// to 48 rows (dot products up to 4, broadcasts beyond; without AVX-512, blocks of the
    /// weight by gemm), one threaded gemm beyond. Every row count on either side of each switch
    /// equals candle's matmul.
    #[test]
    fn linear_forward_equals_the_plain_product_for_every_row_count() {
        let w = rand(&[37, 64], 1);
        let lin = Linear::new(w.clone(), None);
        let streamed = crate::kernels::few_rows::MAX_ROWS;
        for rows in [
            1,
            2,
            crate::kernels::few_rows::DOT_MAX_ROWS,
            crate::kernels::few_rows::DOT_MAX_ROWS + 1,
            16,
            17,
            streamed,
            streamed + 1,
            24,
            SMALL_ROWS,
            SMALL_ROWS + 1,
            130,
        ] {
            let x = rand(&[rows, 64], rows as u64);
            let want = x.matmul(&w.t().unwrap()).unwrap();
            for grad in [false, true] {
                let got = lin.forward(&x, grad).unwrap();
                assert_eq!(got.dims(), &[rows, 37]);
                let d = max_diff(&got, &want);
                assert!(d < 1e-5, "rows {rows} grad {grad}: max diff {d}");
            }
        }
    }

    /// Projections that share their input (q, k, v with biases, as Qwen2's) give the same
    /// bits together as alone, at decoding sizes and beyond, with or without a gradient.
    #[test]
    fn shared_input_projections_equal_each_alone() {
        let lins: Vec<Linear> = [(40, 1), (8, 2), (8, 3)]
            .iter()
            .map(|&(out, seed)| Linear::new(rand(&[out, 64], seed), Some(rand(&[out], seed + 10))))
            .collect();
        let refs = [&lins[0], &lins[1], &lins[2]];
        for rows in [1, 3, 20, 60] {
            let x = rand(&[rows, 64], 100 + rows as u64);
            for grad in [false, true] {
                let together = Linear::forward_shared(refs, &x, grad).unwrap();
                for (l, y) in lins.iter().zip(&together) {
                    let alone = l.forward(&x, grad).unwrap();
                    assert_eq!(y.dims(), alone.dims());
                    assert_eq!(max_diff(y, &alone), 0.0, "rows {rows} grad {grad}");
                }
            }
        }
    }

    #[test]
    fn transpose_moves_every_element_for_uneven_blocks() {
        for (n, m) in [(1, 1), (17, 3), (33, 32), (5, 40)] {
            let a: Vec<f32> = (0..n * m).map(|i| i as f32).collect();
            let t = transpose(&a, n, m);
            for i in 0..n {
                for j in 0..m {
                    assert_eq!(t[j * n + i], a[i * m + j], "{n}x{m} at ({i}, {j})");
                }
            }
        }
    }

    /// Inference uses the fused SwiGLU pass for large tensors and candle's ops for small ones:
    /// both equal `silu(a) * u`.
    #[test]
    fn swiglu_for_inference_equals_the_composite_at_both_sizes() {
        for n in [100, 1 << 17] {
            let (a, u) = (rand(&[2, n / 2], 5), rand(&[2, n / 2], 6));
            let want = (a.silu().unwrap() * &u).unwrap();
            let d = max_diff(&swiglu(&a, &u, false).unwrap(), &want);
            assert!(d < 1e-6, "{n} elements: max diff {d}");
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::testing::max_abs(&(a - b).unwrap()) as f32
    }

    #[test]
    fn fast_and_differentiable_forms_agree() {
        let x = rand(&[2, 3, 5, 8], 1);
        let w = rand(&[8], 2);
        assert!(
            max_diff(
                &rms_norm(&x, &w, 1e-5, true).unwrap(),
                &rms_norm(&x, &w, 1e-5, false).unwrap()
            ) < 1e-5
        );
        assert!(
            max_diff(
                &softmax_last(&x, true).unwrap(),
                &softmax_last(&x, false).unwrap()
            ) < 1e-6
        );
        let cos = rand(&[2, 5, 4], 3);
        let sin = rand(&[2, 5, 4], 4);
        for inter in [true, false] {
            let a = rope(&x, &cos, &sin, inter, true).unwrap();
            let b = rope(&x, &cos, &sin, inter, false).unwrap();
            assert!(max_diff(&a, &b) < 1e-5, "interleaved={inter}");
        }
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_its_gradient() {
        let w = rand(&[4, 6], 5);
        let x = Var::from_tensor(&rand(&[3, 6], 6)).unwrap();
        let lin = Linear::new(w.clone(), None);
        let y = lin.forward(x.as_tensor(), true).unwrap();
        assert!(max_diff(&y, &x.as_tensor().matmul(&w.t().unwrap()).unwrap()) < 1e-6);
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        let expect = (y * 2.0).unwrap().matmul(&w).unwrap();
        assert!(max_diff(gx, &expect) < 1e-5);
    }
}
