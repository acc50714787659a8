//! Errors of the geometry layer.

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad input or option.
    #[error("{0}")]
    Invalid(String),
    /// Inputs that do not belong together (carriers of another model's shape).
    #[error("{0}")]
    Mismatch(String),
    /// A data-layer failure.
    #[error(transparent)]
    Data(#[from] safegeo_data::Error),
    /// A runtime failure.
    #[error(transparent)]
    Runtime(#[from] safegeo_runtime::Error),
    /// A tensor failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
