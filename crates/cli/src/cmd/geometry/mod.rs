//! The geometry commands, one file each: `carriers`, `select`, `drift`, `sweep`, `abliterate`,
//! `control-vector`, and what they share (their journals, validation prompts, the model a
//! carriers folder names).
use crate::common::{self, ModelArgs};
use anyhow::{Context, Result};
use safegeo_data::jsonl::Journal;
use std::path::Path;

pub mod abliterate;
pub mod carriers;
pub mod control_vector;
pub mod drift;
pub mod select;
pub mod sweep;

/// `DIR/COMMAND.journal.jsonl` for a run identified by `fingerprint` (everything its
/// measurements depend on); says so when it resumes.
pub(crate) fn open_journal<V: serde::Serialize + serde::de::DeserializeOwned>(
    dir: &Path,
    command: &str,
    fingerprint: &serde_json::Value,
    done: &str,
) -> Result<Journal<V>> {
    safegeo_runtime::files::lock_dir(dir)?;
    let journal = Journal::open(&dir.join(format!("{command}.journal.jsonl")), fingerprint)?;
    if !journal.is_empty() {
        crate::common::note!("{command}: resuming, {} {done}", journal.len());
    }
    Ok(journal)
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    safegeo_runtime::files::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())?;
    Ok(())
}

/// `n` prompts of the set `name` (a dataset name or file), sampled with `seed`.
pub(crate) fn prompts(
    name: &str,
    n: usize,
    seed: u64,
    data_dir: Option<&Path>,
) -> Result<safegeo_data::Dataset> {
    Ok(safegeo_geometry::selection::prompts(
        name, n, seed, data_dir,
    )?)
}

/// The model a carriers folder was made with (or `model` when given), loaded on `device`.
pub(crate) fn carriers_model(
    dir: &Path,
    model: Option<&str>,
    device: &common::DeviceArgs,
) -> Result<safegeo_runtime::Model> {
    let text = std::fs::read_to_string(dir.join("carriers.json")).with_context(|| {
        format!(
            "{}: no carriers.json\n  fix: run `safegeo carriers --out {}` first",
            dir.display(),
            dir.display()
        )
    })?;
    let meta: serde_json::Value = serde_json::from_str(&text)?;
    let spec = model
        .map(String::from)
        .or_else(|| meta["model"].as_str().map(String::from));
    common::load(&ModelArgs {
        model: spec,
        device: device.clone(),
        quantized: false,
    })
}

/// `--carrier LAYER:POS` in `dir`, or the carrier selected there.
pub(crate) fn chosen_carrier(
    dir: &Path,
    carrier: Option<&str>,
) -> Result<(Vec<f64>, usize, usize, String)> {
    match carrier {
        Some(lp) => crate::cmd::eval::carrier(&format!("{}:{lp}", dir.display())),
        None => crate::cmd::eval::carrier(&dir.display().to_string()),
    }
}
