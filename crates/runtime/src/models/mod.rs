//! One file per model family.
pub mod gemma3;
pub mod llama;
pub mod qwen2;

use crate::io::weights::WeightSource;
use crate::ops::{Linear, Projections};

/// Load block `i`'s projections by their GGUF names; `qkv_bias` reads q/k/v biases (Qwen2).
pub(crate) fn load_projections(
    ws: &WeightSource,
    cfg: &crate::ModelConfig,
    i: usize,
    qkv_bias: bool,
    dev: &candle_core::Device,
) -> crate::Result<Projections> {
    // (out, in) of each projection, as the configuration implies.
    let (h, q, kv, m) = (
        cfg.hidden,
        cfg.n_head * cfg.head_dim,
        cfg.n_kv_head * cfg.head_dim,
        cfg.intermediate,
    );
    let lin = |n: &str, (out, inp): (usize, usize), bias: bool| -> crate::Result<Linear> {
        let b = if bias {
            let name = format!("blk.{i}.{n}.bias");
            ws.get_opt(&name, dev)?
                .map(|b| crate::io::weights::check_weight(ws.path(), &name, &b, &[out]).map(|()| b))
                .transpose()?
        } else {
            None
        };
        let w = ws.get_shaped(&format!("blk.{i}.{n}.weight"), &[out, inp], dev)?;
        Ok(Linear::new(w, b))
    };
    Ok(Projections {
        q: lin("attn_q", (q, h), qkv_bias)?,
        k: lin("attn_k", (kv, h), qkv_bias)?,
        v: lin("attn_v", (kv, h), qkv_bias)?,
        o: lin("attn_output", (h, q), false)?,
        gate: lin("ffn_gate", (m, h), false)?,
        up: lin("ffn_up", (m, h), false)?,
        down: lin("ffn_down", (h, m), false)?,
    })
}
