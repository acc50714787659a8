//! Architecture-neutral model configuration, read from GGUF metadata or `config.json`.
use crate::{Error, Result};
use serde::Serialize;

/// Supported model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    /// Llama 2/3, Mistral, SmolLM2 (RMSNorm, SwiGLU, RoPE, GQA).
    Llama,
    /// Qwen2: Llama layout with biases on the q/k/v projections.
    Qwen2,
    /// Gemma 3 text: GELU-tanh MLP, q/k norms, pre+post norms, scaled embeddings, sliding window.
    Gemma3,
}

/// Names accepted for `--model` files, for error messages.
pub const SUPPORTED_ARCHS: &str =
    "llama (Llama 2/3, SmolLM/SmolLM2), mistral, qwen2, gemma3 (GGUF `general.architecture` or config.json `model_type`)";

impl Arch {
    /// The GGUF `general.architecture` of this family.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Parse a GGUF `general.architecture` or HF `model_type`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "mistral" | "smollm" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "gemma3" | "gemma3_text" => Ok(Arch::Gemma3),
            other => Err(Error::UnknownArchitecture {
                arch: other.to_string(),
                supported: SUPPORTED_ARCHS.to_string(),
            }),
        }
    }
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    /// Model family.
    pub arch: Arch,
    /// Number of transformer blocks `L`.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (GQA when smaller than `n_head`).
    pub n_kv_head: usize,
    /// Residual width `d`.
    pub hidden: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// MLP inner width.
    pub intermediate: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base for global-attention layers.
    pub rope_theta: f64,
    /// RoPE base for sliding-window layers (Gemma 3), when different.
    pub rope_local_theta: Option<f64>,
    /// Linear RoPE scaling factor for global layers (positions divided by it).
    pub rope_scale: f64,
    /// RoPE pairs adjacent dimensions (GGUF Llama layout) instead of halves (HF layout).
    pub rope_interleaved: bool,
    /// Maximum context length.
    pub context_length: usize,
    /// Sliding window size for local layers.
    pub sliding_window: Option<usize>,
    /// Every `n`-th layer is global when a sliding window is set (Gemma 3: 6).
    pub sliding_pattern: usize,
    /// Multiply embeddings by `sqrt(hidden)` (Gemma).
    pub scale_embeddings: bool,
    /// Attention scale (`1/sqrt(head_dim)` or `1/sqrt(query_pre_attn_scalar)`).
    pub attn_scale: f64,
}

impl ModelConfig {
    /// Whether layer `l` uses sliding-window attention.
    pub fn is_local_layer(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && !(layer + 1).is_multiple_of(self.sliding_pattern.max(1))
    }

    /// Approximate forward FLOPs per token (2 x parameters touched, LM head included).
    pub fn flops_per_token(&self) -> f64 {
        let d = self.hidden as f64;
        let q = (self.n_head * self.head_dim) as f64;
        let kv = (self.n_kv_head * self.head_dim) as f64;
        let per_layer = d * q + 2.0 * d * kv + q * d + 3.0 * d * self.intermediate as f64;
        2.0 * (per_layer * self.n_layer as f64 + d * self.vocab as f64)
    }

    /// Check invariants so a malformed file fails here, not deep in a matmul.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_layer == 0
            || self.hidden == 0
            || self.n_head == 0
            || self.head_dim == 0
            || self.intermediate == 0
            || self.vocab == 0
        {
            return Err(format!(
                "a zero dimension (layers {}, width {}, heads {}, head_dim {}, intermediate {}, vocabulary {})",
                self.n_layer, self.hidden, self.n_head, self.head_dim, self.intermediate, self.vocab
            ));
        }
        if self.n_kv_head == 0 || !self.n_head.is_multiple_of(self.n_kv_head) {
            return Err(format!(
                "{} query heads are not a multiple of {} kv heads",
                self.n_head, self.n_kv_head
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("odd head_dim {}", self.head_dim));
        }
        if self.context_length == 0 {
            return Err("context length 0".into());
        }
        // NaN fails every comparison, so these refuse it too.
        if !(self.rms_eps > 0.0 && self.rms_eps.is_finite()) {
            return Err(format!(
                "RMS norm epsilon {} (must be a small positive number)",
                self.rms_eps
            ));
        }
        for (what, v) in [
            ("RoPE base", self.rope_theta),
            ("RoPE scale", self.rope_scale),
        ]
        .into_iter()
        .chain(self.rope_local_theta.map(|t| ("local RoPE base", t)))
        {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{what} {v} (must be a positive number)"));
            }
        }
        if !self.attn_scale.is_finite() {
            return Err(format!("attention scale {}", self.attn_scale));
        }
        Ok(())
    }
}
