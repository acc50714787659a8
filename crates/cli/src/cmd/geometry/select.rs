//! `safegeo select`: the admissible refusal carrier of a carriers folder.
use super::carriers_model;
use crate::common;
use anyhow::Result;
use safegeo_geometry::select::SelectConfig;
use safegeo_geometry::selection::{select_into, SelectJob, SelectObserver};
use safegeo_geometry::store;
use std::path::PathBuf;

/// Validation prompts per set (Arditi et al.: 32).
pub const VALIDATION_PROMPTS: usize = 32;

/// What the selection spends: validation prompts, the screen and the finalists, and the KL
/// bound. Shared by `select` and `trajectory`.
#[derive(clap::Args, Clone, Debug)]
pub struct SelectionBudget {
    /// Harmful and harmless validation sets.
    #[arg(
        help_heading = "Selection budget",
        long,
        value_delimiter = ',',
        default_value = "harmful-val,harmless-val"
    )]
    pub val: Vec<String>,
    /// Validation prompts per set (Arditi et al.: 32).
    #[arg(help_heading = "Selection budget", long, default_value_t = VALIDATION_PROMPTS)]
    pub n_val: usize,
    /// Prompts per set in the screening stage.
    #[arg(help_heading = "Selection budget", long, default_value_t = SelectConfig::default().screen_prompts)]
    pub screen: usize,
    /// Candidates re-measured on all validation prompts.
    #[arg(help_heading = "Selection budget", long, default_value_t = SelectConfig::default().finalists)]
    pub finalists: usize,
    /// Maximum KL on harmless prompts under ablation (admissibility).
    #[arg(help_heading = "Selection budget", value_parser = crate::common::finite, long, default_value_t = SelectConfig::default().kl_max)]
    pub kl_max: f64,
}

impl Default for SelectionBudget {
    fn default() -> Self {
        common::defaults()
    }
}

#[derive(clap::Args)]
pub struct SelectArgs {
    /// A folder written by `safegeo carriers`.
    pub dir: PathBuf,
    /// Model [default: the one recorded in DIR/carriers.json].
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: common::DeviceArgs,
    #[command(flatten)]
    pub budget: SelectionBudget,
    /// Candidates must lie below this fraction of the layers (Arditi: 0.8; 1 = no cut-off).
    #[arg(value_parser = crate::common::finite, long, default_value_t = SelectConfig::default().layer_cutoff)]
    pub layer_cutoff: f64,
    /// Harmful and harmless prompts (each) of the first stage over every candidate: bypass and
    /// KL in one small forward (0 = none: every candidate is screened in full).
    #[arg(long, default_value_t = SelectConfig::default().prescreen_prompts)]
    pub prescreen: usize,
    /// A first-stage KL above this multiple of --kl-max puts a candidate behind all others when
    /// choosing who goes on (directions that lower refusal by wrecking the model).
    #[arg(value_parser = crate::common::finite, long, default_value_t = SelectConfig::default().prescreen_kl_slack)]
    pub prescreen_kl_slack: f64,
    /// Candidates that go on to the screen: the lowest first-stage bypass within the KL slack
    /// first.
    #[arg(long, default_value_t = SelectConfig::default().screen_keep)]
    pub screen_keep: usize,
    /// Also measure bypass for screened and final candidates that already failed the KL, induce
    /// or layer test (they cannot be selected, so by default their bypass is skipped: NaN).
    #[arg(long)]
    pub bypass_all: bool,
    /// Rows per forward pass: candidates whose prompts fit together are measured in one batch,
    /// each ablating or adding its own direction (more rows: bigger matmuls, more memory).
    #[arg(long, default_value_t = SelectConfig::default().batch)]
    pub batch_size: usize,
    /// Random unit directions whose ablation KL on the harmless validation prompts is the
    /// model's own floor: a candidate whose KL is within its 95th percentile passes the
    /// floor-relative rule (0 = no floor, the absolute rule alone).
    #[arg(long, default_value_t = SelectConfig::default().random_directions)]
    pub random_directions: usize,
    /// Only these position indices are candidates (comma-separated; 0 = t_inst, the last =
    /// t_post; see carriers.json) [default: all].
    #[arg(long, value_delimiter = ',')]
    pub positions: Option<Vec<usize>>,
    /// Let the t_inst carriers (the harmfulness carrier's position) be candidates too; by
    /// default only the post-instruction positions are.
    #[arg(long)]
    pub t_inst: bool,
    /// Use the orthogonalized carriers (heretic: `r - (r.g) g`, `g` the harmless mean's
    /// direction; added at that scale for the induce test).
    #[arg(long)]
    pub orth: bool,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    /// Sampling seed for the validation prompts.
    #[arg(long, default_value_t = VALIDATION_SEED)]
    pub seed: u64,
    /// Print selection.json to stdout.
    #[arg(long)]
    pub json: bool,
}

/// Seed of the validation prompts' sample.
pub const VALIDATION_SEED: u64 = 42;

impl SelectionBudget {
    /// A selection in `dir` within this budget, every other setting at its default.
    pub fn job(&self, dir: PathBuf) -> SelectJob {
        SelectJob {
            dir,
            val: self.val.clone(),
            n_val: self.n_val,
            seed: VALIDATION_SEED,
            orth: false,
            data_dir: None,
            config: SelectConfig {
                kl_max: self.kl_max,
                screen_prompts: self.screen,
                finalists: self.finalists,
                seed: VALIDATION_SEED,
                ..SelectConfig::default()
            },
        }
    }
}

pub fn run(a: SelectArgs) -> Result<()> {
    let job = SelectJob {
        dir: a.dir.clone(),
        val: a.budget.val.clone(),
        n_val: a.budget.n_val,
        seed: a.seed,
        orth: a.orth,
        data_dir: a.data.data_dir.clone(),
        config: SelectConfig {
            kl_max: a.budget.kl_max,
            layer_cutoff: a.layer_cutoff,
            prescreen_prompts: a.prescreen,
            screen_keep: a.screen_keep,
            screen_prompts: a.budget.screen,
            finalists: a.budget.finalists,
            batch: a.batch_size,
            bypass_all: a.bypass_all,
            positions: a.positions.clone(),
            prescreen_kl_slack: a.prescreen_kl_slack,
            random_directions: a.random_directions,
            t_inst: a.t_inst,
            seed: a.seed,
        },
    };
    store::load(&a.dir.join("carriers.safetensors"))?;
    job.check()?;
    let model = carriers_model(&a.dir, a.model.as_deref(), &a.device)?;
    let out = select_into_with_progress(&model, &job)?;
    if a.json {
        common::print_json(&out)?;
    } else if out["result"]["selected"].is_null() {
        println!("{}", out["result"]["reason"].as_str().unwrap_or_default());
    } else {
        let k = &out["result"]["selected"];
        println!(
            "selected carrier: layer {} position {} (bypass {:.3}, induce {:.3}, KL {:.4}); baseline harmful score {:.3}",
            k["layer"], k["pos"],
            k["bypass"].as_f64().unwrap_or(f64::NAN),
            k["induce"].as_f64().unwrap_or(f64::NAN),
            k["kl"].as_f64().unwrap_or(f64::NAN),
            out["baseline"]["harmful_refusal_score"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// [`select_into`] with a progress bar and the command's notes. Shared with `trajectory`.
pub fn select_into_with_progress(
    model: &safegeo_runtime::Model,
    job: &SelectJob,
) -> Result<serde_json::Value> {
    struct Shown(common::Progress);
    impl SelectObserver for Shown {
        fn resumed(&mut self, n: usize) {
            common::note!("select: resuming, {n} measurements already made");
        }
        fn progress(&mut self, done: usize, total: usize) {
            self.0.set(done, total);
        }
    }
    let t0 = std::time::Instant::now();
    let mut shown = Shown(common::Progress::new("candidate measurements"));
    let out = select_into(model, &common::model_hash(&model.source)?, job, &mut shown)?;
    shown.0.finish();
    common::note!(
        "select: done in {:.1}s -> {}",
        t0.elapsed().as_secs_f64(),
        job.dir.display()
    );
    Ok(out)
}
