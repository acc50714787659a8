//! Errors of the data layer.
use std::path::PathBuf;

/// What can go wrong reading datasets and judging.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A dataset file that is not where it should be.
    #[error("dataset `{name}` not found: looked for {wanted} in {looked}\n  fix: pass --data-dir DIR (or set SAFEGEO_DATA) to a folder holding {wanted}")]
    MissingDataset {
        /// Dataset name.
        name: String,
        /// The relative file it needs.
        wanted: String,
        /// The folders tried.
        looked: String,
    },
    /// An unknown dataset name.
    #[error("unknown dataset `{0}`; known: {known}\n  fix: use one of the known names, or a .jsonl/.csv file path", known = crate::DATASET_NAMES.join(", "))]
    UnknownDataset(String),
    /// A file that does not parse.
    #[error(
        "{path}: {reason}\n  fix: check the file's format (CSV with a header, JSON list, or JSONL)"
    )]
    Parse {
        /// File.
        path: PathBuf,
        /// Detail.
        reason: String,
    },
    /// A dataset with no rows (after filtering).
    #[error("dataset `{0}` is empty (after filtering)\n  fix: check the file and the --category/--limit options")]
    Empty(String),
    /// A bad option value.
    #[error("invalid value: {0}")]
    Invalid(String),
    /// An outside service (a judge endpoint) that failed after its retries.
    #[error("{0}")]
    Endpoint(String),
    /// An output folder that holds another run's results (the message names the folder and
    /// the fix).
    #[error("{0}")]
    OtherRun(String),
    /// An I/O failure.
    #[error("{path}: {cause}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause: in the message, and not a `source`, so a chain of errors prints it once.
        cause: std::io::Error,
    },
    /// A runtime failure (local judges, refusal scores).
    #[error(transparent)]
    Runtime(#[from] safegeo_runtime::Error),
    /// A tensor failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}
