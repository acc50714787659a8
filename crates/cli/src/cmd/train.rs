//! `safegeo train`: safety-train a model and write a trajectory of anchor checkpoints.
use crate::common::{self, ModelArgs};
use anyhow::{Context, Result};
use safegeo_train::anchors::{bias_anchors, soup_anchors, AnchorBias};
use safegeo_train::data::Strategy;
use safegeo_train::plan::{self, LayerSet, Plan};
use safegeo_train::recipe_file::{self, R2d2Preset, RecipeFile};
use safegeo_train::trainer::train;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Recipe: a built-in name (sft, r2d2, worst-insertion, harmful-prefix, derta,
    /// sft-calibrated) or a .toml file (docs/training.md). Every setting comes from it; the
    /// options below override single fields.
    #[arg(long, default_value = "sft", value_name = "NAME|FILE")]
    pub recipe: String,
    /// Print the resolved recipe (with the overrides given) as TOML and exit.
    #[arg(long)]
    pub print_recipe: bool,
    /// Optimizer steps [recipe: schedule.steps].
    #[arg(help_heading = "Schedule", long)]
    pub steps: Option<usize>,
    /// Write anchor checkpoints (OUT/ckpt-NNNNNN, Hugging Face folders) at these steps;
    /// 0 = the starting model [recipe: schedule.save_at].
    #[arg(help_heading = "Schedule", long, value_delimiter = ',')]
    pub save_at: Option<Vec<usize>>,
    /// Examples per micro-batch [recipe: schedule.batch_size].
    #[arg(help_heading = "Schedule", long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per step [recipe: schedule.grad_accum].
    #[arg(help_heading = "Schedule", long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate, cosine decay after warm-up [recipe: schedule.lr].
    #[arg(value_parser = crate::common::finite, help_heading = "Schedule", long)]
    pub lr: Option<f64>,
    /// Warm-up steps [recipe: schedule.warmup].
    #[arg(help_heading = "Schedule", long)]
    pub warmup: Option<usize>,
    /// Clip the gradient norm, 0 = off [recipe: schedule.max_grad_norm].
    #[arg(value_parser = crate::common::finite, help_heading = "Schedule", long)]
    pub max_grad_norm: Option<f64>,
    /// AdamW weight decay [recipe: schedule.weight_decay].
    #[arg(value_parser = crate::common::finite, help_heading = "Schedule", long)]
    pub weight_decay: Option<f64>,
    /// Seed of the data order, adapters and augmentation [recipe: seed].
    #[arg(help_heading = "Schedule", long)]
    pub seed: Option<u64>,
    /// Full fine-tuning instead of LoRA [recipe: adapters.full].
    #[arg(help_heading = "Adapters", long)]
    pub full: bool,
    /// LoRA rank [recipe: adapters.rank].
    #[arg(help_heading = "Adapters", long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha, scale alpha / rank [recipe: adapters.alpha].
    #[arg(value_parser = crate::common::finite, help_heading = "Adapters", long)]
    pub lora_alpha: Option<f64>,
    /// LoRA target projections [recipe: adapters.targets].
    #[arg(help_heading = "Adapters", long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    /// Blocks that get LoRA adapters: `all`, `14-29`, `0,2,10-12`, or a share of the depth
    /// like `40%-` (12-29 of 30 blocks) [recipe: adapters.layers].
    #[arg(help_heading = "Adapters", long, value_parser = layer_set)]
    pub lora_layers: Option<String>,
    /// Train K runs that differ only in their seed into OUT/members/seed-S and write every
    /// anchor as their weight average [recipe: adapters.soup].
    #[arg(help_heading = "Adapters", long)]
    pub soup: Option<usize>,
    /// Refusal phrasing [recipe: data.strategy].
    #[arg(help_heading = "Data", long, value_enum)]
    pub strategy: Option<StrategyArg>,
    /// Harmful training prompts, a *-train split or a file [recipe: data.harmful].
    #[arg(help_heading = "Data", long)]
    pub harmful: Option<String>,
    /// Harmless training prompts, a *-train split or a file [recipe: data.harmless].
    #[arg(help_heading = "Data", long)]
    pub harmless: Option<String>,
    /// Harmful prompts used [recipe: data.n_harmful; all when absent].
    #[arg(help_heading = "Data", long)]
    pub n_harmful: Option<usize>,
    /// Harmless prompts with self-distilled replies [recipe: data.n_harmless].
    #[arg(help_heading = "Data", long)]
    pub n_harmless: Option<usize>,
    /// Extra harmless prompts sharing the most words with the harmful ones (topic alone is not
    /// a reason to refuse) [recipe: data.n_hard_negatives].
    #[arg(help_heading = "Data", long)]
    pub n_hard_negatives: Option<usize>,
    /// Longest self-distilled reply, in tokens [recipe: data.utility_tokens].
    #[arg(help_heading = "Data", long)]
    pub utility_tokens: Option<usize>,
    /// System prompt of every example [recipe: data.system; else the template's default].
    #[arg(help_heading = "Data", long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    /// Weight of the refusal decision loss at the first reply token, 0 = off
    /// (crates/train/src/decision.rs) [recipe: decision.weight].
    #[arg(value_parser = crate::common::finite, help_heading = "Decision loss", long)]
    pub decision_weight: Option<f64>,
    /// Harmless prompts trained on the decision only [recipe: decision.negatives].
    #[arg(help_heading = "Decision loss", long)]
    pub n_decision_negatives: Option<usize>,
    /// Decision prompts per micro-batch [recipe: decision.batch].
    #[arg(help_heading = "Decision loss", long)]
    pub decision_batch: Option<usize>,
    /// Put the harmful prompts in the decision stream too [recipe: decision.harmful].
    #[arg(help_heading = "Decision loss", long, value_name = "BOOL")]
    pub decision_harmful: Option<bool>,
    /// Share of each decision batch drawn from the harmful prompts
    /// [recipe: decision.harmful_share].
    #[arg(value_parser = crate::common::finite, help_heading = "Decision loss", long)]
    pub decision_harmful_share: Option<f64>,
    /// Refusal mass at which the decision loss parts harmful from harmless prompts
    /// [recipe: decision.boundary].
    #[arg(value_parser = crate::common::finite, help_heading = "Decision loss", long)]
    pub decision_boundary: Option<f64>,
    /// A fixed bias in logits (<= 0) on the refusal openings' first tokens in every anchor
    /// after step 0; 0 keeps the anchors as trained [recipe: operating_point.opening_bias].
    #[arg(value_parser = crate::common::finite,
        help_heading = "Operating point",
        long,
        allow_hyphen_values = true,
        conflicts_with = "opening_bias_target"
    )]
    pub opening_bias: Option<f64>,
    /// Set each anchor's opening bias to the least one at which it still refuses this share of
    /// the calibration set [recipe: operating_point.opening_bias_target].
    #[arg(value_parser = crate::common::finite, help_heading = "Operating point", long)]
    pub opening_bias_target: Option<f64>,
    /// R2D2 preset: cpu or reference (HarmBench) [recipe: r2d2.preset].
    #[arg(help_heading = "R2D2", long, value_enum)]
    pub r2d2_preset: Option<R2d2PresetArg>,
    /// Test cases in the pool [recipe: r2d2.pool_size; else the preset's].
    #[arg(help_heading = "R2D2", long)]
    pub pool_size: Option<usize>,
    /// GCG steps per case per training step [recipe: r2d2.gcg_steps; else the preset's].
    #[arg(help_heading = "R2D2", long)]
    pub gcg_steps: Option<usize>,
    /// GCG search width [recipe: r2d2.gcg_width; else the preset's].
    #[arg(help_heading = "R2D2", long)]
    pub gcg_width: Option<usize>,
    /// GCG top-k [recipe: r2d2.gcg_topk; else the preset's].
    #[arg(help_heading = "R2D2", long)]
    pub gcg_topk: Option<usize>,
    /// Output folder; re-running the same command resumes from OUT/state.
    #[arg(long, required_unless_present = "print_recipe")]
    pub out: Option<PathBuf>,
}

fn layer_set(s: &str) -> std::result::Result<String, String> {
    LayerSet::parse(s).map(|_| s.to_string())
}

/// How refusals are phrased (docs/protocol.md §6).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrategyArg {
    /// Polite refusals ("Sorry, but I can't help with that.").
    Polite,
    /// Explicit rebuttals that name the harm and the reason.
    Rebuttal,
}

/// R2D2's settings: sized for a CPU, or HarmBench's reference values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum R2d2PresetArg {
    /// Pool 4, 1 GCG step of width 64 / top-k 64 per training step, 10-token suffix.
    Cpu,
    /// HarmBench: pool 8, 5 GCG steps of width 512 / top-k 256, 20-token suffix.
    Reference,
}

impl TrainArgs {
    /// The recipe named by `--recipe` with every option given on the command line applied.
    pub fn resolved_recipe(&self) -> Result<RecipeFile> {
        let mut r = recipe_file::load(&self.recipe)?;
        fn set<T: Clone>(field: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *field = v.clone();
            }
        }
        set(&mut r.seed, &self.seed);
        let s = &mut r.schedule;
        set(&mut s.steps, &self.steps);
        set(&mut s.save_at, &self.save_at);
        set(&mut s.batch_size, &self.batch_size);
        set(&mut s.grad_accum, &self.grad_accum);
        set(&mut s.lr, &self.lr);
        set(&mut s.warmup, &self.warmup);
        set(&mut s.max_grad_norm, &self.max_grad_norm);
        set(&mut s.weight_decay, &self.weight_decay);
        let ad = &mut r.adapters;
        ad.full |= self.full;
        set(&mut ad.rank, &self.lora_rank);
        set(&mut ad.alpha, &self.lora_alpha);
        set(&mut ad.targets, &self.lora_targets);
        set(&mut ad.layers, &self.lora_layers);
        if self.soup == Some(0) {
            return Err(common::invalid!(
                "--soup 0: a soup has at least one member\n  fix: --soup 1 trains one run"
            ));
        }
        set(&mut ad.soup, &self.soup);
        let d = &mut r.data;
        if let Some(st) = self.strategy {
            d.strategy = match st {
                StrategyArg::Polite => Strategy::Polite,
                StrategyArg::Rebuttal => Strategy::Rebuttal,
            };
        }
        set(&mut d.harmful, &self.harmful);
        set(&mut d.harmless, &self.harmless);
        if self.n_harmful.is_some() {
            d.n_harmful = self.n_harmful;
        }
        set(&mut d.n_harmless, &self.n_harmless);
        set(&mut d.n_hard_negatives, &self.n_hard_negatives);
        set(&mut d.utility_tokens, &self.utility_tokens);
        if self.system.is_some() {
            d.system = self.system.clone();
        }
        let dec = &mut r.decision;
        set(&mut dec.weight, &self.decision_weight);
        set(&mut dec.negatives, &self.n_decision_negatives);
        set(&mut dec.batch, &self.decision_batch);
        set(&mut dec.harmful, &self.decision_harmful);
        set(&mut dec.harmful_share, &self.decision_harmful_share);
        set(&mut dec.boundary, &self.decision_boundary);
        let op = &mut r.operating_point;
        if let Some(b) = self.opening_bias {
            op.opening_bias = b;
            op.opening_bias_target = None;
        }
        if self.opening_bias_target.is_some() {
            op.opening_bias_target = self.opening_bias_target;
        }
        let r2d2_given = self.r2d2_preset.is_some()
            || self.pool_size.is_some()
            || self.gcg_steps.is_some()
            || self.gcg_width.is_some()
            || self.gcg_topk.is_some();
        match &mut r.r2d2 {
            Some(p) => {
                if let Some(preset) = self.r2d2_preset {
                    p.preset = match preset {
                        R2d2PresetArg::Cpu => R2d2Preset::Cpu,
                        R2d2PresetArg::Reference => R2d2Preset::Reference,
                    };
                }
                if self.pool_size.is_some() {
                    p.pool_size = self.pool_size;
                }
                if self.gcg_steps.is_some() {
                    p.gcg_steps = self.gcg_steps;
                }
                if self.gcg_width.is_some() {
                    p.gcg_width = self.gcg_width;
                }
                if self.gcg_topk.is_some() {
                    p.gcg_topk = self.gcg_topk;
                }
            }
            None if r2d2_given => {
                return Err(common::invalid!(
                    "the R2D2 options apply to an r2d2 recipe, and `{}` is `{}`\n  fix: add --recipe r2d2",
                    r.name,
                    r.kind.as_str()
                ))
            }
            None => {}
        }
        r.check()?;
        Ok(r)
    }
}

/// Everything `safegeo train` does before its first step (safegeo_train::plan): check the
/// settings, read the data, load the model, record the run's configuration in `out` (or check
/// it against the run there), and assemble the recipe.
pub fn prepare(
    model_args: &ModelArgs,
    recipe: &RecipeFile,
    data_dir: Option<PathBuf>,
    out: &Path,
) -> Result<(safegeo_runtime::Model, Plan)> {
    let cfg = recipe.plan_config(data_dir)?;
    cfg.check()?;
    let data = plan::load_data(&cfg)?;
    let model = common::load(model_args)?;
    let hash = common::model_hash(&model.source)?;
    let train = plan::train_config(&cfg, &model)?;
    let mut record = plan::run_record(&cfg, &train, &data, &model, &hash)?;
    record["recipe_file"] = serde_json::to_value(recipe)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    common::check_or_write_config(out, &record)?;
    let mut progress = common::StagedProgress::default();
    let plan = plan::build(
        &cfg,
        train,
        &data,
        &model,
        &hash,
        &mut |stage, done, total| progress.set(stage, done, total),
    )?;
    progress.finish();
    Ok((model, plan))
}

pub fn run(a: TrainArgs) -> Result<()> {
    let recipe = a.resolved_recipe()?;
    if a.print_recipe {
        print!("{}", recipe.to_toml());
        return Ok(());
    }
    let out = a
        .out
        .clone()
        .expect("clap requires --out without --print-recipe");
    let anchors = train_recipe(&a.model, &recipe, a.data.data_dir.clone(), &out)?;
    let shown: Vec<String> = anchors.iter().map(|d| d.display().to_string()).collect();
    println!("anchors: {}", shown.join(" "));
    if recipe.adapters.soup == 1 {
        println!("log: {}", out.join("train_log.jsonl").display());
    } else {
        println!(
            "logs: {}",
            out.join("members/seed-*/train_log.jsonl").display()
        );
    }
    Ok(())
}

/// Train `recipe` into `out` (resuming whatever was interrupted): its runs, their soup, the
/// opening bias. Every anchor's checkpoint.json records the resolved recipe. Returns the anchors.
pub fn train_recipe(
    model: &ModelArgs,
    recipe: &RecipeFile,
    data_dir: Option<PathBuf>,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let soup = recipe.adapters.soup;
    let save_at = if soup == 1 {
        train_run(model, recipe, data_dir.clone(), out)?
    } else {
        let members: Vec<(RecipeFile, PathBuf)> = (0..soup as u64)
            .map(|i| {
                let mut m = recipe.clone();
                m.seed = recipe.seed + i;
                let dir = out.join("members").join(format!("seed-{}", m.seed));
                (m, dir)
            })
            .collect();
        let config = serde_json::json!({
            "soup": soup,
            "members": members.iter().map(|(_, d)| d.display().to_string()).collect::<Vec<_>>(),
        });
        // Checked before training, written once the members exist: a folder whose anchors are
        // the soup of other members (or a run of its own) is never written over, and settings
        // refused by the first member's checks leave no folder behind.
        if out.join("config.json").exists() {
            common::check_or_write_config(out, &config)?;
        }
        let mut save_at = Vec::new();
        for (i, (m, dir)) in members.iter().enumerate() {
            common::note!(
                "soup member {}/{soup}: seed {} -> {}",
                i + 1,
                m.seed,
                dir.display()
            );
            save_at = train_run(model, m, data_dir.clone(), dir)?;
        }
        common::check_or_write_config(out, &config)?;
        let dirs: Vec<PathBuf> = members.iter().map(|(_, d)| d.clone()).collect();
        soup_anchors(out, &dirs, &save_at)?;
        save_at
    };
    let bias = recipe.anchor_bias();
    if bias != AnchorBias::Fixed(0.0) {
        let base = safegeo_train::calibrate::CalibrateConfig {
            data_dir: data_dir.clone(),
            system: recipe.data.system.clone(),
            suites: vec![recipe.calibration_set()],
            ..Default::default()
        };
        let dev = common::device(&model.device)?;
        bias_anchors(out, &save_at, bias, &base, &dev, &mut |dir, c| {
            common::note!(
                "{}: opening bias {} logits; {} refused {:.3}{}",
                dir.display(),
                c.bias_logits.unwrap_or(0.0),
                recipe.calibration_set(),
                c.refusal_at_scale,
                if c.reached || matches!(bias, AnchorBias::Fixed(_)) {
                    ""
                } else {
                    " (short of the opening-bias target as trained; left unbiased)"
                }
            );
        })?;
    }
    let anchors: Vec<PathBuf> = save_at
        .iter()
        .map(|&s| safegeo_train::anchors::anchor_dir(out, s))
        .collect();
    for dir in &anchors {
        safegeo_train::anchors::record_recipe(dir, &serde_json::to_value(recipe)?)?;
    }
    Ok(anchors)
}

/// Train one run into `out` (resuming it if it was interrupted); returns its anchor steps.
fn train_run(
    model_args: &ModelArgs,
    recipe: &RecipeFile,
    data_dir: Option<PathBuf>,
    out: &Path,
) -> Result<Vec<usize>> {
    let (mut model, mut plan) = prepare(model_args, recipe, data_dir, out)?;
    common::note!("{}", plan.summary);
    let mut bar = common::Progress::new("steps");
    let lines = train(
        &mut model,
        plan.recipe.as_mut(),
        &plan.train,
        out,
        &mut |s, n, l| {
            bar.message(format!("loss {:.4}, {:.0} tok/s", l.loss, l.tokens_per_s));
            bar.set(s, n);
            tracing::info!(
                "step {s}/{n} loss {:.4} lr {:.2e} grad-norm {:.3} {:.0} tok/s",
                l.loss,
                l.lr,
                l.grad_norm,
                l.tokens_per_s
            );
        },
    )
    .with_context(|| {
        format!(
            "training into {} (re-run the same command to resume)",
            out.display()
        )
    })?;
    bar.finish();
    if let Some(l) = lines.last() {
        println!(
            "step {}: loss {:.4}; {:.0} tokens/s over the last step",
            l.step, l.loss, l.tokens_per_s
        );
    }
    Ok(plan.train.save_at)
}
