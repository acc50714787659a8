//! One file per model family.
pub mod gemma3;
pub mod llama;
pub mod qwen2;
