//! Running a model: the forward and backward passes, hooks that capture and edit the residual
//! stream, and batched generation with a KV cache.
pub(crate) mod generate;
pub(crate) mod hooks;
pub(crate) mod model;
