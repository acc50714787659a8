//! The model engine shared by every family: embedding, the block loop with observer sites, RoPE
//! tables, masks for left-padded batches, grouped-query attention with a KV cache, and the LM head
//! applied only where logits are read. Family files (`models/*.rs`) supply the blocks.
use crate::config::ModelConfig;
use crate::engine::hooks::{Observer, Phase, Site, SiteInfo};
use crate::ops::{self, Linear};
use crate::text::tokenizer::Tok;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};

/// Per-layer attention inputs computed once per forward.
pub struct AttnCtx<'a> {
    /// RoPE tables for global layers, `(b, t, hd/2)`.
    pub cos: &'a Tensor,
    /// See `cos`.
    pub sin: &'a Tensor,
    /// RoPE tables for sliding-window layers (Gemma 3).
    pub local_cos: &'a Tensor,
    /// See `local_cos`.
    pub local_sin: &'a Tensor,
    /// Additive mask `(b, 1, 1, t, T)` for global layers (`None` when nothing is masked).
    pub mask: Option<&'a Tensor>,
    /// Additive mask for sliding-window layers.
    pub local_mask: Option<&'a Tensor>,
    /// Use differentiable ops.
    pub grad: bool,
}

/// One transformer block of some family.
pub trait Block: Send + Sync {
    /// Run the block on the residual stream `x: (b, t, d)`; `site` is called with the attention
    /// and MLP outputs before they are added. `cache` carries the layer's cache and the number of
    /// positions to reserve when it first allocates.
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        ctx: &AttnCtx,
        cache: Option<(&mut LayerCache, usize)>,
        site: &mut dyn FnMut(Site, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor>;

    /// The block's linear layers by name (`q`, `k`, `v`, `o`, `gate`, `up`, `down`), for LoRA.
    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)>;

    /// Every weight tensor of the block (norms included) with its GGUF name within the block
    /// (`attn_norm.weight`, `attn_q.weight`, ...), for fine-tuning, editing and export.
    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor)>;
}

/// Cached keys and values of one layer in preallocated buffers: keys transposed
/// `(b, kv_heads, hd, cap)`, values `(b, kv_heads, cap, hd)`. Appending writes in place, and the
/// attention matmuls read strided views, so a decode step copies nothing already cached.
#[derive(Clone, Default)]
pub struct LayerCache {
    buf: Option<(Tensor, Tensor)>,
    len: usize,
    frozen: bool,
}

impl LayerCache {
    /// Append `k_t: (b, kvh, hd, t)` and `v: (b, kvh, t, hd)`; return views of everything cached.
    fn append(&mut self, k_t: &Tensor, v: &Tensor, reserve: usize) -> Result<(Tensor, Tensor)> {
        let (b, kvh, hd, t) = k_t.dims4()?;
        let need = self.len + t;
        let cap = self.buf.as_ref().map_or(0, |(k, _)| k.dim(3).unwrap_or(0));
        if need > cap {
            let new_cap = need.max(reserve).max(cap * 2).max(16);
            let k_new = Tensor::zeros((b, kvh, hd, new_cap), k_t.dtype(), k_t.device())?;
            let v_new = Tensor::zeros((b, kvh, new_cap, hd), v.dtype(), v.device())?;
            if let Some((k_old, v_old)) = &self.buf {
                k_new.slice_set(&k_old.narrow(3, 0, self.len)?.contiguous()?, 3, 0)?;
                v_new.slice_set(&v_old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.buf = Some((k_new, v_new));
        }
        let (kb, vb) = self.buf.as_ref().expect("allocated above");
        kb.slice_set(&k_t.contiguous()?, 3, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok((kb.narrow(3, 0, need)?, vb.narrow(2, 0, need)?))
    }

    /// The cached keys and values followed by `k_t` and `v`, leaving the cache untouched: the
    /// differentiable path reads a cached prefix through `cat`, which autograd follows (writing
    /// into the buffer in place would cut the gradient of the new tokens).
    fn read_with(&self, k_t: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.buf {
            None => Ok((k_t.clone(), v.clone())),
            Some((kb, vb)) => {
                let b = k_t.dim(0)?;
                let (ck, cv) = (kb.narrow(3, 0, self.len)?, vb.narrow(2, 0, self.len)?);
                let (ck, cv) = if ck.dim(0)? == 1 && b > 1 {
                    let (_, kvh, hd, n) = ck.dims4()?;
                    (
                        ck.broadcast_as((b, kvh, hd, n))?,
                        cv.broadcast_as((b, kvh, n, hd))?,
                    )
                } else {
                    (ck, cv)
                };
                Ok((
                    Tensor::cat(&[&ck, k_t], 3)?.contiguous()?,
                    Tensor::cat(&[&cv, v], 2)?.contiguous()?,
                ))
            }
        }
    }
}

/// Each row of `x: (b, ...)` repeated `k` times in place: `(b * k, ...)`, contiguous.
fn repeat_rows(x: &Tensor, k: usize) -> Result<Tensor> {
    let dims = x.dims();
    let mut wide = dims.to_vec();
    wide.insert(1, k);
    let mut flat = dims.to_vec();
    flat[0] *= k;
    x.unsqueeze(1)?
        .broadcast_as(wide)?
        .contiguous()?
        .reshape(flat)
}

/// The unedited residual stream of a [`Model::forward_prompts`] pass at every block input:
/// the shared prefix's pass (one row; empty when no prefix was shared) and the suffixes'.
#[derive(Debug, Clone, Default)]
pub struct Tape {
    /// Tokens of the shared prefix (0 = none).
    pub shared: usize,
    /// Per layer `(1, shared, d)`.
    pub prefix: Vec<Tensor>,
    /// Per layer `(b, t, d)`, left-padded after the prefix.
    pub suffix: Vec<Tensor>,
}

/// Records block inputs per pass: `(cache offset, input of every block)`.
#[derive(Default)]
struct TapeRecorder {
    passes: Vec<(usize, Vec<Tensor>)>,
}

impl Observer for TapeRecorder {
    fn visit(&mut self, at: &SiteInfo, x: Tensor) -> Result<Tensor> {
        if at.site == Site::ResidPre {
            if at.layer == 0 {
                self.passes.push((at.offset, Vec::new()));
            }
            if let Some((_, layers)) = self.passes.last_mut() {
                layers.push(x.clone());
            }
        }
        Ok(x)
    }
}

/// Runs `f` on a worker of the global thread pool (inline when already on one). The kernels of
/// a forward are parallel loops of a fraction of a millisecond each (a decoding step has ~15 per
/// block); called from a thread outside the pool, each one hands its work to the pool and
/// sleeps until a worker wakes up and finishes it. From a worker, the loop's first part starts
/// at once on the calling thread and the other worker joins when it is awake. Measured on 2
/// cores over interleaved rounds: batch-1 decoding ~5% faster; prefill and batch-32 decoding
/// moved within this machine's noise (±10%).
pub(crate) fn on_thread_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::join(f, || ()).0
    }
}

/// `loss.backward()` on a worker of the thread pool, for the reason [`Model::forward_from`]
/// runs there: the backward's kernels are parallel loops too.
pub fn backward(loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
    on_thread_pool(|| loss.backward())
}

/// Keys and values of every layer, for incremental decoding.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    reserve: usize,
}

impl KvCache {
    /// Repeat every cached row `k` times, row `i` becoming rows `i*k .. (i+1)*k` (a prefix
    /// shared by `k` prompts fanned out to their batch).
    pub fn expand(&self, k: usize) -> Result<Self> {
        let mut out = self.clone();
        for l in out.layers.iter_mut() {
            if let Some((kb, vb)) = &l.buf {
                let kb = kb.narrow(3, 0, l.len)?;
                let vb = vb.narrow(2, 0, l.len)?;
                l.buf = Some((repeat_rows(&kb, k)?, repeat_rows(&vb, k)?));
            }
        }
        Ok(out)
    }

    /// Make this cache a read-only prefix: later forwards attend to it (one cached row serves a
    /// whole batch) but do not extend it, so it can be reused across calls (GCG candidates).
    pub fn freeze(mut self) -> Self {
        for l in self.layers.iter_mut() {
            l.frozen = true;
        }
        self
    }

    /// A frozen view of the first `len` cached tokens, sharing this cache's buffers (candidates
    /// that agree with a sequence up to some position reuse its keys and values).
    pub fn prefix(&self, len: usize) -> Self {
        let len = len.min(self.len);
        let mut out = self.clone();
        for l in out.layers.iter_mut() {
            l.len = len;
        }
        out.len = len;
        out.freeze()
    }

    /// An empty cache for `n_layer` blocks.
    pub fn new(n_layer: usize) -> Self {
        Self::with_capacity(n_layer, 0)
    }

    /// An empty cache that allocates room for `tokens` positions at the first append.
    pub fn with_capacity(n_layer: usize, tokens: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); n_layer],
            len: 0,
            reserve: tokens,
        }
    }

    /// Tokens already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Grouped-query attention with RoPE and an optional cache.
/// `q: (b, h, t, hd)`, `k, v: (b, kvh, t, hd)` before RoPE; returns `(b, t, h*hd)`, or
/// `(b*t, h*hd)` when `flat_out`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: Option<&Tensor>,
    cfg: &ModelConfig,
    cache: Option<(&mut LayerCache, usize)>,
    grad: bool,
    flat_out: bool,
) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let kvh = k.dim(1)?;
    let q = ops::rope(q, cos, sin, cfg.rope_interleaved, grad)?;
    let k = ops::rope(k, cos, sin, cfg.rope_interleaved, grad)?;
    // Keys as stored in the cache, `k^T`; without a cache `k` itself (the scores' product reads
    // it transposed in place).
    let (keys, v, keys_transposed) = match cache {
        Some((c, _)) if grad || c.frozen => {
            let (k_t, v) = c.read_with(&k.transpose(2, 3)?, v)?;
            (k_t, v, true)
        }
        Some((c, reserve)) => {
            let (k_t, v) = c.append(&k.transpose(2, 3)?, v, reserve)?;
            (k_t, v, true)
        }
        None => (k, v.clone(), false),
    };
    let total = if keys_transposed {
        keys.dim(3)?
    } else {
        keys.dim(2)?
    };
    let n_rep = h / kvh;
    // Query heads sharing a kv head are stacked along the token axis, so no kv copy is needed.
    let q = q.reshape((b, kvh, n_rep * t, hd))?;
    let scores = if keys_transposed {
        ops::batched_matmul(&q, &keys, grad)?
    } else {
        ops::batched_matmul_bt(&q, &keys, grad)?
    };
    let mask_fits = mask.is_none_or(|m| m.dims() == [b, 1, 1, t, total]);
    let p = if crate::kernels::fused::serves(&scores) && mask_fits {
        // One pass (and one graph node) for scale, mask and softmax.
        let mask = mask.map(|m| m.reshape((b, t, total))).transpose()?;
        crate::kernels::fused::scaled_masked_softmax(&scores, mask.as_ref(), cfg.attn_scale)?
    } else {
        let att = (scores * cfg.attn_scale)?;
        let att = match mask {
            Some(m) => att
                .reshape((b, kvh, n_rep, t, total))?
                .broadcast_add(m)?
                .reshape((b, kvh, n_rep * t, total))?,
            None => att,
        };
        ops::softmax_last(&att, grad)?
    };
    let y = ops::batched_matmul(&p, &v, grad)?; // (b, kvh, n_rep*t, hd)
    let y = y.reshape((b, h, t, hd))?;
    if crate::kernels::fused::serves(&y) {
        return crate::kernels::fused::merge_heads(&y, flat_out);
    }
    let merged = if flat_out {
        Shape::from((b * t, h * hd))
    } else {
        Shape::from((b, t, h * hd))
    };
    y.transpose(1, 2)?.reshape(merged)
}

/// How tokens of a batch are laid out: left padding per row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Number of pad tokens in each row.
    pub pad: Vec<usize>,
    /// Sequence index where each row's pads begin: 0 for left padding, the length of a shared
    /// cached prefix when suffixes are padded after it.
    pub pad_at: usize,
}

impl Layout {
    /// No padding for `b` rows.
    pub fn dense(b: usize) -> Self {
        Self {
            pad: vec![0; b],
            pad_at: 0,
        }
    }

    /// Whether sequence index `k` of row `r` is a pad.
    fn is_pad(&self, r: usize, k: usize) -> bool {
        k >= self.pad_at && k < self.pad_at + self.pad[r]
    }

    /// The position (for RoPE) of sequence index `j` in row `r`: pads do not count.
    pub fn position(&self, r: usize, j: usize) -> usize {
        if j < self.pad_at {
            j
        } else {
            self.pad_at + j.saturating_sub(self.pad_at + self.pad[r])
        }
    }
}

/// Which positions get logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsAt {
    /// None (capture-only passes).
    None,
    /// The chunk's last token.
    Last,
    /// Every token (training).
    All,
    /// The chunk's last `n` tokens (target scoring in attacks).
    Tail(usize),
    /// These rows of the flattened `(b * t)` positions, returned as `(1, n, V)` (training
    /// losses that read only target positions).
    Rows(Vec<u32>),
}

/// A causal language model: a family's blocks around the shared engine.
pub struct Model {
    /// Shape and hyper-parameters.
    pub cfg: ModelConfig,
    /// Token embedding `(vocab, d)`.
    pub embed: Tensor,
    /// Blocks.
    pub blocks: Vec<Box<dyn Block>>,
    /// Final norm weight.
    pub final_norm: Tensor,
    /// LM head (the embedding when tied).
    pub lm_head: Linear,
    /// Tokenizer and chat template.
    pub tok: Tok,
    /// Device the weights live on.
    pub device: Device,
    /// Where it was loaded from.
    pub source: std::path::PathBuf,
}

fn rope_tables(
    positions: &Tensor,
    theta: f64,
    scale: f64,
    hd: usize,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / hd as f64) / scale) as f32)
        .collect();
    let inv = Tensor::new(inv.as_slice(), positions.device())?.to_dtype(dtype)?;
    let (b, t) = positions.dims2()?;
    let f = positions
        .to_dtype(dtype)?
        .reshape((b, t, 1))?
        .broadcast_mul(&inv.reshape((1, 1, hd / 2))?)?;
    Ok((f.cos()?.contiguous()?, f.sin()?.contiguous()?))
}

/// Additive mask `(b, 1, 1, t, T)`: causal, left padding, optional sliding window.
fn build_mask(
    layout: &Layout,
    offset: usize,
    t: usize,
    window: Option<usize>,
    dev: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let total = offset + t;
    let b = layout.pad.len();
    let mut any = false;
    let mut m = vec![0f32; b * t * total];
    for r in 0..b {
        for i in 0..t {
            let q = offset + i;
            let qp = layout.position(r, q);
            for k in 0..total {
                let causal = k <= q;
                let not_pad = !layout.is_pad(r, k) || k == q; // a pad query sees itself
                let in_window = window.is_none_or(|w| qp - layout.position(r, k).min(qp) < w);
                if !(causal && not_pad && in_window) {
                    m[(r * t + i) * total + k] = -1e30;
                    any = true;
                }
            }
        }
    }
    if !any {
        return Ok(None);
    }
    Ok(Some(
        Tensor::from_vec(m, (b, 1, 1, t, total), dev)?.to_dtype(dtype)?,
    ))
}

/// Refuse logits holding NaN or infinity, naming the first block whose output already did (its
/// sum in `block_sums`), so a bad weight or an overflow is traced to where it started instead of
/// turning into garbage text and scores.
fn check_finite(logits: &Tensor, block_sums: &[(usize, Tensor)]) -> Result<()> {
    let finite = |t: &Tensor| -> Result<bool> {
        Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?.is_finite())
    };
    if finite(&logits.sum_all()?)? {
        return Ok(());
    }
    let mut start = "the final norm or the LM head".to_string();
    for (l, sum) in block_sums {
        if !finite(sum)? {
            start = format!("block {l}");
            break;
        }
    }
    candle_core::bail!(
        "the forward pass produced non-finite logits (NaN or infinity), first seen in the output of {start}\n  fix: the checkpoint's weights or configuration are corrupt, or its dtype overflows: fetch or export it again, or run it in f32"
    )
}

impl Model {
    /// Embeddings of `ids: (b, t)`, scaled for Gemma.
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e =
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, self.cfg.hidden))?;
        self.scale_embeddings(e)
    }

    /// Apply the family's embedding scale to raw embeddings (also used for `onehot @ W_embed`).
    pub fn scale_embeddings(&self, e: Tensor) -> Result<Tensor> {
        if self.cfg.scale_embeddings {
            e * (self.cfg.hidden as f64).sqrt()
        } else {
            Ok(e)
        }
    }

    /// Run the model on embeddings `x: (b, t, d)` that follow `cache.len()` cached tokens.
    /// Observers see every site; logits are computed only at `logits`. With `grad` a cache is a
    /// read-only prefix (as a [`KvCache::freeze`]d one always is): it may hold one row for the
    /// whole batch, and it is not extended.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_embeds(
        &self,
        x: Tensor,
        layout: &Layout,
        cache: Option<&mut KvCache>,
        logits: LogitsAt,
        phase: Phase,
        grad: bool,
        obs: &mut dyn Observer,
    ) -> Result<Option<Tensor>> {
        self.forward_from(0, x, layout, cache, logits, phase, grad, obs)
    }

    /// [`Model::forward_embeds`] from block `first` on: `x` is the residual stream at that
    /// block's input (a recorded unedited pass, [`Tape`]); blocks below `first` are not run and
    /// their caches stay empty. Edits at layers `>= first` then cost only the layers they touch.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_from(
        &self,
        first: usize,
        x: Tensor,
        layout: &Layout,
        cache: Option<&mut KvCache>,
        logits: LogitsAt,
        phase: Phase,
        grad: bool,
        obs: &mut dyn Observer,
    ) -> Result<Option<Tensor>> {
        on_thread_pool(|| self.forward_here(first, x, layout, cache, logits, phase, grad, obs))
    }

    /// [`Model::forward_from`] on the calling thread.
    #[allow(clippy::too_many_arguments)]
    fn forward_here(
        &self,
        first: usize,
        mut x: Tensor,
        layout: &Layout,
        mut cache: Option<&mut KvCache>,
        logits: LogitsAt,
        phase: Phase,
        grad: bool,
        obs: &mut dyn Observer,
    ) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        if !grad {
            // Embeddings of a trainable table would otherwise carry the graph along the
            // residual stream (see `Linear::forward`).
            x = x.detach();
        }
        let (b, t, _) = x.dims3()?;
        if layout.pad.len() != b {
            candle_core::bail!("layout has {} rows, batch has {b}", layout.pad.len());
        }
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let dev = x.device().clone();
        let pos: Vec<u32> = (0..b)
            .flat_map(|r| (offset..offset + t).map(move |j| layout.position(r, j) as u32))
            .collect();
        let positions = Tensor::from_vec(pos, (b, t), &dev)?;
        let (cos, sin) = rope_tables(
            &positions,
            cfg.rope_theta,
            cfg.rope_scale,
            cfg.head_dim,
            x.dtype(),
        )?;
        let (local_cos, local_sin) = match cfg.rope_local_theta {
            Some(th) => rope_tables(&positions, th, 1.0, cfg.head_dim, x.dtype())?,
            None => (cos.clone(), sin.clone()),
        };
        let mask = build_mask(layout, offset, t, None, &dev, x.dtype())?;
        let local_mask = match cfg.sliding_window {
            Some(w) => build_mask(layout, offset, t, Some(w), &dev, x.dtype())?,
            None => mask.clone(),
        };
        let ctx = AttnCtx {
            cos: &cos,
            sin: &sin,
            local_cos: &local_cos,
            local_sin: &local_sin,
            mask: mask.as_ref(),
            local_mask: local_mask.as_ref(),
            grad,
        };
        // Each block's output sum, kept unread (no device sync) unless the logits come out
        // non-finite: then the first non-finite one names the block where it started.
        let mut block_sums = Vec::with_capacity(self.blocks.len());
        for (l, block) in self.blocks.iter().enumerate().skip(first) {
            let info = |site| SiteInfo {
                layer: l,
                site,
                offset,
                phase,
            };
            x = obs.visit(&info(Site::ResidPre), x)?;
            let layer_cache = cache.as_deref_mut().map(|c| (&mut c.layers[l], c.reserve));
            let mut site_fn = |site: Site, a: Tensor| obs.visit(&info(site), a);
            x = block.forward(&x, l, &ctx, layer_cache, &mut site_fn)?;
            if !grad {
                block_sums.push((l, x.sum_all()?));
            }
        }
        if let Some(c) = cache {
            // A frozen cache (every layer frozen by `freeze`) is never extended.
            if !grad && !c.layers.iter().any(|l| l.frozen) {
                c.len += t;
            }
        }
        let at = SiteInfo {
            layer: cfg.n_layer,
            site: Site::FinalNormInput,
            offset,
            phase,
        };
        x = obs.visit(&at, x)?;
        let x = match logits {
            LogitsAt::None => return Ok(None),
            LogitsAt::Last => x.narrow(1, t - 1, 1)?,
            LogitsAt::All => x,
            LogitsAt::Tail(n) => x.narrow(1, t - n.min(t), n.min(t))?,
            LogitsAt::Rows(rows) => {
                let d = x.dim(2)?;
                let idx = Tensor::new(rows.as_slice(), &dev)?;
                x.reshape((b * t, d))?.index_select(&idx, 0)?.unsqueeze(0)?
            }
        };
        let x = ops::rms_norm(&x, &self.final_norm, cfg.rms_eps, grad)?;
        let logits = self.lm_head.forward(&x, grad)?;
        if !grad {
            check_finite(&logits, &block_sums)?;
        }
        Ok(Some(logits))
    }

    /// Forward over token ids `(b, t)`.
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        layout: &Layout,
        cache: Option<&mut KvCache>,
        logits: LogitsAt,
        phase: Phase,
        obs: &mut dyn Observer,
    ) -> Result<Option<Tensor>> {
        let x = self.embed_ids(ids)?;
        self.forward_embeds(x, layout, cache, logits, phase, false, obs)
    }

    /// Last-position logits `(b, V)` of prompts, computing a prefix shared by all of them (a
    /// chat template's system prompt) once and fanning its keys and values out to the batch.
    /// Observers see the prefix pass and the suffix pass as two prompt chunks.
    pub fn last_logits(&self, prompts: &[Vec<u32>], obs: &mut dyn Observer) -> Result<Tensor> {
        self.last_logits_grouped(prompts, 1, obs)
    }

    /// Last-position logits `(groups * b, V)` of `groups` copies of the `b` prompts in one
    /// batch, copy-major, for an observer that edits each copy differently (several candidate
    /// directions measured at once, [`crate::Intervention::AblateGroups`]). The shared prefix
    /// is computed once per copy: the prefix pass has `groups` rows, the suffix pass
    /// `groups * b`.
    pub fn last_logits_grouped(
        &self,
        prompts: &[Vec<u32>],
        groups: usize,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let l = self.forward_prompts(prompts, groups, 1, LogitsAt::Last, obs)?;
        l.expect("logits requested").squeeze(1)
    }

    /// Forward over `groups` copies of `prompts` (see [`Model::last_logits_grouped`]), their
    /// shared prefix (if at least 8 tokens, leaving every row `min_suffix` tokens) computed once
    /// per copy in a pass of its own; `logits` as in [`Model::forward_embeds`], over the suffix
    /// pass (left-padded after the prefix, so prompt ends align).
    pub fn forward_prompts(
        &self,
        prompts: &[Vec<u32>],
        groups: usize,
        min_suffix: usize,
        logits: LogitsAt,
        obs: &mut dyn Observer,
    ) -> Result<Option<Tensor>> {
        const MIN_SHARED: usize = 8;
        let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
        if prompts.is_empty() || shortest == 0 || groups == 0 {
            candle_core::bail!("a forward needs non-empty prompts and at least one group");
        }
        let first = &prompts[0];
        let mut shared = (0..shortest.saturating_sub(min_suffix.max(1)))
            .take_while(|&i| prompts.iter().all(|p| p[i] == first[i]))
            .count();
        if prompts.len() < 2 || shared < MIN_SHARED {
            shared = 0;
        }
        let copies = |rows: &[Vec<u32>]| -> Vec<Vec<u32>> {
            (0..groups).flat_map(|_| rows.iter().cloned()).collect()
        };
        if shared == 0 {
            let (ids, layout) = self.pad_batch(&copies(prompts))?;
            return self.forward_ids(&ids, &layout, None, logits, Phase::Prompt, obs);
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut cache = self
            .cache_prefix_rows(&first[..shared], groups, obs)?
            .expand(prompts.len())?;
        cache.reserve = longest;
        let suffixes: Vec<Vec<u32>> = prompts.iter().map(|p| p[shared..].to_vec()).collect();
        let (ids, mut layout) = self.pad_batch(&copies(&suffixes))?;
        layout.pad_at = shared;
        self.forward_ids(&ids, &layout, Some(&mut cache), logits, Phase::Prompt, obs)
    }

    /// Record the unedited residual stream of [`Model::forward_prompts`] over `prompts` at every
    /// block input, to restart edited passes from ([`Model::last_logits_grouped_from`]); with
    /// the same pass's last-position logits `(b, V)`.
    pub fn tape(&self, prompts: &[Vec<u32>]) -> Result<(Tape, Tensor)> {
        let mut rec = TapeRecorder::default();
        let logits = self
            .forward_prompts(prompts, 1, 1, LogitsAt::Last, &mut rec)?
            .expect("logits requested")
            .squeeze(1)?;
        let mut passes = rec.passes.into_iter();
        let tape = match (passes.next(), passes.next(), passes.next()) {
            (Some((_, suffix)), None, None) => Tape {
                shared: 0,
                prefix: Vec::new(),
                suffix,
            },
            (Some((_, prefix)), Some((shared, suffix)), None) => Tape {
                shared,
                prefix,
                suffix,
            },
            _ => candle_core::bail!("a prompt forward is one pass, or a prefix and a suffix pass"),
        };
        Ok((tape, logits))
    }

    /// [`Model::last_logits_grouped`] restarted at block `first` from a [`Tape`] of the same
    /// prompts: equal to it when no edit touches a layer below `first`.
    pub fn last_logits_grouped_from(
        &self,
        prompts: &[Vec<u32>],
        tape: &Tape,
        groups: usize,
        first: usize,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        if groups == 0 || first >= self.cfg.n_layer || tape.suffix.len() != self.cfg.n_layer {
            candle_core::bail!(
                "a restart needs a full tape, a layer below {} and a group",
                self.cfg.n_layer
            );
        }
        let copies = |x: &Tensor| -> Result<Tensor> {
            let (b, t, d) = x.dims3()?;
            x.unsqueeze(0)?
                .broadcast_as((groups, b, t, d))?
                .contiguous()?
                .reshape((groups * b, t, d))
        };
        let shared = tape.shared;
        let suffixes: Vec<Vec<u32>> = prompts.iter().map(|p| p[shared..].to_vec()).collect();
        let (_, one) = self.pad_batch(&suffixes)?;
        let layout = Layout {
            pad: (0..groups).flat_map(|_| one.pad.iter().copied()).collect(),
            pad_at: shared,
        };
        let x = copies(&tape.suffix[first])?;
        let l = if shared == 0 {
            self.forward_from(
                first,
                x,
                &layout,
                None,
                LogitsAt::Last,
                Phase::Prompt,
                false,
                obs,
            )?
        } else {
            let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
            let mut cache = KvCache::with_capacity(self.cfg.n_layer, shared);
            let p = copies(&tape.prefix[first])?;
            let dense = Layout::dense(groups);
            self.forward_from(
                first,
                p,
                &dense,
                Some(&mut cache),
                LogitsAt::None,
                Phase::Prompt,
                false,
                obs,
            )?;
            let mut cache = cache.expand(prompts.len())?;
            cache.reserve = longest;
            self.forward_from(
                first,
                x,
                &layout,
                Some(&mut cache),
                LogitsAt::Last,
                Phase::Prompt,
                false,
                obs,
            )?
        };
        l.expect("logits requested").squeeze(1)
    }

    /// Keys and values of one row of `ids` (a prefix that later chunks continue from).
    pub fn cache_prefix(&self, ids: &[u32], obs: &mut dyn Observer) -> Result<KvCache> {
        self.cache_prefix_rows(ids, 1, obs)
    }

    /// Keys and values of `rows` identical rows of `ids` (for observers that edit rows apart).
    fn cache_prefix_rows(
        &self,
        ids: &[u32],
        rows: usize,
        obs: &mut dyn Observer,
    ) -> Result<KvCache> {
        let mut cache = KvCache::with_capacity(self.cfg.n_layer, ids.len());
        if !ids.is_empty() {
            let t = Tensor::new(ids, &self.device)?
                .unsqueeze(0)?
                .repeat((rows, 1))?;
            let layout = Layout::dense(rows);
            self.forward_ids(
                &t,
                &layout,
                Some(&mut cache),
                LogitsAt::None,
                Phase::Prompt,
                obs,
            )?;
        }
        Ok(cache)
    }

    /// Left-pad prompts into one `(b, T)` id tensor.
    pub fn pad_batch(&self, prompts: &[Vec<u32>]) -> Result<(Tensor, Layout)> {
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(prompts.len() * t);
        let mut pad = Vec::with_capacity(prompts.len());
        for p in prompts {
            let n = t - p.len();
            pad.push(n);
            ids.extend(std::iter::repeat_n(self.tok.pad_id, n));
            ids.extend_from_slice(p);
        }
        Ok((
            Tensor::from_vec(ids, (prompts.len(), t), &self.device)?,
            Layout { pad, pad_at: 0 },
        ))
    }

    /// Whether the LM head shares the embedding matrix.
    pub fn tied(&self) -> bool {
        self.lm_head.w.id() == self.embed.id()
    }

    /// Make every weight a trainable [`Var`] (full fine-tuning). Returns them, embedding first.
    pub fn make_trainable(&mut self) -> Result<Vec<Var>> {
        let tied = self.tied();
        let mut vars = Vec::new();
        let mut to_var = |t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().clone();
            vars.push(v);
            Ok(())
        };
        to_var(&mut self.embed)?;
        to_var(&mut self.final_norm)?;
        if tied {
            self.lm_head.w = self.embed.clone();
        } else {
            to_var(&mut self.lm_head.w)?;
        }
        self.lm_head.trainable = true;
        for b in self.blocks.iter_mut() {
            for (_, t) in b.tensors_mut() {
                to_var(t)?;
            }
            for (_, l) in b.linears_mut() {
                l.trainable = true;
            }
        }
        Ok(vars)
    }

    /// Attach LoRA adapters of rank `r` (scale `alpha / r`) to the named projections (`q`, `k`,
    /// `v`, `o`, `gate`, `up`, `down`) of every block. `A ~ N(0, 1/r)`-ish small, `B = 0`.
    pub fn attach_lora(
        &mut self,
        rank: usize,
        alpha: f64,
        targets: &[&str],
        seed: u64,
    ) -> Result<Vec<Var>> {
        self.attach_lora_at(rank, alpha, targets, None, seed)
    }

    /// [`Model::attach_lora`] on the blocks in `layers` only (every block when `None`). Blocks
    /// below the first adapted one then stay out of the backward pass entirely.
    pub fn attach_lora_at(
        &mut self,
        rank: usize,
        alpha: f64,
        targets: &[&str],
        layers: Option<&[usize]>,
        seed: u64,
    ) -> Result<Vec<Var>> {
        use rand::{Rng, SeedableRng};
        if rank == 0 {
            candle_core::bail!("LoRA rank must be at least 1");
        }
        let n_layer = self.blocks.len();
        if let Some(&bad) = layers.and_then(|l| l.iter().find(|&&i| i >= n_layer)) {
            candle_core::bail!(
                "LoRA layer {bad} does not exist: this model has layers 0-{} (fix: --lora-layers within that range)",
                n_layer - 1
            );
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dtype = self.embed.dtype();
        let mut vars = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if layers.is_some_and(|l| !l.contains(&i)) {
                continue;
            }
            for (name, l) in b.linears_mut() {
                if !targets.contains(&name) {
                    continue;
                }
                let (out, inp) = l.w.dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f64> = (0..rank * inp)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(
                    &Tensor::from_vec(a, (rank, inp), l.w.device())?.to_dtype(dtype)?,
                )?;
                let bm = Var::from_tensor(&Tensor::zeros((out, rank), dtype, l.w.device())?)?;
                vars.push(a.clone());
                vars.push(bm.clone());
                l.lora = Some(crate::ops::Lora {
                    a,
                    b: bm,
                    scale: alpha / rank as f64,
                });
            }
        }
        if vars.is_empty() {
            candle_core::bail!(
                "no LoRA targets matched {targets:?} (use q, k, v, o, gate, up, down)"
            );
        }
        Ok(vars)
    }

    /// Number of parameters (tied head counted once).
    pub fn n_params(&mut self) -> usize {
        let mut n = self.embed.elem_count() + self.final_norm.elem_count();
        if !self.tied() {
            n += self.lm_head.w.elem_count();
        }
        for b in self.blocks.iter_mut() {
            n += b
                .tensors_mut()
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum::<usize>();
        }
        n
    }
}
