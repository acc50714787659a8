//! One carriers run (docs/protocol.md §2): capture the harmful and harmless prompts, take the
//! difference-of-means carriers, and measure them: effective rank per layer, coupling, belief
//! scores, carrier norms and, on two held-out sets, how well each carrier reads as a probe. The
//! result is typed: [`CarriersMeta`] is `carriers.json`, [`GeometryReport`] is `geometry.json`.
use crate::carriers::{capture, difference_of_means, prompt_ids, Activations, Carriers};
use crate::measures::{
    belief_score, coupling_curve, coupling_intervals, effective_ranks_of, resample_carriers,
    ErankReport, Interval, StackSpec,
};
use crate::separation::{probe_separation, separation, Separation, PROBE_L2};
use crate::{linalg, store, Error, Result};
use safegeo_data::judges::refusal_score::{refusal_scores, refusal_token_ids, REFUSAL_OPENINGS};
use safegeo_data::Dataset;
use safegeo_runtime::{Model, NoHooks};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Settings of a carriers run; defaults follow Arditi et al.
#[derive(Debug, Clone)]
pub struct EstimateConfig {
    /// Keep only harmful prompts the model refuses (refusal score > 0) and harmless ones it
    /// accepts (< 0).
    pub filter: bool,
    /// Bootstrap resamples behind the effective ranks' intervals.
    pub bootstrap: usize,
    /// The rows of the effective-rank stacks.
    pub stacks: StackSpec,
    /// Prompts per forward pass.
    pub batch_size: usize,
    /// Seed of the bootstrap (and recorded: the prompts were sampled with it).
    pub seed: u64,
}

impl Default for EstimateConfig {
    fn default() -> Self {
        Self {
            filter: false,
            bootstrap: 20,
            stacks: StackSpec::default(),
            batch_size: 16,
            seed: 42,
        }
    }
}

/// A prompt set as recorded: its name, file hash and the ids sampled.
#[derive(Debug, Clone, Serialize)]
pub struct SetRecord {
    /// Ids of the prompts used.
    pub ids: Vec<String>,
    /// Name it was loaded by.
    pub name: String,
    /// sha256 of its file.
    pub sha256: String,
}

impl SetRecord {
    fn of(d: &Dataset) -> Self {
        Self {
            ids: d.items.iter().map(|i| i.id.clone()).collect(),
            name: d.name.clone(),
            sha256: d.sha256.clone(),
        }
    }
}

/// One carrier position: its index, its name and the token at it (from the first prompt).
#[derive(Debug, Clone, Serialize)]
pub struct PositionName {
    /// 0 = `t_inst`, the last = `t_post`.
    pub index: usize,
    /// `t_inst`, `post_P` or `post_P (t_post)`.
    pub name: String,
    /// The template's token there.
    pub token: String,
}

/// How many prompts of each set the filter kept.
#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    /// Harmful prompts kept.
    pub harmful: usize,
    /// Harmless prompts kept.
    pub harmless: usize,
}

/// `carriers.json`: what the carriers were estimated from.
#[derive(Debug, Clone, Serialize)]
pub struct CarriersMeta {
    /// The model's architecture, as GGUF names it (`llama`, `qwen2`, `gemma3`).
    pub architecture: String,
    /// Model width.
    pub d: usize,
    /// Whether `--filter` was on.
    pub filter: bool,
    /// The harmful set.
    pub harmful: SetRecord,
    /// The harmless set.
    pub harmless: SetRecord,
    /// Prompts kept by the filter.
    pub kept: Kept,
    /// The model's path or name.
    pub model: String,
    /// The model file's sha256.
    pub model_sha256: String,
    /// Layers (index `l` is the input of block `l`).
    pub n_layer: usize,
    /// Positions (`t_inst`, then the post-instruction tokens).
    pub n_pos: usize,
    /// Every position, named.
    pub positions: Vec<PositionName>,
    /// The version that wrote the file.
    pub safegeo_version: String,
    /// Sampling seed.
    pub seed: u64,
    /// What each tensor of `carriers.safetensors` holds.
    pub tensors: BTreeMap<&'static str, &'static str>,
}

/// Belief scores of Zhao et al. at one position, per capture prompt and their means.
#[derive(Debug, Clone, Serialize)]
pub struct Beliefs {
    /// Per harmful prompt.
    pub harmful: Vec<f64>,
    /// Mean over harmful prompts.
    pub harmful_mean: f64,
    /// Per harmless prompt.
    pub harmless: Vec<f64>,
    /// Mean over harmless prompts.
    pub harmless_mean: f64,
}

/// The logistic probes' separation of the held-out sets.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Every layer and position.
    pub all: Vec<Separation>,
    /// AUC per layer at `t_post`.
    pub auc_t_post: Vec<f64>,
    /// The highest TPR at FPR 0.2, then AUC.
    pub best: Option<Separation>,
    /// The probes' L2 penalty.
    pub l2: f64,
    /// TPR at FPR 0.2 per layer at `t_post`.
    pub tpr_at_fpr_0_2_t_post: Vec<f64>,
}

/// How well every carrier, read as a linear probe, separates two held-out sets.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOut {
    /// Every carrier.
    pub all: Vec<Separation>,
    /// AUC per layer at `t_inst`.
    pub auc_t_inst: Vec<f64>,
    /// AUC per layer at `t_post`.
    pub auc_t_post: Vec<f64>,
    /// The carrier with the highest TPR at FPR 0.2, then AUC.
    pub best: Option<Separation>,
    /// The held-out harmful set.
    pub harmful: SetRecord,
    /// The held-out harmless set.
    pub harmless: SetRecord,
    /// How to read it.
    pub note: &'static str,
    /// Logistic probes fitted on the capture prompts, read the same way.
    pub probe: ProbeReport,
    /// TPR at FPR 0.2 per layer at `t_inst`.
    pub tpr_at_fpr_0_2_t_inst: Vec<f64>,
    /// TPR at FPR 0.2 per layer at `t_post`.
    pub tpr_at_fpr_0_2_t_post: Vec<f64>,
}

/// `geometry.json`: the measures of the carriers.
#[derive(Debug, Clone, Serialize)]
pub struct GeometryReport {
    /// Belief scores at `t_inst`.
    pub belief_t_inst: Beliefs,
    /// Belief scores at `t_post`.
    pub belief_t_post: Beliefs,
    /// `|cos(h_l, r_l)|` per layer, the refusal carrier taken at `t_post`.
    pub coupling_abs_cos_t_post: Vec<f64>,
    /// Effective rank per layer with its bootstrap interval.
    pub effective_rank: Vec<ErankReport>,
    /// `|cos(h_l, r_{l,p})|` per layer and position with its basic bootstrap 95% interval.
    pub coupling_abs_cos: Vec<Vec<Interval>>,
    /// With held-out sets: the carriers read as probes on them.
    pub heldout: Option<HeldOut>,
    /// How to read it.
    pub note: &'static str,
    /// The refusal carrier's norm per layer and position.
    pub refusal_norms: Vec<Vec<f64>>,
}

/// Everything one carriers run measured.
pub struct Estimate {
    /// The carriers.
    pub carriers: Carriers,
    /// `carriers.json`.
    pub meta: CarriersMeta,
    /// `geometry.json`.
    pub geometry: GeometryReport,
    /// The refusal carriers of every bootstrap resample (`bootstrap.safetensors`).
    pub bootstrap_refusal: Vec<Vec<Vec<Vec<f64>>>>,
}

const GEOMETRY_NOTE: &str = "coupling = |cos(harmfulness carrier at t_inst, refusal carrier at t_post)| per layer; belief = Zhao et al.'s mean over layers of cos(h_l, mean harmful_l) - cos(h_l, mean harmless_l) for each capture prompt (harmful, harmless) at that position; `safegeo select` adds `selected` (layer, coupling and effective rank there)";

const HELDOUT_NOTE: &str = "each carrier read as a linear probe: projection of held-out prompts on the unit carrier; best = highest TPR at FPR 0.2, then AUC. `probe`: a logistic regression fitted at each layer and position on the same capture (standardized activations, L2 `l2`), read the same way";

/// Token ids of a prompt set, one row per prompt.
type Ids = Vec<Vec<u32>>;

fn texts(d: &Dataset) -> Vec<String> {
    d.items.iter().map(|i| i.prompt.clone()).collect()
}

/// Capture `ids` at every layer and position, reporting `(stage, done, total)`.
fn capture_sets(
    model: &Model,
    sets: [&[Vec<u32>]; 2],
    post_len: usize,
    batch_size: usize,
    stage: &str,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<[Activations; 2]> {
    let total = sets[0].len() + sets[1].len();
    let mut done = 0;
    let mut tick = |n| {
        done += n;
        progress(stage, done, total)
    };
    let a = capture(model, sets[0], post_len, batch_size, &mut tick)?;
    let b = capture(model, sets[1], post_len, batch_size, &mut tick)?;
    Ok([a, b])
}

/// Keep the harmful prompts the model refuses and the harmless ones it accepts.
fn filter_by_refusal(
    model: &Model,
    harmful: Ids,
    harmless: Ids,
    batch_size: usize,
) -> Result<(Ids, Ids)> {
    let refusal_ids = refusal_token_ids(&model.tok, REFUSAL_OPENINGS)?;
    let hs = refusal_scores(model, &harmful, &refusal_ids, batch_size, &mut NoHooks)?;
    let ls = refusal_scores(model, &harmless, &refusal_ids, batch_size, &mut NoHooks)?;
    let keep = |ids: Ids, scores: &[f64], refused: bool| -> Ids {
        ids.into_iter()
            .zip(scores)
            .filter(|(_, &s)| if refused { s > 0.0 } else { s < 0.0 })
            .map(|(i, _)| i)
            .collect()
    };
    let (h, l) = (keep(harmful, &hs, true), keep(harmless, &ls, false));
    if h.is_empty() || l.is_empty() {
        return Err(Error::Invalid(format!(
            "--filter kept {} harmful and {} harmless prompts: the model refuses none of the harmful ones (or all harmless ones)\n  fix: run without --filter, or safety-train the model first",
            h.len(),
            l.len()
        )));
    }
    Ok((h, l))
}

/// The carriers of `model` from `harmful` vs `harmless`, with their measures and, when
/// `heldout` is given, their separation of those two sets. `progress(stage, done, total)`
/// follows the captures.
pub fn estimate(
    model: &Model,
    model_sha256: &str,
    harmful: &Dataset,
    harmless: &Dataset,
    heldout: Option<(&Dataset, &Dataset)>,
    cfg: &EstimateConfig,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Estimate> {
    let (h_ids, pos) = prompt_ids(model, &texts(harmful))?;
    let (l_ids, _) = prompt_ids(model, &texts(harmless))?;
    let (h_ids, l_ids) = if cfg.filter {
        filter_by_refusal(model, h_ids, l_ids, cfg.batch_size)?
    } else {
        (h_ids, l_ids)
    };
    let [hacts, lacts] = capture_sets(
        model,
        [&h_ids, &l_ids],
        pos.post_len,
        cfg.batch_size,
        "prompts captured",
        progress,
    )?;
    let c = difference_of_means(&hacts, &lacts, None, None);
    let k = pos.post_len + 1;
    let first = &h_ids[0];
    let positions = (0..k)
        .map(|p| PositionName {
            index: p,
            name: match p {
                0 => "t_inst".into(),
                p if p == k - 1 => format!("post_{p} (t_post)"),
                p => format!("post_{p}"),
            },
            token: model
                .tok
                .decode(&[first[first.len() - k + p]], false)
                .unwrap_or_default(),
        })
        .collect();
    let meta = CarriersMeta {
        architecture: model.cfg.arch.gguf_name().into(),
        d: model.cfg.hidden,
        filter: cfg.filter,
        harmful: SetRecord::of(harmful),
        harmless: SetRecord::of(harmless),
        kept: Kept {
            harmful: h_ids.len(),
            harmless: l_ids.len(),
        },
        model: model.source.display().to_string(),
        model_sha256: model_sha256.to_string(),
        n_layer: c.n_layer(),
        n_pos: c.n_pos(),
        positions,
        safegeo_version: env!("CARGO_PKG_VERSION").to_string(),
        seed: cfg.seed,
        tensors: BTreeMap::from([
            ("refusal", "[L, P, d] mean harmful - mean harmless"),
            (
                "refusal_orth",
                "[L, P, d] unit, orthogonal to the harmless mean",
            ),
            ("harmfulness", "[L, d] refusal at t_inst"),
            ("mean_harmful", "[L, P, d]"),
            ("mean_harmless", "[L, P, d]"),
        ]),
    };
    let t_post = c.n_pos() - 1;
    let heldout = match heldout {
        Some((h, l)) => {
            let (h_ids, hp) = prompt_ids(model, &texts(h))?;
            let (l_ids, lp) = prompt_ids(model, &texts(l))?;
            if hp.post_len != pos.post_len || lp.post_len != pos.post_len {
                return Err(Error::Invalid(
                    "the held-out prompts' post-instruction positions differ from the carriers'"
                        .into(),
                ));
            }
            let [ha, la] = capture_sets(
                model,
                [&h_ids, &l_ids],
                pos.post_len,
                cfg.batch_size,
                "held-out prompts captured",
                progress,
            )?;
            Some(held_out(&c, [&hacts, &lacts], [&ha, &la], [h, l], t_post))
        }
        None => None,
    };
    // One set of bootstrap resamples serves every interval.
    let resampled = resample_carriers(&hacts, &lacts, cfg.bootstrap, cfg.seed);
    let geometry = GeometryReport {
        belief_t_inst: beliefs(&c, &hacts, &lacts, 0),
        belief_t_post: beliefs(&c, &hacts, &lacts, t_post),
        coupling_abs_cos_t_post: coupling_curve(&c, t_post),
        effective_rank: effective_ranks_of(&c, &resampled, cfg.stacks),
        coupling_abs_cos: coupling_intervals(&c, &resampled),
        heldout,
        note: GEOMETRY_NOTE,
        refusal_norms: c
            .refusal
            .iter()
            .map(|per| per.iter().map(|r| linalg::norm(r)).collect())
            .collect(),
    };
    Ok(Estimate {
        carriers: c,
        meta,
        geometry,
        bootstrap_refusal: resampled.into_iter().map(|r| r.refusal).collect(),
    })
}

fn beliefs(c: &Carriers, harmful: &Activations, harmless: &Activations, p: usize) -> Beliefs {
    let of = |acts: &Activations| -> Vec<f64> {
        acts.acts.iter().map(|x| belief_score(x, c, p)).collect()
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (h, l) = (of(harmful), of(harmless));
    Beliefs {
        harmful_mean: mean(&h),
        harmless_mean: mean(&l),
        harmful: h,
        harmless: l,
    }
}

/// The highest TPR at FPR 0.2, then the highest AUC.
fn best(sep: &[Separation]) -> Option<Separation> {
    sep.iter()
        .max_by(|x, y| {
            (x.tpr_at_fpr_0_2, x.auc)
                .partial_cmp(&(y.tpr_at_fpr_0_2, y.auc))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .cloned()
}

fn at(sep: &[Separation], p: usize, f: fn(&Separation) -> f64) -> Vec<f64> {
    sep.iter().filter(|s| s.pos == p).map(f).collect()
}

fn held_out(
    c: &Carriers,
    [hacts, lacts]: [&Activations; 2],
    [ha, la]: [&Activations; 2],
    [h, l]: [&Dataset; 2],
    t_post: usize,
) -> HeldOut {
    let sep = separation(c, ha, la);
    let probe = probe_separation(hacts, lacts, ha, la);
    let auc: fn(&Separation) -> f64 = |s| s.auc;
    let tpr: fn(&Separation) -> f64 = |s| s.tpr_at_fpr_0_2;
    HeldOut {
        auc_t_inst: at(&sep, 0, auc),
        auc_t_post: at(&sep, t_post, auc),
        best: best(&sep),
        harmful: SetRecord::of(h),
        harmless: SetRecord::of(l),
        note: HELDOUT_NOTE,
        probe: ProbeReport {
            auc_t_post: at(&probe, t_post, auc),
            best: best(&probe),
            l2: PROBE_L2,
            tpr_at_fpr_0_2_t_post: at(&probe, t_post, tpr),
            all: probe,
        },
        tpr_at_fpr_0_2_t_inst: at(&sep, 0, tpr),
        tpr_at_fpr_0_2_t_post: at(&sep, t_post, tpr),
        all: sep,
    }
}

impl Estimate {
    /// Write `carriers.safetensors`, `carriers.json` and `geometry.json` into `out` (and
    /// `refusal.npy`, `harmfulness.npy` with `npy`).
    pub fn write(&self, out: &Path, npy: bool) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| safegeo_data::Error::io(out, e))?;
        let m = &self.meta;
        let positions: Vec<&str> = m.positions.iter().map(|p| p.name.as_str()).collect();
        let metadata = [
            ("model", m.model.clone()),
            ("model_sha256", m.model_sha256.clone()),
            ("positions", positions.join(", ")),
            ("safegeo_version", m.safegeo_version.clone()),
        ];
        store::save(&self.carriers, &metadata, &out.join("carriers.safetensors"))?;
        store::save_bootstrap(&self.bootstrap_refusal, &out.join("bootstrap.safetensors"))?;
        if npy {
            let t = store::to_tensors(&self.carriers)?;
            store::write_npy(&t["refusal"], &out.join("refusal.npy"))?;
            store::write_npy(&t["harmfulness"], &out.join("harmfulness.npy"))?;
        }
        write_sorted_json(&out.join("carriers.json"), &self.meta)?;
        write_sorted_json(&out.join("geometry.json"), &self.geometry)
    }
}

/// Pretty JSON with every object's keys sorted, as every other result file of the project.
pub fn write_sorted_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let value = serde_json::to_value(v).map_err(|e| Error::Invalid(e.to_string()))?;
    let text = serde_json::to_string_pretty(&value).map_err(|e| Error::Invalid(e.to_string()))?;
    safegeo_runtime::files::write_atomic(path, text.as_bytes())?;
    Ok(())
}
