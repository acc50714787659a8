//! Weight edits that keep a model a plain checkpoint: interpolation toward a base model, and a
//! first-token bias carried by an untied LM head.
pub(crate) mod interpolate;
pub(crate) mod opening_bias;
