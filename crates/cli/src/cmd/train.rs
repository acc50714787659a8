//! `safegeo train`: safety-train a model and write a trajectory of anchor checkpoints.
use crate::common::{self, ModelArgs};
use anyhow::{Context, Result};
use safegeo_train::data::{self, Strategy};
use safegeo_train::decision::{Against, DecisionRule};
use safegeo_train::recipes::ExampleRecipe;
use safegeo_train::trainer::{train, LoraConfig, TrainConfig};
use std::path::PathBuf;

#[derive(clap::Args, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Recipe: sft (refusals + self-distilled utility anchor), r2d2 (SFT + away/toward losses on
    /// a persistent pool of GCG test cases), harmful-prefix (Qi et al.: refusals after
    /// harmful-reply prefixes), derta (harmful-prefix MLE + transition optimization),
    /// worst-insertion (refusal / recovery after a harmful span inserted at the worst of 8
    /// random places, plus the SFT data).
    #[arg(long, default_value = "sft")]
    pub recipe: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 150)]
    pub steps: usize,
    /// Write anchor checkpoints (OUT/ckpt-NNNNNN, Hugging Face folders) at these steps;
    /// 0 = the starting model.
    #[arg(long, value_delimiter = ',', default_value = "0,50,100,150")]
    pub save_at: Vec<usize>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (cosine decay after warm-up).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Clip the gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Full fine-tuning instead of LoRA.
    #[arg(long)]
    pub full: bool,
    /// LoRA rank. Rank 64 (alpha 128) ranks JailbreakBench harmful over benign prompts better
    /// than 16 (refusal-score AUC 0.87-0.90 over five runs, against 0.86-0.88) but refuses more
    /// of both, which --opening-bias takes back; see the README's safety-training section.
    #[arg(long, default_value_t = 64)]
    pub lora_rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 128.0)]
    pub lora_alpha: f64,
    /// Lower the first-token logits of the refusal openings (Sorry, Unfortunately, No, I) by
    /// this much in every anchor after step 0, written into an untied LM head once training
    /// ends (`safegeo calibrate --knob opening-bias`; each anchor's calibration.json records it
    /// with its harmful-val refusal). It moves where greedy decoding starts to refuse along the
    /// ranking training learned. 0 = anchors as trained. Session 20's fixed default, -3.25, put
    /// none of fresh seeds 5-10 in the target corner (README). [default for --recipe sft: set
    /// per anchor by --opening-bias-target; 0 otherwise]
    #[arg(
        long,
        allow_hyphen_values = true,
        conflicts_with = "opening_bias_target"
    )]
    pub opening_bias: Option<f64>,
    /// Set each anchor's opening bias by bisection to the least (most negative) one at which
    /// the anchor still refuses this share of harmful-val (`safegeo calibrate --knob
    /// opening-bias --target-refusal SHARE`): the threshold is placed per run on validation
    /// prompts instead of one bias for every run. An anchor that refuses less as trained is
    /// left unbiased. Costs about eight decodes of the 39 prompts per anchor (1-2 min on 2
    /// cores). [default: 0.71 for --recipe sft unless --opening-bias is given (28 of 39; JBB
    /// harmful / benign refused by single runs on fresh seeds 6-14: 0.80-0.85 / 0.14-0.27,
    /// five of nine within 0.80 / 0.20; by the default two-seed soups (--soup) of fresh seeds
    /// 11-14: 0.82 / 0.17 and 0.82 / 0.13; README, sessions 22-24)]
    #[arg(long)]
    pub opening_bias_target: Option<f64>,
    /// Train K runs that differ only in their seed (SEED, SEED+1, ...) into
    /// OUT/members/seed-S, each resumable on its own, and write every anchor OUT/ckpt-NNNNNN as
    /// their uniform soup: the weights averaged (crates/train/src/soup.rs). The opening bias is
    /// then set on the soup. Costs K trainings. Averaging two runs keeps one seed's stray
    /// threshold from setting the operating point (JBB benign refused 0.13-0.19 by eleven
    /// soups, 0.14-0.27 by ten single runs). [default: 2 for --recipe sft (README, sessions 23-24), 1
    /// otherwise]
    #[arg(long)]
    pub soup: Option<usize>,
    /// LoRA target projections.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: Vec<String>,
    /// Blocks that get LoRA adapters: `all`, layers and ranges like `14-29` or `0,2,10-12`, or a
    /// share of the depth like `40%-` (on 30 blocks: 12-29).
    /// Adapting only late blocks leaves the earlier representation as the base model has it
    /// (and out of the backward pass, so steps are faster), and the refusal decision is learned
    /// on top of the mid-depth representation instead of reshaping it to fit the training
    /// prompts (JailbreakBench harmful vs benign ranked with AUC 0.86-0.88 instead of 0.83-0.84).
    #[arg(long, default_value = "40%-", value_parser = parse_layers)]
    pub lora_layers: LayerSet,
    /// Refusal phrasing: polite or rebuttal.
    #[arg(long, default_value = "polite")]
    pub strategy: String,
    /// Harmful training prompts (a *_train split, or a file).
    #[arg(long, default_value = "harmful-train")]
    pub harmful: String,
    /// Harmless training prompts (a *_train split, or a file).
    #[arg(long, default_value = "harmless-train")]
    pub harmless: String,
    /// Harmful prompts used (all when omitted).
    #[arg(long)]
    pub n_harmful: Option<usize>,
    /// Harmless prompts used (self-distilled utility anchor).
    #[arg(long, default_value_t = 256)]
    pub n_harmless: usize,
    /// Extra harmless prompts mined from the harmless set for vocabulary they share with the
    /// harmful prompts (hard negatives: topic alone is not a reason to refuse).
    #[arg(long, default_value_t = 256)]
    pub n_hard_negatives: usize,
    /// Extra harmless prompts put in the request frames of harmful ones ("Give step-by-step
    /// instructions for how to bake a cake"): frames that open harmful-train prompts but almost
    /// no harmless ones, which a model otherwise learns to refuse on sight.
    #[arg(long, default_value_t = 0)]
    pub n_framed_negatives: usize,
    /// Add every harmful prompt quoted in a benign request about it ("What are the legal
    /// consequences for someone who acts on this request: ...?") with a self-distilled helpful
    /// reply, so that refusing depends on the request, not its topic.
    #[arg(long)]
    pub contrast_negatives: bool,
    /// Weight of the refusal decision loss at the first reply token: binary cross-entropy of
    /// the refusal-opening probability mass, toward 1 on harmful prompts and toward 0 on
    /// harmless ones (crates/train/src/decision.rs). 0 = plain cross-entropy only (the other
    /// decision options are then unused).
    #[arg(long, default_value_t = 3.0)]
    pub decision_weight: f64,
    /// Extra harmless prompts, drawn at random from the harmless set, trained on the refusal
    /// decision only (no reply: the decision loss pushes their refusal-opening mass at the first
    /// reply token toward 0). Cheap next to a self-distilled reply, so the decision sees
    /// thousands of harmless requests instead of hundreds. 0 = no decision stream.
    #[arg(long, default_value_t = 2048)]
    pub n_decision_negatives: usize,
    /// Share of the decision negatives taken by vocabulary hardness (the harmless prompts that
    /// share the most words with the harmful ones, after those of --n-hard-negatives) instead of
    /// at random: 0 = all random, 1 = all hard. On the default model all-hard ranked JBB harmful
    /// over benign no better than random (README, session 19).
    #[arg(long, default_value_t = 0.0)]
    pub decision_hard_share: f64,
    /// Decision prompts per micro-batch, run in a forward of their own.
    #[arg(long, default_value_t = 32)]
    pub decision_batch: usize,
    /// Put the harmful prompts in the decision stream too (see --decision-harmful-share), so the
    /// decision trains for several epochs at the cost of a prompt pass, next to the refusal
    /// replies of the main batch (`--decision-harmful false`: harmless prompts only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    pub decision_harmful: bool,
    /// With --decision-harmful: the share of each decision batch drawn from the harmful prompts.
    /// Below 0.5 the decision is trained to refuse less readily.
    #[arg(long, default_value_t = 0.2)]
    pub decision_harmful_share: f64,
    /// Refusal mass at which the decision loss parts harmful from harmless prompts
    /// (crates/train/src/decision.rs). Below 0.5 the unseen borderline prompts, which land
    /// between the two sides, end under the mass at which greedy decoding refuses: the model
    /// refuses less readily without ranking prompts differently.
    #[arg(long, default_value_t = 0.025)]
    pub decision_boundary: f64,
    /// What the decision loss weighs the refusal side against: `rest` (refusal mass q against
    /// 1 - q) or `top` (the likeliest refusal token against the likeliest other token, the
    /// comparison greedy decoding makes: a helpful opening's mass is spread over many tokens, so
    /// greedy decoding refuses prompts whose q is well under 1/2).
    #[arg(long, default_value = "rest")]
    pub decision_against: Against,
    /// With --decision-against top: read the decision over the first K tokens of the refusal
    /// (teacher-forced; the least margin counts), so a prompt counts as refused only when greedy
    /// decoding would write the whole opening ("Sorry, but"), not just its first token (which
    /// matters for openings whose first token also opens helpful replies; the built-in banks
    /// avoid those since session 16). Decision-only prompts are forced through the opening of
    /// the first refusal of --strategy.
    #[arg(long, default_value_t = 1)]
    pub decision_opening: usize,
    /// Longest self-distilled reply, in tokens.
    #[arg(long, default_value_t = 64)]
    pub utility_tokens: usize,
    /// R2D2 preset: cpu (pool 4, 1 GCG step of width 64 per training step, 10-token suffix) or
    /// reference (HarmBench: pool 8, 5 steps of width 512 / top-k 256, 20-token suffix).
    #[arg(long, default_value = "cpu")]
    pub r2d2_preset: String,
    /// R2D2: test cases in the pool (overrides the preset).
    #[arg(long)]
    pub pool_size: Option<usize>,
    /// R2D2: GCG steps per case per training step (overrides the preset).
    #[arg(long)]
    pub gcg_steps: Option<usize>,
    /// R2D2: GCG search width (overrides the preset).
    #[arg(long)]
    pub gcg_width: Option<usize>,
    /// R2D2: GCG top-k (overrides the preset).
    #[arg(long)]
    pub gcg_topk: Option<usize>,
    /// Data directory [default: $SAFEGEO_DATA, else ../shared/data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seed (data order, adapters, augmentation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// System prompt used for every example (else the template's default).
    #[arg(long)]
    pub system: Option<String>,
    /// Output folder; re-running the same command resumes from OUT/state.
    #[arg(long)]
    pub out: PathBuf,
}

fn load_train_split(name: &str, limit: Option<usize>, a: &TrainArgs) -> Result<Vec<String>> {
    if let Ok(n) = safegeo_data::DatasetName::parse(name) {
        if !n.is_train_split() {
            return Err(common::invalid!(
                "`{name}` is an evaluation set; training uses *_train splits only (harmful-train, \
                 harmless-train) or your own files"
            ));
        }
    }
    let d = safegeo_data::load_dataset(
        name,
        &safegeo_data::LoadSpec {
            data_dir: a.data_dir.as_deref(),
            limit,
            seed: a.seed,
            ..Default::default()
        },
    )?;
    Ok(d.items.into_iter().map(|i| i.prompt).collect())
}

/// A model with its recipe and settings, ready for [`train`].
pub struct Prepared {
    pub model: safegeo_runtime::Model,
    pub recipe: Box<dyn safegeo_train::trainer::Recipe>,
    pub cfg: TrainConfig,
    /// One line saying what will be trained.
    pub summary: String,
}

/// Everything `safegeo train` does before its first step: check the options, load data and
/// model, record the run's configuration in `a.out`, build (or read from the cache) the
/// self-distilled replies, and assemble the recipe.
pub fn prepare(a: &TrainArgs) -> Result<Prepared> {
    let strategy = Strategy::parse(&a.strategy)?;
    let mut cfg = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr,
        warmup_steps: a.warmup,
        min_lr_ratio: 0.1,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        lora: (!a.full).then(|| LoraConfig {
            rank: a.lora_rank,
            alpha: a.lora_alpha,
            targets: a.lora_targets.clone(),
            // Resolved once the model's depth is known (below).
            layers: None,
        }),
        seed: a.seed,
        save_at: a.save_at.clone(),
        state_every: 5,
    };
    cfg.check()?;
    if !matches!(
        a.recipe.as_str(),
        "sft" | "r2d2" | "worst-insertion" | "harmful-prefix" | "derta"
    ) {
        return Err(common::invalid!(
            "unknown recipe `{}`: use sft, r2d2, worst-insertion, harmful-prefix or derta",
            a.recipe
        ));
    }
    let r2d2_cfg = {
        let mut c = match a.r2d2_preset.as_str() {
            "cpu" => safegeo_train::r2d2::R2d2Config::default(),
            "reference" => safegeo_train::r2d2::R2d2Config::reference(),
            p => {
                return Err(common::invalid!(
                    "--r2d2-preset `{p}`: use cpu or reference"
                ))
            }
        };
        c.pool_size = a.pool_size.unwrap_or(c.pool_size);
        c.gcg_steps = a.gcg_steps.unwrap_or(c.gcg_steps);
        c.gcg.search_width = a.gcg_width.unwrap_or(c.gcg.search_width);
        c.gcg.topk = a.gcg_topk.unwrap_or(c.gcg.topk);
        c.gcg.seed = a.seed;
        c
    };
    if let Some(b) = a.opening_bias.filter(|b| !(b.is_finite() && *b <= 0.0)) {
        return Err(common::invalid!(
            "--opening-bias {b}: use a number of logits <= 0 (e.g. -3.25; 0 = anchors as trained)"
        ));
    }
    if let Some(r) = a.opening_bias_target.filter(|r| !(*r > 0.0 && *r <= 1.0)) {
        return Err(common::invalid!(
            "--opening-bias-target {r}: use a share of harmful-val above 0 and at most 1 (e.g. 0.71)"
        ));
    }
    if a.recipe == "r2d2" && a.grad_accum != 1 {
        return Err(common::invalid!(
            "r2d2 runs one micro-batch per step: use --grad-accum 1"
        ));
    }
    let decision_rule = DecisionRule {
        boundary: a.decision_boundary,
        against: a.decision_against,
        opening: a.decision_opening,
    };
    // Checked here too so a bad value is refused before the model loads.
    decision_rule
        .check()
        .map_err(|e| common::invalid!("--decision-{e}"))?;
    // The decision stream runs only beside a decision loss, and its harmful prompts only beside
    // its harmless ones: without them the options are unused, not wrong.
    let n_decision_negatives = if a.decision_weight > 0.0 {
        a.n_decision_negatives
    } else {
        0
    };
    let decision_harmful = a.decision_harmful && n_decision_negatives > 0;
    if decision_harmful && !(a.decision_harmful_share > 0.0 && a.decision_harmful_share < 1.0) {
        return Err(common::invalid!(
            "--decision-harmful-share {}: use a share strictly between 0 and 1 (e.g. 0.2)",
            a.decision_harmful_share
        ));
    }
    if !(0.0..=1.0).contains(&a.decision_hard_share) {
        return Err(common::invalid!(
            "--decision-hard-share {}: use a share from 0 to 1 (e.g. 0.5)",
            a.decision_hard_share
        ));
    }
    let harmful = load_train_split(&a.harmful, a.n_harmful, a)?;
    let mut harmless = load_train_split(&a.harmless, Some(a.n_harmless), a)?;
    // The whole harmless split, read once for whichever extra prompts are drawn from it.
    let pool = if a.n_hard_negatives + a.n_framed_negatives + n_decision_negatives > 0 {
        load_train_split(&a.harmless, None, a)?
    } else {
        Vec::new()
    };
    if a.n_hard_negatives + a.n_framed_negatives > 0 {
        let mined = data::hard_negatives(&harmful, &pool, &harmless, a.n_hard_negatives);
        harmless.extend(mined);
        let framed = data::framed_negatives(&pool, &harmless, a.n_framed_negatives, a.seed);
        harmless.extend(framed);
    }
    if a.contrast_negatives {
        harmless.extend(data::contrast_negatives(&harmful, a.seed));
    }
    let n_hard_decision = (n_decision_negatives as f64 * a.decision_hard_share).round() as usize;
    let mut decision_negatives = if n_hard_decision > 0 {
        data::hard_negatives(&harmful, &pool, &harmless, n_hard_decision)
    } else {
        Vec::new()
    };
    let taken = [harmless.as_slice(), decision_negatives.as_slice()].concat();
    decision_negatives.extend(data::sample_excluding(
        &pool,
        &taken,
        n_decision_negatives - decision_negatives.len(),
        a.seed,
    ));
    let model = common::load(&a.model)?;
    if let Some(l) = cfg.lora.as_mut() {
        l.layers = a.lora_layers.resolve(model.cfg.n_layer);
        cfg.check()?;
    }
    let hash = common::model_hash(&model.source)?;
    let mut config = serde_json::json!({
        "safegeo_version": env!("CARGO_PKG_VERSION"),
        "model": model.source, "model_sha256": hash, "recipe": a.recipe, "strategy": strategy,
        "train": cfg, "harmful": a.harmful, "n_harmful": harmful.len(), "harmless": a.harmless,
        "n_harmless": a.n_harmless, "r2d2": (a.recipe == "r2d2").then_some(&r2d2_cfg), "n_hard_negatives": a.n_hard_negatives, "decision_weight": a.decision_weight, "n_framed_negatives": a.n_framed_negatives, "contrast_negatives": a.contrast_negatives, "utility_tokens": a.utility_tokens, "system": a.system,
        // The phrasing trained, so a run never resumes under another bank.
        "refusals": data::refusals(strategy),
    });
    // Recorded only when used, so runs started before these options existed still resume.
    if n_decision_negatives > 0 {
        config["n_decision_negatives"] = n_decision_negatives.into();
        config["decision_batch"] = a.decision_batch.into();
        config["decision_harmful"] = decision_harmful.into();
        if a.decision_harmful_share != 0.5 {
            config["decision_harmful_share"] = a.decision_harmful_share.into();
        }
        if a.decision_hard_share > 0.0 {
            config["decision_hard_share"] = a.decision_hard_share.into();
        }
    }
    if a.decision_boundary != 0.5 {
        config["decision_boundary"] = a.decision_boundary.into();
    }
    if a.decision_against != Against::Rest {
        config["decision_against"] = a.decision_against.to_string().into();
    }
    if a.decision_opening != 1 {
        config["decision_opening"] = a.decision_opening.into();
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    common::check_or_write_config(&a.out, &config)?;
    // The base model's own replies are cached per model and prompt set, shared across runs.
    let cache_dir = safegeo_runtime::fetch::home().join("distill");
    let short = &hash[..16.min(hash.len())];
    let system = a.system.as_deref();
    let mut hooks = safegeo_runtime::NoHooks;
    let mut bar = common::Progress::new("self-distilled replies");
    let utility = data::own_replies(
        &model,
        system,
        &harmless,
        a.utility_tokens,
        32,
        &cache_dir.join(format!("{short}-harmless-{}.jsonl", a.utility_tokens)),
        &mut hooks,
        &mut |d, t| bar.set(d, t),
    )?;
    bar.finish();
    let mut examples = data::utility_examples(&model, system, &utility)?;
    // The base model's own (compliant) replies to the harmful prompts: harmful prefixes,
    // transitions and R2D2's targets.
    let harm = if a.recipe == "sft" {
        Vec::new()
    } else {
        let mut bar = common::Progress::new("harmful replies of the base model");
        let harm = data::own_replies(
            &model,
            system,
            &harmful,
            100,
            32,
            &cache_dir.join(format!("{short}-harmful-100.jsonl")),
            &mut hooks,
            &mut |d, t| bar.set(d, t),
        )?;
        bar.finish();
        harm
    };
    match a.recipe.as_str() {
        "sft" | "r2d2" => examples.extend(data::refusal_examples(
            &model, system, &harmful, strategy, a.seed,
        )?),
        "worst-insertion" => {
            examples.extend(data::refusal_examples(
                &model, system, &harmful, strategy, a.seed,
            )?);
            let cfg = safegeo_attacks::insertion::InsertionConfig {
                candidates: 8,
                seed: a.seed,
                ..Default::default()
            };
            let mut bar = common::Progress::new("worst-insertion states");
            examples.extend(data::worst_insertion_examples(
                &model,
                system,
                &harm,
                strategy,
                &cfg,
                &mut hooks,
                &mut |d, t| bar.set(d, t),
            )?);
            bar.finish();
        }
        _ => {
            examples.extend(data::harmful_prefix_examples(
                &model, system, &harm, strategy, 0.5, 100, a.seed,
            )?);
            if a.recipe == "derta" {
                examples.extend(data::transition_examples(
                    &model, system, &harm, strategy, 0.05, a.seed,
                )?);
            }
        }
    }
    let name: &'static str = match a.recipe.as_str() {
        "sft" => "sft",
        "r2d2" => "sft+r2d2",
        "worst-insertion" => "worst-insertion",
        "harmful-prefix" => "harmful-prefix",
        _ => "derta",
    };
    let n_examples = examples.len();
    // The decision is read over the first tokens of the bank's refusals only, not over the
    // judges' generic openings: those include "I", which opens helpful replies too, and a
    // decision read over it teaches "I" as a refusal (see data::POLITE).
    let refusal_ids = safegeo_data::judges::refusal_score::refusal_token_ids(
        &model.tok,
        data::refusals(strategy),
    )?;
    // A decision prompt needs only its reply position: the prompt plus the first K tokens of a
    // refusal the decision is read over. With K = 1 the token is a placeholder (the decision
    // reads the position before it); " " would do, but encodes to nothing on some tokenizers.
    let opening = model.tok.encode(data::refusals(strategy)[0], false)?;
    if opening.is_empty() {
        anyhow::bail!(
            "the tokenizer encodes the refusal `{}` to no tokens: check the model's tokenizer",
            data::refusals(strategy)[0]
        );
    }
    let decision_target = opening[..a.decision_opening.clamp(1, opening.len())].to_vec();
    let decision_examples = |prompts: &[String], kind: &str| {
        prompts
            .iter()
            .map(|p| {
                let prompt = model.tok.encode_chat(&data::messages(system, p), false)?;
                Ok(data::Example::reply(prompt, decision_target.clone(), kind))
            })
            .collect::<Result<Vec<_>>>()
    };
    let decision_pos = if decision_harmful {
        decision_examples(&harmful, "harmful")?
    } else {
        Vec::new()
    };
    let decision_neg = decision_examples(&decision_negatives, "harmless")?;
    let sft = ExampleRecipe::new(name, examples, a.batch_size, a.grad_accum, a.seed)?
        .with_decision(a.decision_weight, refusal_ids)?
        .with_decision_rule(decision_rule)?
        .with_decision_only(
            decision_pos,
            decision_neg,
            a.decision_batch,
            a.decision_harmful_share,
        )?;
    let recipe: Box<dyn safegeo_train::trainer::Recipe> = if a.recipe == "r2d2" {
        Box::new(safegeo_train::r2d2::R2d2::new(
            r2d2_cfg.clone(),
            sft,
            harm,
            a.system.clone(),
        )?)
    } else {
        Box::new(sft)
    };
    let summary = format!(
        "{name}: {n_examples} examples ({} harmful prompts, {} harmless{}), {} steps of {} x {}, {}",
        harmful.len(),
        harmless.len(),
        if decision_negatives.is_empty() {
            String::new()
        } else {
            format!(
                ", {} decision negatives{}, {} per micro-batch",
                decision_negatives.len(),
                if decision_harmful { " and the harmful prompts" } else { "" },
                a.decision_batch
            )
        },
        a.steps,
        a.batch_size,
        a.grad_accum,
        if a.full {
            "full fine-tuning".to_string()
        } else {
            format!("LoRA r={}", a.lora_rank)
        }
    );
    Ok(Prepared {
        model,
        recipe,
        cfg,
        summary,
    })
}

pub fn run(a: TrainArgs) -> Result<()> {
    let soup = a.soup.unwrap_or(if a.recipe == "sft" {
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
            eprintln!(
                "soup member {}/{soup}: seed {} -> {}",
                i + 1,
                m.seed,
                m.out.display()
            );
            save_at = train_run(m)?;
        }
        common::check_or_write_config(&a.out, &config)?;
        soup_anchors(&a.out, &members, &save_at)?;
        save_at
    };
    let anchors: Vec<String> = save_at
        .iter()
        .map(|s| format!("{}", a.out.join(format!("ckpt-{s:06}")).display()))
        .collect();
    let bias = match (a.opening_bias, a.opening_bias_target) {
        (_, Some(share)) => AnchorBias::Target(share),
        (Some(b), None) => AnchorBias::Fixed(b),
        (None, None) if a.recipe == "sft" => AnchorBias::Target(DEFAULT_SFT_OPENING_BIAS_TARGET),
        (None, None) => AnchorBias::Fixed(0.0),
    };
    if bias != AnchorBias::Fixed(0.0) {
        bias_anchors(&a, &save_at, bias)?;
    }
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
    let Prepared {
        mut model,
        mut recipe,
        cfg,
        summary,
    } = prepare(a)?;
    eprintln!("{summary}");
    let mut bar = common::Progress::new("steps");
    let lines = train(&mut model, recipe.as_mut(), &cfg, &a.out, &mut |s, n, l| {
        bar.message(format!("loss {:.4}, {:.0} tok/s", l.loss, l.tokens_per_s));
        bar.set(s, n);
        tracing::info!(
            "step {s}/{n} loss {:.4} lr {:.2e} grad-norm {:.3} {:.0} tok/s",
            l.loss,
            l.lr,
            l.grad_norm,
            l.tokens_per_s
        );
    })
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
    Ok(cfg.save_at)
}

/// `--soup` of the sft recipe (README, sessions 23-24: both soups of a fresh test in the target
/// corner, eight of eleven soups in all).
pub const DEFAULT_SFT_SOUP: usize = 2;

/// Write every anchor of `out` as the soup of the members' anchors at the same step. An anchor
/// already written (or already swapped out by [`bias_anchors`]) is kept; a soup is written in
/// a folder of its own and renamed into place, so an interruption never leaves half of one.
fn soup_anchors(out: &std::path::Path, members: &[TrainArgs], save_at: &[usize]) -> Result<()> {
    for &step in save_at {
        let name = format!("ckpt-{step:06}");
        let dir = out.join(&name);
        if dir.exists() || out.join(format!("{name}.unbiased")).exists() {
            continue;
        }
        let partial = out.join(format!("{name}.soup"));
        let _ = std::fs::remove_dir_all(&partial);
        let sources: Vec<PathBuf> = members.iter().map(|m| m.out.join(&name)).collect();
        safegeo_train::soup::write_soup(&sources, &partial)
            .with_context(|| format!("averaging the members' {name} into {}", dir.display()))?;
        std::fs::rename(&partial, &dir)?;
    }
    Ok(())
}

/// `--opening-bias-target` of the sft recipe (README, session 22): the share of harmful-val at
/// which seeds 4 and 5 reached the target corner's edge. On fresh seeds 6-10 it put two in the
/// corner and two within one prompt of it, where session 20's fixed bias of -3.25 put none.
pub const DEFAULT_SFT_OPENING_BIAS_TARGET: f64 = 0.71;

/// How each anchor's opening bias is set.
#[derive(Debug, Clone, Copy, PartialEq)]
enum AnchorBias {
    /// This many logits on every anchor.
    Fixed(f64),
    /// The least bias at which the anchor still refuses this share of harmful-val.
    Target(f64),
}

/// Write the opening bias into every anchor after step 0. Each anchor is biased in a folder of
/// its own and swapped in whole, its calibration.json marking it done, so an interrupted run
/// never biases an anchor twice or leaves half of one.
fn bias_anchors(a: &TrainArgs, save_at: &[usize], bias: AnchorBias) -> Result<()> {
    use safegeo_train::calibrate::{calibrate, CalibrateConfig, Knob};
    let dev = common::device(&a.model.device)?;
    let mut cfg = CalibrateConfig {
        knob: Knob::OpeningBias,
        data_dir: a.data_dir.clone(),
        system: a.system.clone(),
        ..Default::default()
    };
    match bias {
        AnchorBias::Fixed(b) => {
            cfg.max_bias = -b;
            cfg.fixed_scale = Some(0.0);
        }
        AnchorBias::Target(share) => cfg.target_refusal = share,
    }
    for &step in save_at.iter().filter(|&&s| s > 0) {
        let dir = a.out.join(format!("ckpt-{step:06}"));
        let biased = a.out.join(format!("ckpt-{step:06}.biased"));
        let unbiased = a.out.join(format!("ckpt-{step:06}.unbiased"));
        if !dir.exists() && unbiased.exists() && biased.join("calibration.json").exists() {
            // Interrupted between the two renames below.
            std::fs::rename(&biased, &dir)?;
        }
        if dir.join("calibration.json").exists() {
            let _ = std::fs::remove_dir_all(&unbiased);
            continue;
        }
        let _ = std::fs::remove_dir_all(&biased);
        let mut model = safegeo_runtime::load_model(&dir, &dev)?;
        let work = a.out.join("opening-bias").join(format!("ckpt-{step:06}"));
        let c = calibrate(&mut model, None, &cfg, &work, &mut |_| {})
            .with_context(|| format!("writing the opening bias into {}", dir.display()))?;
        safegeo_runtime::export_hf(&mut model, &biased)?;
        let mut ck: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json"))?)?;
        let logits = c.bias_logits.unwrap_or(0.0);
        ck["opening_bias"] = logits.into();
        safegeo_runtime::files::write_atomic(
            &biased.join("checkpoint.json"),
            serde_json::to_string_pretty(&ck)?.as_bytes(),
        )?;
        safegeo_runtime::files::write_atomic(
            &biased.join("calibration.json"),
            serde_json::to_string_pretty(&c)?.as_bytes(),
        )?;
        std::fs::rename(&dir, &unbiased)?;
        std::fs::rename(&biased, &dir)?;
        std::fs::remove_dir_all(&unbiased)?;
        eprintln!(
            "{}: opening bias {logits} logits; harmful-val refused {:.3}{}",
            dir.display(),
            c.refusal_at_scale,
            if c.reached || matches!(bias, AnchorBias::Fixed(_)) {
                ""
            } else {
                " (short of --opening-bias-target as trained; left unbiased)"
            }
        );
    }
    Ok(())
}

/// Blocks named by `--lora-layers`.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerSet {
    /// Every block.
    All,
    /// These blocks.
    Layers(Vec<usize>),
    /// The blocks in a share of the depth, in percent: block `i` of `n` when
    /// `from <= 100 i / n < to` (`40%-` on 30 blocks: 12-29).
    Depth { from: f64, to: f64 },
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
}

/// `all`; comma-separated layers and inclusive ranges (`14-29`, `0,2,10-12`); or a share of
/// the depth in percent (`40%-`, `40%-80%`).
fn parse_layers(spec: &str) -> std::result::Result<LayerSet, String> {
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

#[cfg(test)]
mod layer_tests {
    use super::*;

    #[test]
    fn layer_sets_parse_ranges_lists_and_all() {
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
}
