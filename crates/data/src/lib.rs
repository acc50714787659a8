//! safegeo's data layer: benchmark datasets by name, refusal judges, and the behaviour metrics of
//! docs/protocol.md §4 with their intervals.
#![deny(missing_docs)]

mod datasets;
pub mod deception;
mod error;
pub mod eval;
pub mod jsonl;
pub mod judges;
pub mod metrics;
pub mod table;
pub mod test_cases;
pub mod utility;

pub use datasets::{
    data_dir, load_dataset, parse_named, parse_user_file, Dataset, DatasetName, Item, LoadSpec,
    DATASET_NAMES,
};
pub use error::{Error, Result};
