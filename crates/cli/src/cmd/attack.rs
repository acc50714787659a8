//! `safegeo attack prefill|insertion|gcg|autodan`: adversarial test cases for behaviours.
use crate::cmd::eval::{interventions, InterventionArgs};
use crate::common::{self, ModelArgs};
use anyhow::{Context, Result};
use safegeo_attacks::autodan::AutoDanConfig;
use safegeo_attacks::gcg::GcgConfig;
use safegeo_attacks::insertion::{InsertionConfig, InsertionScore};
use safegeo_attacks::prefill::PrefillConfig;
use safegeo_attacks::run::{run_attack, AttackSpec, Event, RunSpec};
use std::path::PathBuf;

/// Behaviours whose prefill replies are decoded together.
pub const PREFILL_BATCH: usize = 16;

/// How worst insertion ranks its candidates.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreArg {
    /// The probability of the refusal tokens at the position after the span (lowest wins).
    RefusalProbability,
    /// The negative log-likelihood of the span (most likely wins).
    SpanLikelihood,
}

#[derive(clap::Args)]
pub struct AttackArgs {
    #[command(subcommand)]
    pub kind: AttackKind,
}

/// Options every attack shares.
#[derive(clap::Args, Clone)]
pub struct CommonArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Behaviours to attack: a dataset name (harmbench-val, jbb-harmful, advbench, ...) or a
    /// .jsonl/.csv file with a `prompt` (and optional `target`) column.
    #[arg(long, default_value = "harmbench-val")]
    pub behaviors: String,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    /// Attack at most N behaviours (deterministic sample with --seed).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Keep only behaviours of this category or kind (e.g. `standard` for HarmBench).
    #[arg(long)]
    pub category: Option<String>,
    /// Seed for sampling behaviours and for the attack's randomness.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// System prompt (else the chat template's default).
    #[arg(long)]
    pub system: Option<String>,
    /// Output folder: test_cases.jsonl (one line per behaviour), config.json, state/ (resume).
    /// Re-running the same command resumes.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub steer: InterventionArgs,
    /// Print the test cases as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand)]
pub enum AttackKind {
    /// Force the first K tokens of the affirmative target as the start of the reply
    /// (K = 0: the direct request).
    Prefill {
        #[command(flatten)]
        common: CommonArgs,
        /// Target tokens forced.
        #[arg(long, default_value_t = 10)]
        k: usize,
    },
    /// Random insertion: insert a span of the harmful target into the model's own reply at a
    /// random position and let it continue; with --candidates N > 1, worst insertion (keep the
    /// candidate with the lowest score).
    Insertion {
        #[command(flatten)]
        common: CommonArgs,
        /// Shortest span in tokens.
        #[arg(long, default_value_t = 5)]
        min_span: usize,
        /// Longest span in tokens.
        #[arg(long, default_value_t = 20)]
        max_span: usize,
        /// (position, span) candidates; more than 1 = worst insertion.
        #[arg(long, default_value_t = 1)]
        candidates: usize,
        /// Worst-insertion ranking.
        #[arg(long, value_enum, default_value_t = ScoreArg::RefusalProbability)]
        score: ScoreArg,
        /// Tokens of the own reply generated before inserting.
        #[arg(long, default_value_t = 64)]
        own_reply_tokens: usize,
        /// Own replies decoded together.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
    },
    /// GCG (nanoGCG's algorithm and defaults): optimize an adversarial suffix so the reply starts
    /// with the target.
    Gcg {
        #[command(flatten)]
        common: CommonArgs,
        /// Optimization steps.
        #[arg(long, default_value_t = 250)]
        steps: usize,
        /// Candidates per step.
        #[arg(long, default_value_t = 512)]
        search_width: usize,
        /// Top-k tokens per position from the gradient.
        #[arg(long, default_value_t = 256)]
        topk: usize,
        /// Positions replaced per candidate.
        #[arg(long, default_value_t = 1)]
        n_replace: usize,
        /// Best suffixes kept.
        #[arg(long, default_value_t = 0)]
        buffer_size: usize,
        /// Candidates per forward pass (0 = a whole group).
        #[arg(long, default_value_t = 0)]
        candidate_batch: usize,
        /// Use the mellowmax loss with this alpha.
        #[arg(long)]
        mellowmax: Option<f64>,
        /// Stop when greedy decoding already yields the target.
        #[arg(long)]
        early_stop: bool,
        /// Allow non-ASCII tokens in the suffix.
        #[arg(long)]
        allow_non_ascii: bool,
        /// Keep candidates that do not survive a decode-encode round trip.
        #[arg(long)]
        no_filter_ids: bool,
        /// Initial suffix.
        #[arg(long, default_value = "x x x x x x x x x x x x x x x x x x x x")]
        optim_str_init: String,
        /// Put a space before the target.
        #[arg(long)]
        add_space_before_target: bool,
    },
    /// AutoDAN (genetic): evolve a jailbreak template by crossover and synonym mutation.
    Autodan {
        #[command(flatten)]
        common: CommonArgs,
        /// Maximum generations.
        #[arg(long, default_value_t = 100)]
        steps: usize,
        /// Population size.
        #[arg(long, default_value_t = 64)]
        population: usize,
        /// Stop after this many generations without improvement.
        #[arg(long, default_value_t = 10)]
        patience: usize,
        /// Individuals per forward pass (0 = all).
        #[arg(long, default_value_t = 0)]
        candidate_batch: usize,
    },
}

fn spec_of(kind: &AttackKind) -> Result<(CommonArgs, AttackSpec, usize)> {
    Ok(match kind {
        AttackKind::Prefill { common, k } => (
            common.clone(),
            AttackSpec::Prefill(PrefillConfig { k: *k }),
            PREFILL_BATCH,
        ),
        AttackKind::Insertion {
            common,
            min_span,
            max_span,
            candidates,
            score,
            own_reply_tokens,
            batch_size,
        } => {
            let score = match score {
                ScoreArg::RefusalProbability => InsertionScore::RefusalProbability,
                ScoreArg::SpanLikelihood => InsertionScore::SpanLikelihood,
            };
            let cfg = InsertionConfig {
                min_span: *min_span,
                max_span: *max_span,
                candidates: *candidates,
                score,
                own_reply_tokens: *own_reply_tokens,
                seed: common.seed,
            };
            cfg.check()?;
            (common.clone(), AttackSpec::Insertion(cfg), *batch_size)
        }
        AttackKind::Gcg {
            common,
            steps,
            search_width,
            topk,
            n_replace,
            buffer_size,
            candidate_batch,
            mellowmax,
            early_stop,
            allow_non_ascii,
            no_filter_ids,
            optim_str_init,
            add_space_before_target,
        } => (
            common.clone(),
            AttackSpec::Gcg(GcgConfig {
                num_steps: *steps,
                optim_str_init: optim_str_init.clone(),
                search_width: *search_width,
                batch_size: *candidate_batch,
                topk: *topk,
                n_replace: *n_replace,
                buffer_size: *buffer_size,
                use_mellowmax: mellowmax.is_some(),
                mellowmax_alpha: mellowmax.unwrap_or(1.0),
                early_stop: *early_stop,
                use_prefix_cache: true,
                allow_non_ascii: *allow_non_ascii,
                filter_ids: !no_filter_ids,
                add_space_before_target: *add_space_before_target,
                seed: common.seed,
            }),
            1,
        ),
        AttackKind::Autodan {
            common,
            steps,
            population,
            patience,
            candidate_batch,
        } => (
            common.clone(),
            AttackSpec::Autodan(AutoDanConfig {
                num_steps: *steps,
                population: *population,
                patience: *patience,
                batch_size: *candidate_batch,
                seed: common.seed,
                ..Default::default()
            }),
            1,
        ),
    })
}

/// Run `spec` on `items` into `out` with a progress display; shared with `eval --adaptive`.
pub fn attack_with_progress(
    model: &safegeo_runtime::Model,
    spec: &AttackSpec,
    dataset: &str,
    items: &[safegeo_data::Item],
    run: &RunSpec,
    obs: &mut dyn safegeo_runtime::Observer,
) -> Result<Vec<safegeo_data::test_cases::TestCase>> {
    let mut bar = common::Progress::new("behaviours");
    let steps = match spec {
        AttackSpec::Gcg(c) => c.num_steps,
        AttackSpec::Autodan(c) => c.num_steps,
        _ => 0,
    };
    let cases = run_attack(model, spec, dataset, items, run, obs, &mut |ev| match ev {
        Event::Behavior(i, n, id) => {
            bar.set(i, n);
            tracing::info!("attacking {id} ({}/{n})", i + 1);
        }
        Event::Step(s, loss) => {
            if s == 1 || s % 10 == 0 || s == steps {
                tracing::info!("step {s}/{steps}: best loss {loss:.4}");
            }
        }
    })
    .with_context(|| {
        format!(
            "attack into {} (re-run the same command to resume)",
            run.out.display()
        )
    })?;
    bar.finish();
    Ok(cases)
}

pub fn run(a: AttackArgs) -> Result<()> {
    let (c, spec, batch_size) = spec_of(&a.kind)?;
    let cases = attack(&c, &spec, batch_size)?;
    if c.json {
        return common::print_json(&cases);
    }
    println!(
        "{:<40} {:>10} {:>9}",
        "behaviour", "final loss", "succeeded"
    );
    for t in &cases {
        let loss = t
            .loss_trace
            .last()
            .map_or("-".to_string(), |l| format!("{l:.4}"));
        println!(
            "{:<40} {:>10} {:>9}",
            truncate(&t.behavior_id, 40),
            loss,
            t.succeeded
        );
    }
    println!(
        "{} test cases in {}; replay them with `safegeo eval --test-cases {}`",
        cases.len(),
        c.out.join("test_cases.jsonl").display(),
        c.out.join("test_cases.jsonl").display()
    );
    Ok(())
}

/// Run `spec` on the behaviours `c` names into `c.out` (resuming what is there): config.json and
/// test_cases.jsonl. Shared with `demo`.
pub fn attack(
    c: &CommonArgs,
    spec: &AttackSpec,
    batch_size: usize,
) -> Result<Vec<safegeo_data::test_cases::TestCase>> {
    let load = safegeo_data::LoadSpec {
        data_dir: c.data.data_dir.as_deref(),
        category: c.category.as_deref(),
        limit: c.limit,
        seed: c.seed,
        prompt_column: None,
    };
    let dataset = safegeo_data::load_dataset(&c.behaviors, &load)?;
    let (ivs, described) = interventions(&c.steer, &common::device(&c.model.device)?)?;
    let model = common::load(&c.model)?;
    std::fs::create_dir_all(&c.out).with_context(|| format!("creating {}", c.out.display()))?;
    let config = serde_json::json!({
        "safegeo_version": env!("CARGO_PKG_VERSION"),
        "model": model.source,
        "model_sha256": common::model_hash(&model.source)?,
        "behaviors": {"name": dataset.name, "path": dataset.path, "sha256": dataset.sha256,
            "total": dataset.total, "sampled_ids": dataset.items.iter().map(|i| i.id.clone()).collect::<Vec<_>>()},
        "attack": spec, "system": c.system, "interventions": described,
    });
    common::check_or_write_config(&c.out, &config)?;
    let mut hooks = safegeo_runtime::Hooks::with_interventions(ivs);
    let run = RunSpec {
        out: &c.out,
        system: c.system.as_deref(),
        batch_size,
    };
    attack_with_progress(
        &model,
        spec,
        &dataset.name,
        &dataset.items,
        &run,
        &mut hooks,
    )
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}
