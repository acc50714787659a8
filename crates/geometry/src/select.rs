//! Selection of the admissible refusal carrier (SPEC.md section 2). For each candidate `(l, p)`:
//! `bypass` = mean refusal score on harmful validation prompts under directional ablation of
//! `r^`, `induce` = mean refusal score on harmless validation prompts under activation addition of
//! `r` at layer `l`, `kl` = mean KL(P_base || P_ablated) at the last position on harmless
//! validation prompts. Admissible: finite, `kl <= kl_max`, `induce > 0`, `l < cutoff * L`; the
//! admissible candidate with the lowest `bypass` is selected.
//!
//! Cost control (ours), successive halving: every candidate is first measured on
//! `prescreen_prompts` harmful and as many harmless prompts in one small ablated forward (bypass
//! and KL, no induce); the `screen_keep` lowest in bypass among those whose KL is within
//! `prescreen_kl_slack * kl_max` (then the rest, lowest bypass first) get all three measurements
//! on `screen_prompts` prompts per set; the `finalists` with the lowest screened bypass that pass
//! the screen are re-measured on all validation prompts, and only full measurements decide the
//! selection. The prescreen's KL keeps directions that lower the refusal score only by wrecking
//! the model (they have the lowest bypass of all) from crowding out admissible ones.
//!
//! For scale, the KL of ablating `random_directions` random unit directions on the screening
//! prompts is measured too: it tells whether the KL bound is tight for this model at all.
use crate::linalg;
use crate::Result;
use candle_core::{DType, Device, Tensor, D};
use safegeo_data::jsonl::{journaled, Journal};
use safegeo_data::judges::refusal_score::{refusal_scores, score_from_logprobs};
use safegeo_runtime::{Hooks, Intervention, Model, NoHooks, Observer, Scope};
use serde::Serialize;

/// Knobs of the selection; defaults follow Arditi et al. with the cut-off of SPEC.md (ours).
#[derive(Debug, Clone, Serialize)]
pub struct SelectConfig {
    /// Maximum KL on harmless prompts under ablation.
    pub kl_max: f64,
    /// Candidates must lie in layers `< cutoff * L` (Arditi: 0.8; ours: 1.0 = none).
    pub layer_cutoff: f64,
    /// Harmful and harmless prompts (each) of the bypass-and-KL first stage (0 = no such stage).
    pub prescreen_prompts: usize,
    /// First-stage KL above `prescreen_kl_slack * kl_max` sends a candidate behind the others
    /// (the slack allows for the few prompts).
    pub prescreen_kl_slack: f64,
    /// Candidates (lowest first-stage bypass) that go on to the screen.
    pub screen_keep: usize,
    /// Prompts per set in the screening stage.
    pub screen_prompts: usize,
    /// Candidates measured on all validation prompts.
    pub finalists: usize,
    /// Prompts per forward pass.
    pub batch: usize,
    /// Only these position indices are candidates (`None` = every position).
    pub positions: Option<Vec<usize>>,
    /// Random unit directions whose ablation KL is measured for scale (0 = none).
    pub random_directions: usize,
    /// Seed of the random directions.
    pub seed: u64,
}

impl Default for SelectConfig {
    fn default() -> Self {
        Self {
            kl_max: 0.1,
            layer_cutoff: 1.0,
            prescreen_prompts: 2,
            prescreen_kl_slack: 3.0,
            screen_keep: 48,
            screen_prompts: 8,
            finalists: 16,
            batch: 32,
            positions: None,
            random_directions: 4,
            seed: 0,
        }
    }
}

/// Measurements of one candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// Layer.
    pub layer: usize,
    /// Position index (0 = `t_inst`, then post-instruction).
    pub pos: usize,
    /// Mean refusal score on harmful prompts under ablation.
    pub bypass: f64,
    /// Mean refusal score on harmless prompts under addition.
    pub induce: f64,
    /// Mean KL on harmless prompts under ablation.
    pub kl: f64,
    /// The last stage measured: `prescreen` (bypass and KL), `screen` or `full`; `zero` for a
    /// zero carrier, never measured.
    pub stage: &'static str,
    /// Passed every test.
    pub admissible: bool,
    /// Tests failed (`nan`, `kl`, `induce`, `layer`, `zero`; none after the prescreen alone).
    pub failed: Vec<&'static str>,
}

/// Base-model measurements shared by every candidate.
pub struct Baseline {
    /// Mean refusal score on harmful prompts without edits.
    pub harmful_score: f64,
    /// Mean refusal score on harmless prompts without edits.
    pub harmless_score: f64,
    harmless_logp: Vec<Tensor>,
    /// KL of ablating random unit directions on the screening harmless prompts (for scale).
    pub random_direction_kl: Vec<f64>,
}

/// Last-position log-probabilities `(b, V)` in f64, one tensor per chunk of `batch` prompts.
pub fn last_logprobs(
    model: &Model,
    ids: &[Vec<u32>],
    batch: usize,
    obs: &mut dyn Observer,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(batch.max(1)) {
        let logits = model.last_logits(chunk, obs)?.to_dtype(DType::F64)?;
        out.push(safegeo_runtime::log_softmax_last(&logits)?);
    }
    Ok(out)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Scores and log-probabilities of the unedited model.
pub fn baseline(
    model: &Model,
    harmful: &[Vec<u32>],
    harmless: &[Vec<u32>],
    refusal_ids: &[u32],
    batch: usize,
) -> Result<Baseline> {
    Ok(Baseline {
        harmful_score: mean(&refusal_scores(
            model,
            harmful,
            refusal_ids,
            batch,
            &mut NoHooks,
        )?),
        harmless_score: mean(&refusal_scores(
            model,
            harmless,
            refusal_ids,
            batch,
            &mut NoHooks,
        )?),
        harmless_logp: last_logprobs(model, harmless, batch, &mut NoHooks)?,
        random_direction_kl: Vec::new(),
    })
}

/// Mean over rows of KL(P_base || P_edited) from log-probabilities in matching chunks.
fn mean_kl(base: &[Tensor], edited: &[Tensor]) -> Result<f64> {
    let mut kls = Vec::new();
    for (b, a) in base.iter().zip(edited) {
        let rows = b.dim(0)?;
        let b = b.narrow(0, 0, rows.min(a.dim(0)?))?;
        // KL(P || Q) = sum P (log P - log Q), per row.
        let kl = (b.exp()? * (&b - a)?)?.sum(D::Minus1)?;
        kls.extend(kl.to_vec1::<f64>()?);
    }
    Ok(mean(&kls))
}

/// KL of ablating `r` on `harmless` (whose unedited log-probabilities `base` holds).
fn ablation_kl(
    model: &Model,
    r: &[f64],
    harmless: &[Vec<u32>],
    base: &Baseline,
    batch: usize,
) -> Result<f64> {
    let mut ablate = ablation(model, r)?;
    mean_kl(
        &base.harmless_logp,
        &last_logprobs(model, harmless, batch, &mut ablate)?,
    )
}

/// The first stage: bypass on `harmful` and KL on `harmless` (whose unedited log-probabilities
/// are `harmless_logp`) under ablation of `r^`, in one forward over both sets.
fn prescreen(
    model: &Model,
    r: &[f64],
    harmful: &[Vec<u32>],
    harmless: &[Vec<u32>],
    harmless_logp: &Tensor,
    refusal_ids: &[u32],
) -> Result<(f64, f64)> {
    let mut ablate = ablation(model, r)?;
    let rows: Vec<Vec<u32>> = harmful.iter().chain(harmless).cloned().collect();
    let logp = last_logprobs(model, &rows, rows.len(), &mut ablate)?.remove(0);
    let n = harmful.len();
    let scores: Vec<f64> = logp
        .narrow(0, 0, n)?
        .to_vec2::<f64>()?
        .iter()
        .map(|row| score_from_logprobs(row, refusal_ids))
        .collect();
    let kl = mean_kl(
        std::slice::from_ref(harmless_logp),
        &[logp.narrow(0, n, harmless.len())?],
    )?;
    Ok((mean(&scores), kl))
}

fn to_tensor(v: &[f64], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        v.len(),
        dev,
    )?)
}

/// Directional ablation of `r^` at every layer and position.
fn ablation(model: &Model, r: &[f64]) -> Result<Hooks> {
    let unit = to_tensor(&linalg::normalize(r), &model.device)?;
    Ok(Hooks::with_interventions(vec![Intervention::Ablate {
        direction: unit,
        layers: None,
        scope: Scope::All,
    }]))
}

/// Measure one candidate direction `r` (unnormalized) at layer `layer` on the given prompt sets.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    model: &Model,
    r: &[f64],
    layer: usize,
    harmful: &[Vec<u32>],
    harmless: &[Vec<u32>],
    base: &Baseline,
    refusal_ids: &[u32],
    batch: usize,
) -> Result<(f64, f64, f64)> {
    let dev = &model.device;
    let mut ablate = ablation(model, r)?;
    let bypass = mean(&refusal_scores(
        model,
        harmful,
        refusal_ids,
        batch,
        &mut ablate,
    )?);
    let mut add = Hooks::with_interventions(vec![Intervention::Add {
        vector: to_tensor(r, dev)?,
        coef: 1.0,
        layer,
        scope: Scope::All,
    }]);
    let induce = mean(&refusal_scores(
        model,
        harmless,
        refusal_ids,
        batch,
        &mut add,
    )?);
    Ok((
        bypass,
        induce,
        ablation_kl(model, r, harmless, base, batch)?,
    ))
}

/// The admissibility tests a measurement fails.
pub fn failed_tests(
    bypass: f64,
    induce: f64,
    kl: f64,
    layer: usize,
    n_layer: usize,
    cfg: &SelectConfig,
) -> Vec<&'static str> {
    let mut f = Vec::new();
    if !(bypass.is_finite() && induce.is_finite() && kl.is_finite()) {
        f.push("nan");
    }
    if kl > cfg.kl_max {
        f.push("kl");
    }
    if induce <= 0.0 {
        f.push("induce");
    }
    if (layer as f64) >= cfg.layer_cutoff * n_layer as f64 {
        f.push("layer");
    }
    f
}

/// Prescreen every candidate, screen the best, re-measure finalists on all prompts, and pick the
/// admissible one with the lowest bypass. `progress(done, total)` after every measurement. With
/// a `journal`, every measurement is recorded as it finishes and measurements already in it are
/// not redone, so a killed selection resumes where it stopped (and gives the same result).
#[allow(clippy::too_many_arguments)]
pub fn select(
    model: &Model,
    carriers: &[Vec<Vec<f64>>],
    harmful: &[Vec<u32>],
    harmless: &[Vec<u32>],
    refusal_ids: &[u32],
    cfg: &SelectConfig,
    mut journal: Option<&mut Journal<[f64; 3]>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Candidate>, Option<usize>, Baseline)> {
    if harmful.is_empty() || harmless.is_empty() {
        return Err(crate::Error::Invalid(
            "selection needs harmful and harmless validation prompts; a set is empty".into(),
        ));
    }
    let n_layer = carriers.len();
    let s = cfg.screen_prompts.max(1);
    let (hs, ls) = (
        &harmful[..s.min(harmful.len())],
        &harmless[..s.min(harmless.len())],
    );
    let wanted = |p: usize| cfg.positions.as_ref().is_none_or(|ps| ps.contains(&p));
    let all: Vec<(usize, usize)> = (0..n_layer)
        .flat_map(|l| (0..carriers[l].len()).map(move |p| (l, p)))
        .filter(|&(_, p)| wanted(p))
        .collect();
    if all.is_empty() {
        return Err(crate::Error::Invalid(format!(
            "no candidate position left: positions {:?} are outside 0..{}",
            cfg.positions,
            carriers[0].len()
        )));
    }
    // A zero carrier (e.g. at the embeddings, where the post-instruction tokens are the same for
    // every prompt) has no direction to ablate; it is listed but never measured.
    let largest = all
        .iter()
        .map(|&(l, p)| linalg::norm(&carriers[l][p]))
        .fold(0.0f64, f64::max);
    let is_zero = |&(l, p): &(usize, usize)| linalg::norm(&carriers[l][p]) <= 1e-9 * largest;
    let (zero, all): (Vec<_>, Vec<_>) = all.into_iter().partition(is_zero);
    if all.is_empty() {
        return Err(crate::Error::Invalid(
            "every carrier is zero: the harmful and harmless activations are identical".into(),
        ));
    }
    let prescreen = cfg.prescreen_prompts > 0 && cfg.screen_keep < all.len();
    let n_screen = if prescreen {
        cfg.screen_keep
    } else {
        all.len()
    };
    let total = if prescreen { all.len() } else { 0 } + n_screen + cfg.finalists.min(n_screen);
    let mut done = 0;
    let mut cands: Vec<Candidate> = all
        .iter()
        .map(|&(layer, pos)| Candidate {
            layer,
            pos,
            bypass: f64::NAN,
            induce: f64::NAN,
            kl: f64::NAN,
            stage: "prescreen",
            admissible: false,
            failed: Vec::new(),
        })
        .collect();
    // Stage 1: bypass and KL on a few prompts; the lowest bypass within the KL slack go on.
    let mut screened: Vec<usize> = (0..cands.len()).collect();
    if prescreen {
        let k = cfg.prescreen_prompts;
        let (hp, lp) = (
            &harmful[..k.min(harmful.len())],
            &harmless[..k.min(harmless.len())],
        );
        let lp_base = last_logprobs(model, lp, lp.len(), &mut NoHooks)?.remove(0);
        for c in cands.iter_mut() {
            let (l, p) = (c.layer, c.pos);
            let [b, _, kl] = journaled(&mut journal, &format!("prescreen/{l}/{p}"), || {
                let (b, kl) =
                    self::prescreen(model, &carriers[l][p], hp, lp, &lp_base, refusal_ids)?;
                Ok::<_, crate::Error>([b, 0.0, kl])
            })?;
            (c.bypass, c.kl) = (b, kl);
            done += 1;
            progress(done, total);
        }
        screened = keep_for_screen(&cands, cfg);
    }
    // Stage 2: all three measurements on `screen_prompts` prompts per set.
    let base_screen = baseline(model, hs, ls, refusal_ids, cfg.batch)?;
    let mut run = Staged {
        model,
        carriers,
        refusal_ids,
        cfg,
        journal,
    };
    for &i in &screened {
        cands[i] = run.measure("screen", &cands[i], hs, ls, &base_screen)?;
        done += 1;
        progress(done, total);
    }
    // Finalists: pass the screen (KL may be re-checked), lowest bypass first; fill with the rest.
    let order = lowest_bypass_first(&cands, screened, |c| !c.failed.is_empty());
    let mut base = baseline(model, harmful, harmless, refusal_ids, cfg.batch)?;
    let d = carriers[0][0].len();
    let controls = crate::sweep::random_controls(d, cfg.random_directions, 1.0, cfg.seed);
    for (k, r) in controls.iter().enumerate() {
        let [kl, _, _] = journaled(&mut run.journal, &format!("random/{k}"), || {
            Ok::<_, crate::Error>([
                ablation_kl(model, r, ls, &base_screen, cfg.batch)?,
                0.0,
                0.0,
            ])
        })?;
        base.random_direction_kl.push(kl);
    }
    for i in order.into_iter().take(cfg.finalists) {
        cands[i] = run.measure("full", &cands[i], harmful, harmless, &base)?;
        done += 1;
        progress(done, total);
    }
    cands.extend(zero.into_iter().map(|(layer, pos)| Candidate {
        layer,
        pos,
        bypass: f64::NAN,
        induce: f64::NAN,
        kl: f64::NAN,
        stage: "zero",
        admissible: false,
        failed: vec!["zero"],
    }));
    cands.sort_by_key(|c| (c.layer, c.pos));
    let best = (0..cands.len())
        .filter(|&i| cands[i].admissible)
        .min_by(|&a, &b| cands[a].bypass.total_cmp(&cands[b].bypass));
    Ok((cands, best, base))
}

/// Candidate indices ordered by bypass, lowest first, with every `demoted` one behind every other.
fn lowest_bypass_first(
    cands: &[Candidate],
    mut idx: Vec<usize>,
    demoted: impl Fn(&Candidate) -> bool,
) -> Vec<usize> {
    idx.sort_by(|&a, &b| {
        (demoted(&cands[a]).cmp(&demoted(&cands[b])))
            .then(cands[a].bypass.total_cmp(&cands[b].bypass))
    });
    idx
}

/// The prescreened candidates that go on to the screen, in index order: the lowest bypass among
/// those whose KL is within `prescreen_kl_slack * kl_max`, then the rest by bypass.
fn keep_for_screen(cands: &[Candidate], cfg: &SelectConfig) -> Vec<usize> {
    let wrecks = |c: &Candidate| c.kl > cfg.prescreen_kl_slack * cfg.kl_max;
    let mut order = lowest_bypass_first(cands, (0..cands.len()).collect(), wrecks);
    order.truncate(cfg.screen_keep);
    order.sort_unstable();
    order
}

/// Journaled measurements of candidates at one stage.
struct Staged<'a, 'j> {
    model: &'a Model,
    carriers: &'a [Vec<Vec<f64>>],
    refusal_ids: &'a [u32],
    cfg: &'a SelectConfig,
    journal: Option<&'j mut Journal<[f64; 3]>>,
}

impl Staged<'_, '_> {
    /// Bypass, induce and KL of candidate `c` on the given prompts, as stage `stage` (only a
    /// `full` measurement can be admissible).
    fn measure(
        &mut self,
        stage: &'static str,
        c: &Candidate,
        harmful: &[Vec<u32>],
        harmless: &[Vec<u32>],
        base: &Baseline,
    ) -> Result<Candidate> {
        let (l, p) = (c.layer, c.pos);
        let [bypass, induce, kl] = journaled(
            &mut self.journal,
            &format!("{stage}/{l}/{p}"),
            || -> Result<_> {
                let (b, i, k) = measure(
                    self.model,
                    &self.carriers[l][p],
                    l,
                    harmful,
                    harmless,
                    base,
                    self.refusal_ids,
                    self.cfg.batch,
                )?;
                Ok([b, i, k])
            },
        )?;
        let failed = failed_tests(bypass, induce, kl, l, self.carriers.len(), self.cfg);
        Ok(Candidate {
            layer: l,
            pos: p,
            bypass,
            induce,
            kl,
            stage,
            admissible: stage == "full" && failed.is_empty(),
            failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(bypass: f64, kl: f64) -> Candidate {
        Candidate {
            layer: 0,
            pos: 0,
            bypass,
            induce: f64::NAN,
            kl,
            stage: "prescreen",
            admissible: false,
            failed: Vec::new(),
        }
    }

    #[test]
    fn the_screen_takes_the_lowest_bypass_within_the_kl_slack_before_any_wreck() {
        let cfg = SelectConfig {
            kl_max: 0.1,
            prescreen_kl_slack: 3.0,
            screen_keep: 3,
            ..Default::default()
        };
        // 0 and 3 wreck the model (KL > 0.3) with the lowest bypass of all; 1, 2, 4 are within
        // the slack.
        let cands = [
            pre(-9.0, 2.0),
            pre(-1.0, 0.05),
            pre(-2.0, 0.3),
            pre(-8.0, 0.31),
            pre(0.5, 0.0),
        ];
        assert_eq!(keep_for_screen(&cands, &cfg), vec![1, 2, 4]);
        // With room left, wrecks follow, lowest bypass first.
        let cfg = SelectConfig {
            screen_keep: 4,
            ..cfg
        };
        assert_eq!(keep_for_screen(&cands, &cfg), vec![0, 1, 2, 4]);
    }
}
