//! The binary's contract: JSON shapes, resumable results and one clear error per class of bad
//! input (never a panic), in themed modules sharing `common`.
mod common;

mod attacks;
mod deception;
mod determinism;
mod error_table;
mod errors;
mod eval;
mod geometry;
mod inference;
mod resume;
mod security;
mod train;
mod trajectory;
