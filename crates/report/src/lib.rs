//! Trajectory tables and the self-contained HTML report: reads the result folders that the
//! other commands write and never runs a model.
#![deny(missing_docs)]

pub mod html;
pub mod trajectory;

use std::path::PathBuf;

/// What can go wrong assembling a report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A result file that should exist does not.
    #[error(
        "{0}: missing\n  fix: run `safegeo trajectory` for this anchor first (it writes the file)"
    )]
    Missing(PathBuf),
    /// A result file that does not parse.
    #[error(
        "{0}: corrupt ({1})\n  fix: delete the file and re-run `safegeo trajectory` to redo it"
    )]
    Corrupt(PathBuf, String),
    /// A figure that could not be drawn.
    #[error("figure: {0}")]
    Plot(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
