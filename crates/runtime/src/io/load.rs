//! Turning a path into a [`Model`]: GGUF files and Hugging Face folders.
use crate::config::{Arch, ModelConfig};
use crate::engine::model::{Block, Model};
use crate::io::weights::{open_gguf, Meta, WeightSource};
use crate::models::{gemma3, llama, qwen2};
use crate::ops::{Linear, QuantizedWeight};
use crate::text::tokenizer::Tok;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use std::sync::Mutex;

/// How to load.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Also keep GGUF quantized weights and use them for inference (not for gradients, LoRA or
    /// edited weights): faster decoding at batch 1, logits differ slightly from f32.
    pub keep_quantized: bool,
}

/// Load a model from a `.gguf` file or a HF folder onto `dev` (weights as f32).
pub fn load_model(path: &Path, dev: &Device) -> Result<Model> {
    load_model_with(path, dev, LoadOptions::default())
}

/// A missing model is "not found"; a path that is there but cannot be followed (a link loop, a
/// dangling link, no permission) says what it is.
fn check_openable(path: &Path) -> Result<()> {
    let unreadable = |reason: String| Error::ModelUnreadable {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::read_link(path) {
            Ok(target) => Err(unreadable(format!(
                "it is a symbolic link to {}, which does not exist",
                target.display()
            ))),
            Err(_) => Err(Error::ModelNotFound {
                path: path.to_path_buf(),
            }),
        },
        Err(e) if e.raw_os_error() == Some(40) && std::fs::symlink_metadata(path).is_ok() => Err(
            unreadable("it is a symbolic link that leads back to itself (a link loop)".into()),
        ),
        Err(e) => Err(unreadable(e.to_string())),
    }
}

/// [`load_model`] with options.
pub fn load_model_with(path: &Path, dev: &Device, opts: LoadOptions) -> Result<Model> {
    check_openable(path)?;
    let t0 = std::time::Instant::now();
    let (cfg, ws, tok) = if path.is_dir() {
        open_hf(path)?
    } else {
        open_gguf_model(path)?
    };
    let mut model = build(cfg, &ws, tok, dev, path)?;
    if opts.keep_quantized {
        attach_quantized(&mut model, &ws, dev)?;
    }
    tracing::info!(
        "loaded {} ({:?}, {} layers, d={}) in {:.2}s",
        path.display(),
        model.cfg.arch,
        model.cfg.n_layer,
        model.cfg.hidden,
        t0.elapsed().as_secs_f64()
    );
    Ok(model)
}

fn open_gguf_model(path: &Path) -> Result<(ModelConfig, WeightSource, Tok)> {
    let (content, reader) = open_gguf(path)?;
    let arch_name = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or(Error::MissingKey {
            path: path.to_path_buf(),
            key: "general.architecture".into(),
        })?;
    let arch = Arch::parse(&arch_name)?;
    let meta = Meta {
        content: &content,
        path,
        prefix: arch_name.clone(),
    };
    let cfg = match arch {
        Arch::Llama => llama::config_from_gguf(&meta, Arch::Llama)?,
        Arch::Qwen2 => qwen2::config_from_gguf(&meta)?,
        Arch::Gemma3 => gemma3::config_from_gguf(&meta)?,
    };
    let tok = Tok::from_gguf(&content, path)?;
    let ws = WeightSource::Gguf {
        path: path.to_path_buf(),
        content,
        file: Mutex::new(reader),
    };
    Ok((cfg, ws, tok))
}

fn open_hf(dir: &Path) -> Result<(ModelConfig, WeightSource, Tok)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingKey {
            path: dir.to_path_buf(),
            key: "config.json".into(),
        },
        _ => Error::io(&cfg_path, e),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", cfg_path.display())))?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or(Error::MissingKey {
            path: cfg_path.clone(),
            key: "model_type".into(),
        })?;
    let arch = Arch::parse(model_type)?;
    let cfg = match arch {
        Arch::Llama => llama::config_from_hf(&json, Arch::Llama)?,
        Arch::Qwen2 => qwen2::config_from_hf(&json)?,
        Arch::Gemma3 => gemma3::config_from_hf(&json)?,
    };
    let tok = Tok::from_hf_dir(dir)?;
    let ws = WeightSource::open_safetensors(dir, arch)?;
    Ok((cfg, ws, tok))
}

/// Give every block linear (and the LM head) its quantized GGUF weight.
fn attach_quantized(model: &mut Model, ws: &WeightSource, dev: &Device) -> Result<()> {
    const NAMES: [(&str, &str); 7] = [
        ("q", "attn_q"),
        ("k", "attn_k"),
        ("v", "attn_v"),
        ("o", "attn_output"),
        ("gate", "ffn_gate"),
        ("up", "ffn_up"),
        ("down", "ffn_down"),
    ];
    for (i, b) in model.blocks.iter_mut().enumerate() {
        for (short, lin) in b.linears_mut() {
            let gguf = NAMES
                .iter()
                .find(|(s, _)| *s == short)
                .map_or(short, |(_, g)| *g);
            if let Some(q) = ws.get_quantized(&format!("blk.{i}.{gguf}.weight"), dev)? {
                lin.quantized = Some(std::sync::Arc::new(fast_kernel(q, &lin.w)?));
            }
        }
    }
    let head = if model.tied() {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    if let Some(q) = ws.get_quantized(head, dev)? {
        model.lm_head.quantized = Some(std::sync::Arc::new(fast_kernel(q, &model.lm_head.w)?));
    }
    Ok(())
}

/// candle 0.11 has SIMD dot products for Q4_0, Q8_0 and the K-quants but only scalar code for
/// Q4_1, Q5_0 and Q5_1 (measured: Q4_1 decoding 4x slower than f32). Q4_1 on the CPU runs this
/// crate's kernel on the file's own blocks; the others are requantized from their f32 values to
/// Q8_0, whose grid is far finer than theirs.
fn fast_kernel(q: candle_core::quantized::QTensor, f32_weight: &Tensor) -> Result<QuantizedWeight> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    let fits = f32_weight.dims().last().is_some_and(|k| k % 32 == 0);
    if q.dtype() == GgmlDType::Q4_1 && fits && q.device().is_cpu() {
        let (out_dim, in_dim) = f32_weight.dims2()?;
        let m = crate::kernels::q4_1::Q41Matrix::from_gguf_bytes(&q.data()?, out_dim, in_dim)?;
        return Ok(QuantizedWeight::Q4_1(m));
    }
    let slow = matches!(
        q.dtype(),
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q4_1
    );
    let q = if slow && fits {
        QTensor::quantize(f32_weight, GgmlDType::Q8_0)?
    } else {
        q
    };
    Ok(QuantizedWeight::Candle(QMatMul::from_qtensor(q)?))
}

pub(crate) fn build(
    mut cfg: ModelConfig,
    ws: &WeightSource,
    tok: Tok,
    dev: &Device,
    path: &Path,
) -> Result<Model> {
    let embed = ws.get("token_embd.weight", dev)?;
    cfg.vocab = embed.dim(0)?;
    cfg.validate().map_err(|reason| Error::BadConfig {
        path: path.to_path_buf(),
        reason,
    })?;
    crate::io::weights::check_weight(path, "token_embd.weight", &embed, &[cfg.vocab, cfg.hidden])?;
    if tok.vocab_size() > cfg.vocab {
        return Err(Error::BadConfig {
            path: path.to_path_buf(),
            reason: format!(
                "the tokenizer has {} tokens but the embedding only {} rows, so some token ids have no embedding",
                tok.vocab_size(),
                cfg.vocab
            ),
        });
    }
    let final_norm = ws.get_shaped("output_norm.weight", &[cfg.hidden], dev)?;
    let lm_head = match ws.get_opt("output.weight", dev)? {
        Some(w) => {
            crate::io::weights::check_weight(path, "output.weight", &w, &[cfg.vocab, cfg.hidden])?;
            Linear::new(w, None)
        }
        None => Linear::new(embed.clone(), None),
    };
    let mut blocks: Vec<Box<dyn Block>> = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        blocks.push(match cfg.arch {
            Arch::Llama => Box::new(llama::LlamaBlock::load(ws, &cfg, i, false, dev)?),
            Arch::Qwen2 => Box::new(qwen2::load_block(ws, &cfg, i, dev)?),
            Arch::Gemma3 => Box::new(gemma3::Gemma3Block::load(ws, &cfg, i, dev)?),
        });
    }
    Ok(Model {
        cfg,
        embed,
        blocks,
        final_norm,
        lm_head,
        tok,
        device: dev.clone(),
        source: path.to_path_buf(),
    })
}
