//! A bias on chosen reply-opening tokens, written into the LM head's weights. Llama-family
//! heads have no bias term, so the shift is carried by the reply-opening hidden state itself:
//! for each chosen token `t`, `w_t <- w_t + beta * mu / |mu|^2`, where `mu` is the mean
//! final-normed hidden state at the last prompt position (where the reply's first token is
//! chosen) over reference prompts. At a prompt whose state is `h`, token `t`'s logit moves by
//! `beta * (h . mu) / |mu|^2`: exactly `beta` at `h = mu`, and close to it wherever the opening
//! state is dominated by its common component. The head is untied from the embedding first, so
//! what the model reads in is unchanged; the result is a plain model (transformers loads it).
use crate::hooks::{Hooks, Positions, Site};
use crate::model::{LogitsAt, Model};
use crate::{Error, Phase, Result};
use candle_core::{DType, Tensor};

/// The head before the edit, the edited rows and the shift direction.
pub struct OpeningBias {
    head: Tensor,
    ids: Tensor,
    direction: Tensor,
    /// `(h . mu) / |mu|^2` at each reference prompt: how evenly a bias of 1 lands (1 = exactly).
    pub spread: Vec<f32>,
}

impl OpeningBias {
    /// Read `mu` from `prompts` (token ids, chat-rendered with the generation prompt) and keep
    /// the head as it is now. `tokens` are the opening token ids to shift.
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
        let mut states = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut hooks = Hooks::capture(&[Site::FinalNormInput], Positions::LastK(1));
            let (ids, layout) = model.pad_batch(std::slice::from_ref(p))?;
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
                .flatten_all()?
                .unsqueeze(0)?
                .to_dtype(model.final_norm.dtype())?;
            let h = crate::ops::rms_norm(&x, &model.final_norm, model.cfg.rms_eps, false)?;
            states.push(h.flatten_all()?.to_dtype(DType::F32)?);
        }
        let states = Tensor::stack(&states, 0)?; // (n, d)
        let mu = states.mean(0)?;
        let norm2 = mu.sqr()?.sum_all()?.to_scalar::<f32>()?;
        if !(norm2.is_finite() && norm2 > 0.0) {
            return Err(Error::Invalid(
                "the mean reply-opening state is zero; no bias direction".into(),
            ));
        }
        let direction = (mu / norm2 as f64)?;
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

    /// Set the head to the kept one with `beta` added to the chosen tokens' logits (at `mu`).
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
        // One reference prompt: its state is mu, so the shift is exactly beta there.
        let bias = OpeningBias::new(&m, &p, &[4, 9]).unwrap();
        assert!((bias.spread[0] - 1.0).abs() < 1e-5);
        bias.apply(&mut m, -3.0).unwrap();
        let after = m.last_logits(&p, &mut NoHooks).unwrap();
        let diff = (after - before)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (t, d) in diff.iter().enumerate() {
            let want = if t == 4 || t == 9 { -3.0 } else { 0.0 };
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
    fn bad_inputs_are_errors() {
        let m = tiny_model(Arch::Llama, 2, DType::F32).unwrap();
        assert!(OpeningBias::new(&m, &[], &[1]).is_err());
        assert!(OpeningBias::new(&m, &[vec![1, 2]], &[]).is_err());
        assert!(OpeningBias::new(&m, &[vec![1, 2]], &[u32::MAX]).is_err());
    }
}
