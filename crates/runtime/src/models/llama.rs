//! Llama family: Llama 2/3, Mistral, SmolLM2 (and, with q/k/v biases, Qwen2; see `qwen2.rs`).
//! Touvron et al. 2023; pre-norm blocks `x + Attn(RMSNorm(x))`, `x + SwiGLU(RMSNorm(x))`, RoPE, GQA.
use crate::config::{Arch, ModelConfig};
use crate::engine::hooks::Site;
use crate::engine::model::{attend, AttnCtx, Block, LayerCache};
use crate::io::weights::{Meta, WeightSource};
use crate::ops::{rms_norm, swiglu, Linear, Projections};
use crate::Result;
use candle_core::{Device, Tensor};

/// Config from GGUF metadata (prefix `llama.` or `qwen2.`).
pub fn config_from_gguf(meta: &Meta, arch: Arch) -> Result<ModelConfig> {
    let hidden = meta.usize("embedding_length")?;
    let n_head = meta.usize("attention.head_count")?;
    let head_dim = meta
        .usize_opt("attention.key_length")
        .unwrap_or(hidden / n_head.max(1));
    Ok(ModelConfig {
        arch,
        n_layer: meta.usize("block_count")?,
        n_head,
        n_kv_head: meta.usize_opt("attention.head_count_kv").unwrap_or(n_head),
        hidden,
        head_dim,
        intermediate: meta.usize("feed_forward_length")?,
        vocab: 0,
        rms_eps: meta.f64("attention.layer_norm_rms_epsilon")?,
        rope_theta: meta.f64_opt("rope.freq_base").unwrap_or(10_000.0),
        rope_local_theta: None,
        rope_scale: meta.f64_opt("rope.scaling.factor").unwrap_or(1.0),
        // llama.cpp permutes Llama q/k weights into the interleaved layout; Qwen2 keeps halves.
        rope_interleaved: arch == Arch::Llama,
        context_length: meta.usize_opt("context_length").unwrap_or(4096),
        sliding_window: None,
        sliding_pattern: 1,
        scale_embeddings: false,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
    })
}

/// Config from a HF `config.json`.
pub fn config_from_hf(c: &serde_json::Value, arch: Arch) -> Result<ModelConfig> {
    let get = |k: &str| c.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let need = |k: &str| {
        get(k).ok_or_else(|| crate::Error::Invalid(format!("config.json: missing integer `{k}`")))
    };
    let hidden = need("hidden_size")?;
    let n_head = need("num_attention_heads")?;
    let head_dim = get("head_dim").unwrap_or(hidden / n_head.max(1));
    let rope_scale = c
        .get("rope_scaling")
        .filter(|r| {
            r.get("rope_type")
                .or(r.get("type"))
                .and_then(|t| t.as_str())
                == Some("linear")
        })
        .and_then(|r| r.get("factor")?.as_f64())
        .unwrap_or(1.0);
    Ok(ModelConfig {
        arch,
        n_layer: need("num_hidden_layers")?,
        n_head,
        n_kv_head: get("num_key_value_heads").unwrap_or(n_head),
        hidden,
        head_dim,
        intermediate: need("intermediate_size")?,
        vocab: need("vocab_size")?,
        rms_eps: c
            .get("rms_norm_eps")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-6),
        rope_theta: c
            .get("rope_theta")
            .and_then(|v| v.as_f64())
            .unwrap_or(10_000.0),
        rope_local_theta: None,
        rope_scale,
        rope_interleaved: false,
        context_length: get("max_position_embeddings").unwrap_or(4096),
        // Mistral v0.1's 4096-token window only matters beyond 4096 tokens.
        sliding_window: None,
        sliding_pattern: 1,
        scale_embeddings: false,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
    })
}

/// A Llama block.
pub struct LlamaBlock {
    attn_norm: Tensor,
    p: Projections,
    ffn_norm: Tensor,
    cfg: ModelConfig,
}

impl LlamaBlock {
    /// Load block `i`; `bias` reads q/k/v biases (Qwen2).
    pub fn load(
        ws: &WeightSource,
        cfg: &ModelConfig,
        i: usize,
        bias: bool,
        dev: &Device,
    ) -> Result<Self> {
        Ok(Self {
            attn_norm: ws.get_shaped(&format!("blk.{i}.attn_norm.weight"), &[cfg.hidden], dev)?,
            ffn_norm: ws.get_shaped(&format!("blk.{i}.ffn_norm.weight"), &[cfg.hidden], dev)?,
            p: super::load_projections(ws, cfg, i, bias, dev)?,
            cfg: cfg.clone(),
        })
    }
}

/// The query, key and value projections of normed rows `xn` (one pass when decoding), split
/// into heads `(b, heads, t, hd)`.
pub(crate) fn qkv_heads(
    p: &Projections,
    xn: &Tensor,
    b: usize,
    c: &ModelConfig,
    grad: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let [q, k, v] = Linear::forward_shared([&p.q, &p.k, &p.v], xn, grad)?;
    Ok((
        heads(&q, b, c.n_head, c.head_dim)?,
        heads(&k, b, c.n_kv_head, c.head_dim)?,
        heads(&v, b, c.n_kv_head, c.head_dim)?,
    ))
}

/// Split `(b, t, heads*hd)`, or flat `(b*t, heads*hd)` rows, into `(b, heads, t, hd)`.
pub(crate) fn heads(x: &Tensor, b: usize, n: usize, hd: usize) -> candle_core::Result<Tensor> {
    if crate::kernels::fused::serves(x) {
        // One graph node instead of three.
        return crate::kernels::fused::split_heads(x, n, (x.rank() == 2).then_some(b));
    }
    let t = x.elem_count() / (b * n * hd).max(1);
    x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
}

impl Block for LlamaBlock {
    fn forward(
        &self,
        x: &Tensor,
        _layer: usize,
        ctx: &AttnCtx,
        cache: Option<(&mut LayerCache, usize)>,
        site: &mut dyn FnMut(Site, Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let g = ctx.grad;
        // Projections run on flat (b*t, d) rows: one reshape per sub-block instead of two per
        // projection (each a graph node whose backward adds a zeroed buffer and a pass).
        let (b, t, d) = x.dims3()?;
        let xn = rms_norm(x, &self.attn_norm, c.rms_eps, g)?.reshape((b * t, d))?;
        let (q, k, v) = qkv_heads(&self.p, &xn, b, c, g)?;
        let y = attend(&q, &k, &v, ctx.cos, ctx.sin, ctx.mask, c, cache, g, true)?;
        let attn_out = self.p.o.forward(&y, g)?.reshape((b, t, d))?;
        let h = (x + site(Site::AttnOut, attn_out)?)?;
        let xn = rms_norm(&h, &self.ffn_norm, c.rms_eps, g)?.reshape((b * t, d))?;
        let [gate, up] = Linear::forward_shared([&self.p.gate, &self.p.up], &xn, g)?;
        let act = swiglu(&gate, &up, g)?;
        let mlp_out = self.p.down.forward(&act, g)?.reshape((b, t, d))?;
        h + site(Site::MlpOut, mlp_out)?
    }

    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        self.p.named_mut()
    }

    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut v = vec![
            ("attn_norm.weight", &mut self.attn_norm),
            ("ffn_norm.weight", &mut self.ffn_norm),
        ];
        v.extend(self.p.tensors_mut());
        v
    }
}
