//! Safety training (docs/protocol.md §6) on the runtime's differentiable path: data builders with
//! polite or rebuttal refusals and self-distilled utility targets, recipes, and a trainer that
//! writes a trajectory of anchor checkpoints.
#![deny(missing_docs)]

pub mod anchors;
pub mod calibrate;
pub mod data;
pub mod decision;
pub mod plan;
pub mod r2d2;
pub mod recipe_file;
pub mod recipes;
pub mod soup;
pub mod trainer;

pub use safegeo_data::{Error, Result};
