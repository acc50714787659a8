//! Export a loaded (possibly edited) model as a Hugging Face folder: `config.json`,
//! `model.safetensors` (f32, HF tensor names and layouts), `tokenizer.json`,
//! `tokenizer_config.json` with the chat template. safegeo and transformers load it.
use crate::config::Arch;
use crate::engine::model::Model;
use crate::io::weights::hf_name;
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Undo llama.cpp's q/k row permutation (GGUF interleaved RoPE -> HF rotate-half layout).
pub(crate) fn unpermute_qk(t: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let n = rows / head_dim;
    Ok(t.reshape((n, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The model's tensors under HF names, in HF layouts.
fn hf_tensors(model: &mut Model) -> Result<HashMap<String, Tensor>> {
    let arch = model.cfg.arch;
    let (hd, interleaved) = (model.cfg.head_dim, model.cfg.rope_interleaved);
    let mut named: Vec<(String, Tensor)> = vec![
        ("token_embd.weight".into(), model.embed.clone()),
        ("output_norm.weight".into(), model.final_norm.clone()),
    ];
    if !model.tied() {
        named.push(("output.weight".into(), model.lm_head.w.clone()));
    }
    for (i, b) in model.blocks.iter_mut().enumerate() {
        // LoRA adapters are merged into their weights, so the folder is a plain model.
        let mut merged = HashMap::new();
        for (name, l) in b.linears_mut() {
            if l.lora.is_some() {
                merged.insert(crate::ops::gguf_names(name).0, l.merged_weight()?);
            }
        }
        for (name, t) in b.tensors_mut() {
            let t = merged.remove(name).unwrap_or_else(|| t.clone());
            named.push((format!("blk.{i}.{name}"), t));
        }
    }
    let mut out = HashMap::new();
    for (name, t) in named {
        let mut t = t.detach().to_dtype(candle_core::DType::F32)?;
        let qk = name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight");
        if interleaved && qk {
            t = unpermute_qk(&t, hd)?;
        }
        if arch == Arch::Gemma3 && name.ends_with("norm.weight") {
            t = (t - 1.0)?; // HF Gemma computes x * (1 + w)
        }
        out.insert(hf_name(arch, &name), t.contiguous()?);
    }
    Ok(out)
}

fn config_json(model: &Model) -> serde_json::Value {
    let c = &model.cfg;
    let mut j = serde_json::json!({
        "hidden_size": c.hidden, "intermediate_size": c.intermediate,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
        "num_hidden_layers": c.n_layer, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": c.context_length, "vocab_size": c.vocab,
        "tie_word_embeddings": model.tied(), "torch_dtype": "float32",
        "bos_token_id": model.tok.bos_id, "eos_token_id": model.tok.eos_id,
    });
    if c.rope_scale != 1.0 {
        j["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": c.rope_scale});
    }
    let (model_type, arch) = match c.arch {
        Arch::Llama => ("llama", "LlamaForCausalLM"),
        Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Arch::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
    };
    j["model_type"] = model_type.into();
    j["architectures"] = serde_json::json!([arch]);
    if c.arch == Arch::Gemma3 {
        j["query_pre_attn_scalar"] = (1.0 / (c.attn_scale * c.attn_scale)).round().into();
        j["sliding_window"] = serde_json::json!(c.sliding_window);
        j["sliding_window_pattern"] = c.sliding_pattern.into();
        j["rope_local_base_freq"] = serde_json::json!(c.rope_local_theta);
        j["hidden_activation"] = "gelu_pytorch_tanh".into();
    }
    if c.arch == Arch::Qwen2 {
        j["use_sliding_window"] = false.into();
    }
    j
}

/// Write `model` as a Hugging Face folder at `dir` (created; existing files are overwritten).
pub fn export_hf(model: &mut Model, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = hf_tensors(model)?;
    crate::io::files::save_tensors_atomic(&tensors, &dir.join("model.safetensors"))?;
    let write = |name: &str, v: &serde_json::Value| {
        crate::io::files::write_atomic(
            &dir.join(name),
            serde_json::to_string_pretty(v)
                .unwrap_or_default()
                .as_bytes(),
        )
    };
    write("config.json", &config_json(model))?;
    model
        .tok
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| Error::Invalid(format!("saving tokenizer.json: {e}")))?;
    let text = |id: Option<u32>| id.and_then(|i| model.tok.id_to_token(i));
    write(
        "tokenizer_config.json",
        &serde_json::json!({
            "bos_token": text(model.tok.bos_id), "eos_token": text(model.tok.eos_id),
            "pad_token": model.tok.id_to_token(model.tok.pad_id),
            "add_bos_token": model.tok.add_bos, "chat_template": model.tok.chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    )
}
