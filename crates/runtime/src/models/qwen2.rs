//! Qwen2 (Yang et al. 2024): the Llama block with biases on the q/k/v projections, RoPE over
//! halves, a large RoPE base. Shares `LlamaBlock`; this file holds what differs.
use super::llama::{self, LlamaBlock};
use crate::config::{Arch, ModelConfig};
use crate::io::weights::{Meta, WeightSource};
use crate::Result;
use candle_core::Device;

/// Config from GGUF metadata (prefix `qwen2.`).
pub fn config_from_gguf(meta: &Meta) -> Result<ModelConfig> {
    let mut cfg = llama::config_from_gguf(meta, Arch::Qwen2)?;
    cfg.rope_theta = meta.f64_opt("rope.freq_base").unwrap_or(1_000_000.0);
    Ok(cfg)
}

/// Config from a HF `config.json`.
pub fn config_from_hf(c: &serde_json::Value) -> Result<ModelConfig> {
    llama::config_from_hf(c, Arch::Qwen2)
}

/// Load block `i` with its q/k/v biases.
pub fn load_block(
    ws: &WeightSource,
    cfg: &ModelConfig,
    i: usize,
    dev: &Device,
) -> Result<LlamaBlock> {
    LlamaBlock::load(ws, cfg, i, true, dev)
}
