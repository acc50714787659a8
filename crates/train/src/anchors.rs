//! What a training run does to its anchors once training ends (docs/training.md): average the
//! members of a soup into each anchor, and write the opening bias into every anchor after step
//! 0. Both swap whole folders into place, so an interruption never leaves half an anchor and a
//! re-run never does the work twice.
use crate::calibrate::{calibrate, CalibrateConfig, Calibration, Knob};
use crate::{Error, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// The folder of the anchor at `step`.
pub fn anchor_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("ckpt-{step:06}"))
}

/// Write every anchor of `out` as the soup of the `members`' anchors at the same step. An anchor
/// already written (or already swapped out by [`bias_anchors`]) is kept; a soup is written in a
/// folder of its own and renamed into place.
pub fn soup_anchors(out: &Path, members: &[PathBuf], save_at: &[usize]) -> Result<()> {
    for &step in save_at {
        let dir = anchor_dir(out, step);
        let name = format!("ckpt-{step:06}");
        if dir.exists() || out.join(format!("{name}.unbiased")).exists() {
            continue;
        }
        let partial = out.join(format!("{name}.soup"));
        let _ = std::fs::remove_dir_all(&partial);
        let sources: Vec<PathBuf> = members.iter().map(|m| m.join(&name)).collect();
        crate::soup::write_soup(&sources, &partial).map_err(|e| {
            Error::Invalid(format!(
                "averaging the members' {name} into {}: {e}",
                dir.display()
            ))
        })?;
        std::fs::rename(&partial, &dir).map_err(|e| Error::io(&dir, e))?;
    }
    Ok(())
}

/// Record the resolved recipe in the anchor's checkpoint.json (key `recipe_file`), so a
/// comparison of anchors can name every setting in which their runs differ.
pub fn record_recipe(anchor: &Path, recipe: &serde_json::Value) -> Result<()> {
    let path = anchor.join("checkpoint.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut ck: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    if ck.get("recipe_file") == Some(recipe) {
        return Ok(());
    }
    ck["recipe_file"] = recipe.clone();
    safegeo_runtime::files::write_atomic(
        &path,
        &serde_json::to_vec_pretty(&ck).map_err(|e| Error::Invalid(e.to_string()))?,
    )?;
    Ok(())
}

/// How each anchor's opening bias is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AnchorBias {
    /// This many logits on every anchor.
    Fixed(f64),
    /// The least bias at which the anchor still refuses this share of the calibration set.
    Target(f64),
}

impl AnchorBias {
    /// What is wrong with the setting, naming the option.
    pub fn check(self) -> Result<()> {
        match self {
            AnchorBias::Fixed(b) if !(b.is_finite() && b <= 0.0) => Err(Error::Invalid(format!(
                "--opening-bias {b}: use a number of logits <= 0 (e.g. -3.25; 0 = anchors as trained)"
            ))),
            AnchorBias::Target(r) if !(r > 0.0 && r <= 1.0) => Err(Error::Invalid(format!(
                "--opening-bias-target {r}: use a share of the calibration set above 0 and at most 1 (e.g. 0.71)"
            ))),
            _ => Ok(()),
        }
    }
}

/// Write the opening bias into every anchor of `out` after step 0, calibrating with `base`'s
/// validation settings (data directory, system prompt). Each anchor is biased in a folder of its
/// own and swapped in whole, its `calibration.json` marking it done. `done(anchor, calibration)`
/// is told of each anchor biased.
pub fn bias_anchors(
    out: &Path,
    save_at: &[usize],
    bias: AnchorBias,
    base: &CalibrateConfig,
    device: &Device,
    done: &mut dyn FnMut(&Path, &Calibration),
) -> Result<()> {
    let mut cfg = CalibrateConfig {
        knob: Knob::OpeningBias,
        ..base.clone()
    };
    match bias {
        AnchorBias::Fixed(b) => {
            cfg.max_bias = -b;
            cfg.fixed_scale = Some(0.0);
        }
        AnchorBias::Target(share) => cfg.target_refusal = share,
    }
    for &step in save_at.iter().filter(|&&s| s > 0) {
        let dir = anchor_dir(out, step);
        let biased = out.join(format!("ckpt-{step:06}.biased"));
        let unbiased = out.join(format!("ckpt-{step:06}.unbiased"));
        if !dir.exists() && unbiased.exists() && biased.join("calibration.json").exists() {
            // Interrupted between the two renames below.
            std::fs::rename(&biased, &dir).map_err(|e| Error::io(&dir, e))?;
        }
        if dir.join("calibration.json").exists() {
            let _ = std::fs::remove_dir_all(&unbiased);
            continue;
        }
        let _ = std::fs::remove_dir_all(&biased);
        let mut model = safegeo_runtime::load_model(&dir, device)?;
        let work = out.join("opening-bias").join(format!("ckpt-{step:06}"));
        let c = calibrate(&mut model, None, &cfg, &work, &mut |_| {}).map_err(|e| {
            Error::Invalid(format!(
                "writing the opening bias into {}: {e}",
                dir.display()
            ))
        })?;
        safegeo_runtime::export_hf(&mut model, &biased)?;
        let path = dir.join("checkpoint.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut ck: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Invalid(e.to_string()))?;
        ck["opening_bias"] = c.bias_logits.unwrap_or(0.0).into();
        safegeo_runtime::files::write_atomic(&biased.join("checkpoint.json"), &pretty(&ck)?)?;
        safegeo_runtime::files::write_atomic(&biased.join("calibration.json"), &pretty(&c)?)?;
        std::fs::rename(&dir, &unbiased).map_err(|e| Error::io(&dir, e))?;
        std::fs::rename(&biased, &dir).map_err(|e| Error::io(&dir, e))?;
        std::fs::remove_dir_all(&unbiased).map_err(|e| Error::io(&unbiased, e))?;
        done(&dir, &c);
    }
    Ok(())
}

fn pretty(v: &impl serde::Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Invalid(e.to_string()))
}
