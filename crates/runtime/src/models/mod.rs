//! One file per model family.
pub mod gemma3;
pub mod llama;
pub mod qwen2;

use crate::io::weights::WeightSource;
use crate::ops::{Linear, Projections};

/// Load block `i`'s projections by their GGUF names; `qkv_bias` reads q/k/v biases (Qwen2).
pub(crate) fn load_projections(
    ws: &WeightSource,
    i: usize,
    qkv_bias: bool,
    dev: &candle_core::Device,
) -> crate::Result<Projections> {
    let lin = |n: &str, bias: bool| -> crate::Result<Linear> {
        let b = if bias {
            ws.get_opt(&format!("blk.{i}.{n}.bias"), dev)?
        } else {
            None
        };
        Ok(Linear::new(ws.get(&format!("blk.{i}.{n}.weight"), dev)?, b))
    };
    Ok(Projections {
        q: lin("attn_q", qkv_bias)?,
        k: lin("attn_k", qkv_bias)?,
        v: lin("attn_v", qkv_bias)?,
        o: lin("attn_output", false)?,
        gate: lin("ffn_gate", false)?,
        up: lin("ffn_up", false)?,
        down: lin("ffn_down", false)?,
    })
}
