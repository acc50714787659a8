//! Everything a training run does before its first step (docs/training.md): check the settings,
//! read the prompt sets, record the run's configuration, build (or read from the cache) the
//! base model's own replies, and assemble the recipe.
//!
//! [`PlanConfig`] names every setting; [`load_data`] reads the prompts before the model loads (so
//! a bad dataset is refused at once); [`run_record`] is the run's `config.json`; [`build`] turns
//! the data and the loaded model into a [`Plan`] the trainer runs.
use crate::data::{self, Example, Strategy};
use crate::decision::DecisionRule;
use crate::r2d2::{R2d2, R2d2Config};
use crate::recipes::ExampleRecipe;
use crate::trainer::{Recipe, TrainConfig};
use crate::{Error, Result};
use safegeo_runtime::Model;
use std::path::PathBuf;

/// Which losses and data builders a recipe runs (docs/training.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecipeKind {
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

impl RecipeKind {
    /// The name on the command line and in `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::R2d2 => "r2d2",
            Self::WorstInsertion => "worst-insertion",
            Self::HarmfulPrefix => "harmful-prefix",
            Self::Derta => "derta",
        }
    }

    /// The name the trainer logs (R2D2 trains the SFT examples too).
    fn log_name(self) -> &'static str {
        match self {
            Self::R2d2 => "sft+r2d2",
            other => other.as_str(),
        }
    }
}

/// Blocks that get LoRA adapters.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerSet {
    /// Every block.
    All,
    /// These blocks.
    Layers(Vec<usize>),
    /// The blocks in a share of the depth, in percent: block `i` of `n` when
    /// `from <= 100 i / n < to` (`40%-` on 30 blocks: 12-29).
    Depth {
        /// Lower edge, in percent of the depth.
        from: f64,
        /// Upper edge (exclusive), in percent of the depth.
        to: f64,
    },
}

impl LayerSet {
    /// The blocks of a model with `n_layer` of them (`None`: all).
    pub fn resolve(&self, n_layer: usize) -> Option<Vec<usize>> {
        match self {
            LayerSet::All => None,
            LayerSet::Layers(l) => Some(l.clone()),
            LayerSet::Depth { from, to } => Some(
                (0..n_layer)
                    .filter(|&i| {
                        let at = 100.0 * i as f64 / n_layer as f64;
                        *from <= at && at < *to
                    })
                    .collect(),
            ),
        }
    }

    /// `all`; comma-separated layers and inclusive ranges (`14-29`, `0,2,10-12`); or a share of
    /// the depth in percent (`40%-`, `40%-80%`).
    pub fn parse(spec: &str) -> std::result::Result<LayerSet, String> {
        if spec.trim() == "all" {
            return Ok(LayerSet::All);
        }
        if spec.contains('%') {
            let percent = |t: &str| {
                t.trim()
                    .trim_end_matches('%')
                    .parse::<f64>()
                    .ok()
                    .filter(|v| (0.0..=100.0).contains(v))
                    .ok_or_else(|| {
                        format!("`{t}` is not a share of the depth (use e.g. 40%-, or 40%-80%)")
                    })
            };
            let (a, b) = spec.split_once('-').ok_or_else(|| {
                format!("`{spec}`: a share of the depth is a range, e.g. 40%- or 40%-80%")
            })?;
            let from = percent(a)?;
            let to = if b.trim().is_empty() {
                100.0 + 1e-9
            } else {
                percent(b)?
            };
            if from >= to {
                return Err(format!(
                    "`{spec}` holds no layer (the range is empty or backwards)"
                ));
            }
            return Ok(LayerSet::Depth { from, to });
        }
        let number = |t: &str| {
            t.trim().parse::<usize>().map_err(|_| {
                format!("`{t}` is not a layer number (use e.g. 14-29, or 0,2,10-12, or all)")
            })
        };
        let mut layers = Vec::new();
        for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    if a > b {
                        return Err(format!("range `{part}` runs backwards (write {b}-{a})"));
                    }
                    layers.extend(a..=b);
                }
                None => layers.push(number(part)?),
            }
        }
        if layers.is_empty() {
            return Err("no layer given (use e.g. 14-29, or all)".into());
        }
        layers.sort_unstable();
        layers.dedup();
        Ok(LayerSet::Layers(layers))
    }
}

/// The refusal decision loss and its stream of decision-only prompts (`decision.rs`).
#[derive(Debug, Clone)]
pub struct DecisionStream {
    /// Weight of the decision loss; 0 = plain cross-entropy (the stream is then unused).
    pub weight: f64,
    /// Harmless prompts trained on the decision only.
    pub negatives: usize,
    /// Decision prompts per micro-batch.
    pub batch: usize,
    /// Put the harmful prompts in the stream too.
    pub harmful: bool,
    /// The share of each decision batch drawn from the harmful prompts.
    pub harmful_share: f64,
    /// Where the loss's two sides part.
    pub rule: DecisionRule,
}

/// Every setting of one training run but the model and the output folder.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// The recipe.
    pub recipe: RecipeKind,
    /// Refusal phrasing.
    pub strategy: Strategy,
    /// The trainer's settings (LoRA layers resolved from `lora_layers` once the model is known).
    pub train: TrainConfig,
    /// Blocks that get LoRA adapters.
    pub lora_layers: LayerSet,
    /// R2D2's settings (used by `RecipeKind::R2d2` only).
    pub r2d2: R2d2Config,
    /// Harmful training prompts (a `*_train` split, or a file).
    pub harmful: String,
    /// Harmless training prompts (a `*_train` split, or a file).
    pub harmless: String,
    /// Harmful prompts used (all when `None`).
    pub n_harmful: Option<usize>,
    /// Harmless prompts with self-distilled replies.
    pub n_harmless: usize,
    /// Harmless prompts added for the vocabulary they share with the harmful ones.
    pub n_hard_negatives: usize,
    /// The refusal decision loss.
    pub decision: DecisionStream,
    /// Longest self-distilled reply, in tokens.
    pub utility_tokens: usize,
    /// System prompt of every example.
    pub system: Option<String>,
    /// Data directory (else `$SAFEGEO_DATA`, else `../shared/data`).
    pub data_dir: Option<PathBuf>,
    /// Seed of the data order, sampling and augmentation.
    pub seed: u64,
}

impl PlanConfig {
    /// Decision-only negatives actually drawn: none without a decision loss.
    fn decision_negatives(&self) -> usize {
        if self.decision.weight > 0.0 {
            self.decision.negatives
        } else {
            0
        }
    }

    /// Whether the harmful prompts join the decision stream (only beside its harmless ones).
    fn decision_harmful(&self) -> bool {
        self.decision.harmful && self.decision_negatives() > 0
    }

    /// Refuses settings that cannot run, before anything is read or loaded.
    pub fn check(&self) -> Result<()> {
        self.train.check()?;
        if self.recipe == RecipeKind::R2d2 && self.train.grad_accum != 1 {
            return Err(Error::Invalid(
                "r2d2 runs one micro-batch per step: use --grad-accum 1".into(),
            ));
        }
        self.decision
            .rule
            .check()
            .map_err(|e| Error::Invalid(format!("--decision-{e}")))?;
        let share = self.decision.harmful_share;
        if self.decision_harmful() && !(share > 0.0 && share < 1.0) {
            return Err(Error::Invalid(format!(
                "--decision-harmful-share {share}: use a share strictly between 0 and 1 (e.g. 0.2)"
            )));
        }
        Ok(())
    }

    fn load_split(&self, name: &str, limit: Option<usize>) -> Result<Vec<String>> {
        if let Ok(n) = safegeo_data::DatasetName::parse(name) {
            if !n.is_train_split() {
                return Err(Error::Invalid(format!(
                    "`{name}` is an evaluation set; training uses *_train splits only \
                     (harmful-train, harmless-train) or your own files"
                )));
            }
        }
        let d = safegeo_data::load_dataset(
            name,
            &safegeo_data::LoadSpec {
                data_dir: self.data_dir.as_deref(),
                limit,
                seed: self.seed,
                ..Default::default()
            },
        )?;
        Ok(d.items.into_iter().map(|i| i.prompt).collect())
    }
}

/// The prompts of a run.
#[derive(Debug, Clone)]
pub struct PlanData {
    /// Harmful prompts (refusal targets).
    pub harmful: Vec<String>,
    /// Harmless prompts with self-distilled replies, hard negatives included.
    pub harmless: Vec<String>,
    /// Harmless prompts trained on the decision only.
    pub decision_negatives: Vec<String>,
}

/// Read the prompt sets of `cfg`.
pub fn load_data(cfg: &PlanConfig) -> Result<PlanData> {
    let harmful = cfg.load_split(&cfg.harmful, cfg.n_harmful)?;
    let mut harmless = cfg.load_split(&cfg.harmless, Some(cfg.n_harmless))?;
    let n_decision = cfg.decision_negatives();
    // The whole harmless split, read once for whichever extra prompts are drawn from it.
    let pool = if cfg.n_hard_negatives + n_decision > 0 {
        cfg.load_split(&cfg.harmless, None)?
    } else {
        Vec::new()
    };
    if cfg.n_hard_negatives > 0 {
        let mined = data::hard_negatives(&harmful, &pool, &harmless, cfg.n_hard_negatives);
        harmless.extend(mined);
    }
    let decision_negatives = data::sample_excluding(&pool, &harmless, n_decision, cfg.seed);
    Ok(PlanData {
        harmful,
        harmless,
        decision_negatives,
    })
}

/// The trainer's settings for `model` (LoRA layers resolved to its depth).
pub fn train_config(cfg: &PlanConfig, model: &Model) -> Result<TrainConfig> {
    let mut train = cfg.train.clone();
    if let Some(l) = train.lora.as_mut() {
        l.layers = cfg.lora_layers.resolve(model.cfg.n_layer);
        train.check()?;
    }
    Ok(train)
}

/// The run's `config.json`: everything its result depends on, so a run never resumes under
/// other settings. `train` is [`train_config`] for this model.
pub fn run_record(
    cfg: &PlanConfig,
    train: &TrainConfig,
    data: &PlanData,
    model: &Model,
    model_sha256: &str,
) -> Result<serde_json::Value> {
    let mut record = serde_json::json!({
        "safegeo_version": env!("CARGO_PKG_VERSION"),
        "model": model.source, "model_sha256": model_sha256, "recipe": cfg.recipe,
        "strategy": cfg.strategy, "train": train, "harmful": cfg.harmful,
        "n_harmful": data.harmful.len(), "harmless": cfg.harmless,
        "n_harmless": cfg.n_harmless,
        "r2d2": (cfg.recipe == RecipeKind::R2d2).then_some(&cfg.r2d2),
        "n_hard_negatives": cfg.n_hard_negatives, "decision_weight": cfg.decision.weight,
        // Framed and contrast negatives were measured and dropped (docs/experiments.md); the
        // keys stay at their off values so runs recorded with them resume.
        "n_framed_negatives": 0, "contrast_negatives": false,
        "utility_tokens": cfg.utility_tokens, "system": cfg.system,
        // The phrasing trained, so a run never resumes under another bank.
        "refusals": data::refusals(cfg.strategy),
    });
    // Recorded only when used, so runs started before these options existed still resume.
    let n_decision = cfg.decision_negatives();
    if n_decision > 0 {
        record["n_decision_negatives"] = n_decision.into();
        record["decision_batch"] = cfg.decision.batch.into();
        record["decision_harmful"] = cfg.decision_harmful().into();
        if cfg.decision.harmful_share != 0.5 {
            record["decision_harmful_share"] = cfg.decision.harmful_share.into();
        }
    }
    if cfg.decision.rule.boundary != 0.5 {
        record["decision_boundary"] = cfg.decision.rule.boundary.into();
    }
    Ok(record)
}

/// A recipe with its settings, ready for [`crate::trainer::train`].
pub struct Plan {
    /// The recipe.
    pub recipe: Box<dyn Recipe>,
    /// The trainer's settings.
    pub train: TrainConfig,
    /// One line saying what will be trained.
    pub summary: String,
}

/// Assemble the recipe of `cfg` for `model` from `data`, trained with `train` ([`train_config`]
/// for this model). The base model's own replies are
/// cached under `$SAFEGEO_HOME/distill`, keyed by the model's hash and the prompt set, and
/// shared across runs; `progress(stage, done, total)` follows their generation.
pub fn build(
    cfg: &PlanConfig,
    train: TrainConfig,
    data: &PlanData,
    model: &Model,
    model_sha256: &str,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Plan> {
    let cache_dir = safegeo_runtime::fetch::home().join("distill");
    let short = &model_sha256[..16.min(model_sha256.len())];
    let system = cfg.system.as_deref();
    let strategy = cfg.strategy;
    let mut hooks = safegeo_runtime::NoHooks;
    let utility = data::own_replies(
        model,
        system,
        &data.harmless,
        cfg.utility_tokens,
        32,
        &cache_dir.join(format!("{short}-harmless-{}.jsonl", cfg.utility_tokens)),
        &mut hooks,
        &mut |d, t| progress("self-distilled replies", d, t),
    )?;
    let mut examples = data::utility_examples(model, system, &utility)?;
    // The base model's own (compliant) replies to the harmful prompts: harmful prefixes,
    // transitions and R2D2's targets.
    let harm = if cfg.recipe == RecipeKind::Sft {
        Vec::new()
    } else {
        data::own_replies(
            model,
            system,
            &data.harmful,
            100,
            32,
            &cache_dir.join(format!("{short}-harmful-100.jsonl")),
            &mut hooks,
            &mut |d, t| progress("harmful replies of the base model", d, t),
        )?
    };
    match cfg.recipe {
        RecipeKind::Sft | RecipeKind::R2d2 => examples.extend(data::refusal_examples(
            model,
            system,
            &data.harmful,
            strategy,
            cfg.seed,
        )?),
        RecipeKind::WorstInsertion => {
            examples.extend(data::refusal_examples(
                model,
                system,
                &data.harmful,
                strategy,
                cfg.seed,
            )?);
            let insertion = safegeo_attacks::insertion::InsertionConfig {
                candidates: 8,
                seed: cfg.seed,
                ..Default::default()
            };
            examples.extend(data::worst_insertion_examples(
                model,
                system,
                &harm,
                strategy,
                &insertion,
                &mut hooks,
                &mut |d, t| progress("worst-insertion states", d, t),
            )?);
        }
        RecipeKind::HarmfulPrefix | RecipeKind::Derta => {
            examples.extend(data::harmful_prefix_examples(
                model, system, &harm, strategy, 0.5, 100, cfg.seed,
            )?);
            if cfg.recipe == RecipeKind::Derta {
                examples.extend(data::transition_examples(
                    model, system, &harm, strategy, 0.05, cfg.seed,
                )?);
            }
        }
    }
    let n_examples = examples.len();
    let recipe = decision_recipe(cfg, data, model, examples)?;
    let recipe: Box<dyn Recipe> = if cfg.recipe == RecipeKind::R2d2 {
        Box::new(R2d2::new(
            cfg.r2d2.clone(),
            recipe,
            harm,
            cfg.system.clone(),
        )?)
    } else {
        Box::new(recipe)
    };
    let summary = summary(cfg, data, n_examples);
    Ok(Plan {
        recipe,
        train,
        summary,
    })
}

/// The examples as a recipe with the refusal decision loss and its decision-only stream.
fn decision_recipe(
    cfg: &PlanConfig,
    data: &PlanData,
    model: &Model,
    examples: Vec<Example>,
) -> Result<ExampleRecipe> {
    let strategy = cfg.strategy;
    let system = cfg.system.as_deref();
    // The decision is read over the first tokens of the bank's refusals only, not over the
    // judges' generic openings: those include "I", which opens helpful replies too, and a
    // decision read over it teaches "I" as a refusal (see data::POLITE).
    let refusal_ids = safegeo_data::judges::refusal_score::refusal_token_ids(
        &model.tok,
        data::refusals(strategy),
    )?;
    // A decision prompt needs only its reply position: the prompt plus one placeholder token
    // (the decision reads the position before it); " " would do, but encodes to nothing on
    // some tokenizers.
    let opening = model.tok.encode(data::refusals(strategy)[0], false)?;
    let Some(&placeholder) = opening.first() else {
        return Err(Error::Invalid(format!(
            "the tokenizer encodes the refusal `{}` to no tokens: check the model's tokenizer",
            data::refusals(strategy)[0]
        )));
    };
    let decision_examples = |prompts: &[String], kind: &str| {
        prompts
            .iter()
            .map(|p| {
                let prompt = model.tok.encode_chat(&data::messages(system, p), false)?;
                Ok(Example::reply(prompt, vec![placeholder], kind))
            })
            .collect::<Result<Vec<_>>>()
    };
    let decision_pos = if cfg.decision_harmful() {
        decision_examples(&data.harmful, "harmful")?
    } else {
        Vec::new()
    };
    let decision_neg = decision_examples(&data.decision_negatives, "harmless")?;
    let t = &cfg.train;
    ExampleRecipe::new(
        cfg.recipe.log_name(),
        examples,
        t.batch_size,
        t.grad_accum,
        cfg.seed,
    )?
    .with_decision(cfg.decision.weight, refusal_ids)?
    .with_decision_rule(cfg.decision.rule)?
    .with_decision_only(
        decision_pos,
        decision_neg,
        cfg.decision.batch,
        cfg.decision.harmful_share,
    )
}

fn summary(cfg: &PlanConfig, data: &PlanData, n_examples: usize) -> String {
    let t = &cfg.train;
    format!(
        "{}: {n_examples} examples ({} harmful prompts, {} harmless{}), {} steps of {} x {}, {}",
        cfg.recipe.log_name(),
        data.harmful.len(),
        data.harmless.len(),
        if data.decision_negatives.is_empty() {
            String::new()
        } else {
            format!(
                ", {} decision negatives{}, {} per micro-batch",
                data.decision_negatives.len(),
                if cfg.decision_harmful() {
                    " and the harmful prompts"
                } else {
                    ""
                },
                cfg.decision.batch
            )
        },
        t.steps,
        t.batch_size,
        t.grad_accum,
        match &t.lora {
            None => "full fine-tuning".to_string(),
            Some(l) => format!("LoRA r={}", l.rank),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_sets_parse_ranges_lists_and_all() {
        let parse_layers = LayerSet::parse;
        assert_eq!(parse_layers("all"), Ok(LayerSet::All));
        assert_eq!(
            parse_layers("3-5,1,4"),
            Ok(LayerSet::Layers(vec![1, 3, 4, 5]))
        );
        assert_eq!(parse_layers("7"), Ok(LayerSet::Layers(vec![7])));
        // Shares of the depth: 40% of 30 blocks starts at block 12, of 32 at block 13 (12.8).
        let upper = parse_layers("40%-").unwrap();
        assert_eq!(upper.resolve(30), Some((12..30).collect()));
        assert_eq!(upper.resolve(32), Some((13..32).collect()));
        assert_eq!(parse_layers("0%-50%").unwrap().resolve(4), Some(vec![0, 1]));
        assert!(parse_layers("50%-20%")
            .unwrap_err()
            .contains("empty or backwards"));
        assert!(parse_layers("140%-")
            .unwrap_err()
            .contains("share of the depth"));
        assert!(parse_layers("40%").is_err());
        assert!(parse_layers("5-3").unwrap_err().contains("backwards"));
        assert!(parse_layers("x").unwrap_err().contains("not a layer"));
        assert!(parse_layers(",").is_err());
    }

    #[test]
    fn recipe_names_are_the_command_line_names() {
        assert_eq!(
            serde_json::to_value(RecipeKind::WorstInsertion).unwrap(),
            "worst-insertion"
        );
        assert_eq!(RecipeKind::R2d2.log_name(), "sft+r2d2");
        assert_eq!(RecipeKind::Derta.log_name(), "derta");
    }
}
