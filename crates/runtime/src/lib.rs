//! safegeo's model runtime: load GGUF or Hugging Face checkpoints, run them with hooks that
//! capture and edit the residual stream, generate in batches with a KV cache, and differentiate.
#![deny(missing_docs)]

pub mod alloc_guard;
pub mod blas;
pub mod block_cache;
mod config;
mod error;
mod export;
pub mod fetch;
mod few_rows;
pub mod files;
mod fused;
mod generate;
pub mod gguf_check;
mod hooks;
mod interpolate;
mod load;
mod model;
pub mod models;
mod opening_bias;
mod ops;
mod optim;
pub mod q4_1;
pub mod template;
pub mod testing;
mod tokenizer;
mod weights;

pub use config::{Arch, ModelConfig, SUPPORTED_ARCHS};
pub use error::{Error, Result};
pub use export::export_hf;
pub use generate::{
    generate, generate_seeded, token_budget_batches, GenerateConfig, Generation, Stop,
};
pub use hooks::{
    unit, Captured, Hooks, Intervention, NoHooks, Observer, Phase, Positions, Scope, Site, SiteInfo,
};
pub use interpolate::Interpolation;
pub use load::{load_model, load_model_with, LoadOptions};
pub use model::{
    attend, backward, AttnCtx, Block, KvCache, LayerCache, Layout, LogitsAt, Model, Tape,
};
pub use opening_bias::OpeningBias;
pub use ops::{
    log_softmax_last, rms_norm, rope, softmax_last, target_log_probs, Linear, Lora, QuantizedWeight,
};
pub use optim::{AdamW, AdamWConfig};
pub use tokenizer::{render_template, Message, PromptPositions, Tok};
pub use weights::{open_gguf, WeightSource};
