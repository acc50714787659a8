//! The selection job (docs/protocol.md §3): read a carriers folder's carriers, draw the
//! validation prompts, measure every candidate through a journal (a killed selection resumes
//! where it stopped), and write what was found: `selection.json`, `selection.csv`, and the
//! selected carrier's numbers in `geometry.json`.
use crate::select::{best_below, cutoff_layer, select, SelectConfig};
use crate::{linalg, store, Error, Result};
use safegeo_data::jsonl::Journal;
use safegeo_data::judges::refusal_score::{refusal_token_ids, REFUSAL_OPENINGS};
use safegeo_data::{load_dataset, LoadSpec};
use std::path::{Path, PathBuf};

/// One selection in a carriers folder: the validation sets and the selection's settings.
#[derive(Debug, Clone)]
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
    /// Refuses settings that cannot run.
    pub fn check(&self) -> Result<()> {
        if self.val.len() != 2 {
            return Err(Error::Invalid(
                "--val takes two sets: harmful,harmless".into(),
            ));
        }
        Ok(())
    }
}

/// What a selection tells its caller as it goes.
pub trait SelectObserver {
    /// A resumed selection found `n` measurements in its journal.
    fn resumed(&mut self, n: usize);
    /// `done` of `total` candidate measurements made.
    fn progress(&mut self, done: usize, total: usize);
}

/// `n` prompts of the set `name` (a dataset name or file), sampled with `seed`.
pub fn prompts(
    name: &str,
    n: usize,
    seed: u64,
    data_dir: Option<&Path>,
) -> Result<safegeo_data::Dataset> {
    Ok(load_dataset(
        name,
        &LoadSpec {
            data_dir,
            limit: Some(n),
            seed,
            ..Default::default()
        },
    )?)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    safegeo_runtime::files::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Select the admissible carrier of `a.dir` on `model` (whose sha256 is `model_sha256`):
/// selection.json, selection.csv, and the selected layer's numbers in geometry.json. Returns
/// selection.json.
pub fn select_into(
    model: &safegeo_runtime::Model,
    model_sha256: &str,
    a: &SelectJob,
    obs: &mut dyn SelectObserver,
) -> Result<serde_json::Value> {
    a.check()?;
    let c = store::load(&a.dir.join("carriers.safetensors"))?;
    if model.cfg.n_layer != c.n_layer() || model.cfg.hidden != c.refusal[0][0].len() {
        return Err(Error::Mismatch(format!(
            "the carriers in {} do not fit this model's shape ({} layers x width {} against {} x {})\n  fix: select with the model the carriers were estimated on (the one carriers.json names), or estimate them again on this one",
            a.dir.display(),
            c.n_layer(),
            c.refusal[0][0].len(),
            model.cfg.n_layer,
            model.cfg.hidden
        )));
    }
    let hv = prompts(&a.val[0], a.n_val, a.seed, a.data_dir.as_deref())?;
    let lv = prompts(&a.val[1], a.n_val, a.seed, a.data_dir.as_deref())?;
    let text =
        |d: &safegeo_data::Dataset| d.items.iter().map(|i| i.prompt.clone()).collect::<Vec<_>>();
    let (h_ids, _) = crate::carriers::prompt_ids(model, &text(&hv))?;
    let (l_ids, _) = crate::carriers::prompt_ids(model, &text(&lv))?;
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
        "model": model_sha256, "orth": a.orth, "config": cfg,
        "harmful": &h_ids, "harmless": &l_ids, "refusal_ids": &refusal_ids,
    });
    safegeo_runtime::files::lock_dir(&a.dir)?;
    let mut journal = Journal::open(&a.dir.join("select.journal.jsonl"), &fingerprint)?;
    if !journal.is_empty() {
        obs.resumed(journal.len());
    }
    let t0 = std::time::Instant::now();
    let (cands, best, base) = select(
        model,
        carriers,
        &h_ids,
        &l_ids,
        &refusal_ids,
        cfg,
        Some(&mut journal),
        &mut |d, t| obs.progress(d, t),
    )?;
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
            "floor_admissible",
            "floor_failed",
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
                k.floor_admissible.to_string(),
                k.floor_failed.join(";"),
            ]
        }),
    );
    safegeo_runtime::files::write_atomic(&a.dir.join("selection.csv"), csv.as_bytes())?;
    let full: Vec<_> = cands.iter().filter(|k| k.stage == "full").collect();
    let count = |t: &str| full.iter().filter(|k| k.failed.contains(&t)).count();
    let lowest_kl = full.iter().map(|k| k.kl).fold(f64::INFINITY, f64::min);
    let rk = &base.random_direction_kl;
    let floor = match (base.floor_kl_mean(), base.floor_kl_p95()) {
        (Some(mean), Some(p95)) => format!(
            "{} random directions: mean KL {mean:.4}, 95th percentile {p95:.4}",
            rk.len()
        ),
        _ => "no random directions measured, so no floor-relative rule".into(),
    };
    let floor_count = |t: &str| full.iter().filter(|k| k.floor_failed.contains(&t)).count();
    let verdict = match best {
        Some(i) => serde_json::json!({
            "selected": cands[i],
            "rule": cands[i].rule(),
            "direction": if a.orth { "refusal_orth" } else { "refusal" },
        }),
        None => serde_json::json!({
            "selected": null,
            "rule": null,
            "reason": format!(
                "no carrier passes either rule among {} fully measured candidates. Absolute rule: induce <= 0 for {}, KL > {} for {} (lowest {:.3}), NaN for {}. Floor-relative rule ({floor}): KL above the floor for {}, bypass not below the baseline for {}. {} candidates at or above the layer cut-off left out (baseline refusal score on harmful prompts {:.3}; a model that does not refuse has no refusal carrier to find)",
                full.len(), count("induce"), cfg.kl_max, count("kl"), lowest_kl, count("nan"),
                floor_count("floor-kl"), floor_count("bypass"),
                cands.iter().filter(|k| k.stage == "cutoff").count(), base.harmful_score
            ),
        }),
    };
    // The verdicts of both cut-offs the protocol names: none, and Arditi et al.'s 0.8.
    let n_layer = c.n_layer();
    let verdict_at = |fraction: f64| -> serde_json::Value {
        if fraction > cfg.layer_cutoff {
            return serde_json::json!({"selected": null, "reason": format!(
                "not measured: candidates at or above cut-off {} (layer {}) were left out",
                cfg.layer_cutoff, cutoff_layer(cfg.layer_cutoff, n_layer))});
        }
        match best_below(&cands, fraction, n_layer) {
            Some(i) => serde_json::json!({"selected": cands[i]}),
            None => serde_json::json!({"selected": null, "reason": format!(
                "no admissible candidate below layer {}", cutoff_layer(fraction, n_layer))}),
        }
    };
    let by_cutoff = serde_json::json!({
        "none": verdict_at(1.0),
        "0.8": verdict_at(0.8),
    });
    let out = serde_json::json!({
        "config": cfg, "seconds": t0.elapsed().as_secs_f64(), "by_cutoff": by_cutoff,
        "baseline": {"harmful_refusal_score": base.harmful_score, "harmless_refusal_score": base.harmless_score,
            "random_direction_kl": &base.random_direction_kl,
            "random_direction_kl_mean": base.floor_kl_mean(), "random_direction_kl_p95": base.floor_kl_p95()},
        "validation": {"harmful": {"name": hv.name, "sha256": hv.sha256}, "harmless": {"name": lv.name, "sha256": lv.sha256}},
        "refusal_token_ids": refusal_ids, "result": verdict,
    });
    write_json(&a.dir.join("selection.json"), &out)?;
    // geometry.json gains the numbers at the selected layer (or loses stale ones).
    let geometry_path = a.dir.join("geometry.json");
    if let Ok(text) = std::fs::read_to_string(&geometry_path) {
        let mut geo: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::Invalid(format!(
                "{} is not valid JSON: {e}",
                geometry_path.display()
            ))
        })?;
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
    Ok(out)
}
