//! `safegeo train`: safety-train a model and write a trajectory of anchor checkpoints.
use crate::common::{self, ModelArgs};
use anyhow::{Context, Result};
use safegeo_train::anchors::{
    bias_anchors, soup_anchors, AnchorBias, DEFAULT_SFT_OPENING_BIAS_TARGET, DEFAULT_SFT_SOUP,
};
use safegeo_train::data::Strategy;
use safegeo_train::decision::DecisionRule;
use safegeo_train::plan::{self, DecisionStream, LayerSet, Plan, PlanConfig, RecipeKind};
use safegeo_train::trainer::{train, LoraConfig, TrainConfig};
use std::path::PathBuf;

#[derive(clap::Args, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Recipe (docs/training.md).
    #[arg(long, value_enum, default_value_t = RecipeName::Sft)]
    pub recipe: RecipeName,
    /// Optimizer steps.
    #[arg(help_heading = "Schedule", long, default_value_t = 150)]
    pub steps: usize,
    /// Write anchor checkpoints (OUT/ckpt-NNNNNN, Hugging Face folders) at these steps;
    /// 0 = the starting model.
    #[arg(
        help_heading = "Schedule",
        long,
        value_delimiter = ',',
        default_value = "0,50,100,150"
    )]
    pub save_at: Vec<usize>,
    /// Examples per micro-batch.
    #[arg(help_heading = "Schedule", long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per step.
    #[arg(help_heading = "Schedule", long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (cosine decay after warm-up).
    #[arg(value_parser = crate::common::finite, help_heading = "Schedule", long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Warm-up steps.
    #[arg(help_heading = "Schedule", long, default_value_t = 5)]
    pub warmup: usize,
    /// Clip the gradient norm (0 = off).
    #[arg(value_parser = crate::common::finite, help_heading = "Schedule", long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(value_parser = crate::common::finite, help_heading = "Schedule", long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Full fine-tuning instead of LoRA.
    #[arg(help_heading = "Adapters", long)]
    pub full: bool,
    /// LoRA rank (docs/training.md: rank 64 ranks harmful over benign prompts better than 16).
    #[arg(help_heading = "Adapters", long, default_value_t = 64)]
    pub lora_rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(value_parser = crate::common::finite, help_heading = "Adapters", long, default_value_t = 128.0)]
    pub lora_alpha: f64,
    /// Lower the first-token logits of the refusal openings (Sorry, Unfortunately, No, I) by
    /// this fixed bias in every anchor after step 0 (as `safegeo calibrate --knob opening-bias`);
    /// 0 keeps the anchors as trained. [default for --recipe sft: set per anchor by
    /// --opening-bias-target; 0 otherwise]
    #[arg(value_parser = crate::common::finite,
        help_heading = "Operating point",
        long,
        allow_hyphen_values = true,
        conflicts_with = "opening_bias_target"
    )]
    pub opening_bias: Option<f64>,
    /// Set each anchor's opening bias to the least one at which it still refuses this share of
    /// harmful-val, found by bisection (as `safegeo calibrate --target-refusal`); an anchor that
    /// refuses less as trained is left unbiased. [default: 0.71 for --recipe sft unless
    /// --opening-bias is given]
    #[arg(value_parser = crate::common::finite, help_heading = "Operating point", long)]
    pub opening_bias_target: Option<f64>,
    /// Train K runs that differ only in their seed (SEED, SEED+1, ...) into OUT/members/seed-S
    /// and write every anchor as their weight average; the opening bias is then set on the
    /// average. Costs K trainings. [default: 2 for --recipe sft, 1 otherwise]
    #[arg(help_heading = "Adapters", long)]
    pub soup: Option<usize>,
    /// LoRA target projections.
    #[arg(
        help_heading = "Adapters",
        long,
        value_delimiter = ',',
        default_value = "q,k,v,o,gate,up,down"
    )]
    pub lora_targets: Vec<String>,
    /// Blocks that get LoRA adapters: `all`, layers and ranges like `14-29` or `0,2,10-12`, or a
    /// share of the depth like `40%-` (on 30 blocks: 12-29). Blocks below stay as the base model
    /// has them and out of the backward pass.
    #[arg(help_heading = "Adapters", long, default_value = "40%-", value_parser = LayerSet::parse)]
    pub lora_layers: LayerSet,
    /// Refusal phrasing.
    #[arg(help_heading = "Data", long, value_enum, default_value_t = StrategyArg::Polite)]
    pub strategy: StrategyArg,
    /// Harmful training prompts (a *_train split, or a file).
    #[arg(help_heading = "Data", long, default_value = "harmful-train")]
    pub harmful: String,
    /// Harmless training prompts (a *_train split, or a file).
    #[arg(help_heading = "Data", long, default_value = "harmless-train")]
    pub harmless: String,
    /// Harmful prompts used (all when omitted).
    #[arg(help_heading = "Data", long)]
    pub n_harmful: Option<usize>,
    /// Harmless prompts used (self-distilled utility anchor).
    #[arg(help_heading = "Data", long, default_value_t = 256)]
    pub n_harmless: usize,
    /// Extra harmless prompts mined from the harmless set for vocabulary they share with the
    /// harmful prompts (hard negatives: topic alone is not a reason to refuse).
    #[arg(help_heading = "Data", long, default_value_t = 256)]
    pub n_hard_negatives: usize,
    /// Weight of the refusal decision loss at the first reply token: binary cross-entropy of
    /// the refusal-opening probability mass, toward 1 on harmful prompts and toward 0 on
    /// harmless ones (crates/train/src/decision.rs). 0 = plain cross-entropy only (the other
    /// decision options are then unused).
    #[arg(value_parser = crate::common::finite, help_heading = "Decision loss", long, default_value_t = 3.0)]
    pub decision_weight: f64,
    /// Extra harmless prompts, drawn at random from the harmless set, trained on the refusal
    /// decision only (no reply: the decision loss pushes their refusal-opening mass at the first
    /// reply token toward 0). Cheap next to a self-distilled reply, so the decision sees
    /// thousands of harmless requests instead of hundreds. 0 = no decision stream.
    #[arg(help_heading = "Decision loss", long, default_value_t = 2048)]
    pub n_decision_negatives: usize,
    /// Decision prompts per micro-batch, run in a forward of their own.
    #[arg(help_heading = "Decision loss", long, default_value_t = 32)]
    pub decision_batch: usize,
    /// Put the harmful prompts in the decision stream too (see --decision-harmful-share), so the
    /// decision trains for several epochs at the cost of a prompt pass, next to the refusal
    /// replies of the main batch (`--decision-harmful false`: harmless prompts only).
    #[arg(help_heading = "Decision loss", long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    pub decision_harmful: bool,
    /// With --decision-harmful: the share of each decision batch drawn from the harmful prompts.
    /// Below 0.5 the decision is trained to refuse less readily.
    #[arg(value_parser = crate::common::finite, help_heading = "Decision loss", long, default_value_t = 0.2)]
    pub decision_harmful_share: f64,
    /// Refusal mass at which the decision loss parts harmful from harmless prompts
    /// (crates/train/src/decision.rs). Below 0.5 the unseen borderline prompts, which land
    /// between the two sides, end under the mass at which greedy decoding refuses: the model
    /// refuses less readily without ranking prompts differently.
    #[arg(value_parser = crate::common::finite, help_heading = "Decision loss", long, default_value_t = 0.025)]
    pub decision_boundary: f64,
    /// Longest self-distilled reply, in tokens.
    #[arg(help_heading = "Data", long, default_value_t = 64)]
    pub utility_tokens: usize,
    /// R2D2 preset: cpu (pool 4, 1 GCG step of width 64 per training step, 10-token suffix) or
    /// reference (HarmBench: pool 8, 5 steps of width 512 / top-k 256, 20-token suffix).
    #[arg(help_heading = "R2D2", long, value_enum, default_value_t = R2d2Preset::Cpu)]
    pub r2d2_preset: R2d2Preset,
    /// R2D2: test cases in the pool (overrides the preset).
    #[arg(help_heading = "R2D2", long)]
    pub pool_size: Option<usize>,
    /// R2D2: GCG steps per case per training step (overrides the preset).
    #[arg(help_heading = "R2D2", long)]
    pub gcg_steps: Option<usize>,
    /// R2D2: GCG search width (overrides the preset).
    #[arg(help_heading = "R2D2", long)]
    pub gcg_width: Option<usize>,
    /// R2D2: GCG top-k (overrides the preset).
    #[arg(help_heading = "R2D2", long)]
    pub gcg_topk: Option<usize>,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    /// Seed (data order, adapters, augmentation).
    #[arg(help_heading = "Schedule", long, default_value_t = 0)]
    pub seed: u64,
    /// System prompt used for every example (else the template's default).
    #[arg(help_heading = "Data", long)]
    pub system: Option<String>,
    /// Output folder; re-running the same command resumes from OUT/state.
    #[arg(long)]
    pub out: PathBuf,
}

/// The training recipes (docs/training.md).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecipeName {
    /// Refusals and a self-distilled utility anchor, with the refusal decision loss.
    Sft,
    /// SFT plus away/toward losses on a persistent pool of GCG test cases.
    R2d2,
    /// Refusal and recovery after a harmful span inserted at the worst of 8 places.
    WorstInsertion,
    /// Refusals after harmful-reply prefixes (Qi et al.).
    HarmfulPrefix,
    /// Harmful-prefix MLE plus transition optimization (DeRTa).
    Derta,
}

impl From<RecipeName> for RecipeKind {
    fn from(r: RecipeName) -> Self {
        match r {
            RecipeName::Sft => RecipeKind::Sft,
            RecipeName::R2d2 => RecipeKind::R2d2,
            RecipeName::WorstInsertion => RecipeKind::WorstInsertion,
            RecipeName::HarmfulPrefix => RecipeKind::HarmfulPrefix,
            RecipeName::Derta => RecipeKind::Derta,
        }
    }
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
pub enum R2d2Preset {
    /// Pool 4, 1 GCG step of width 64 / top-k 64 per training step, 10-token suffix.
    Cpu,
    /// HarmBench: pool 8, 5 GCG steps of width 512 / top-k 256, 20-token suffix.
    Reference,
}

impl TrainArgs {
    fn recipe(&self) -> RecipeKind {
        self.recipe.into()
    }

    /// The run's settings for the train crate.
    fn plan_config(&self) -> Result<PlanConfig> {
        let mut r2d2 = match self.r2d2_preset {
            R2d2Preset::Cpu => safegeo_train::r2d2::R2d2Config::default(),
            R2d2Preset::Reference => safegeo_train::r2d2::R2d2Config::reference(),
        };
        r2d2.pool_size = self.pool_size.unwrap_or(r2d2.pool_size);
        r2d2.gcg_steps = self.gcg_steps.unwrap_or(r2d2.gcg_steps);
        r2d2.gcg.search_width = self.gcg_width.unwrap_or(r2d2.gcg.search_width);
        r2d2.gcg.topk = self.gcg_topk.unwrap_or(r2d2.gcg.topk);
        r2d2.gcg.seed = self.seed;
        Ok(PlanConfig {
            recipe: self.recipe(),
            strategy: match self.strategy {
                StrategyArg::Polite => Strategy::Polite,
                StrategyArg::Rebuttal => Strategy::Rebuttal,
            },
            train: TrainConfig {
                steps: self.steps,
                batch_size: self.batch_size,
                grad_accum: self.grad_accum,
                lr: self.lr,
                warmup_steps: self.warmup,
                min_lr_ratio: 0.1,
                weight_decay: self.weight_decay,
                max_grad_norm: self.max_grad_norm,
                lora: (!self.full).then(|| LoraConfig {
                    rank: self.lora_rank,
                    alpha: self.lora_alpha,
                    targets: self.lora_targets.clone(),
                    // Resolved once the model's depth is known.
                    layers: None,
                }),
                seed: self.seed,
                save_at: self.save_at.clone(),
                state_every: 5,
            },
            lora_layers: self.lora_layers.clone(),
            r2d2,
            harmful: self.harmful.clone(),
            harmless: self.harmless.clone(),
            n_harmful: self.n_harmful,
            n_harmless: self.n_harmless,
            n_hard_negatives: self.n_hard_negatives,
            decision: DecisionStream {
                weight: self.decision_weight,
                negatives: self.n_decision_negatives,
                batch: self.decision_batch,
                harmful: self.decision_harmful,
                harmful_share: self.decision_harmful_share,
                rule: DecisionRule {
                    boundary: self.decision_boundary,
                },
            },
            utility_tokens: self.utility_tokens,
            system: self.system.clone(),
            data_dir: self.data.data_dir.clone(),
            seed: self.seed,
        })
    }

    /// How the anchors' opening bias is set: as given, else the recipe's default.
    fn anchor_bias(&self) -> AnchorBias {
        match (self.opening_bias, self.opening_bias_target) {
            (_, Some(share)) => AnchorBias::Target(share),
            (Some(b), None) => AnchorBias::Fixed(b),
            (None, None) if self.recipe() == RecipeKind::Sft => {
                AnchorBias::Target(DEFAULT_SFT_OPENING_BIAS_TARGET)
            }
            (None, None) => AnchorBias::Fixed(0.0),
        }
    }
}

/// Everything `safegeo train` does before its first step (safegeo_train::plan): check the
/// options, read the data, load the model, record the run's configuration in `a.out` (or check
/// it against the run there), and assemble the recipe.
pub fn prepare(a: &TrainArgs) -> Result<(safegeo_runtime::Model, Plan)> {
    let cfg = a.plan_config()?;
    cfg.check()?;
    a.anchor_bias().check()?;
    let data = plan::load_data(&cfg)?;
    let model = common::load(&a.model)?;
    let hash = common::model_hash(&model.source)?;
    let train = plan::train_config(&cfg, &model)?;
    let record = plan::run_record(&cfg, &train, &data, &model, &hash)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    common::check_or_write_config(&a.out, &record)?;
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
    let soup = a.soup.unwrap_or(if a.recipe() == RecipeKind::Sft {
        DEFAULT_SFT_SOUP
    } else {
        1
    });
    if soup == 0 {
        return Err(common::invalid!(
            "--soup 0: a soup has at least one member\n  fix: --soup 1 trains one run"
        ));
    }
    let save_at = if soup == 1 {
        train_run(&a)?
    } else {
        let members: Vec<TrainArgs> = (0..soup as u64)
            .map(|i| {
                let mut m = a.clone();
                m.seed = a.seed + i;
                m.out = a.out.join("members").join(format!("seed-{}", m.seed));
                m
            })
            .collect();
        let config = serde_json::json!({
            "soup": soup,
            "members": members.iter().map(|m| m.out.display().to_string()).collect::<Vec<_>>(),
        });
        // Checked before training, written once the members exist: a folder whose anchors are
        // the soup of other members (or a run of its own) is never written over, and options
        // refused by the first member's checks leave no folder behind.
        if a.out.join("config.json").exists() {
            common::check_or_write_config(&a.out, &config)?;
        }
        let mut save_at = Vec::new();
        for (i, m) in members.iter().enumerate() {
            common::note!(
                "soup member {}/{soup}: seed {} -> {}",
                i + 1,
                m.seed,
                m.out.display()
            );
            save_at = train_run(m)?;
        }
        common::check_or_write_config(&a.out, &config)?;
        let dirs: Vec<PathBuf> = members.iter().map(|m| m.out.clone()).collect();
        soup_anchors(&a.out, &dirs, &save_at)?;
        save_at
    };
    let bias = a.anchor_bias();
    if bias != AnchorBias::Fixed(0.0) {
        let base = safegeo_train::calibrate::CalibrateConfig {
            data_dir: a.data.data_dir.clone(),
            system: a.system.clone(),
            ..Default::default()
        };
        let dev = common::device(&a.model.device)?;
        bias_anchors(&a.out, &save_at, bias, &base, &dev, &mut |dir, c| {
            common::note!(
                "{}: opening bias {} logits; harmful-val refused {:.3}{}",
                dir.display(),
                c.bias_logits.unwrap_or(0.0),
                c.refusal_at_scale,
                if c.reached || matches!(bias, AnchorBias::Fixed(_)) {
                    ""
                } else {
                    " (short of --opening-bias-target as trained; left unbiased)"
                }
            );
        })?;
    }
    let anchors: Vec<String> = save_at
        .iter()
        .map(|&s| {
            safegeo_train::anchors::anchor_dir(&a.out, s)
                .display()
                .to_string()
        })
        .collect();
    println!("anchors: {}", anchors.join(" "));
    if soup == 1 {
        println!("log: {}", a.out.join("train_log.jsonl").display());
    } else {
        println!(
            "logs: {}",
            a.out.join("members/seed-*/train_log.jsonl").display()
        );
    }
    Ok(())
}

/// Train one run into `a.out` (resuming it if it was interrupted); returns its anchor steps.
fn train_run(a: &TrainArgs) -> Result<Vec<usize>> {
    let (mut model, mut plan) = prepare(a)?;
    common::note!("{}", plan.summary);
    let mut bar = common::Progress::new("steps");
    let lines = train(
        &mut model,
        plan.recipe.as_mut(),
        &plan.train,
        &a.out,
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
            a.out.display()
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
