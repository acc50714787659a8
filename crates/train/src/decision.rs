//! The refusal decision loss at the first reply token.
//!
//! Whether a reply refuses is settled by its first token. Plain cross-entropy trains that token
//! only as one of many (a 64-token helpful reply outweighs a 10-token refusal, and the helpful
//! first token varies), so a small model learns "refuse this topic" instead of "refuse this
//! request". This term trains the decision itself, as a binary classifier on the refusal mass
//!
//! `q = sum_{t in R} p(t | prompt)` (R: the refusal opening tokens the judges score),
//!
//! `L_decision = -(1/m) * ( sum_{harmful} ln q + sum_{harmless} ln(1 - q) )`
//!
//! over the `m` examples of the batch that have a decision: harmful prompts trained to refuse
//! (with R holding their refusal's first token), and harmless prompts whose trained reply does not itself open with a token of R (a helpful
//! reply may start with "I"; pushing it away from R would contradict its own target). The
//! harmless term's gradient grows as `q / (1 - q)`: it concentrates on harmless prompts the
//! model is about to refuse, which is where over-refusal comes from.
//!
//! With a boundary `q_b` other than 1/2, the classifier's log-odds are shifted by
//! `delta = ln((1 - q_b) / q_b)`: `p = q e^delta / (q e^delta + 1 - q)` takes the place of `q`.
//! The two sides then part at refusal mass `q_b` instead of 1/2: harmless prompts are pushed below
//! `q_b`, harmful ones need only clear it. Training prompts separate with room to spare, so the
//! prompts that decide the over-refusal rate are the unseen borderline ones between the two
//! sides; with `q_b` below 1/2 they sit near `q_b`, under the mass at which greedy decoding
//! opens with a refusal. (Training greedy decoding's own comparison instead, the likeliest refusal
//! token against the likeliest other one, ranked worse: docs/experiments.md.)
use crate::data::Example;
use crate::Result;
use candle_core::{DType, Tensor};

/// How the decision loss reads the refusal decision: where its two sides part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecisionRule {
    /// Refusal mass at which harmful and harmless prompts part, in (0, 1).
    pub boundary: f64,
}

impl Default for DecisionRule {
    fn default() -> Self {
        Self { boundary: 0.5 }
    }
}

impl DecisionRule {
    /// What is wrong with the rule, naming the field first (`boundary 1.5: ...`).
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(self.boundary > 0.0 && self.boundary < 1.0) {
            return Err(format!(
                "boundary {}: use a refusal mass strictly between 0 and 1 (e.g. 0.05)",
                self.boundary
            ));
        }
        Ok(())
    }
}

/// The side of the decision an example trains, if any.
pub fn side(example: &Example, refusal_ids: &[u32]) -> Option<bool> {
    let first = example.target.iter().flatten().next()?;
    match example.kind.as_str() {
        "harmful" if refusal_ids.contains(first) => Some(true),
        "harmless" if !refusal_ids.contains(first) => Some(false),
        _ => None,
    }
}

/// `L_decision` from the log-probabilities `(m, V)` at each example's first reply position and
/// whether each should refuse (`None` when `m = 0`), the two sides parting at refusal mass
/// `boundary` (in (0, 1); 1/2 is the plain classifier).
pub fn decision_loss_at(
    first_log_probs: &Tensor,
    refuse: &[bool],
    refusal_ids: &[u32],
    boundary: f64,
) -> Result<Option<Tensor>> {
    if refuse.is_empty() {
        return Ok(None);
    }
    let r = Tensor::new(refusal_ids, first_log_probs.device())?;
    // Probabilities are below 1, so summing exponentials cannot overflow; the floors keep the
    // logarithms finite when a side's mass rounds to 0 in f32.
    let q = first_log_probs
        .index_select(&r, 1)?
        .to_dtype(DType::F32)?
        .exp()?
        .sum(1)?;
    let rest = q.affine(-1.0, 1.0)?.clamp(1e-7f32, 1.0f32)?;
    let log_odds = (q.clamp(1e-30f32, 1.0f32)?.log()? - rest.log()?)?;
    Ok(Some(side_loss(&log_odds, refuse, boundary)?))
}

/// `-(1/m) * sum_i ln sigmoid(s_i (z_i + delta))`, `s_i = +1` for a prompt that should refuse
/// and `-1` otherwise, with `delta = ln((1 - q_b) / q_b)`.
fn side_loss(log_odds: &Tensor, refuse: &[bool], boundary: f64) -> Result<Tensor> {
    let delta = ((1.0 - boundary) / boundary).ln();
    let sign: Vec<f32> = refuse.iter().map(|&h| if h { 1.0 } else { -1.0 }).collect();
    let right = ((log_odds + delta)? * Tensor::new(sign.as_slice(), log_odds.device())?)?;
    // -ln sigmoid(x) = softplus(-x) = relu(-x) + ln(1 + e^{-|x|}), stable for any x.
    let loss = (right.neg()?.relu()? + (right.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(loss.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rows(p: &[[f32; 4]]) -> Tensor {
        let flat: Vec<f32> = p.iter().flatten().map(|x| x.ln()).collect();
        Tensor::from_vec(flat, (p.len(), 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_the_formula_by_hand() {
        // R = {0, 2}. Row 0 (harmful): q = 0.1 + 0.3 = 0.4. Row 1 (harmless): q = 0.5 + 0.25.
        let lp = rows(&[[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.25, 0.15]]);
        let got = decision_loss_at(&lp, &[true, false], &[0, 2], 0.5)
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = -(0.4f64.ln() + 0.25f64.ln()) / 2.0;
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        assert!(decision_loss_at(&lp, &[], &[0], 0.5).unwrap().is_none());
        // Boundary 0.2 (e^delta = 4): harmful p = 0.4*4 / (0.4*4 + 0.6) = 1.6 / 2.2; harmless
        // 1 - p = 0.25 / (0.75*4 + 0.25) = 0.25 / 3.25.
        let got = decision_loss_at(&lp, &[true, false], &[0, 2], 0.2)
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = -((1.6f64 / 2.2).ln() + (0.25f64 / 3.25).ln()) / 2.0;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }

    /// The gradient of `loss` at the logits `base` (rows of 4) against central differences.
    fn assert_gradient_matches_finite_differences(base: &[f64], loss: impl Fn(&Tensor) -> Tensor) {
        let shape = (base.len() / 4, 4);
        let v = Var::from_vec(base.to_vec(), shape, &Device::Cpu).unwrap();
        let logits = v.as_tensor().to_dtype(DType::F32).unwrap();
        let grads = loss(&logits).backward().unwrap();
        let g: Vec<f64> = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let value = |x: &[f64]| {
            let t = Tensor::from_vec(x.to_vec(), shape, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            loss(&t).to_scalar::<f32>().unwrap() as f64
        };
        for i in 0..base.len() {
            let (mut up, mut down) = (base.to_vec(), base.to_vec());
            up[i] += 1e-3;
            down[i] -= 1e-3;
            let fd = (value(&up) - value(&down)) / 2e-3;
            assert!((fd - g[i]).abs() < 1e-3, "logit {i}: {fd} vs {}", g[i]);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let base = [0.3f64, -1.2, 0.5, 2.0, -0.7, 0.1, 1.1, -0.4];
        assert_gradient_matches_finite_differences(&base, |x| {
            let lp = safegeo_runtime::log_softmax_last(x).unwrap();
            decision_loss_at(&lp, &[true, false], &[1, 3], 0.3)
                .unwrap()
                .unwrap()
        });
    }

    #[test]
    fn only_refusals_and_non_refusing_helpful_replies_have_a_side() {
        let harmful = Example::reply(vec![1], vec![7, 8], "harmful");
        let helpful = Example::reply(vec![1], vec![9], "harmless");
        let opens_with_i = Example::reply(vec![1], vec![7], "harmless");
        let other = Example::reply(vec![1], vec![9], "transition");
        assert_eq!(side(&harmful, &[7]), Some(true));
        assert_eq!(side(&harmful, &[9]), None);
        assert_eq!(side(&helpful, &[7]), Some(false));
        assert_eq!(side(&opens_with_i, &[7]), None);
        assert_eq!(side(&other, &[7]), None);
    }
}
