//! safegeo's model runtime: load GGUF or Hugging Face checkpoints, run them with hooks that
//! capture and edit the residual stream, generate in batches with a KV cache, and differentiate.
#![deny(missing_docs)]

mod config;
mod edit;
mod engine;
mod error;
pub mod io;
pub mod kernels;
pub mod models;
mod ops;
mod optim;
pub mod testing;
pub mod text;

// The modules other crates reach by name, at the paths they have always had.
pub use io::{control_vector, fetch, files, gguf_check};
pub use kernels::{blas, block_cache, q4_1};
pub use text::{alloc_guard, template};

pub use config::{Arch, ModelConfig, SUPPORTED_ARCHS};
pub use edit::interpolate::Interpolation;
pub use edit::opening_bias::OpeningBias;
pub use engine::generate::{
    generate, generate_seeded, token_budget_batches, GenerateConfig, Generation, Stop,
};
pub use engine::hooks::{
    unit, Captured, Hooks, Intervention, NoHooks, Observer, Phase, Positions, Scope, Site, SiteInfo,
};
pub use engine::model::{
    attend, backward, AttnCtx, Block, KvCache, LayerCache, Layout, LogitsAt, Model, Tape,
};
pub use error::{Error, Result};
pub use io::export::export_hf;
pub use io::load::{load_model, load_model_with, LoadOptions};
pub use io::weights::{open_gguf, WeightSource};
pub use ops::{
    log_softmax_last, rms_norm, rope, softmax_last, target_log_probs, Linear, Lora, QuantizedWeight,
};
pub use optim::{AdamW, AdamWConfig};
pub use text::tokenizer::{render_template, Message, PromptPositions, Tok};
