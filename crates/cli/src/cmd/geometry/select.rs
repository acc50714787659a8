//! `safegeo select`: the admissible refusal carrier of a carriers folder.
use super::{carriers_model, open_journal, prompts, write_json};
use crate::common;
use anyhow::{bail, Context, Result};
use safegeo_data::judges::refusal_score::{refusal_token_ids, REFUSAL_OPENINGS};
use safegeo_geometry::carriers::prompt_ids;
use safegeo_geometry::select::{select, SelectConfig};
use safegeo_geometry::{linalg, store};
use std::path::PathBuf;

/// Validation prompts per set (Arditi et al.: 32).
pub const VALIDATION_PROMPTS: usize = 32;

/// What the selection spends: validation prompts, the screen and the finalists, and the KL
/// bound. Shared by `select` and `trajectory`.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Selection budget")]
pub struct SelectionBudget {
    /// Harmful and harmless validation sets.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "harmful-val,harmless-val"
    )]
    pub val: Vec<String>,
    /// Validation prompts per set (Arditi et al.: 32).
    #[arg(long, default_value_t = VALIDATION_PROMPTS)]
    pub n_val: usize,
    /// Prompts per set in the screening stage.
    #[arg(long, default_value_t = SelectConfig::default().screen_prompts)]
    pub screen: usize,
    /// Candidates re-measured on all validation prompts.
    #[arg(long, default_value_t = SelectConfig::default().finalists)]
    pub finalists: usize,
    /// Maximum KL on harmless prompts under ablation (admissibility).
    #[arg(value_parser = crate::common::finite, long, default_value_t = SelectConfig::default().kl_max)]
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
    /// Candidates must lie below this fraction of the layers (Arditi: 0.8; default none).
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
    /// Random unit directions whose ablation KL is measured on the screening prompts, to show
    /// the scale of --kl-max for this model (0 = none).
    #[arg(long, default_value_t = SelectConfig::default().random_directions)]
    pub random_directions: usize,
    /// Only these position indices are candidates (comma-separated; 0 = t_inst, the last =
    /// t_post; see carriers.json) [default: all].
    #[arg(long, value_delimiter = ',')]
    pub positions: Option<Vec<usize>>,
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

/// One selection in a carriers folder: the validation sets and the selection's settings.
pub struct SelectJob {
    /// A folder written by `safegeo carriers`; selection.{json,csv} go there.
    pub dir: PathBuf,
    /// Harmful and harmless validation sets.
    pub val: Vec<String>,
    /// Validation prompts per set.
    pub n_val: usize,
    /// Seed of the validation prompts' sample.
    pub seed: u64,
    /// Select among the orthogonalized carriers.
    pub orth: bool,
    /// Where the named sets live.
    pub data_dir: Option<PathBuf>,
    /// The selection's settings.
    pub config: SelectConfig,
}

impl SelectJob {
    /// A selection in `dir` within `budget`, every other setting at its default.
    pub fn new(dir: PathBuf, budget: &SelectionBudget) -> Self {
        SelectJob {
            dir,
            val: budget.val.clone(),
            n_val: budget.n_val,
            seed: VALIDATION_SEED,
            orth: false,
            data_dir: None,
            config: SelectConfig {
                kl_max: budget.kl_max,
                screen_prompts: budget.screen,
                finalists: budget.finalists,
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
            seed: a.seed,
        },
    };
    store::load(&a.dir.join("carriers.safetensors"))?;
    check(&job)?;
    let model = carriers_model(&a.dir, a.model.as_deref(), &a.device)?;
    let out = select_into(&model, &job)?;
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

fn check(a: &SelectJob) -> Result<()> {
    if a.val.len() != 2 {
        bail!("--val takes two sets: harmful,harmless");
    }
    Ok(())
}

/// Select the admissible carrier of `a.dir` on `model`: selection.json, selection.csv, and the
/// selected layer's numbers in geometry.json. Returns selection.json. Shared with `trajectory`.
pub fn select_into(model: &safegeo_runtime::Model, a: &SelectJob) -> Result<serde_json::Value> {
    check(a)?;
    let c = store::load(&a.dir.join("carriers.safetensors"))?;
    if model.cfg.n_layer != c.n_layer() || model.cfg.hidden != c.refusal[0][0].len() {
        bail!(
            "the carriers in {} do not fit this model's shape ({} layers x width {} against {} x {})\n  fix: select with the model the carriers were estimated on (the one carriers.json names), or estimate them again on this one",
            a.dir.display(),
            c.n_layer(),
            c.refusal[0][0].len(),
            model.cfg.n_layer,
            model.cfg.hidden
        );
    }
    let hv = prompts(&a.val[0], a.n_val, a.seed, a.data_dir.as_deref())?;
    let lv = prompts(&a.val[1], a.n_val, a.seed, a.data_dir.as_deref())?;
    let text =
        |d: &safegeo_data::Dataset| d.items.iter().map(|i| i.prompt.clone()).collect::<Vec<_>>();
    let (h_ids, _) = prompt_ids(model, &text(&hv))?;
    let (l_ids, _) = prompt_ids(model, &text(&lv))?;
    let refusal_ids = refusal_token_ids(&model.tok, REFUSAL_OPENINGS)?;
    let cfg = &a.config;
    // Ablation normalizes either; addition needs the orthogonalized carrier at its own scale.
    let orth_at_scale;
    let carriers = if a.orth {
        orth_at_scale = c.refusal_orth_at_scale();
        &orth_at_scale
    } else {
        &c.refusal
    };
    // Every measurement lands in a journal, so a killed selection resumes where it stopped.
    let fingerprint = serde_json::json!({
        "carriers": safegeo_runtime::fetch::sha256_file(&a.dir.join("carriers.safetensors"))?,
        "model": common::model_hash(&model.source)?, "orth": a.orth, "config": cfg,
        "harmful": &h_ids, "harmless": &l_ids, "refusal_ids": &refusal_ids,
    });
    let mut journal = open_journal(&a.dir, "select", &fingerprint, "measurements already made")?;
    let t0 = std::time::Instant::now();
    let mut bar = common::Progress::new("candidate measurements");
    let (cands, best, base) = select(
        model,
        carriers,
        &h_ids,
        &l_ids,
        &refusal_ids,
        cfg,
        Some(&mut journal),
        &mut |d, t| bar.set(d, t),
    )?;
    bar.finish();
    let csv = safegeo_data::table::csv_text(
        &[
            "layer",
            "pos",
            "bypass",
            "induce",
            "kl",
            "stage",
            "admissible",
            "failed",
        ],
        cands.iter().map(|k| {
            [
                k.layer.to_string(),
                k.pos.to_string(),
                format!("{:.6}", k.bypass),
                format!("{:.6}", k.induce),
                format!("{:.6}", k.kl),
                k.stage.to_string(),
                k.admissible.to_string(),
                k.failed.join(";"),
            ]
        }),
    );
    safegeo_runtime::files::write_atomic(&a.dir.join("selection.csv"), csv.as_bytes())?;
    let full: Vec<_> = cands.iter().filter(|k| k.stage == "full").collect();
    let count = |t: &str| full.iter().filter(|k| k.failed.contains(&t)).count();
    let lowest_kl = full.iter().map(|k| k.kl).fold(f64::INFINITY, f64::min);
    let rk = &base.random_direction_kl;
    let random_kl = if rk.is_empty() {
        "not measured".to_string()
    } else {
        format!(
            "mean KL {:.4}, max {:.4} over {}",
            rk.iter().sum::<f64>() / rk.len() as f64,
            rk.iter().fold(0.0f64, |m, &x| m.max(x)),
            rk.len()
        )
    };
    let verdict = match best {
        Some(i) => {
            serde_json::json!({"selected": cands[i], "direction": if a.orth { "refusal_orth" } else { "refusal" }})
        }
        None => serde_json::json!({
            "selected": null,
            "reason": format!(
                "no admissible carrier among {} fully measured candidates: induce <= 0 for {}, KL > {} for {} (lowest {:.3}; ablating a random direction: {}), NaN for {}; {} candidates at or above the layer cut-off left out (baseline refusal score on harmful prompts {:.3}; a model that does not refuse has no refusal carrier to find)",
                full.len(), count("induce"), cfg.kl_max, count("kl"), lowest_kl, random_kl, count("nan"), cands.iter().filter(|k| k.stage == "cutoff").count(), base.harmful_score
            ),
        }),
    };
    let out = serde_json::json!({
        "config": cfg, "seconds": t0.elapsed().as_secs_f64(),
        "baseline": {"harmful_refusal_score": base.harmful_score, "harmless_refusal_score": base.harmless_score,
            "random_direction_kl": &base.random_direction_kl},
        "validation": {"harmful": {"name": hv.name, "sha256": hv.sha256}, "harmless": {"name": lv.name, "sha256": lv.sha256}},
        "refusal_token_ids": refusal_ids, "result": verdict,
    });
    write_json(&a.dir.join("selection.json"), &out)?;
    // geometry.json gains the numbers at the selected layer (or loses stale ones).
    let geometry_path = a.dir.join("geometry.json");
    if let Ok(text) = std::fs::read_to_string(&geometry_path) {
        let mut geo: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", geometry_path.display()))?;
        geo["selected"] = match best {
            Some(i) => {
                let (l, p) = (cands[i].layer, cands[i].pos);
                serde_json::json!({
                    "layer": l, "pos": p, "direction": if a.orth { "refusal_orth" } else { "refusal" },
                    "coupling_abs_cos": linalg::cosine(c.harmfulness(l), &carriers[l][p]).abs(),
                    "effective_rank": geo["effective_rank"].get(l).cloned().unwrap_or_default(),
                })
            }
            None => serde_json::Value::Null,
        };
        write_json(&geometry_path, &geo)?;
    }
    crate::common::note!(
        "select: {} candidates in {:.1}s -> {}",
        cands.len(),
        t0.elapsed().as_secs_f64(),
        a.dir.display()
    );
    Ok(out)
}
