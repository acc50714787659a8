//! Tiny random-weight models for tests that must run in seconds without a real checkpoint.
use crate::config::{Arch, ModelConfig};
use crate::model::Model;
use crate::tokenizer::Tok;
use crate::weights::WeightSource;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Shape of the tiny models: 2 layers, d = 16, 4 query heads over 2 kv heads, vocab 48.
pub fn tiny_config(arch: Arch) -> ModelConfig {
    let head_dim = if arch == Arch::Gemma3 { 8 } else { 4 };
    ModelConfig {
        arch,
        n_layer: if arch == Arch::Gemma3 { 3 } else { 2 },
        n_head: 4,
        n_kv_head: 2,
        hidden: 16,
        head_dim,
        intermediate: 24,
        vocab: 48,
        rms_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_local_theta: (arch == Arch::Gemma3).then_some(100.0),
        rope_scale: 1.0,
        rope_interleaved: arch == Arch::Llama,
        context_length: 1024,
        sliding_window: (arch == Arch::Gemma3).then_some(4),
        sliding_pattern: if arch == Arch::Gemma3 { 2 } else { 1 },
        scale_embeddings: arch == Arch::Gemma3,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
    }
}

/// A word-level tokenizer over `w0 .. w{n-3}` plus `<pad>` (0) and `<eos>` (1).
pub fn tiny_tokenizer(vocab: usize) -> Tok {
    use tokenizers::models::wordlevel::WordLevel;
    let mut v: HashMap<String, u32> = HashMap::new();
    v.insert("<pad>".into(), 0);
    v.insert("<eos>".into(), 1);
    for i in 2..vocab {
        v.insert(format!("w{}", i - 2), i as u32);
    }
    let wl = WordLevel::builder()
        .vocab(v.into_iter().collect())
        .unk_token("<pad>".into())
        .build()
        .expect("valid vocab");
    let mut tk = tokenizers::Tokenizer::new(wl);
    tk.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
    ));
    Tok::from_tokenizer(tk, None, Some(1), None)
}

/// The random tensors of a tiny model, by GGUF name.
pub fn tiny_weights(cfg: &ModelConfig, seed: u64, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut rand_t = |shape: &[usize], scale: f64, offset: f64| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| offset + scale * rng.gen_range(-1.0..1.0))
            .collect();
        Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?)
    };
    let (d, q, kv, f) = (
        cfg.hidden,
        cfg.n_head * cfg.head_dim,
        cfg.n_kv_head * cfg.head_dim,
        cfg.intermediate,
    );
    let mut w = HashMap::new();
    w.insert(
        "token_embd.weight".to_string(),
        rand_t(&[cfg.vocab, d], 1.0, 0.0)?,
    );
    w.insert("output_norm.weight".to_string(), rand_t(&[d], 0.2, 1.0)?);
    for l in 0..cfg.n_layer {
        let p = |n: &str| format!("blk.{l}.{n}");
        let s = 0.5;
        w.insert(p("attn_norm.weight"), rand_t(&[d], 0.2, 1.0)?);
        w.insert(p("ffn_norm.weight"), rand_t(&[d], 0.2, 1.0)?);
        w.insert(p("attn_q.weight"), rand_t(&[q, d], s, 0.0)?);
        w.insert(p("attn_k.weight"), rand_t(&[kv, d], s, 0.0)?);
        w.insert(p("attn_v.weight"), rand_t(&[kv, d], s, 0.0)?);
        w.insert(p("attn_output.weight"), rand_t(&[d, q], s, 0.0)?);
        w.insert(p("ffn_gate.weight"), rand_t(&[f, d], s, 0.0)?);
        w.insert(p("ffn_up.weight"), rand_t(&[f, d], s, 0.0)?);
        w.insert(p("ffn_down.weight"), rand_t(&[d, f], s, 0.0)?);
        if cfg.arch == Arch::Qwen2 {
            w.insert(p("attn_q.bias"), rand_t(&[q], 0.3, 0.0)?);
            w.insert(p("attn_k.bias"), rand_t(&[kv], 0.3, 0.0)?);
            w.insert(p("attn_v.bias"), rand_t(&[kv], 0.3, 0.0)?);
        }
        if cfg.arch == Arch::Gemma3 {
            w.insert(p("attn_q_norm.weight"), rand_t(&[cfg.head_dim], 0.2, 1.0)?);
            w.insert(p("attn_k_norm.weight"), rand_t(&[cfg.head_dim], 0.2, 1.0)?);
            w.insert(p("post_attention_norm.weight"), rand_t(&[d], 0.2, 1.0)?);
            w.insert(p("post_ffw_norm.weight"), rand_t(&[d], 0.2, 1.0)?);
        }
    }
    Ok(w)
}

/// A tiny random model of the given family (tied LM head) in `dtype` on the CPU.
pub fn tiny_model(arch: Arch, seed: u64, dtype: DType) -> Result<Model> {
    let cfg = tiny_config(arch);
    let w = tiny_weights(&cfg, seed, dtype)?;
    let tok = tiny_tokenizer(cfg.vocab);
    crate::load::build(
        cfg,
        &WeightSource::Memory(w),
        tok,
        &Device::Cpu,
        std::path::Path::new("<tiny>"),
    )
}

/// Write a tiny random model as a Hugging Face folder (`config.json`, `model.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json`) holding the same function as [`tiny_model`]:
/// Llama q/k rows are un-permuted to the HF rotate-half layout and Gemma norms stored as `w - 1`.
pub fn write_tiny_hf(arch: Arch, seed: u64, dir: &std::path::Path) -> Result<()> {
    use crate::Error;
    let cfg = tiny_config(arch);
    let w = tiny_weights(&cfg, seed, DType::F32)?;
    let mut out = HashMap::new();
    for (name, t) in &w {
        let hf = crate::weights::hf_name(arch, name);
        let mut t = t.clone();
        let is_qk = name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight");
        if arch == Arch::Llama && is_qk {
            t = crate::export::unpermute_qk(&t, cfg.head_dim)?;
        }
        if arch == Arch::Gemma3 && name.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        out.insert(hf, t);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    candle_core::safetensors::save(&out, dir.join("model.safetensors"))?;
    let model_type = match arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Gemma3 => "gemma3_text",
    };
    let config = serde_json::json!({
        "model_type": model_type,
        "hidden_size": cfg.hidden, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.n_layer, "intermediate_size": cfg.intermediate,
        "vocab_size": cfg.vocab, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.context_length, "tie_word_embeddings": true,
        "sliding_window": cfg.sliding_window, "sliding_window_pattern": cfg.sliding_pattern,
        "rope_local_base_freq": cfg.rope_local_theta, "query_pre_attn_scalar": cfg.head_dim,
    });
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write("config.json", config.to_string())?;
    let tok = tiny_tokenizer(cfg.vocab);
    tok.inner()
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| Error::Invalid(format!("saving tokenizer: {e}")))?;
    write(
        "tokenizer_config.json",
        serde_json::json!({
            "eos_token": "<eos>",
            "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w0{% endif %}",
        })
        .to_string(),
    )?;
    Ok(())
}
