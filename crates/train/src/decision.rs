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
//! opens with a refusal.
//!
//! Greedy decoding does not compare `q` with `1 - q`, though: it opens with a refusal when the
//! likeliest refusal token beats the likeliest other token, and a helpful opening's mass is
//! spread over many tokens, so a prompt with `q` well under 1/2 is often refused. With
//! [`Against::Top`] the classifier's log-odds are that comparison itself,
//!
//! `z = max_{t in R} ln p(t) - max_{t not in R} ln p(t) + delta`,
//!
//! positive exactly when greedy decoding opens with a refusal token (at `delta = 0`), and the
//! loss is `-(1/m) * ( sum_{harmful} ln sigmoid(z) + sum_{harmless} ln sigmoid(-z) )`. With
//! [`Against::Rest`] it is `z = ln q - ln(1 - q) + delta`, the loss above.
use crate::data::Example;
use crate::Result;
use candle_core::{DType, Tensor};

/// What the refusal side is weighed against in the decision's log-odds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Against {
    /// The refusal mass `q` against the rest, `1 - q`.
    #[default]
    Rest,
    /// The likeliest refusal token against the likeliest other token: greedy decoding's choice.
    Top,
}

impl std::str::FromStr for Against {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "rest" => Ok(Self::Rest),
            "top" => Ok(Self::Top),
            _ => Err(format!("`{s}`: use rest or top")),
        }
    }
}

impl std::fmt::Display for Against {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Rest => "rest",
            Self::Top => "top",
        })
    }
}

/// How the decision loss reads the refusal decision: where the two sides part (`boundary`), what
/// the refusal side is weighed against, and over how many refusal-opening tokens (more than one
/// only with [`Against::Top`], through [`opening_loss`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecisionRule {
    /// Refusal mass at which harmful and harmless prompts part, in (0, 1).
    pub boundary: f64,
    /// What the refusal side is weighed against.
    pub against: Against,
    /// Refusal-opening tokens read (1: the first reply token only).
    pub opening: usize,
}

impl Default for DecisionRule {
    fn default() -> Self {
        Self {
            boundary: 0.5,
            against: Against::Rest,
            opening: 1,
        }
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
        if self.opening == 0 || (self.opening > 1 && self.against != Against::Top) {
            return Err(format!(
                "opening {}: use 1, or more with the top-token rule (against top)",
                self.opening
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
/// `boundary` (in (0, 1); 1/2 is the plain classifier), the refusal side weighed `against` the
/// rest or the top other token.
pub fn decision_loss_at(
    first_log_probs: &Tensor,
    refuse: &[bool],
    refusal_ids: &[u32],
    boundary: f64,
    against: Against,
) -> Result<Option<Tensor>> {
    if refuse.is_empty() {
        return Ok(None);
    }
    if against == Against::Top {
        let unforced = vec![None; refuse.len()];
        return opening_loss(
            std::slice::from_ref(first_log_probs),
            &[unforced],
            refuse,
            refusal_ids,
            boundary,
        );
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

/// `L_decision` over the teacher-forced opening of a refusal: [`Against::Top`] continued past the
/// first token. Greedy decoding writes an opening `y_1..y_k` (its first token any of `R`) when
/// every position's token beats the likeliest other token, so the log-odds are the least margin
///
/// `z = min( max_{t in R} ln p_1(t) - max_{t not in R} ln p_1(t),
///           min_{j >= 2} ln p_j(y_j) - max_{t != y_j} ln p_j(t) ) + delta`.
///
/// A first token alone does not decide: "I" opens "I'm sorry" and "I'm here to help" alike.
/// `steps[j]` holds the log-probabilities `(m, V)` at opening position `j` (0-based) and
/// `tokens[j][i]` example `i`'s forced token there; `None` leaves the position out of its minimum
/// (`tokens[0]` is not read: the first position weighs all of `R`).
pub fn opening_loss(
    steps: &[Tensor],
    tokens: &[Vec<Option<u32>>],
    refuse: &[bool],
    refusal_ids: &[u32],
    boundary: f64,
) -> Result<Option<Tensor>> {
    let m = refuse.len();
    if m == 0 || steps.is_empty() {
        return Ok(None);
    }
    let first = steps[0].to_dtype(DType::F32)?;
    let dev = first.device().clone();
    let vocab = first.dim(1)?;
    let r = Tensor::new(refusal_ids, &dev)?;
    let mut mask = vec![0f32; vocab];
    for &t in refusal_ids {
        mask[t as usize] = f32::NEG_INFINITY;
    }
    let others = first.broadcast_add(&Tensor::new(mask.as_slice(), &dev)?)?;
    let mut margins = vec![(first.index_select(&r, 1)?.max(1)? - others.max(1)?)?];
    for (lp, forced) in steps.iter().zip(tokens).skip(1) {
        if forced.iter().all(Option::is_none) {
            continue;
        }
        let lp = lp.to_dtype(DType::F32)?;
        let y: Vec<u32> = forced.iter().map(|t| t.unwrap_or(0)).collect();
        let own = lp
            .gather(&Tensor::new(y.as_slice(), &dev)?.unsqueeze(1)?, 1)?
            .squeeze(1)?;
        let mut mask = vec![0f32; m * vocab];
        for (i, &t) in y.iter().enumerate() {
            mask[i * vocab + t as usize] = f32::NEG_INFINITY;
        }
        let rival = (&lp + Tensor::from_vec(mask, (m, vocab), &dev)?)?.max(1)?;
        // A position an example does not force cannot be its least margin.
        let skip: Vec<f32> = forced
            .iter()
            .map(|t| if t.is_some() { 0.0 } else { 1e4 })
            .collect();
        margins.push(((own - rival)? + Tensor::new(skip.as_slice(), &dev)?)?);
    }
    let log_odds = Tensor::stack(&margins, 1)?.min(1)?;
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
        let got = decision_loss_at(&lp, &[true, false], &[0, 2], 0.5, Against::Rest)
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = -(0.4f64.ln() + 0.25f64.ln()) / 2.0;
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        assert!(decision_loss_at(&lp, &[], &[0], 0.5, Against::Rest)
            .unwrap()
            .is_none());
        // Boundary 0.2 (e^delta = 4): harmful p = 0.4*4 / (0.4*4 + 0.6) = 1.6 / 2.2; harmless
        // 1 - p = 0.25 / (0.75*4 + 0.25) = 0.25 / 3.25.
        let got = decision_loss_at(&lp, &[true, false], &[0, 2], 0.2, Against::Rest)
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = -((1.6f64 / 2.2).ln() + (0.25f64 / 3.25).ln()) / 2.0;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn top_weighs_the_likeliest_refusal_token_against_the_likeliest_other() {
        // R = {0, 2}. Row 0 (harmful): 0.3 against 0.4, odds 3/4, so greedy decoding would not
        // refuse although q = 0.4. Row 1 (harmless): 0.5 against 0.15.
        let lp = rows(&[[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.25, 0.15]]);
        let loss = |boundary| {
            decision_loss_at(&lp, &[true, false], &[0, 2], boundary, Against::Top)
                .unwrap()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let want = -((0.3f64 / 0.7).ln() + (0.15f64 / 0.65).ln()) / 2.0;
        assert!((loss(0.5) - want).abs() < 1e-5, "{} vs {want}", loss(0.5));
        // Boundary 0.2 multiplies the odds by 4: harmful 3/1, harmless 2.0/0.15.
        let want = -((3.0f64 / 4.0).ln() + (0.15f64 / 2.15).ln()) / 2.0;
        assert!((loss(0.2) - want).abs() < 1e-5, "{} vs {want}", loss(0.2));
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
        // No ties among the maxima, where the top-token loss has no derivative.
        let base = [0.3f64, -1.2, 0.5, 2.0, -0.7, 0.1, 1.1, -0.4];
        for against in [Against::Rest, Against::Top] {
            assert_gradient_matches_finite_differences(&base, |x| {
                let lp = safegeo_runtime::log_softmax_last(x).unwrap();
                decision_loss_at(&lp, &[true, false], &[1, 3], 0.3, against)
                    .unwrap()
                    .unwrap()
            });
        }
    }

    #[test]
    fn opening_takes_the_least_margin_over_the_forced_tokens() {
        // R = {0}. Example 0 (harmful): first position 0.5 against 0.2, then its forced token 2
        // at 0.4 against 0.3: z = ln(4/3). Example 1 (harmless): 0.6 against 0.2, then forced
        // token 1 at 0.2 against 0.5: z = ln(0.4), so greedy decoding leaves the opening.
        let step0 = rows(&[[0.5, 0.2, 0.2, 0.1], [0.6, 0.1, 0.2, 0.1]]);
        let step1 = rows(&[[0.1, 0.3, 0.4, 0.2], [0.1, 0.2, 0.5, 0.2]]);
        let loss = |second: Vec<Option<u32>>| {
            opening_loss(
                &[step0.clone(), step1.clone()],
                &[vec![None, None], second],
                &[true, false],
                &[0],
                0.5,
            )
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
        };
        let want = (-(4.0f64 / 7.0).ln() + 1.4f64.ln()) / 2.0;
        let got = loss(vec![Some(2), Some(1)]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Unforced, the harmless example's second position does not count: z = ln 3.
        let want = (-(4.0f64 / 7.0).ln() + 4.0f64.ln()) / 2.0;
        let got = loss(vec![Some(2), None]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // One position is the top-token rule.
        let top = decision_loss_at(&step0, &[true, false], &[0], 0.5, Against::Top)
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let want = (-(2.5f64 / 3.5).ln() + 4.0f64.ln()) / 2.0;
        assert!((top - want).abs() < 1e-5, "{top} vs {want}");
    }

    #[test]
    fn opening_gradient_matches_finite_differences() {
        // Example 0's least margin is at its forced second token, example 1's at the first.
        let base = [
            0.3f64, -1.2, 0.5, 2.0, -0.7, 0.1, 1.1, -0.4, 0.9, 0.2, -0.3, 0.6, -1.0, 1.4, 0.0, 0.35,
        ];
        assert_gradient_matches_finite_differences(&base, |x| {
            let lp = safegeo_runtime::log_softmax_last(x).unwrap();
            let steps = [lp.narrow(0, 0, 2).unwrap(), lp.narrow(0, 2, 2).unwrap()];
            opening_loss(
                &steps,
                &[vec![None, None], vec![Some(0), Some(1)]],
                &[true, false],
                &[3],
                0.3,
            )
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
