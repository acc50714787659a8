//! GCG (Zou et al. 2023) with nanoGCG's feature set and defaults.
//!
//! Each step:
//! 1. gradient of the target loss w.r.t. the one-hot matrix of the suffix tokens (inputs enter as
//!    `onehot @ W_embed`; weights are frozen so no weight gradient is computed), normalized per
//!    position;
//! 2. per position the `topk` tokens of `-grad` (non-ASCII and special tokens excluded);
//! 3. `search_width` candidates, each replacing `n_replace` random positions with a random top-k
//!    token; candidates whose decode-encode round trip changes the ids are dropped;
//! 4. every candidate's loss; the best enters the buffer if it beats its worst; the next suffix is
//!    the buffer's best. Optionally stop early when greedy decoding already yields the target.
//!
//! Speed: the template prefix before the suffix is computed once (nanoGCG's prefix cache), and
//! since a candidate equals the current suffix up to its first replaced position, candidates are
//! grouped by that position and each group starts from the current suffix's keys and values
//! there (exact: the same losses as a full forward, about a third fewer tokens per step). Logits
//! are computed only at the target positions.
use crate::{
    prefix_cache, target_loss_tensor, target_losses, Error, Result, SplitPrompt, TargetLoss,
};
use candle_core::{DType, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use safegeo_runtime::{KvCache, Layout, LogitsAt, Model, Observer, Phase, Tok};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Every knob of the attack; defaults are nanoGCG's (`GCGConfig`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GcgConfig {
    /// Optimization steps.
    pub num_steps: usize,
    /// Initial suffix.
    pub optim_str_init: String,
    /// Candidates per step.
    pub search_width: usize,
    /// Candidates per forward pass (0 = a whole group at once).
    pub batch_size: usize,
    /// Top-k tokens per position from the gradient.
    pub topk: usize,
    /// Positions replaced per candidate.
    pub n_replace: usize,
    /// Best suffixes kept; 0 = nanoGCG's default: the next suffix is always the step's best
    /// candidate, even when it is worse than the previous one.
    pub buffer_size: usize,
    /// Use the mellowmax loss instead of cross-entropy.
    pub use_mellowmax: bool,
    /// Mellowmax temperature.
    pub mellowmax_alpha: f64,
    /// Stop once greedy decoding (teacher-forced) reproduces the target.
    pub early_stop: bool,
    /// Reuse the prefix's keys and values (off = full forward per candidate; same numbers).
    pub use_prefix_cache: bool,
    /// Allow non-ASCII tokens in the suffix.
    pub allow_non_ascii: bool,
    /// Drop candidates that do not survive a decode-encode round trip.
    pub filter_ids: bool,
    /// Put a space before the target.
    pub add_space_before_target: bool,
    /// Seed; step `s` draws from a generator seeded by `(seed, s)`, so a resumed run is exact.
    pub seed: u64,
}

impl Default for GcgConfig {
    fn default() -> Self {
        Self {
            num_steps: 250,
            optim_str_init: "x x x x x x x x x x x x x x x x x x x x".into(),
            search_width: 512,
            batch_size: 0,
            topk: 256,
            n_replace: 1,
            buffer_size: 0,
            use_mellowmax: false,
            mellowmax_alpha: 1.0,
            early_stop: false,
            use_prefix_cache: true,
            allow_non_ascii: false,
            filter_ids: true,
            add_space_before_target: false,
            seed: 0,
        }
    }
}

impl GcgConfig {
    fn loss(&self) -> TargetLoss {
        if self.use_mellowmax {
            TargetLoss::Mellowmax(self.mellowmax_alpha)
        } else {
            TargetLoss::CrossEntropy
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Invalid(format!("GCG: {what}")));
        if self.search_width == 0 || self.topk == 0 {
            return bad("search_width and topk must be at least 1");
        }
        if self.n_replace == 0 {
            return bad("n_replace must be at least 1");
        }
        if self.use_mellowmax && self.mellowmax_alpha <= 0.0 {
            return bad("mellowmax_alpha must be positive");
        }
        Ok(())
    }
}

/// Progress and outcome of one attack; also the resumable state (written after every step).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GcgState {
    /// Steps completed.
    pub step: usize,
    /// Buffer of `(loss, suffix ids)`, best first; the next step starts from its best.
    pub buffer: Vec<(f64, Vec<u32>)>,
    /// The lowest-loss suffix seen so far `(loss, ids)`.
    pub best: (f64, Vec<u32>),
    /// Lowest loss seen after each step (monotone non-increasing).
    pub best_losses: Vec<f64>,
    /// Best candidate's loss at each step (nanoGCG's `losses`).
    pub step_losses: Vec<f64>,
    /// Whether early stopping fired.
    pub stopped_early: bool,
    /// The candidate that made early stopping fire `(loss, ids)`: greedy decoding of it yields
    /// the target, so it is the attack's result even if the buffer holds a lower loss.
    #[serde(default)]
    pub success: Option<(f64, Vec<u32>)>,
}

impl GcgState {
    /// The suffix the next step starts from (the buffer's best).
    pub fn current_ids(&self) -> &[u32] {
        &self.buffer[0].1
    }

    /// The lowest loss seen.
    pub fn best_loss(&self) -> f64 {
        self.best.0
    }

    /// The attack's result: the successful candidate after an early stop, else the lowest-loss
    /// suffix seen.
    pub fn result_ids(&self) -> &[u32] {
        self.success.as_ref().map_or(&self.best.1, |s| &s.1)
    }

    fn add(&mut self, loss: f64, ids: Vec<u32>, size: usize) {
        if self.best.1.is_empty() || loss < self.best.0 {
            self.best = (loss, ids.clone());
        }
        if size == 0 {
            self.buffer = vec![(loss, ids)];
            return;
        }
        if self.buffer.len() < size {
            self.buffer.push((loss, ids));
        } else if loss < self.buffer.last().map_or(f64::INFINITY, |b| b.0) {
            *self.buffer.last_mut().expect("non-empty") = (loss, ids);
        } else {
            return;
        }
        self.buffer.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
}

/// Tokens GCG may not place in the suffix: special tokens, and unless allowed, tokens whose text
/// is not printable ASCII (nanoGCG's `get_nonascii_toks`).
pub fn disallowed_tokens(tok: &Tok, vocab: usize, allow_non_ascii: bool) -> Result<Vec<bool>> {
    let mut bad = vec![false; vocab];
    for (id, slot) in bad.iter_mut().enumerate() {
        let s = tok.decode(&[id as u32], false)?;
        let printable = s.chars().all(|c| c.is_ascii() && !c.is_ascii_control());
        if !allow_non_ascii && !printable {
            *slot = true;
        }
    }
    for (id, t) in tok.inner().get_added_tokens_decoder() {
        if t.special && (id as usize) < vocab {
            bad[id as usize] = true;
        }
    }
    for id in [tok.bos_id, tok.eos_id, Some(tok.pad_id)]
        .into_iter()
        .flatten()
    {
        if (id as usize) < vocab {
            bad[id as usize] = true;
        }
    }
    for &id in &tok.stop_ids {
        if (id as usize) < vocab {
            bad[id as usize] = true;
        }
    }
    Ok(bad)
}

/// The attack against one behaviour.
pub struct Gcg<'a> {
    model: &'a Model,
    prompt: &'a SplitPrompt,
    target: Vec<u32>,
    cfg: GcgConfig,
    disallowed: std::sync::Arc<[bool]>,
}

impl<'a> Gcg<'a> {
    /// Prepare an attack on `prompt` toward `target`.
    pub fn new(
        model: &'a Model,
        prompt: &'a SplitPrompt,
        target: &str,
        cfg: GcgConfig,
    ) -> Result<Self> {
        let disallowed = disallowed_tokens(&model.tok, model.cfg.vocab, cfg.allow_non_ascii)?;
        Self::with_disallowed(model, prompt, target, cfg, disallowed.into())
    }

    /// [`Gcg::new`] with the disallowed-token mask already computed (it decodes the whole
    /// vocabulary, so callers that start many attacks, like R2D2, compute it once).
    pub fn with_disallowed(
        model: &'a Model,
        prompt: &'a SplitPrompt,
        target: &str,
        cfg: GcgConfig,
        disallowed: std::sync::Arc<[bool]>,
    ) -> Result<Self> {
        cfg.check()?;
        let text = if cfg.add_space_before_target {
            format!(" {target}")
        } else {
            target.to_string()
        };
        let target = model.tok.encode(&text, false)?;
        if target.is_empty() {
            return Err(Error::Invalid("GCG: the target is empty".into()));
        }
        if disallowed.len() != model.cfg.vocab {
            return Err(Error::Invalid(format!(
                "GCG: the disallowed-token mask has {} entries, the vocabulary {}",
                disallowed.len(),
                model.cfg.vocab
            )));
        }
        Ok(Self {
            model,
            prompt,
            target,
            cfg,
            disallowed,
        })
    }

    /// Target token ids.
    pub fn target_ids(&self) -> &[u32] {
        &self.target
    }

    /// The initial state: the init string in the buffer with its loss.
    pub fn init(&self, obs: &mut dyn Observer) -> Result<GcgState> {
        let ids = self.model.tok.encode(&self.cfg.optim_str_init, false)?;
        if ids.is_empty() {
            return Err(Error::Invalid("GCG: optim_str_init is empty".into()));
        }
        let loss = self.losses(std::slice::from_ref(&ids), &ids, obs)?.0[0];
        let mut st = GcgState::default();
        st.add(loss, ids, self.cfg.buffer_size);
        Ok(st)
    }

    /// The loss as a function of a (relaxed) one-hot suffix matrix `(n, V)`: inputs enter as
    /// `onehot @ W_embed`, everything else is fixed.
    pub fn onehot_loss(&self, onehot: &Tensor, obs: &mut dyn Observer) -> Result<Tensor> {
        let m = self.model;
        let dev = &m.device;
        let suffix = m.scale_embeddings(onehot.matmul(&m.embed)?.unsqueeze(0)?)?;
        let n = self.target.len();
        let rest: Vec<u32> = self
            .prompt
            .after
            .iter()
            .chain(&self.target[..n - 1])
            .copied()
            .collect();
        let rest = m.embed_ids(&Tensor::new(rest.as_slice(), dev)?.unsqueeze(0)?)?;
        let x = Tensor::cat(&[&suffix, &rest], 1)?;
        let mut cache = prefix_cache(m, &self.prompt.before, obs)?;
        let logits = m
            .forward_embeds(
                x,
                &Layout::dense(1),
                Some(&mut cache),
                LogitsAt::Tail(n),
                Phase::Prompt,
                true,
                obs,
            )?
            .expect("logits requested");
        Ok(target_loss_tensor(&logits, &self.target, self.cfg.loss())?.sum_all()?)
    }

    /// Gradient of the loss w.r.t. the one-hot matrix of `ids`, `(n, V)`, unnormalized.
    pub fn raw_token_gradient(&self, ids: &[u32], obs: &mut dyn Observer) -> Result<Tensor> {
        let m = self.model;
        let v = m.cfg.vocab;
        let mut oh = vec![0f32; ids.len() * v];
        for (i, &t) in ids.iter().enumerate() {
            oh[i * v + t as usize] = 1.0;
        }
        let onehot = Var::from_tensor(
            &Tensor::from_vec(oh, (ids.len(), v), &m.device)?.to_dtype(m.embed.dtype())?,
        )?;
        let grads = safegeo_runtime::backward(&self.onehot_loss(onehot.as_tensor(), obs)?)?;
        Ok(grads
            .get(onehot.as_tensor())
            .ok_or_else(|| Error::Invalid("GCG: no gradient reached the suffix".into()))?
            .clone())
    }

    /// [`Gcg::raw_token_gradient`] with each row scaled to unit norm (nanoGCG).
    pub fn token_gradient(&self, ids: &[u32], obs: &mut dyn Observer) -> Result<Tensor> {
        let g = self.raw_token_gradient(ids, obs)?.to_dtype(DType::F32)?;
        let norm = g.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        Ok(g.broadcast_div(&(norm + 1e-12)?)?)
    }

    /// `search_width` candidates from the gradient (nanoGCG's `sample_ids_from_grad`).
    pub fn sample_candidates(
        &self,
        ids: &[u32],
        grad: &Tensor,
        step: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let n = ids.len();
        let grad = grad.to_vec2::<f32>()?;
        let mut topk: Vec<Vec<u32>> = Vec::with_capacity(n);
        for row in &grad {
            let mut order: Vec<u32> = (0..row.len() as u32)
                .filter(|&t| !self.disallowed[t as usize])
                .collect();
            let k = self.cfg.topk.min(order.len());
            if k == 0 {
                return Err(Error::Invalid("GCG: every token is disallowed".into()));
            }
            // Largest -grad first; select_nth keeps this linear in the vocabulary.
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                row[a as usize].total_cmp(&row[b as usize])
            });
            order.truncate(k);
            topk.push(order);
        }
        let mut rng = step_rng(self.cfg.seed, step);
        let replace = self.cfg.n_replace.min(n);
        let mut positions: Vec<usize> = (0..n).collect();
        Ok((0..self.cfg.search_width)
            .map(|_| {
                let mut cand = ids.to_vec();
                positions.shuffle(&mut rng);
                for &p in &positions[..replace] {
                    cand[p] = topk[p][rng.gen_range(0..topk[p].len())];
                }
                cand
            })
            .collect())
    }

    /// Keep candidates whose text re-encodes to the same ids (nanoGCG's `filter_ids`).
    pub fn filter(&self, cands: Vec<Vec<u32>>) -> Result<Vec<Vec<u32>>> {
        if !self.cfg.filter_ids {
            return Ok(cands);
        }
        let tok = &self.model.tok;
        let mut keep = Vec::with_capacity(cands.len());
        for c in cands {
            if tok.encode(&tok.decode(&c, false)?, false)? == c {
                keep.push(c);
            }
        }
        if keep.is_empty() {
            return Err(Error::Invalid(
                "GCG: no candidate survived the decode-encode filter; try another optim_str_init \
                 or filter_ids = false"
                    .into(),
            ));
        }
        Ok(keep)
    }

    /// Losses of candidate suffixes (and whether each already yields the target greedily).
    /// `current` is the suffix the candidates were drawn from: a candidate shares its keys and
    /// values up to its first differing position.
    pub fn losses(
        &self,
        cands: &[Vec<u32>],
        current: &[u32],
        obs: &mut dyn Observer,
    ) -> Result<(Vec<f64>, Vec<bool>)> {
        let m = self.model;
        let before = &self.prompt.before;
        // Jobs of (cached prefix, ids to lead each row with, first suffix position, candidates).
        let jobs: Vec<(KvCache, &[u32], usize, Vec<usize>)> = if self.cfg.use_prefix_cache {
            // Keys and values of `before ++ current`, viewed at every prefix length.
            let whole: Vec<u32> = before.iter().chain(current).copied().collect();
            let cache = prefix_cache(m, &whole, obs)?;
            let first_diff = |c: &Vec<u32>| -> usize {
                if c.len() != current.len() {
                    return 0;
                }
                let same = c.iter().zip(current).take_while(|(a, b)| a == b).count();
                same.min(c.len() - 1)
            };
            let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
            for (i, c) in cands.iter().enumerate() {
                groups.entry(first_diff(c)).or_default().push(i);
            }
            // Neighbouring groups merge (at the shortest prefix among them) until a pass has
            // MIN_PASS_ROWS rows: a pass has fixed costs that a handful of rows does not repay
            // (R2D2's 64 candidates over 10 positions: 4.2 s per step in ~10 passes of ~6 rows,
            // 3.7 s in one; at width 512, 23.4-25.5 s against 25.4-26.1 s unmerged). Groups
            // above it stay apart: merging 128-row buckets at width 512 was slower (32 s vs
            // 28 s per step), the extra tokens costing more than the batching saves.
            let mut merged: Vec<(usize, Vec<usize>)> = Vec::new();
            for (p, members) in groups {
                match merged.last_mut() {
                    Some((_, run)) if run.len() < MIN_PASS_ROWS => run.extend(members),
                    _ => merged.push((p, members)),
                }
            }
            merged
                .into_iter()
                .map(|(p, members)| (cache.prefix(before.len() + p), &[][..], p, members))
                .collect()
        } else {
            let empty = KvCache::new(m.cfg.n_layer).freeze();
            vec![(empty, before.as_slice(), 0, (0..cands.len()).collect())]
        };
        let mut losses = vec![0.0; cands.len()];
        let mut hits = vec![false; cands.len()];
        for (prefix, lead, from, members) in jobs {
            for idx in chunks(members.len(), self.cfg.batch_size) {
                let idx: Vec<usize> = idx.iter().map(|&j| members[j]).collect();
                let rows: Vec<Vec<u32>> = idx
                    .iter()
                    .map(|&i| {
                        let tail = cands[i][from..].iter().chain(&self.prompt.after);
                        lead.iter().chain(tail).copied().collect()
                    })
                    .collect();
                let (l, h) = target_losses(m, &prefix, &rows, &self.target, self.cfg.loss(), obs)?;
                for (j, &i) in idx.iter().enumerate() {
                    losses[i] = l[j];
                    hits[i] = h[j];
                }
            }
        }
        Ok((losses, hits))
    }

    /// One GCG step on `state`.
    pub fn step(&self, state: &mut GcgState, obs: &mut dyn Observer) -> Result<()> {
        let current = state.current_ids().to_vec();
        let t0 = std::time::Instant::now();
        let grad = self.token_gradient(&current, obs)?;
        let t1 = std::time::Instant::now();
        let cands = self.filter(self.sample_candidates(&current, &grad, state.step)?)?;
        let t2 = std::time::Instant::now();
        let (losses, hits) = self.losses(&cands, &current, obs)?;
        tracing::debug!(
            "GCG step {}: gradient {:.2}s, sampling+filter {:.2}s ({} kept), losses {:.2}s",
            state.step,
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            cands.len(),
            t2.elapsed().as_secs_f64()
        );
        let best = (0..losses.len())
            .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
            .expect("at least one candidate");
        state.add(losses[best], cands[best].clone(), self.cfg.buffer_size);
        state.step += 1;
        state.step_losses.push(losses[best]);
        state.best_losses.push(state.best_loss());
        if self.cfg.early_stop {
            if let Some(i) = (0..hits.len())
                .filter(|&i| hits[i])
                .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
            {
                state.stopped_early = true;
                state.success = Some((losses[i], cands[i].clone()));
            }
        }
        Ok(())
    }

    /// Run to `num_steps` (or early stop), resuming from and saving to `state_file` if given.
    /// `progress(step, best_loss)` is called after every step.
    pub fn run(
        &self,
        state_file: Option<&Path>,
        obs: &mut dyn Observer,
        progress: &mut dyn FnMut(usize, f64),
    ) -> Result<GcgState> {
        let mut state = match crate::load_state(state_file, "GCG")? {
            Some(s) => s,
            None => self.init(obs)?,
        };
        while state.step < self.cfg.num_steps && !state.stopped_early {
            self.step(&mut state, obs)?;
            crate::save_state(state_file, &state)?;
            progress(state.step, state.best_loss());
        }
        Ok(state)
    }
}

/// Fewest candidates a grouped loss pass takes before neighbouring prefix groups are merged.
const MIN_PASS_ROWS: usize = 32;

fn step_rng(seed: u64, step: usize) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Index chunks of `n` items, `size` at a time (0 = one chunk).
fn chunks(n: usize, size: usize) -> Vec<Vec<usize>> {
    let size = if size == 0 { n.max(1) } else { size };
    (0..n)
        .collect::<Vec<_>>()
        .chunks(size)
        .map(<[usize]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safegeo_runtime::testing::tiny_model;
    use safegeo_runtime::{Arch, NoHooks};

    fn setup() -> (Model, SplitPrompt) {
        let m = tiny_model(Arch::Llama, 3, DType::F32).unwrap();
        let p = SplitPrompt {
            before: vec![1, 20, 21, 22],
            after: vec![23, 24],
            messages: vec![],
        };
        (m, p)
    }

    #[test]
    fn grouped_candidate_losses_equal_full_forwards() {
        let (m, p) = setup();
        let cfg = GcgConfig {
            search_width: 24,
            topk: 8,
            n_replace: 2,
            filter_ids: false,
            batch_size: 5,
            optim_str_init: String::new(),
            ..Default::default()
        };
        let g = Gcg {
            model: &m,
            prompt: &p,
            target: vec![40, 41, 42],
            disallowed: vec![false; m.cfg.vocab].into(),
            cfg: cfg.clone(),
        };
        let current = vec![5u32, 6, 7, 8, 9, 10];
        let grad = g.token_gradient(&current, &mut NoHooks).unwrap();
        assert_eq!(grad.dims(), &[6, m.cfg.vocab]);
        let cands = g.sample_candidates(&current, &grad, 0).unwrap();
        assert_eq!(cands.len(), 24);
        for c in &cands {
            let changed = c.iter().zip(&current).filter(|(a, b)| a != b).count();
            assert!(changed <= 2);
        }
        let (grouped, _) = g.losses(&cands, &current, &mut NoHooks).unwrap();
        let plain = Gcg {
            cfg: GcgConfig {
                use_prefix_cache: false,
                ..cfg
            },
            ..g
        };
        let (full, _) = plain.losses(&cands, &current, &mut NoHooks).unwrap();
        for (a, b) in grouped.iter().zip(&full) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn onehot_gradient_matches_finite_differences() {
        let m = tiny_model(Arch::Llama, 4, DType::F64).unwrap();
        let p = SplitPrompt {
            before: vec![1, 20, 21],
            after: vec![23],
            messages: vec![],
        };
        let g = Gcg {
            model: &m,
            prompt: &p,
            target: vec![40, 41],
            disallowed: vec![false; m.cfg.vocab].into(),
            cfg: GcgConfig::default(),
        };
        let ids = [5u32, 6, 7];
        let grad = g.raw_token_gradient(&ids, &mut NoHooks).unwrap();
        let grad = grad.to_vec2::<f64>().unwrap();
        let v = m.cfg.vocab;
        let loss_at = |i: usize, t: usize, eps: f64| {
            let mut oh = vec![0f64; ids.len() * v];
            for (k, &id) in ids.iter().enumerate() {
                oh[k * v + id as usize] = 1.0;
            }
            oh[i * v + t] += eps;
            let oh = Tensor::from_vec(oh, (ids.len(), v), &m.device).unwrap();
            g.onehot_loss(&oh, &mut NoHooks)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (i, t) in [(0, 5), (0, 33), (1, 2), (2, 47), (2, 7)] {
            let eps = 1e-5;
            let numeric = (loss_at(i, t, eps) - loss_at(i, t, -eps)) / (2.0 * eps);
            let analytic = grad[i][t];
            assert!(
                (numeric - analytic).abs() <= 1e-6 + 1e-4 * numeric.abs(),
                "[{i},{t}] analytic {analytic} numeric {numeric}"
            );
        }
    }

    #[test]
    fn buffer_keeps_the_best_and_the_trace_is_monotone() {
        let mut st = GcgState::default();
        st.add(3.0, vec![1], 2);
        st.add(2.0, vec![2], 2);
        st.add(2.5, vec![3], 2);
        assert_eq!(st.buffer, vec![(2.0, vec![2]), (2.5, vec![3])]);
        st.add(9.0, vec![4], 2);
        assert_eq!(st.current_ids(), &[2]);
        // nanoGCG's buffer_size 0 always moves to the newest, but the best is remembered.
        let mut st = GcgState::default();
        st.add(3.0, vec![1], 0);
        st.add(4.0, vec![2], 0);
        assert_eq!(st.current_ids(), &[2]);
        assert_eq!(st.result_ids(), &[1]);
        assert_eq!(st.best_loss(), 3.0);
    }
}
