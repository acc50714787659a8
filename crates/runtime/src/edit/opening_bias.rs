//! A bias on chosen reply-opening tokens, written into the LM head's weights. Llama-family
//! heads have no bias term, so the shift is carried by the reply-opening hidden state itself:
//! for each chosen token `t`, `w_t <- w_t + beta * u`, where `u` is the direction along which
//! the final-normed hidden state at the last prompt position (where the reply's first token is
//! chosen) reads as constant over reference prompts `h_1..h_n`, by ridge regression:
//!
//! `u = argmin_u sum_i (h_i . u - 1)^2 + lambda |u|^2`, `lambda = LANDING_RIDGE tr(H^T H) / d`
//!
//! At a prompt whose state is `h`, token `t`'s logit moves by `beta (h . u)`: about `beta` at
//! every prompt like the reference ones, harmful or harmless alike. (Sessions up to 20 used
//! `u = mu / |mu|^2` with `mu` the mean state over harmful validation prompts; that bias landed
//! 1.3 times harder on JailbreakBench harmful prompts than on benign ones, so lowering it took
//! away harmful refusals first.) The head is untied from the embedding first, so what the
//! model reads in is unchanged; the result is a plain model (transformers loads it).
use crate::engine::hooks::{Hooks, Positions, Site};
use crate::engine::model::{LogitsAt, Model};
use crate::{Error, Phase, Result};
use candle_core::{DType, Tensor};

/// Ridge strength of the landing regression, relative to the mean eigenvalue of `H^T H`: small
/// enough that the bias lands within a few percent of `beta` on the reference prompts, large
/// enough that it does not fit their noise (a direction that no other prompt reads as 1).
pub const LANDING_RIDGE: f64 = 0.01;

/// Reference prompts read per forward pass.
const STATE_BATCH: usize = 16;

/// The head before the edit, the edited rows and the shift direction.
pub struct OpeningBias {
    head: Tensor,
    ids: Tensor,
    direction: Tensor,
    /// `h . u` at each reference prompt: how evenly a bias of 1 lands (1 = exactly).
    pub spread: Vec<f32>,
}

impl OpeningBias {
    /// Fit `u` on `prompts` (token ids, chat-rendered with the generation prompt; harmful and
    /// harmless ones, so the bias lands alike on both) and keep the head as it is now.
    /// `tokens` are the opening token ids to shift.
    pub fn new(model: &Model, prompts: &[Vec<u32>], tokens: &[u32]) -> Result<Self> {
        if prompts.is_empty() {
            return Err(Error::Invalid(
                "an opening bias needs reference prompts".into(),
            ));
        }
        if tokens.is_empty() || tokens.iter().any(|&t| t as usize >= model.cfg.vocab) {
            return Err(Error::Invalid(format!(
                "opening tokens {tokens:?} are empty or outside the vocabulary of {}",
                model.cfg.vocab
            )));
        }
        let layer = model.cfg.n_layer;
        // The reference pool holds hundreds of prompts: read their states in padded batches
        // (left padding, so the last position is each prompt's own).
        let mut states = Vec::new();
        for chunk in prompts.chunks(STATE_BATCH) {
            let mut hooks = Hooks::capture(&[Site::FinalNormInput], Positions::LastK(1));
            let (ids, layout) = model.pad_batch(chunk)?;
            model.forward_ids(
                &ids,
                &layout,
                None,
                LogitsAt::None,
                Phase::Prompt,
                &mut hooks,
            )?;
            let x = hooks
                .captured
                .get(Site::FinalNormInput, layer)
                .ok_or_else(|| Error::Invalid("final-norm input was not captured".into()))?
                .reshape((chunk.len(), model.cfg.hidden))?
                .to_dtype(model.final_norm.dtype())?;
            let h = crate::ops::rms_norm(&x, &model.final_norm, model.cfg.rms_eps, false)?;
            states.push(h.to_dtype(DType::F32)?);
        }
        let states = Tensor::cat(&states, 0)?; // (n, d)
        let direction = Tensor::new(landing_direction(&states.to_vec2::<f32>()?)?, &model.device)?;
        let spread = states
            .matmul(&direction.unsqueeze(1)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(OpeningBias {
            head: model.lm_head.w.detach(),
            ids: Tensor::new(tokens, &model.device)?,
            direction,
            spread,
        })
    }

    /// Set the head to the kept one with `beta` added to the chosen tokens' logits (along `u`).
    pub fn apply(&self, model: &mut Model, beta: f64) -> Result<()> {
        if !beta.is_finite() {
            return Err(Error::Invalid(format!("opening bias {beta}")));
        }
        let k = self.ids.dim(0)?;
        let d = self.direction.dim(0)?;
        let rows = (self.direction.unsqueeze(0)?.broadcast_as((k, d))? * beta)?
            .to_dtype(self.head.dtype())?
            .contiguous()?;
        // A new tensor: a tied head comes apart from the embedding here.
        model.lm_head.w = self.head.index_add(&self.ids, &rows, 0)?;
        model.lm_head.quantized = None;
        Ok(())
    }
}

/// `u = (H^T H + lambda I)^-1 H^T 1` for the rows `h_i` of `states`, in f64.
fn landing_direction(states: &[Vec<f32>]) -> Result<Vec<f32>> {
    let (n, d) = (states.len(), states.first().map_or(0, Vec::len));
    let h = nalgebra::DMatrix::from_fn(n, d, |i, j| states[i][j] as f64);
    let gram = h.transpose() * &h;
    let lambda = LANDING_RIDGE * gram.trace() / d.max(1) as f64;
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(Error::Invalid(
            "the reply-opening states are zero; no bias direction".into(),
        ));
    }
    let system = gram + nalgebra::DMatrix::identity(d, d) * lambda;
    let rhs = h.transpose() * nalgebra::DVector::from_element(n, 1.0);
    let u = system
        .cholesky()
        .ok_or_else(|| Error::Invalid("the landing regression is singular".into()))?
        .solve(&rhs);
    Ok(u.iter().map(|&x| x as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_model;
    use crate::{Arch, NoHooks};

    #[test]
    fn the_bias_moves_the_chosen_logits_by_beta_at_the_mean_state_and_nothing_else() {
        let mut m = tiny_model(Arch::Llama, 2, DType::F32).unwrap();
        assert!(m.tied());
        let embed_before = m.embed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let p = vec![vec![1u32, 5, 3, 2]];
        let before = m.last_logits(&p, &mut NoHooks).unwrap();
        // One reference prompt `h`: u = h / (|h|^2 + lambda) with lambda = LANDING_RIDGE |h|^2 / d,
        // so the shift there is beta / (1 + LANDING_RIDGE / d).
        let bias = OpeningBias::new(&m, &p, &[4, 9]).unwrap();
        let landed = 1.0 / (1.0 + LANDING_RIDGE / m.cfg.hidden as f64);
        assert!((bias.spread[0] as f64 - landed).abs() < 1e-5);
        bias.apply(&mut m, -3.0).unwrap();
        let after = m.last_logits(&p, &mut NoHooks).unwrap();
        let diff = (after - before)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (t, d) in diff.iter().enumerate() {
            let want = if t == 4 || t == 9 {
                -3.0 * landed as f32
            } else {
                0.0
            };
            assert!((d - want).abs() < 1e-4, "token {t}: {d}");
        }
        // The embedding (what the model reads) is untouched; the head is untied.
        assert!(!m.tied());
        assert_eq!(
            m.embed.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            embed_before
        );
        // Beta 0 restores the kept head.
        bias.apply(&mut m, 0.0).unwrap();
        let back = m.last_logits(&p, &mut NoHooks).unwrap();
        let before = bias.head.clone();
        assert_eq!(
            m.lm_head.w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            before.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        drop(back);
    }

    #[test]
    fn the_landing_direction_reads_one_on_both_kinds_of_state_where_the_mean_does_not() {
        // Two kinds of prompt whose states share a component `a` at different strengths (as
        // harmful and harmless prompts load differently on the mean state), plus their own
        // components and noise.
        let d = 24;
        let mut rng = 7u64;
        let mut noise = move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        };
        let unit = |k: usize| {
            (0..d)
                .map(|j| if j == k { 1.0 } else { 0.0 })
                .collect::<Vec<f32>>()
        };
        let (a, b, c) = (unit(0), unit(1), unit(2));
        let mut states = Vec::new();
        for i in 0..60 {
            let (wa, other) = if i % 2 == 0 { (2.0, &b) } else { (1.0, &c) };
            states.push(
                (0..d)
                    .map(|j| wa * a[j] + 1.5 * other[j] + noise())
                    .collect::<Vec<f32>>(),
            );
        }
        let u = landing_direction(&states).unwrap();
        let read = |h: &Vec<f32>, v: &[f32]| h.iter().zip(v).map(|(x, y)| x * y).sum::<f32>();
        let mean_by_kind = |v: &[f32], kind: usize| {
            states
                .iter()
                .skip(kind)
                .step_by(2)
                .map(|h| read(h, v))
                .sum::<f32>()
                / 30.0
        };
        for kind in 0..2 {
            let m = mean_by_kind(&u, kind);
            assert!((m - 1.0).abs() < 0.03, "kind {kind}: {m}");
        }
        // The old direction, mu / |mu|^2, lands unevenly on the two kinds.
        let mu: Vec<f32> = (0..d)
            .map(|j| states.iter().map(|h| h[j]).sum::<f32>() / 60.0)
            .collect();
        let n2: f32 = mu.iter().map(|x| x * x).sum();
        let old: Vec<f32> = mu.iter().map(|x| x / n2).collect();
        let (m0, m1) = (mean_by_kind(&old, 0), mean_by_kind(&old, 1));
        assert!(m0 - m1 > 0.2, "{m0} vs {m1}");
        // All-zero states have no direction.
        assert!(landing_direction(&[vec![0.0; 4]]).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = tiny_model(Arch::Llama, 2, DType::F32).unwrap();
        assert!(OpeningBias::new(&m, &[], &[1]).is_err());
        assert!(OpeningBias::new(&m, &[vec![1, 2]], &[]).is_err());
        assert!(OpeningBias::new(&m, &[vec![1, 2]], &[u32::MAX]).is_err());
    }
}
