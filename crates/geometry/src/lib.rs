//! Refusal geometry (docs/protocol.md §2 and §3): difference-of-means carriers, admissible-carrier
//! selection, effective rank, harmfulness/refusal coupling and drift between anchors.
#![deny(missing_docs)]

pub mod abliterate;
pub mod buckets;
pub mod carriers;
mod error;
pub mod estimate;
pub mod linalg;
pub mod measures;
pub mod select;
pub mod selection;
pub mod separation;
pub mod store;
pub mod sweep;

pub use error::{Error, Result};
