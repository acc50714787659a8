//! `safegeo demo`: the README's main job. On the default model: safety-train it two ways, the
//! built-in `sft` and `r2d2` recipes as matched arms, make fixed-source attack test cases once on
//! the base model,
//! measure every anchor (behaviour + geometry) and write the report. Every stage resumes or is
//! skipped when its results exist, so a re-run is quick.
use crate::cmd::geometry::select::SelectionBudget;
use crate::cmd::trajectory::TrajectoryArgs;
use crate::common::{DeviceArgs, ModelArgs};
use anyhow::{Context, Result};
use safegeo_attacks::prefill::PrefillConfig;
use safegeo_attacks::run::AttackSpec;
use safegeo_train::recipe_file::{self, RecipeFile};
use std::path::PathBuf;

/// The model the demo trains and measures.
const DEMO_MODEL: &str = "smollm2-135m-instruct";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Output folder: runs/sft, runs/r2d2, attack/, report/ (report/index.html is the result).
    #[arg(long, default_value = "safegeo-demo")]
    pub out: PathBuf,
    /// Training steps of each arm, SFT and R2D2 (anchors at the middle and the end; each R2D2
    /// step also runs GCG on its pool). 30 is the least at which both arms refuse at least half
    /// of JBB harmful at their last anchor (docs/experiments.md).
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Harmful training prompts (harmful-train) per recipe.
    #[arg(long, default_value_t = 64)]
    pub n_harmful: usize,
    /// Harmless training prompts (harmless-train, self-distilled once and cached).
    #[arg(long, default_value_t = 64)]
    pub n_harmless: usize,
    /// Prompts per evaluation suite at every anchor.
    #[arg(long, default_value_t = 16)]
    pub limit: usize,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let data_dir = a.data.data_dir.clone();
    // Fail on missing data before any training starts.
    for name in [
        "harmful-train",
        "harmless-train",
        "harmbench-val",
        "jbb-harmful",
        "jbb-benign",
        "xstest",
        "harmful-val",
        "harmless-val",
    ] {
        safegeo_data::load_dataset(
            name,
            &safegeo_data::LoadSpec {
                data_dir: a.data.data_dir.as_deref(),
                limit: Some(1),
                ..Default::default()
            },
        )
        .with_context(|| format!("the demo needs the `{name}` dataset"))?;
    }
    safegeo_runtime::files::lock_dir(&a.out)?;
    let stage = |name: &str| {
        crate::common::note!(
            "== demo: {name} ({:.0}s so far)",
            t0.elapsed().as_secs_f64()
        );
    };
    let runs = a.out.join("runs");
    let model = ModelArgs::of(DEMO_MODEL, &DeviceArgs::default());
    // The two arms: the built-in `sft` and `r2d2` recipes, shortened alike, so they differ only
    // in R2D2's own losses.
    let arm = |name: &str| -> Result<RecipeFile> {
        let mut r = recipe_file::load(name)?;
        let mid = (a.steps / 2).max(1);
        r.schedule.steps = a.steps;
        r.schedule.save_at = vec![mid, a.steps];
        r.data.n_harmful = Some(a.n_harmful);
        r.data.n_harmless = a.n_harmless;
        r.check()?;
        Ok(r)
    };
    for name in ["sft", "r2d2"] {
        stage(name);
        crate::cmd::train::train_recipe(&model, &arm(name)?, data_dir.clone(), &runs.join(name))?;
    }
    let attack = a.out.join("attack");
    if !attack.join("test_cases.jsonl").is_file() || !attack.join("done").is_file() {
        stage(
            "fixed-source test cases (prefill attack on standard HarmBench behaviours, base model)",
        );
        let behaviours = crate::cmd::attack::CommonArgs {
            model: model.clone(),
            behaviors: "harmbench-val".into(),
            data: a.data.clone(),
            limit: Some(a.limit),
            // Standard behaviours: the contextual ones carry ~1,000-token contexts that would
            // dominate the demo's evaluation time.
            category: Some("standard".into()),
            seed: 0,
            system: None,
            out: attack.clone(),
            steer: Default::default(),
            json: false,
        };
        let spec = AttackSpec::Prefill(PrefillConfig::default());
        crate::cmd::attack::attack(&behaviours, &spec, crate::cmd::attack::PREFILL_BATCH)?;
        std::fs::write(attack.join("done"), b"")?;
    }
    stage("trajectory: behaviour and geometry at every anchor");
    let mut anchors: Vec<PathBuf> = Vec::new();
    for recipe in ["sft", "r2d2"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(runs.join(recipe))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy().starts_with("ckpt-")
                        && !n.to_string_lossy().ends_with(".tmp")
                })
            })
            .collect();
        found.sort();
        anchors.extend(found);
    }
    // CPU budget: short replies, 32+32 carrier prompts, t_post candidates screened on 2 prompts
    // per set, 2 finalists on 8.
    crate::cmd::trajectory::run(TrajectoryArgs {
        base: Some(DEMO_MODEL.into()),
        test_cases: Some(attack.join("test_cases.jsonl")),
        limit: a.limit,
        max_new_tokens: 48,
        n_carrier: 32,
        budget: SelectionBudget {
            n_val: 8,
            screen: 2,
            finalists: 2,
            ..SelectionBudget::default()
        },
        data: a.data.clone(),
        ..TrajectoryArgs::new(anchors, a.out.join("report"))
    })?;
    crate::common::note!(
        "== demo: done in {:.0}s; open {}",
        t0.elapsed().as_secs_f64(),
        a.out.join("report/index.html").display()
    );
    Ok(())
}
