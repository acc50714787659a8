//! Text in and out of the model: tokenizers, chat templates, and the allocator guard that
//! bounds the memory an untrusted template may take.
pub mod alloc_guard;
pub mod template;
pub(crate) mod tokenizer;
