//! `safegeo calibrate`: set a safety-trained checkpoint's operating point on validation prompts
//! by interpolating its weights toward the base model (crates/train/src/calibrate.rs).
use crate::common;
use anyhow::{Context, Result};
use safegeo_train::calibrate::{calibrate, CalibrateConfig, Knob};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// The checkpoint to calibrate (a folder written by `safegeo train`, or any model fine-tuned
    /// from --base).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// What moves the operating point: `interpolate` (weights base + t (checkpoint - base)) or
    /// `opening-bias` (the refusal openings' first-token logits lowered by max-bias (1 - t),
    /// written into an untied LM head; the ranking of prompts is the checkpoint's own).
    #[arg(long, default_value = "interpolate")]
    pub knob: Knob,
    /// interpolate: the model the checkpoint was trained from [default: base_model in its
    /// checkpoint.json].
    #[arg(long)]
    pub base: Option<String>,
    /// opening-bias: the bias at t = 0, in logits.
    #[arg(value_parser = crate::common::finite, long, default_value_t = 8.0)]
    pub max_bias: f64,
    /// opening-bias: the refusal openings whose first tokens are lowered: the first words of
    /// the built-in refusal banks, and "I", which opens the base model's own refusals.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "Sorry,Unfortunately,No,I"
    )]
    pub openings: Vec<String>,
    /// opening-bias: harmless validation suites whose prompts, with the --val prompts, fit the
    /// direction that carries the bias, so it lands alike on harmful and harmless requests.
    #[arg(long, value_delimiter = ',', default_value = "harmless-val")]
    pub landing: Vec<String>,
    /// opening-bias: prompts drawn from each --landing suite.
    #[arg(long, default_value_t = 256)]
    pub landing_limit: usize,
    /// opening-bias: write this bias (logits, <= 0) instead of searching; its validation
    /// refusal is still measured. (`safegeo train --recipe sft` searches each anchor's bias, as
    /// with --target-refusal 0.71.)
    #[arg(value_parser = crate::common::finite, long, allow_hyphen_values = true, conflicts_with = "scale")]
    pub bias: Option<f64>,
    /// Share of the validation harmful prompts the calibrated model must still refuse. The
    /// result is the least knob setting t in [0, 1] (1 = the checkpoint as trained) that
    /// refuses at least this share.
    #[arg(value_parser = crate::common::finite, long, default_value_t = 0.85)]
    pub target_refusal: f64,
    /// Validation suites of harmful prompts (never the suites you report on).
    #[arg(long, value_delimiter = ',', default_value = "harmful-val")]
    pub val: Vec<String>,
    /// Write the model at this knob setting t instead of searching for one (its validation
    /// refusal is still measured and recorded).
    #[arg(value_parser = crate::common::finite, long)]
    pub scale: Option<f64>,
    /// Stop the bisection when t is known to within this.
    #[arg(value_parser = crate::common::finite, long, default_value_t = 1.0 / 64.0)]
    pub tolerance: f64,
    /// Reply tokens per validation prompt (the substring judge reads the opening).
    #[arg(value_parser = crate::common::at_least_one, long, default_value_t = 48)]
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
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    #[command(flatten)]
    pub device: crate::common::DeviceArgs,
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
    let (mut max_bias, mut fixed_scale) = (a.max_bias, a.scale);
    if let Some(b) = a.bias {
        if a.knob != Knob::OpeningBias || !(b.is_finite() && b < 0.0) {
            return Err(common::invalid!(
                "--bias {b}: a negative number of logits, with --knob opening-bias (e.g. --knob opening-bias --bias -3.25)"
            ));
        }
        (max_bias, fixed_scale) = (-b, Some(0.0));
    }
    let cfg = CalibrateConfig {
        target_refusal: a.target_refusal,
        suites: a.val.clone(),
        tolerance: a.tolerance,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        data_dir: a.data.data_dir.clone(),
        system: a.system.clone(),
        substring_list: a.substring_list.clone(),
        fixed_scale,
        knob: a.knob,
        max_bias,
        openings: a.openings.clone(),
        landing: a.landing.clone(),
        landing_limit: a.landing_limit,
    };
    let dev = common::device(&a.device)?;
    let mut model = safegeo_runtime::load_model(&a.model, &dev)?;
    let mut base = match a.knob {
        Knob::Interpolate => {
            let spec = match &a.base {
                Some(b) => b.clone(),
                None => recorded_base(&a.model)?,
            };
            let path = common::model_path(Some(&spec))?;
            Some(safegeo_runtime::load_model(&path, &dev)?)
        }
        Knob::OpeningBias => None,
    };
    safegeo_runtime::files::lock_dir(&a.out)?;
    crate::common::note!(
        "calibrating {} ({:?}) on {} (target refusal {:.2})",
        a.model.display(),
        a.knob,
        a.val.join(","),
        a.target_refusal
    );
    let start = std::time::Instant::now();
    let result = calibrate(
        &mut model,
        base.as_mut(),
        &cfg,
        &a.out.join("probes"),
        &mut |p| {
            crate::common::note!(
                "  t = {:.4}: {}/{} refused ({:.3})  [{:.0}s]",
                p.scale,
                p.refused,
                p.prompts,
                p.rate(),
                start.elapsed().as_secs_f64()
            )
        },
    )?;
    if !result.reached && fixed_scale.is_none() {
        eprintln!(
            "warning: the checkpoint itself refuses {:.3} of the validation prompts, under the target {:.2}; written unchanged",
            result.refusal_at_scale, a.target_refusal
        );
    }
    safegeo_runtime::export_hf(&mut model, &a.out)?;
    let mut record = serde_json::to_value(&result)?;
    record["checkpoint"] = a.model.display().to_string().into();
    if let Some(b) = &base {
        record["base_model"] = b.source.display().to_string().into();
    }
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
        "t = {:.4}{} (validation refusal {:.3}, {} probes, {:.0}s) -> {}",
        result.scale,
        result
            .bias_logits
            .map(|b| format!(", bias {b:.3} logits"))
            .unwrap_or_default(),
        result.refusal_at_scale,
        result.probes.len(),
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
