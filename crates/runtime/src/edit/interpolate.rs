//! Weight-space interpolation between a base model and a fine-tuned copy of it (WiSE-FT,
//! Wortsman et al. 2022): `theta(s) = theta_base + s (theta_tuned - theta_base)`. `s = 1` is the
//! fine-tuned model, `s = 0` the base; in between, every change training made is scaled down
//! alike. For a LoRA-trained checkpoint this is the adapter scale (`W + s * (alpha / r) B A`).
use crate::engine::model::Model;
use crate::{Error, Result};
use candle_core::{DType, Tensor};

/// Every weight of `model` by name (embedding, final norm, an untied head, each block's tensors).
fn named_weights(model: &mut Model) -> Vec<(String, &mut Tensor)> {
    let tied = model.tied();
    let mut out: Vec<(String, &mut Tensor)> = vec![
        ("token_embd.weight".into(), &mut model.embed),
        ("output_norm.weight".into(), &mut model.final_norm),
    ];
    if !tied {
        out.push(("output.weight".into(), &mut model.lm_head.w));
    }
    for (i, b) in model.blocks.iter_mut().enumerate() {
        for (name, t) in b.tensors_mut() {
            out.push((format!("blk.{i}.{name}"), t));
        }
    }
    out
}

/// The base weights and the fine-tuned model's differences from them, by weight.
pub struct Interpolation {
    base: Vec<Tensor>,
    delta: Vec<Tensor>,
}

impl Interpolation {
    /// Read `tuned - base` for every weight. The two must be the same architecture and shape
    /// (a checkpoint and the model it was trained from); adapters must already be merged.
    pub fn new(tuned: &mut Model, base: &mut Model) -> Result<Self> {
        let mismatch = |what: String| {
            Error::Invalid(format!(
                "cannot interpolate: {what}\n  fix: pass the model the checkpoint was trained from (its checkpoint.json names it as base_model)"
            ))
        };
        if tuned.cfg.arch != base.cfg.arch || tuned.blocks.len() != base.blocks.len() {
            return Err(mismatch(format!(
                "{:?} with {} blocks against {:?} with {}",
                tuned.cfg.arch,
                tuned.blocks.len(),
                base.cfg.arch,
                base.blocks.len()
            )));
        }
        if tuned.tied() != base.tied() {
            return Err(mismatch(
                "one model ties its head to the embedding, the other does not".into(),
            ));
        }
        if tuned
            .blocks
            .iter_mut()
            .any(|b| b.linears_mut().iter().any(|(_, l)| l.lora.is_some()))
        {
            return Err(Error::Invalid(
                "cannot interpolate a model with LoRA adapters attached; load the merged checkpoint".into(),
            ));
        }
        let base_w = named_weights(base);
        let tuned_w = named_weights(tuned);
        if base_w.len() != tuned_w.len() {
            return Err(mismatch(format!(
                "{} weights against {}",
                tuned_w.len(),
                base_w.len()
            )));
        }
        let mut out = Interpolation {
            base: Vec::new(),
            delta: Vec::new(),
        };
        for ((bn, b), (tn, t)) in base_w.into_iter().zip(tuned_w) {
            if bn != tn || b.dims() != t.dims() {
                return Err(mismatch(format!(
                    "{tn} {:?} against {bn} {:?}",
                    t.dims(),
                    b.dims()
                )));
            }
            let b = b.detach().to_dtype(DType::F32)?;
            out.delta.push((t.detach().to_dtype(DType::F32)? - &b)?);
            out.base.push(b);
        }
        Ok(out)
    }

    /// Set `model`'s weights (the fine-tuned model this was built from) to `base + scale * delta`.
    pub fn apply(&self, model: &mut Model, scale: f64) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::Invalid(format!("interpolation scale {scale}")));
        }
        let tied = model.tied();
        let weights = named_weights(model);
        if weights.len() != self.base.len() {
            return Err(Error::Invalid(
                "interpolation applied to a different model than it was read from".into(),
            ));
        }
        for ((_, w), (b, d)) in weights.into_iter().zip(self.base.iter().zip(&self.delta)) {
            let dtype = w.dtype();
            *w = (b + (d * scale)?)?.to_dtype(dtype)?;
        }
        if tied {
            model.lm_head.w = model.embed.clone();
        }
        // Quantized copies kept for inference would still hold the old weights.
        model.lm_head.quantized = None;
        for b in model.blocks.iter_mut() {
            for (_, l) in b.linears_mut() {
                l.quantized = None;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_tensor, tiny_model};
    use crate::{Arch, NoHooks};

    fn tiny(seed: u64) -> Model {
        tiny_model(Arch::Llama, seed, DType::F32).unwrap()
    }

    fn all_weights(m: &mut Model) -> Vec<Vec<f32>> {
        named_weights(m)
            .into_iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    #[test]
    fn scale_one_is_the_tuned_model_zero_the_base_and_half_the_midpoint() {
        let mut base = tiny(3);
        let mut tuned = tiny(3);
        // Perturb every weight of the "fine-tuned" copy.
        for (i, (_, t)) in named_weights(&mut tuned).into_iter().enumerate() {
            let noise = random_tensor(t.dims(), 100 + i as u64, 0.1);
            *t = (&*t + noise).unwrap();
        }
        tuned.lm_head.w = tuned.embed.clone();
        let b = all_weights(&mut base);
        let t = all_weights(&mut tuned);
        let interp = Interpolation::new(&mut tuned, &mut base).unwrap();
        for (scale, expect) in [(1.0, 1.0), (0.0, 0.0), (0.5, 0.5), (0.25, 0.25)] {
            interp.apply(&mut tuned, scale).unwrap();
            let got = all_weights(&mut tuned);
            for ((g, b), t) in got.iter().zip(&b).zip(&t) {
                for ((g, b), t) in g.iter().zip(b).zip(t) {
                    let want = b + expect as f32 * (t - b);
                    assert!((g - want).abs() < 1e-6, "scale {scale}: {g} vs {want}");
                }
            }
        }
        // The head still reads the (interpolated) embedding.
        assert!(tuned.tied());
    }

    #[test]
    fn scale_zero_runs_as_the_base_model_and_one_as_the_tuned() {
        let mut base = tiny(5);
        let mut tuned = tiny(6);
        let prompts = vec![vec![1u32, 4, 2, 7]];
        let logits = |m: &Model| m.last_logits(&prompts, &mut NoHooks).unwrap();
        let max_diff = |a: Tensor, b: Tensor| crate::testing::max_abs(&(a - b).unwrap());
        let (want_base, want_tuned) = (logits(&base), logits(&tuned));
        assert!(max_diff(want_base.clone(), want_tuned.clone()) > 1e-3);
        let interp = Interpolation::new(&mut tuned, &mut base).unwrap();
        interp.apply(&mut tuned, 0.0).unwrap();
        assert!(max_diff(logits(&tuned), want_base) < 1e-5);
        interp.apply(&mut tuned, 1.0).unwrap();
        assert!(max_diff(logits(&tuned), want_tuned) < 1e-5);
    }

    #[test]
    fn different_shapes_are_refused_with_the_fix() {
        let mut a = tiny(1);
        let mut b = tiny(1);
        b.blocks.pop();
        let err = Interpolation::new(&mut a, &mut b)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("blocks") && err.contains("fix:"), "{err}");
    }
}
