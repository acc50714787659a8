//! Tiny random-weight models for tests that must run in seconds without a real checkpoint.
use crate::config::{Arch, ModelConfig};
use crate::engine::model::Model;
use crate::io::weights::WeightSource;
use crate::text::tokenizer::Tok;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// A tensor of uniform values in `[-scale, scale)`, seeded (f32, CPU).
pub fn random_tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.gen_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches its element count")
}

/// `f` run on a fresh rayon pool of `threads` threads (for tests that compare thread counts).
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
        .install(f)
}

/// Largest absolute element of `t`, as f64 (any float dtype).
pub fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .and_then(|a| {
            a.flatten_all()?
                .to_dtype(DType::F64)?
                .max(0)?
                .to_scalar::<f64>()
        })
        .expect("a float tensor")
}

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
    crate::io::load::build(
        cfg,
        &WeightSource::Memory(w),
        tok,
        &Device::Cpu,
        std::path::Path::new("<tiny>"),
    )
}

/// Write [`tiny_model`] as a Hugging Face folder through [`crate::export_hf`] (so the export's
/// layouts — un-permuted Llama q/k rows, Gemma norms stored as `w - 1` — are exercised), with a
/// small chat template that appends `w0` as the generation prompt.
pub fn write_tiny_hf(arch: Arch, seed: u64, dir: &std::path::Path) -> Result<()> {
    let mut m = tiny_model(arch, seed, DType::F32)?;
    m.tok.chat_template = Some(
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w0{% endif %}".into(),
    );
    crate::export_hf(&mut m, dir)
}

/// Write the Llama [`tiny_model`]'s weights as a GGUF file (f32 tensors, llama metadata, a
/// byte-level BPE tokenizer over `w`, the digits and `w0`). `edit` may change the tensors by
/// GGUF name before they are written (to make a broken file).
pub fn write_tiny_gguf(
    seed: u64,
    path: &std::path::Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>) -> Result<()>,
) -> Result<()> {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let cfg = tiny_config(Arch::Llama);
    let mut w = tiny_weights(&cfg, seed, DType::F32)?;
    edit(&mut w)?;
    let mut tokens: Vec<String> = ["<pad>", "<eos>", "w"].map(String::from).to_vec();
    tokens.extend((0..10).map(|d| d.to_string()));
    tokens.push("w0".into());
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let u32v = |x: usize| Value::U32(x as u32);
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", u32v(cfg.n_layer)),
        ("llama.embedding_length", u32v(cfg.hidden)),
        ("llama.feed_forward_length", u32v(cfg.intermediate)),
        ("llama.attention.head_count", u32v(cfg.n_head)),
        ("llama.attention.head_count_kv", u32v(cfg.n_kv_head)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_eps as f32),
        ),
        ("llama.context_length", u32v(cfg.context_length)),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&["w 0".to_string()])),
        (
            "tokenizer.ggml.token_type",
            Value::Array(tokens.iter().map(|_| Value::I32(1)).collect()),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
    ];
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let tensors = names
        .iter()
        .map(|n| Ok(((*n).clone(), QTensor::quantize(&w[*n], GgmlDType::F32)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut f = std::fs::File::create(path).map_err(|e| crate::Error::io(path, e))?;
    gguf_file::write(
        &mut f,
        &meta.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        &tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t))
            .collect::<Vec<_>>(),
    )?;
    Ok(())
}
