//! Getting models in and out: checkpoint loading (GGUF, Hugging Face folders), the GGUF header
//! check that runs before candle reads a file, weight export, the model cache, and crash-safe
//! result files.
pub mod control_vector;
pub(crate) mod export;
pub mod fetch;
pub mod files;
pub mod gguf_check;
pub(crate) mod load;
pub(crate) mod weights;
