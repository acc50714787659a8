//! `safegeo carriers`: refusal and harmfulness carrier candidates from harmful vs harmless
//! prompts, with their measures (safegeo_geometry::estimate).
use super::prompts;
use crate::common::{self, ModelArgs};
use anyhow::{bail, Result};
use safegeo_geometry::estimate::{estimate, EstimateConfig};
use std::path::PathBuf;

/// Prompts per set (Arditi et al.: 128).
pub const PROMPTS_PER_SET: usize = 128;

#[derive(clap::Args)]
pub struct CarriersArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Harmful prompts (a *-train split: carriers are estimated, never evaluated, here).
    #[arg(long, default_value = "harmful-train")]
    pub harmful: String,
    /// Harmless prompts.
    #[arg(long, default_value = "harmless-train")]
    pub harmless: String,
    /// Prompts per set (Arditi et al.: 128).
    #[arg(long, default_value_t = PROMPTS_PER_SET)]
    pub n: usize,
    /// Sampling seed (Arditi et al.: 42).
    #[arg(long, default_value_t = EstimateConfig::default().seed)]
    pub seed: u64,
    /// Keep only harmful prompts the model refuses (refusal score > 0) and harmless ones it
    /// accepts (< 0).
    #[arg(long)]
    pub filter: bool,
    /// Bootstrap resamples of the prompts behind the effective ranks' 95% intervals (one
    /// matrix per resample).
    #[arg(long, default_value_t = EstimateConfig::default().bootstrap)]
    pub bootstrap: usize,
    /// Layers on each side of a layer in its layer-window effective rank (the refusal carriers
    /// at the last position across layers l-W..l+W).
    #[arg(long, default_value_t = EstimateConfig::default().stacks.window)]
    pub erank_window: usize,
    /// Put t_inst (the harmfulness carrier's position) in the position-stack effective rank
    /// too; by default it holds the post-instruction positions only.
    #[arg(long)]
    pub erank_t_inst: bool,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = EstimateConfig::default().batch_size)]
    pub batch_size: usize,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    /// Also write refusal.npy and harmfulness.npy.
    #[arg(long)]
    pub export_npy: bool,
    /// Held-out sets (harmful,harmless; evaluation sets are fine, e.g. jbb-harmful,jbb-benign):
    /// how well every carrier, read as a linear probe, separates them (AUC and the true-positive
    /// rate at a 0.2 false-positive rate), written to geometry.json under `heldout`.
    #[arg(long, value_delimiter = ',')]
    pub heldout: Option<Vec<String>>,
    /// Output folder: carriers.safetensors, carriers.json, geometry.json.
    #[arg(long)]
    pub out: PathBuf,
}

/// One estimate of the carriers into a folder: the prompt sets and the estimator's settings.
pub struct CarriersJob {
    /// Harmful prompt set.
    pub harmful: String,
    /// Harmless prompt set.
    pub harmless: String,
    /// Prompts per set.
    pub n: usize,
    /// Held-out harmful and harmless sets the carriers are read as probes on.
    pub heldout: Option<Vec<String>>,
    /// Where the named sets live.
    pub data_dir: Option<PathBuf>,
    /// The estimator's settings (its seed also samples the prompts).
    pub estimate: EstimateConfig,
    /// Output folder.
    pub out: PathBuf,
    /// Also write refusal.npy and harmfulness.npy.
    pub export_npy: bool,
}

impl CarriersJob {
    /// Carriers from `harmful` and `harmless` into `out`, every other setting at its default.
    pub fn new(harmful: &str, harmless: &str, out: PathBuf) -> Self {
        CarriersJob {
            harmful: harmful.into(),
            harmless: harmless.into(),
            n: PROMPTS_PER_SET,
            heldout: None,
            data_dir: None,
            estimate: EstimateConfig::default(),
            out,
            export_npy: false,
        }
    }
}

pub fn run(a: CarriersArgs) -> Result<()> {
    let job = CarriersJob {
        harmful: a.harmful,
        harmless: a.harmless,
        n: a.n,
        heldout: a.heldout,
        data_dir: a.data.data_dir,
        estimate: EstimateConfig {
            filter: a.filter,
            bootstrap: a.bootstrap,
            stacks: safegeo_geometry::measures::StackSpec {
                window: a.erank_window,
                with_t_inst: a.erank_t_inst,
            },
            batch_size: a.batch_size,
            seed: a.seed,
        },
        out: a.out,
        export_npy: a.export_npy,
    };
    check(&job)?;
    let model = common::load(&a.model)?;
    estimate_into(&model, &job)
}

/// The settings' own checks and the prompt sets' (cheap next to loading a model).
pub(crate) fn check(a: &CarriersJob) -> Result<()> {
    if a.heldout.as_ref().is_some_and(|s| s.len() != 2) {
        bail!("--heldout takes two sets: harmful,harmless (e.g. jbb-harmful,jbb-benign)");
    }
    for set in [&a.harmful, &a.harmless]
        .into_iter()
        .chain(a.heldout.iter().flatten())
    {
        prompts(set, 1, a.estimate.seed, a.data_dir.as_deref())?;
    }
    Ok(())
}

/// Estimate the carriers of `model` as `a` says and write them into `a.out`. Shared with
/// `trajectory`.
pub fn estimate_into(model: &safegeo_runtime::Model, a: &CarriersJob) -> Result<()> {
    check(a)?;
    for name in [&a.harmful, &a.harmless] {
        if let Ok(dn) = safegeo_data::DatasetName::parse(name) {
            if !dn.is_train_split() {
                eprintln!(
                    "warning: `{name}` is not a *-train split; evaluate carriers on other data"
                );
            }
        }
    }
    let dir = a.data_dir.as_deref();
    let seed = a.estimate.seed;
    let harmful = prompts(&a.harmful, a.n, seed, dir)?;
    let harmless = prompts(&a.harmless, a.n, seed, dir)?;
    let heldout = match &a.heldout {
        Some(sets) => Some((
            prompts(&sets[0], a.n, seed, dir)?,
            prompts(&sets[1], a.n, seed, dir)?,
        )),
        None => None,
    };
    safegeo_runtime::files::lock_dir(&a.out)?;
    let t0 = std::time::Instant::now();
    let mut progress = common::StagedProgress::default();
    let est = estimate(
        model,
        &common::model_hash(&model.source)?,
        &harmful,
        &harmless,
        heldout.as_ref().map(|(h, l)| (h, l)),
        &a.estimate,
        &mut |stage, done, total| progress.set(stage, done, total),
    )?;
    progress.finish();
    est.write(&a.out, a.export_npy)?;
    if let Some(h) = &est.geometry.heldout {
        for (what, b) in [("carrier", &h.best), ("logistic probe", &h.probe.best)] {
            if let Some(b) = b {
                common::note!(
                    "held-out {} vs {}: best {what} layer {} position {}: AUC {:.3}, TPR {:.2} at FPR 0.2",
                    h.harmful.name, h.harmless.name, b.layer, b.pos, b.auc, b.tpr_at_fpr_0_2
                );
            }
        }
    }
    common::note!(
        "carriers: {} layers x {} positions from {} harmful / {} harmless prompts in {:.1}s -> {}",
        est.carriers.n_layer(),
        est.carriers.n_pos(),
        est.meta.kept.harmful,
        est.meta.kept.harmless,
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
