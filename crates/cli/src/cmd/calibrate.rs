//! `safegeo calibrate`: set a safety-trained checkpoint's operating point on validation prompts
//! by interpolating its weights toward the base model (crates/train/src/calibrate.rs).
use crate::common;
use anyhow::{Context, Result};
use safegeo_train::calibrate::{calibrate, CalibrateConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// The checkpoint to calibrate (a folder written by `safegeo train`, or any model fine-tuned
    /// from --base).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// The model the checkpoint was trained from [default: base_model in its checkpoint.json].
    #[arg(long)]
    pub base: Option<String>,
    /// Share of the validation harmful prompts the calibrated model must still refuse. The
    /// result is the least interpolation s in [0, 1] toward the checkpoint
    /// (base + s * (checkpoint - base)) that refuses at least this share.
    #[arg(long, default_value_t = 0.85)]
    pub target_refusal: f64,
    /// Validation suites of harmful prompts (never the suites you report on).
    #[arg(long, value_delimiter = ',', default_value = "harmful-val")]
    pub val: Vec<String>,
    /// Stop the bisection when s is known to within this.
    #[arg(long, default_value_t = 1.0 / 64.0)]
    pub tolerance: f64,
    /// Reply tokens per validation prompt (the substring judge reads the opening).
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// System prompt (else the chat template's default); use the one you evaluate with.
    #[arg(long)]
    pub system: Option<String>,
    /// Replace the substring judge's list (JSON array or one per line).
    #[arg(long)]
    pub substring_list: Option<PathBuf>,
    /// Data directory [default: $SAFEGEO_DATA, else ../shared/data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Device: cpu, or cuda[:N] in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output: the calibrated model as a Hugging Face folder, with calibration.json and every
    /// probe's replies under OUT/probes (a re-run resumes from them).
    #[arg(long)]
    pub out: PathBuf,
}

/// The base model a checkpoint names in its checkpoint.json.
fn recorded_base(ckpt: &std::path::Path) -> Result<String> {
    let path = ckpt.join("checkpoint.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} has no checkpoint.json naming its base model\n  fix: pass --base MODEL (the model it was fine-tuned from)",
            ckpt.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    v["base_model"]
        .as_str()
        .map(str::to_string)
        .with_context(|| {
            format!(
                "{} names no base_model\n  fix: pass --base MODEL",
                path.display()
            )
        })
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    let cfg = CalibrateConfig {
        target_refusal: a.target_refusal,
        suites: a.val.clone(),
        tolerance: a.tolerance,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        data_dir: a.data_dir.clone(),
        system: a.system.clone(),
        substring_list: a.substring_list.clone(),
    };
    let dev = common::device(&a.device)?;
    let base_spec = match &a.base {
        Some(b) => b.clone(),
        None => recorded_base(&a.model)?,
    };
    let base_path = common::model_path(Some(&base_spec))?;
    let mut model = safegeo_runtime::load_model(&a.model, &dev)?;
    let mut base = safegeo_runtime::load_model(&base_path, &dev)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    eprintln!(
        "calibrating {} against {} on {} (target refusal {:.2})",
        a.model.display(),
        base_path.display(),
        a.val.join(","),
        a.target_refusal
    );
    let start = std::time::Instant::now();
    let result = calibrate(
        &mut model,
        &mut base,
        &cfg,
        &a.out.join("probes"),
        &mut |p| {
            eprintln!(
                "  s = {:.4}: {}/{} refused ({:.3})  [{:.0}s]",
                p.scale,
                p.refused,
                p.prompts,
                p.rate(),
                start.elapsed().as_secs_f64()
            )
        },
    )?;
    if !result.reached {
        eprintln!(
            "warning: the checkpoint itself refuses {:.3} of the validation prompts, under the target {:.2}; written unchanged",
            result.refusal_at_scale, a.target_refusal
        );
    }
    safegeo_runtime::export_hf(&mut model, &a.out)?;
    let mut record = serde_json::to_value(&result)?;
    record["checkpoint"] = a.model.display().to_string().into();
    record["base_model"] = base_path.display().to_string().into();
    safegeo_runtime::files::write_atomic(
        &a.out.join("calibration.json"),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    // Keep the chain to the base model, so trajectory and calibrate can find it again.
    if let Ok(ck) = std::fs::read_to_string(a.model.join("checkpoint.json")) {
        let mut ck: serde_json::Value = serde_json::from_str(&ck)?;
        ck["calibration_scale"] = result.scale.into();
        safegeo_runtime::files::write_atomic(
            &a.out.join("checkpoint.json"),
            serde_json::to_string_pretty(&ck)?.as_bytes(),
        )?;
    }
    println!(
        "s = {:.4} (validation refusal {:.3}, {} probes, {:.0}s) -> {}",
        result.scale,
        result.refusal_at_scale,
        result.probes.len(),
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
