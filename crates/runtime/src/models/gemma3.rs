//! Gemma 3 text (Gemma Team 2025): GELU-tanh gated MLP, RMSNorm on queries and keys, norms before
//! and after both attention and MLP, embeddings scaled by `sqrt(d)`, five sliding-window layers
//! (RoPE base 10k) per global layer (RoPE base 1M). Norm weights are stored as `1 + w` (GGUF).
use crate::config::{Arch, ModelConfig};
use crate::engine::hooks::Site;
use crate::engine::model::{attend, AttnCtx, Block, LayerCache};
use crate::io::weights::{Meta, WeightSource};
use crate::models::llama::qkv_heads;
use crate::ops::{rms_norm, Linear, Projections};
use crate::Result;
use candle_core::{Device, Tensor};

/// Gemma 3 puts a global layer after every five local ones.
const SLIDING_PATTERN: usize = 6;
/// RoPE base of the sliding-window layers (not stored in GGUF; llama.cpp fixes it too).
const LOCAL_ROPE_THETA: f64 = 10_000.0;

/// Config from GGUF metadata (prefix `gemma3.`).
pub fn config_from_gguf(meta: &Meta) -> Result<ModelConfig> {
    let hidden = meta.usize("embedding_length")?;
    let n_head = meta.usize("attention.head_count")?;
    let head_dim = meta.usize_opt("attention.key_length").unwrap_or(256);
    Ok(ModelConfig {
        arch: Arch::Gemma3,
        n_layer: meta.usize("block_count")?,
        n_head,
        n_kv_head: meta.usize_opt("attention.head_count_kv").unwrap_or(n_head),
        hidden,
        head_dim,
        intermediate: meta.usize("feed_forward_length")?,
        vocab: 0,
        rms_eps: meta
            .f64_opt("attention.layer_norm_rms_epsilon")
            .unwrap_or(1e-6),
        rope_theta: meta.f64_opt("rope.freq_base").unwrap_or(1_000_000.0),
        rope_local_theta: Some(LOCAL_ROPE_THETA),
        rope_scale: meta.f64_opt("rope.scaling.factor").unwrap_or(1.0),
        rope_interleaved: false,
        context_length: meta.usize_opt("context_length").unwrap_or(32768),
        sliding_window: meta.usize_opt("attention.sliding_window"),
        sliding_pattern: SLIDING_PATTERN,
        scale_embeddings: true,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
    })
}

/// Config from a HF `config.json` (`gemma3_text`, or the `text_config` of `gemma3`).
pub fn config_from_hf(c: &serde_json::Value) -> Result<ModelConfig> {
    let c = c.get("text_config").unwrap_or(c);
    let get = |k: &str| c.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let need = |k: &str| {
        get(k).ok_or_else(|| crate::Error::Invalid(format!("config.json: missing `{k}`")))
    };
    let head_dim = get("head_dim").unwrap_or(256);
    let qpas = c
        .get("query_pre_attn_scalar")
        .and_then(|v| v.as_f64())
        .unwrap_or(head_dim as f64);
    let rope_scale = c
        .get("rope_scaling")
        .and_then(|r| r.get("factor")?.as_f64())
        .unwrap_or(1.0);
    let n_head = need("num_attention_heads")?;
    Ok(ModelConfig {
        arch: Arch::Gemma3,
        n_layer: need("num_hidden_layers")?,
        n_head,
        n_kv_head: get("num_key_value_heads").unwrap_or(n_head),
        hidden: need("hidden_size")?,
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
            .unwrap_or(1_000_000.0),
        rope_local_theta: Some(
            c.get("rope_local_base_freq")
                .and_then(|v| v.as_f64())
                .unwrap_or(LOCAL_ROPE_THETA),
        ),
        rope_scale,
        rope_interleaved: false,
        context_length: get("max_position_embeddings").unwrap_or(32768),
        sliding_window: get("sliding_window"),
        sliding_pattern: get("sliding_window_pattern").unwrap_or(SLIDING_PATTERN),
        scale_embeddings: true,
        attn_scale: 1.0 / qpas.sqrt(),
    })
}

/// A Gemma 3 block.
pub struct Gemma3Block {
    attn_norm: Tensor,
    p: Projections,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    post_ffn_norm: Tensor,
    cfg: ModelConfig,
}

impl Gemma3Block {
    /// Load block `i`.
    pub fn load(ws: &WeightSource, cfg: &ModelConfig, i: usize, dev: &Device) -> Result<Self> {
        let w = |n: &str, len: usize| ws.get_shaped(&format!("blk.{i}.{n}.weight"), &[len], dev);
        Ok(Self {
            attn_norm: w("attn_norm", cfg.hidden)?,
            p: super::load_projections(ws, cfg, i, false, dev)?,
            q_norm: w("attn_q_norm", cfg.head_dim)?,
            k_norm: w("attn_k_norm", cfg.head_dim)?,
            post_attn_norm: w("post_attention_norm", cfg.hidden)?,
            ffn_norm: w("ffn_norm", cfg.hidden)?,
            post_ffn_norm: w("post_ffw_norm", cfg.hidden)?,
            cfg: cfg.clone(),
        })
    }
}

impl Block for Gemma3Block {
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        ctx: &AttnCtx,
        cache: Option<(&mut LayerCache, usize)>,
        site: &mut dyn FnMut(Site, Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let g = ctx.grad;
        let xn = rms_norm(x, &self.attn_norm, c.rms_eps, g)?;
        let b = x.dim(0)?;
        let (q, k, v) = qkv_heads(&self.p, &xn, b, c, g)?;
        let q = rms_norm(&q, &self.q_norm, c.rms_eps, g)?;
        let k = rms_norm(&k, &self.k_norm, c.rms_eps, g)?;
        let (cos, sin, mask) = if c.is_local_layer(layer) {
            (ctx.local_cos, ctx.local_sin, ctx.local_mask)
        } else {
            (ctx.cos, ctx.sin, ctx.mask)
        };
        let y = attend(&q, &k, &v, cos, sin, mask, c, cache, g, false)?;
        let attn = rms_norm(
            &self.p.o.forward(&y, g)?,
            &self.post_attn_norm,
            c.rms_eps,
            g,
        )?;
        let h = (x + site(Site::AttnOut, attn)?)?;
        let xn = rms_norm(&h, &self.ffn_norm, c.rms_eps, g)?;
        let [gate, up] = Linear::forward_shared([&self.p.gate, &self.p.up], &xn, g)?;
        let act = (gate.gelu()? * up)?;
        let mlp = rms_norm(
            &self.p.down.forward(&act, g)?,
            &self.post_ffn_norm,
            c.rms_eps,
            g,
        )?;
        h + site(Site::MlpOut, mlp)?
    }

    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        self.p.named_mut()
    }

    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut v = vec![
            ("attn_norm.weight", &mut self.attn_norm),
            ("attn_q_norm.weight", &mut self.q_norm),
            ("attn_k_norm.weight", &mut self.k_norm),
            ("post_attention_norm.weight", &mut self.post_attn_norm),
            ("ffn_norm.weight", &mut self.ffn_norm),
            ("post_ffw_norm.weight", &mut self.post_ffn_norm),
        ];
        v.extend(self.p.tensors_mut());
        v
    }
}
