//! Selection of the admissible refusal carrier (docs/protocol.md §2). For each candidate `(l, p)`:
//! `bypass` = mean refusal score on harmful validation prompts under directional ablation of
//! `r^`, `induce` = mean refusal score on harmless validation prompts under activation addition of
//! `r` at layer `l`, `kl` = mean KL(P_base || P_ablated) at the last position on harmless
//! validation prompts. Admissible: finite, `kl <= kl_max`, `induce > 0`, `l < int(cutoff * L)`; the
//! admissible candidate with the lowest `bypass` is selected.
//!
//! Cost control (ours), successive halving: every candidate is first measured on
//! `prescreen_prompts` harmful and as many harmless prompts in one small ablated forward (bypass
//! and KL, no induce); the `screen_keep` lowest in bypass among those whose KL is within
//! `prescreen_kl_slack * kl_max` (then the rest, lowest bypass first) are measured on
//! `screen_prompts` prompts per set; the `finalists` with the lowest screened bypass that pass
//! the screen are re-measured on all validation prompts, and only full measurements decide the
//! selection. At the screen and the final stage induce and KL come first, and bypass is measured
//! only for candidates that pass every test (`bypass_all` for all): one that fails cannot be
//! selected whatever its bypass. The prescreen's KL keeps directions that lower the refusal score only by wrecking
//! the model (they have the lowest bypass of all) from crowding out admissible ones.
//!
//! Candidates whose prompts fit `batch` rows together are measured in one forward, each ablating
//! (or adding) its own direction in its own group of rows: the prescreen's 4-prompt forwards
//! become 64-row ones, with bigger matmuls and fewer per-op overheads, and prompts run in
//! length buckets ([`crate::buckets`]); values equal one forward per candidate up to float
//! rounding (tested).
//!
//! For scale, the KL of ablating `random_directions` random unit directions on the screening
//! prompts is measured too: it tells whether the KL bound is tight for this model at all.
use crate::buckets::by_length;
use crate::linalg;
use crate::Result;
use candle_core::{DType, Tensor, D};
use safegeo_data::jsonl::{journaled_many, Journal};
use safegeo_data::judges::refusal_score::score_from_logprobs;
use safegeo_runtime::{Hooks, Intervention, Model, NoHooks, Observer, Scope, Tape};
use serde::Serialize;

/// Knobs of the selection; defaults follow Arditi et al. with the cut-off of docs/protocol.md §2 (ours).
#[derive(Debug, Clone, Serialize)]
pub struct SelectConfig {
    /// Maximum KL on harmless prompts under ablation.
    pub kl_max: f64,
    /// Candidates must lie in layers `< int(cutoff * L)` (Arditi: 0.8; ours: 1.0 = none).
    pub layer_cutoff: f64,
    /// Let `t_inst` carriers be candidates too (with `positions` unset).
    pub t_inst: bool,
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
    /// Rows per forward pass; candidates whose prompts fit together share one, each editing its
    /// own group of rows.
    pub batch: usize,
    /// Only these position indices are candidates (`None` = every position).
    pub positions: Option<Vec<usize>>,
    /// Measure bypass also for screened and final candidates that already failed a test
    /// (they cannot be selected; by default their bypass is skipped and left NaN).
    pub bypass_all: bool,
    /// Random unit directions whose ablation KL on the harmless validation prompts is the
    /// model's own floor (at least 16 for the floor-relative rule; 0 = none, and no such rule).
    pub random_directions: usize,
    /// Seed of the random directions.
    pub seed: u64,
}

impl Default for SelectConfig {
    fn default() -> Self {
        Self {
            kl_max: 0.1,
            layer_cutoff: 1.0,
            t_inst: false,
            prescreen_prompts: 2,
            prescreen_kl_slack: 3.0,
            screen_keep: 48,
            screen_prompts: 8,
            finalists: 16,
            batch: 64,
            positions: None,
            bypass_all: false,
            random_directions: 16,
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
    /// zero carrier and `cutoff` for one at or above the layer cut-off, never measured.
    pub stage: &'static str,
    /// Passed every test of the absolute rule (docs/protocol.md §3: KL at most `kl_max`).
    pub admissible: bool,
    /// Tests of the absolute rule failed (`nan`, `kl`, `induce`, `layer`, `zero`; none after
    /// the prescreen alone).
    pub failed: Vec<&'static str>,
    /// Passed every test of the floor-relative rule: KL at most the 95th percentile of the
    /// random-direction KL, induce > 0, bypass below the baseline refusal score.
    pub floor_admissible: bool,
    /// Tests of the floor-relative rule failed (`nan`, `floor-kl`, `induce`, `bypass`,
    /// `layer`, `zero`); measured finalists only.
    pub floor_failed: Vec<&'static str>,
}

impl Candidate {
    /// The rule under which this candidate is selectable, the absolute one first.
    pub fn rule(&self) -> Option<&'static str> {
        if self.admissible {
            Some("absolute")
        } else if self.floor_admissible {
            Some("floor-relative")
        } else {
            None
        }
    }
}

/// Base-model measurements shared by every candidate.
pub struct Baseline {
    /// Mean refusal score on harmful prompts without edits.
    pub harmful_score: f64,
    /// Mean refusal score on harmless prompts without edits.
    pub harmless_score: f64,
    /// Last-position log-probabilities `(n, V)` of the harmless prompts.
    harmless_logp: Tensor,
    /// The harmless prompts' unedited passes, one per length bucket (prompt indices, tape):
    /// `induce` restarts from them.
    harmless_tapes: Vec<(Vec<usize>, Tape)>,
    /// KL of ablating each random unit direction on the harmless validation prompts: the
    /// model's own floor.
    pub random_direction_kl: Vec<f64>,
}

impl Baseline {
    /// The floor-relative rule's KL bound: the 95th percentile of the random-direction KL
    /// (`None` without random directions).
    pub fn floor_kl_p95(&self) -> Option<f64> {
        let mut v = self.random_direction_kl.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Some(v[((0.95 * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)])
    }

    /// The mean random-direction KL.
    pub fn floor_kl_mean(&self) -> Option<f64> {
        let v = &self.random_direction_kl;
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// Last-position log-probabilities `(n, V)` in f64 of `ids`, in length buckets of at most
/// `batch` prompts ([`crate::buckets::length_buckets`]), rows in the prompts' order.
pub fn last_logprobs(
    model: &Model,
    ids: &[Vec<u32>],
    batch: usize,
    obs: &mut dyn Observer,
) -> Result<Tensor> {
    let (order, buckets) = by_length(ids, batch);
    let mut pieces = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        let rows: Vec<Vec<u32>> = order[bucket].iter().map(|&i| ids[i].clone()).collect();
        let logits = model.last_logits(&rows, obs)?.to_dtype(DType::F64)?;
        pieces.push(safegeo_runtime::log_softmax_last(&logits)?);
    }
    in_order(&Tensor::cat(&pieces, 0)?, &order)
}

/// Rows of `sorted` (row `j` belongs to prompt `order[j]`) back in the prompts' order.
fn in_order(sorted: &Tensor, order: &[usize]) -> Result<Tensor> {
    let mut inverse = vec![0u32; order.len()];
    for (j, &i) in order.iter().enumerate() {
        inverse[i] = j as u32;
    }
    let inverse = Tensor::new(inverse.as_slice(), sorted.device())?;
    Ok(sorted.index_select(&inverse, 0)?)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Mean refusal score of the rows of log-probabilities `logp: (n, V)`.
fn mean_score(logp: &Tensor, refusal_ids: &[u32]) -> Result<f64> {
    let scores: Vec<f64> = logp
        .to_vec2::<f64>()?
        .iter()
        .map(|row| score_from_logprobs(row, refusal_ids))
        .collect();
    Ok(mean(&scores))
}

/// Scores and log-probabilities of the unedited model.
pub fn baseline(
    model: &Model,
    harmful: &[Vec<u32>],
    harmless: &[Vec<u32>],
    refusal_ids: &[u32],
    batch: usize,
) -> Result<Baseline> {
    let harmful_logp = last_logprobs(model, harmful, batch, &mut NoHooks)?;
    // One unedited pass over the harmless prompts gives their log-probabilities and the tapes.
    let (order, buckets) = by_length(harmless, batch);
    let mut pieces = Vec::with_capacity(buckets.len());
    let mut harmless_tapes = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        let idx = order[bucket].to_vec();
        let rows: Vec<Vec<u32>> = idx.iter().map(|&i| harmless[i].clone()).collect();
        let (tape, logits) = model.tape(&rows)?;
        pieces.push(safegeo_runtime::log_softmax_last(
            &logits.to_dtype(DType::F64)?,
        )?);
        harmless_tapes.push((idx, tape));
    }
    let harmless_logp = in_order(&Tensor::cat(&pieces, 0)?, &order)?;
    Ok(Baseline {
        harmful_score: mean_score(&harmful_logp, refusal_ids)?,
        harmless_score: mean_score(&harmless_logp, refusal_ids)?,
        harmless_logp,
        harmless_tapes,
        random_direction_kl: Vec::new(),
    })
}

/// Mean over rows of KL(P_base || P_edited) from log-probabilities `(n, V)`.
fn mean_kl(base: &Tensor, edited: &Tensor) -> Result<f64> {
    // KL(P || Q) = sum P (log P - log Q), per row.
    let kl = (base.exp()? * (base - edited)?)?.sum(D::Minus1)?;
    Ok(mean(&kl.to_vec1::<f64>()?))
}

/// Last-position log-probabilities `(n, V)` of `prompts` under each of `k` edits, one tensor
/// per edit. `edit(range)` builds the observer for the edits in `range`, each editing its own
/// group of rows; edits share a forward (bigger, faster matmuls) while their prompts fit
/// `batch` rows together. Prompts run in [`crate::buckets::length_buckets`], so little is spent on padding.
fn edited_logprobs(
    model: &Model,
    prompts: &[Vec<u32>],
    k: usize,
    batch: usize,
    edit: impl Fn(std::ops::Range<usize>) -> Result<Hooks>,
) -> Result<Vec<Tensor>> {
    let (order, buckets) = by_length(prompts, batch);
    // pieces[e]: edit e's log-probabilities, bucket after bucket (prompts in `order`).
    let mut pieces: Vec<Vec<Tensor>> = vec![Vec::new(); k];
    for bucket in buckets {
        let rows: Vec<Vec<u32>> = order[bucket].iter().map(|&i| prompts[i].clone()).collect();
        let n = rows.len();
        let per_forward = (batch.max(1) / n).max(1);
        for start in (0..k).step_by(per_forward) {
            let range = start..(start + per_forward).min(k);
            let mut hooks = edit(range.clone())?;
            let logits = model.last_logits_grouped(&rows, range.len(), &mut hooks)?;
            let logp = safegeo_runtime::log_softmax_last(&logits.to_dtype(DType::F64)?)?;
            for (i, e) in range.enumerate() {
                pieces[e].push(logp.narrow(0, i * n, n)?);
            }
        }
    }
    pieces
        .iter()
        .map(|p| in_order(&Tensor::cat(p, 0)?, &order))
        .collect()
}

/// Directional ablation of each of `rs` (normalised here) at every layer and position, one
/// per row group.
fn ablations(model: &Model, rs: &[&[f64]]) -> Result<Hooks> {
    let units: Vec<f32> = rs
        .iter()
        .flat_map(|r| linalg::normalize(r))
        .map(|x| x as f32)
        .collect();
    let directions = Tensor::from_vec(units, (rs.len(), model.cfg.hidden), &model.device)?;
    Ok(Hooks::with_interventions(vec![
        Intervention::AblateGroups {
            directions,
            scope: Scope::All,
        },
    ]))
}

/// Activation addition of each candidate's `r` at its layer, one per row group.
fn additions(model: &Model, cands: &[(&[f64], usize)]) -> Result<Hooks> {
    let vectors: Vec<f32> = cands
        .iter()
        .flat_map(|(r, _)| r.iter().map(|&x| x as f32))
        .collect();
    let vectors = Tensor::from_vec(vectors, (cands.len(), model.cfg.hidden), &model.device)?;
    Ok(Hooks::with_interventions(vec![Intervention::AddGroups {
        vectors,
        layers: cands.iter().map(|&(_, l)| l).collect(),
        scope: Scope::All,
    }]))
}

/// The first stage for each of `rs`: bypass on `harmful` and KL on `harmless` (whose unedited
/// log-probabilities are `harmless_logp`) under ablation of `r^`, in one forward over both
/// sets. Returns `[bypass, 0, kl]` per direction.
fn prescreen(
    model: &Model,
    rs: &[&[f64]],
    harmful: &[Vec<u32>],
    harmless: &[Vec<u32>],
    harmless_logp: &Tensor,
    refusal_ids: &[u32],
    batch: usize,
) -> Result<Vec<[f64; 3]>> {
    let rows: Vec<Vec<u32>> = harmful.iter().chain(harmless).cloned().collect();
    let n = harmful.len();
    edited_logprobs(model, &rows, rs.len(), batch, |g| ablations(model, &rs[g]))?
        .iter()
        .map(|logp| {
            let bypass = mean_score(&logp.narrow(0, 0, n)?, refusal_ids)?;
            let kl = mean_kl(harmless_logp, &logp.narrow(0, n, harmless.len())?)?;
            Ok([bypass, 0.0, kl])
        })
        .collect()
}

/// `kl`: KL of ablating each of `rs` on `harmless` (whose unedited log-probabilities `base`
/// holds).
pub fn ablation_kls(
    model: &Model,
    rs: &[&[f64]],
    harmless: &[Vec<u32>],
    base: &Baseline,
    batch: usize,
) -> Result<Vec<f64>> {
    let ablated = edited_logprobs(model, harmless, rs.len(), batch, |g| {
        ablations(model, &rs[g])
    })?;
    ablated
        .iter()
        .map(|logp| mean_kl(&base.harmless_logp, logp))
        .collect()
}

/// `induce`: mean refusal score on `harmless` under addition of each candidate's `r`
/// (unnormalized) at its layer. Below that layer the stream is the unedited one, so every
/// forward restarts from the baseline's recorded unedited pass ([`Model::tape`]) at the lowest
/// layer among its candidates (sorted by layer to keep that close to each).
pub fn induce(
    model: &Model,
    cands: &[(&[f64], usize)],
    harmless: &[Vec<u32>],
    base: &Baseline,
    refusal_ids: &[u32],
    batch: usize,
) -> Result<Vec<f64>> {
    let taped: usize = base.harmless_tapes.iter().map(|(idx, _)| idx.len()).sum();
    if taped != harmless.len() {
        return Err(crate::Error::Invalid(format!(
            "the baseline holds {taped} harmless prompts, induce was given {}",
            harmless.len()
        )));
    }
    let mut by_layer: Vec<usize> = (0..cands.len()).collect();
    by_layer.sort_by_key(|&c| cands[c].1);
    let mut pieces: Vec<Vec<Tensor>> = vec![Vec::new(); cands.len()];
    for (idx, tape) in &base.harmless_tapes {
        let rows: Vec<Vec<u32>> = idx.iter().map(|&i| harmless[i].clone()).collect();
        let n = rows.len();
        for chunk in by_layer.chunks((batch.max(1) / n).max(1)) {
            let group: Vec<(&[f64], usize)> = chunk.iter().map(|&c| cands[c]).collect();
            let first = group.iter().map(|&(_, l)| l).min().unwrap_or(0);
            let mut hooks = additions(model, &group)?;
            let logits =
                model.last_logits_grouped_from(&rows, tape, group.len(), first, &mut hooks)?;
            let logp = safegeo_runtime::log_softmax_last(&logits.to_dtype(DType::F64)?)?;
            for (i, &c) in chunk.iter().enumerate() {
                pieces[c].push(logp.narrow(0, i * n, n)?);
            }
        }
    }
    // A mean over prompts: their order does not matter.
    pieces
        .iter()
        .map(|p| mean_score(&Tensor::cat(p, 0)?, refusal_ids))
        .collect()
}

/// `bypass`: mean refusal score on `harmful` under ablation of each of `rs`.
pub fn bypass(
    model: &Model,
    rs: &[&[f64]],
    harmful: &[Vec<u32>],
    refusal_ids: &[u32],
    batch: usize,
) -> Result<Vec<f64>> {
    let ablated = edited_logprobs(model, harmful, rs.len(), batch, |g| {
        ablations(model, &rs[g])
    })?;
    ablated
        .iter()
        .map(|logp| mean_score(logp, refusal_ids))
        .collect()
}

/// Tests of the floor-relative rule that a measurement fails: KL above the random-direction
/// floor's 95th percentile, induce not above 0, bypass not below the baseline harmful score.
pub fn floor_failed_tests(
    bypass: f64,
    induce: f64,
    kl: f64,
    floor_p95: f64,
    baseline_harmful: f64,
) -> Vec<&'static str> {
    let mut f = Vec::new();
    if !(bypass.is_finite() && induce.is_finite() && kl.is_finite()) {
        f.push("nan");
    }
    if kl > floor_p95 {
        f.push("floor-kl");
    }
    if induce <= 0.0 {
        f.push("induce");
    }
    if bypass >= baseline_harmful {
        f.push("bypass");
    }
    f
}

/// The admissibility tests a measurement fails (the layer cut-off is applied before anything is
/// measured).
pub fn failed_tests(bypass: f64, induce: f64, kl: f64, cfg: &SelectConfig) -> Vec<&'static str> {
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
    journal: Option<&mut Journal<[f64; 3]>>,
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
    // `t_inst` (position 0) is the harmfulness carrier's position, where coupling is 1 by
    // construction: a refusal candidate only when asked for.
    let wanted = |p: usize| match &cfg.positions {
        Some(ps) => ps.contains(&p),
        None => p > 0 || cfg.t_inst,
    };
    let all: Vec<(usize, usize)> = (0..n_layer)
        .flat_map(|l| (0..carriers[l].len()).map(move |p| (l, p)))
        .filter(|&(_, p)| wanted(p))
        .collect();
    if all.is_empty() {
        return Err(crate::Error::Invalid(match &cfg.positions {
            Some(ps) => format!(
                "no candidate position left: positions {ps:?} are outside 0..{}",
                carriers[0].len()
            ),
            None => "the carriers have no post-instruction position, only t_inst, which is a refusal candidate only when asked for (--t-inst)".into(),
        }));
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
    // A candidate at or above the layer cut-off cannot be selected: it is listed, never measured,
    // so the screen and the finalists go to candidates that can.
    let (above, all): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|&(l, _)| l >= cutoff_layer(cfg.layer_cutoff, n_layer));
    if all.is_empty() {
        return Err(crate::Error::Invalid(format!(
            "layer cut-off {}: no candidate lies below layer {} of {n_layer}; raise the cut-off",
            cfg.layer_cutoff,
            cutoff_layer(cfg.layer_cutoff, n_layer)
        )));
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
            floor_admissible: false,
            floor_failed: Vec::new(),
        })
        .collect();
    // Stage 1: bypass and KL on a few prompts; the lowest bypass within the KL slack go on.
    let mut screened: Vec<usize> = (0..cands.len()).collect();
    let mut run = Staged {
        model,
        carriers,
        refusal_ids,
        cfg,
        journal,
        floor: None,
    };
    let mut step = |n: usize| {
        done += n;
        progress(done, total);
    };
    if prescreen {
        let k = cfg.prescreen_prompts;
        let (hp, lp) = (
            &harmful[..k.min(harmful.len())],
            &harmless[..k.min(harmless.len())],
        );
        let lp_base = last_logprobs(model, lp, cfg.batch, &mut NoHooks)?;
        for group in screened.chunks(chunk_of(cfg.batch, hp.len() + lp.len())) {
            let keys: Vec<String> = group
                .iter()
                .map(|&i| format!("prescreen/{}/{}", cands[i].layer, cands[i].pos))
                .collect();
            let got = journaled_many(&mut run.journal, &keys, || {
                let rs: Vec<&[f64]> = group
                    .iter()
                    .map(|&i| carriers[cands[i].layer][cands[i].pos].as_slice())
                    .collect();
                self::prescreen(model, &rs, hp, lp, &lp_base, refusal_ids, cfg.batch)
            })?;
            for (&i, [b, _, kl]) in group.iter().zip(got) {
                (cands[i].bypass, cands[i].kl) = (b, kl);
            }
            step(group.len());
        }
        screened = keep_for_screen(&cands, cfg);
    }
    // The model's own floor: the KL of ablating random unit directions on the harmless
    // validation prompts, the finalists' KL's like.
    let mut base = baseline(model, harmful, harmless, refusal_ids, cfg.batch)?;
    let d = carriers[0][0].len();
    let controls = crate::sweep::random_controls(d, cfg.random_directions, 1.0, cfg.seed);
    let keys: Vec<String> = (0..controls.len()).map(|k| format!("floor/{k}")).collect();
    let kls = journaled_many(&mut run.journal, &keys, || {
        let rs: Vec<&[f64]> = controls.iter().map(Vec::as_slice).collect();
        let kls = ablation_kls(model, &rs, harmless, &base, cfg.batch)?;
        Ok::<_, crate::Error>(kls.into_iter().map(|kl| [kl, 0.0, 0.0]).collect())
    })?;
    base.random_direction_kl = kls.iter().map(|[kl, _, _]| *kl).collect();
    run.floor = base.floor_kl_p95().map(|p95| (p95, base.harmful_score));
    // Stage 2: all three measurements on `screen_prompts` prompts per set.
    let base_screen = baseline(model, hs, ls, refusal_ids, cfg.batch)?;
    let prescreen_bypass: Vec<f64> = cands.iter().map(|c| c.bypass).collect();
    run.measure(
        "screen",
        &mut cands,
        &screened,
        hs,
        ls,
        &base_screen,
        &mut step,
    )?;
    // Finalists: pass the screen (KL may be re-checked), lowest bypass first; fill with the rest
    // in the order of their prescreen bypass (the screen measured none for them).
    let rank: Vec<f64> = (0..cands.len())
        .map(|i| match cands[i].bypass {
            b if b.is_nan() => prescreen_bypass[i],
            b => b,
        })
        .collect();
    let order = lowest_bypass_first(screened, |i| rank[i], |i| !cands[i].failed.is_empty());
    let finalists: Vec<usize> = order.into_iter().take(cfg.finalists).collect();
    run.measure(
        "full", &mut cands, &finalists, harmful, harmless, &base, &mut step,
    )?;
    let unmeasured = |(layer, pos), stage, failed| Candidate {
        layer,
        pos,
        bypass: f64::NAN,
        induce: f64::NAN,
        kl: f64::NAN,
        stage,
        admissible: false,
        failed: vec![failed],
        floor_admissible: false,
        floor_failed: vec![failed],
    };
    cands.extend(zero.into_iter().map(|c| unmeasured(c, "zero", "zero")));
    cands.extend(above.into_iter().map(|c| unmeasured(c, "cutoff", "layer")));
    cands.sort_by_key(|c| (c.layer, c.pos));
    // The absolute rule's choice when it has one, else the floor-relative rule's.
    let best_by = |ok: fn(&Candidate) -> bool| {
        (0..cands.len())
            .filter(|&i| ok(&cands[i]))
            .min_by(|&a, &b| cands[a].bypass.total_cmp(&cands[b].bypass))
    };
    let best = best_by(|c| c.admissible).or_else(|| best_by(|c| c.floor_admissible));
    Ok((cands, best, base))
}

/// The first layer a cut-off `fraction` leaves out of `n_layer`: Arditi et al.'s integer rule,
/// `layer < int(fraction * n_layer)` (0.8 of 32 layers keeps 0-24).
pub fn cutoff_layer(fraction: f64, n_layer: usize) -> usize {
    // The epsilon keeps 1/n of n layers at 1 where the product rounds to 0.999...
    (fraction * n_layer as f64 + 1e-9).floor() as usize
}

/// The candidate a cut-off `fraction` selects among measured ones: the lowest bypass of those
/// that pass every test but the layer one, below the cut-off. `None` when nothing qualifies;
/// only meaningful for a cut-off at or above the one the candidates were measured under.
pub fn best_below(cands: &[Candidate], fraction: f64, n_layer: usize) -> Option<usize> {
    let limit = cutoff_layer(fraction, n_layer);
    (0..cands.len())
        .filter(|&i| {
            let c = &cands[i];
            c.stage == "full" && c.layer < limit && c.failed.iter().all(|f| *f == "layer")
        })
        .min_by(|&a, &b| cands[a].bypass.total_cmp(&cands[b].bypass))
}

/// Candidates measured (and journaled) together when each needs `rows` prompts: enough to fill
/// forwards of `batch` rows once the prompts are split by length, and at most `4 * batch` rows
/// of log-probabilities held at once.
fn chunk_of(batch: usize, rows: usize) -> usize {
    (4 * batch / rows.max(1)).max(1)
}

/// Candidate indices ordered by `bypass(i)`, lowest first, with every `demoted` one behind every
/// other.
fn lowest_bypass_first(
    mut idx: Vec<usize>,
    bypass: impl Fn(usize) -> f64,
    demoted: impl Fn(usize) -> bool,
) -> Vec<usize> {
    idx.sort_by(|&a, &b| (demoted(a).cmp(&demoted(b))).then(bypass(a).total_cmp(&bypass(b))));
    idx
}

/// The prescreened candidates that go on to the screen, in index order: the lowest bypass among
/// those whose KL is within `prescreen_kl_slack * kl_max`, then the rest by bypass.
fn keep_for_screen(cands: &[Candidate], cfg: &SelectConfig) -> Vec<usize> {
    let wrecks = |i: usize| cands[i].kl > cfg.prescreen_kl_slack * cfg.kl_max;
    let mut order = lowest_bypass_first((0..cands.len()).collect(), |i| cands[i].bypass, wrecks);
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
    /// The floor-relative rule's bounds: the random-direction KL's 95th percentile and the
    /// baseline harmful refusal score.
    floor: Option<(f64, f64)>,
}

impl Staged<'_, '_> {
    /// Induce and KL of candidates `which` on the harmless prompts, then bypass on the
    /// harmful ones for those that pass every test (or all, with `bypass_all`), as stage
    /// `stage` (only a `full` measurement can be admissible). A candidate that fails a test
    /// cannot be selected whatever its bypass, so its bypass stays NaN. Candidates share
    /// forwards; `step(n)` after every group of `n`.
    #[allow(clippy::too_many_arguments)]
    fn measure(
        &mut self,
        stage: &'static str,
        cands: &mut [Candidate],
        which: &[usize],
        harmful: &[Vec<u32>],
        harmless: &[Vec<u32>],
        base: &Baseline,
        step: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let (model, refusal_ids, batch) = (self.model, self.refusal_ids, self.cfg.batch);
        let carriers = self.carriers;
        let key = |what: &str, c: &Candidate| format!("{stage}/{what}/{}/{}", c.layer, c.pos);
        for group in which.chunks(chunk_of(batch, 2 * harmless.len())) {
            let keys: Vec<String> = group.iter().map(|&i| key("tests", &cands[i])).collect();
            let tests = journaled_many(&mut self.journal, &keys, || {
                let todo: Vec<(&[f64], usize)> = group
                    .iter()
                    .map(|&i| {
                        let c = &cands[i];
                        (carriers[c.layer][c.pos].as_slice(), c.layer)
                    })
                    .collect();
                let rs: Vec<&[f64]> = todo.iter().map(|&(r, _)| r).collect();
                let kls = ablation_kls(model, &rs, harmless, base, batch)?;
                let induces = induce(model, &todo, harmless, base, refusal_ids, batch)?;
                Ok::<_, crate::Error>(
                    induces
                        .into_iter()
                        .zip(kls)
                        .map(|(i, k)| [i, k, 0.0])
                        .collect(),
                )
            })?;
            let floor = self.floor;
            // Bypass is not measured yet: only the other tests count here (and the floor
            // rule's only for finalists).
            let floor_tests = |induce: f64, kl: f64| match floor {
                Some((p95, _)) if stage == "full" => floor_failed_tests(0.0, induce, kl, p95, 1.0),
                _ => vec!["floor-kl"],
            };
            for (&i, [induce, kl, _]) in group.iter().zip(tests) {
                let c = &mut cands[i];
                (c.bypass, c.induce, c.kl, c.stage) = (f64::NAN, induce, kl, stage);
                c.failed = failed_tests(0.0, induce, kl, self.cfg);
                c.floor_failed = floor_tests(induce, kl);
                c.admissible = false;
                c.floor_admissible = false;
            }
            let need: Vec<usize> = group
                .iter()
                .copied()
                .filter(|&i| {
                    self.cfg.bypass_all
                        || cands[i].failed.is_empty()
                        || cands[i].floor_failed.is_empty()
                })
                .collect();
            if !need.is_empty() {
                let keys: Vec<String> = need.iter().map(|&i| key("bypass", &cands[i])).collect();
                let got = journaled_many(&mut self.journal, &keys, || {
                    let rs: Vec<&[f64]> = need
                        .iter()
                        .map(|&i| carriers[cands[i].layer][cands[i].pos].as_slice())
                        .collect();
                    let b = bypass(model, &rs, harmful, refusal_ids, batch)?;
                    Ok::<_, crate::Error>(b.into_iter().map(|b| [b, 0.0, 0.0]).collect())
                })?;
                for (&i, [b, _, _]) in need.iter().zip(got) {
                    let c = &mut cands[i];
                    c.bypass = b;
                    c.failed = failed_tests(b, c.induce, c.kl, self.cfg);
                    c.admissible = stage == "full" && c.failed.is_empty();
                    if let (Some((p95, harmful_score)), "full") = (floor, stage) {
                        c.floor_failed = floor_failed_tests(b, c.induce, c.kl, p95, harmful_score);
                        c.floor_admissible = c.floor_failed.is_empty();
                    }
                }
            }
            step(group.len());
        }
        Ok(())
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
            floor_admissible: false,
            floor_failed: Vec::new(),
        }
    }

    #[test]
    fn edited_logprobs_come_back_in_the_prompts_order() {
        use safegeo_runtime::testing::tiny_model;
        let m = tiny_model(safegeo_runtime::Arch::Llama, 3, DType::F32).unwrap();
        // Lengths out of order, a shared prefix, and a batch small enough to need buckets.
        let prompts: Vec<Vec<u32>> = [9usize, 2, 14, 5, 2, 30]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (0..8)
                    .chain((0..n).map(|j| 10 + ((i + j) % 20)))
                    .map(|t| t as u32)
                    .collect()
            })
            .collect();
        let r = vec![0.5f64; m.cfg.hidden];
        let got = edited_logprobs(&m, &prompts, 2, 4, |g| {
            ablations(&m, &vec![r.as_slice(); g.len()])
        })
        .unwrap();
        let mut h = ablations(&m, &[r.as_slice()]).unwrap();
        let plain = last_logprobs(&m, &prompts, 4, &mut h).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let mut h = ablations(&m, &[r.as_slice()]).unwrap();
            let alone = last_logprobs(&m, std::slice::from_ref(p), 1, &mut h).unwrap();
            for e in got.iter().chain([&plain]) {
                let d = (e.narrow(0, i, 1).unwrap() - &alone)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(d < 1e-4, "prompt {i}: {d}");
            }
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

    #[test]
    fn the_layer_cutoff_follows_arditis_integer_rule_and_each_cutoff_has_its_verdict() {
        assert_eq!(cutoff_layer(0.8, 32), 25, "int(25.6): layers 0-24");
        assert_eq!(cutoff_layer(0.8, 30), 24);
        assert_eq!(cutoff_layer(1.0, 30), 30);
        assert_eq!(cutoff_layer(1.0 / 49.0, 49), 1);
        let cand = |layer, bypass, failed: Vec<&'static str>| Candidate {
            layer,
            pos: 1,
            bypass,
            induce: 1.0,
            kl: 0.01,
            stage: "full",
            admissible: failed.is_empty(),
            failed,
            floor_admissible: false,
            floor_failed: vec![],
        };
        let cands = vec![
            cand(3, -1.0, vec![]),
            cand(9, -4.0, vec![]),
            cand(5, -9.0, vec!["kl"]),
        ];
        assert_eq!(best_below(&cands, 1.0, 10), Some(1), "no cut-off: layer 9");
        assert_eq!(best_below(&cands, 0.8, 10), Some(0), "0.8: below layer 8");
        assert_eq!(best_below(&cands, 0.3, 10), None);
    }
}
