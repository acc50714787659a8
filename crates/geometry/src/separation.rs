//! **(ours)** How well a carrier separates held-out prompts it was not estimated on: the
//! carriers read as linear probes. Each held-out prompt is scored by its projection
//! `s(x) = <x_l(p), r^_{l,p}>` on the unit carrier at layer `l` and position `p`, and the two sets
//! are compared by
//!
//! - `AUC = P(s(harmful) > s(harmless)) + 0.5 P(s(harmful) = s(harmless))` (Mann-Whitney);
//! - `TPR@FPR f`: the share of harmful prompts scored above the score that at most a fraction `f`
//!   of harmless prompts exceed.
//!
//! A refusal behaviour that flags at least 80% of one set while flagging at most 20% of the other
//! (the training issue's target) needs, somewhere in the model, a readout with TPR@FPR 0.2 of at
//! least 0.8; these numbers tell whether the difference-of-means directions hold one.
//!
//! The difference of means is the readout that ignores how the activations vary. The logistic
//! probe ([`logistic_probe`]) fitted on the same capture accounts for it, and says whether a
//! *linear* readout of the layer holds the decision at all:
//!
//! `min_{w,b} sum_i c_i ln(1 + exp(-y_i (w . z_i + b))) / n + lambda |w|^2`,
//!
//! on standardized activations `z_i = (x_i - mean) / sd` (per coordinate), labels `y = +1`
//! harmful and `-1` harmless, class weights `c_i = n / (2 n_class)`, solved by Newton's method.
use crate::carriers::{Activations, Carriers};
use crate::linalg::normalize;
use nalgebra::{DMatrix, DVector};
use serde::Serialize;

/// L2 weight of the logistic probe on standardized activations (strong enough to keep the
/// weights finite when the capture is separable, as it is for 128 + 128 prompts in 576 dims).
pub const PROBE_L2: f64 = 1e-3;

/// `AUC` of scores `pos` over scores `neg` (0.5 when either is empty).
pub fn auc(pos: &[f64], neg: &[f64]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return 0.5;
    }
    let mut wins = 0.0;
    for &a in pos {
        for &b in neg {
            wins += if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()) as f64
}

/// Share of `pos` strictly above the threshold that at most `fpr * |neg|` of `neg` exceed.
pub fn tpr_at_fpr(pos: &[f64], neg: &[f64], fpr: f64) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return 0.0;
    }
    let mut sorted = neg.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    // Allowed false positives, then the threshold is the next-highest negative score.
    let allowed = ((fpr * neg.len() as f64) + 1e-9).floor() as usize;
    let threshold = sorted.get(allowed).copied().unwrap_or(f64::NEG_INFINITY);
    pos.iter().filter(|&&s| s > threshold).count() as f64 / pos.len() as f64
}

/// Separation of one carrier.
#[derive(Debug, Clone, Serialize)]
pub struct Separation {
    /// Layer.
    pub layer: usize,
    /// Position index (0 = `t_inst`).
    pub pos: usize,
    /// Mann-Whitney AUC.
    pub auc: f64,
    /// TPR at FPR 0.2.
    pub tpr_at_fpr_0_2: f64,
}

impl Separation {
    /// The separation at `(layer, pos)` of harmful scores `h` from harmless scores `b`.
    fn of_scores(layer: usize, pos: usize, h: &[f64], b: &[f64]) -> Self {
        Separation {
            layer,
            pos,
            auc: auc(h, b),
            tpr_at_fpr_0_2: tpr_at_fpr(h, b, 0.2),
        }
    }
}

fn scores(acts: &Activations, l: usize, p: usize, unit: &[f64]) -> Vec<f64> {
    acts.acts
        .iter()
        .map(|prompt| {
            prompt[l][p]
                .iter()
                .zip(unit)
                .map(|(&x, &u)| x as f64 * u)
                .sum()
        })
        .collect()
}

/// Separation of held-out `harmful` from `harmless` by every carrier `(l, p)`.
pub fn separation(c: &Carriers, harmful: &Activations, harmless: &Activations) -> Vec<Separation> {
    let mut out = Vec::new();
    for l in 0..c.n_layer() {
        for p in 0..c.n_pos() {
            let unit = normalize(&c.refusal[l][p]);
            let (h, b) = (scores(harmful, l, p, &unit), scores(harmless, l, p, &unit));
            out.push(Separation::of_scores(l, p, &h, &b));
        }
    }
    out
}

/// A fitted logistic probe: `score(x) = w . x + b` on raw activations.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Weights on the raw activation (the standardization folded in).
    pub w: Vec<f64>,
    /// Bias.
    pub b: f64,
}

impl Probe {
    /// The probe's score of one activation.
    pub fn score(&self, x: &[f32]) -> f64 {
        self.w
            .iter()
            .zip(x)
            .map(|(&w, &x)| w * x as f64)
            .sum::<f64>()
            + self.b
    }
}

/// The logistic probe (module docs) of `harmful` vs `harmless` at layer `l`, position `p`, with L2
/// weight `lambda`. Newton's method: at most 50 steps, until the step is below 1e-8.
pub fn logistic_probe(
    harmful: &Activations,
    harmless: &Activations,
    l: usize,
    p: usize,
    lambda: f64,
) -> Probe {
    let rows: Vec<(&[f32], f64)> = harmful
        .acts
        .iter()
        .map(|a| (a[l][p].as_slice(), 1.0))
        .chain(harmless.acts.iter().map(|a| (a[l][p].as_slice(), -1.0)))
        .collect();
    let (n, d) = (rows.len(), rows.first().map_or(0, |r| r.0.len()));
    if harmful.is_empty() || harmless.is_empty() || d == 0 {
        return Probe {
            w: vec![0.0; d],
            b: 0.0,
        };
    }
    let mean: Vec<f64> = (0..d)
        .map(|j| rows.iter().map(|r| r.0[j] as f64).sum::<f64>() / n as f64)
        .collect();
    let sd: Vec<f64> = (0..d)
        .map(|j| {
            let v = rows
                .iter()
                .map(|r| (r.0[j] as f64 - mean[j]).powi(2))
                .sum::<f64>();
            (v / n as f64).sqrt().max(1e-6)
        })
        .collect();
    // Design matrix: standardized activations and a constant column for the bias (unpenalized).
    let z = DMatrix::from_fn(n, d + 1, |i, j| {
        if j == d {
            1.0
        } else {
            (rows[i].0[j] as f64 - mean[j]) / sd[j]
        }
    });
    let y = DVector::from_iterator(n, rows.iter().map(|r| r.1));
    let n_pos = harmful.len() as f64;
    let class = |yi: f64| n as f64 / (2.0 * if yi > 0.0 { n_pos } else { n as f64 - n_pos });
    let mut theta = DVector::<f64>::zeros(d + 1);
    let penalty = DVector::from_fn(d + 1, |j, _| if j == d { 0.0 } else { 2.0 * lambda });
    for _ in 0..50 {
        let margin = &z * &theta;
        // Per row: gradient factor c * (-y) * sigma(-y m), curvature c * sigma(m) sigma(-m).
        let mut g_row = DVector::zeros(n);
        let mut h_row = DVector::zeros(n);
        for i in 0..n {
            let (m, yi) = (margin[i], y[i]);
            let s = 1.0 / (1.0 + (yi * m).exp());
            g_row[i] = -yi * s * class(yi) / n as f64;
            let sig = 1.0 / (1.0 + (-m).exp());
            h_row[i] = sig * (1.0 - sig) * class(yi) / n as f64;
        }
        let grad = z.tr_mul(&g_row) + penalty.component_mul(&theta);
        let mut weighted = z.clone();
        for (i, mut row) in weighted.row_iter_mut().enumerate() {
            row *= h_row[i];
        }
        let mut hess = z.tr_mul(&weighted);
        for j in 0..=d {
            hess[(j, j)] += penalty[j] + 1e-12;
        }
        let Some(chol) = hess.cholesky() else { break };
        let step = chol.solve(&grad);
        theta -= &step;
        if step.norm() < 1e-8 {
            break;
        }
    }
    let w: Vec<f64> = (0..d).map(|j| theta[j] / sd[j]).collect();
    let b = theta[d] - (0..d).map(|j| w[j] * mean[j]).sum::<f64>();
    Probe { w, b }
}

/// Separation of held-out `harmful` from `harmless` by a logistic probe fitted at every `(l, p)`
/// on the capture `fit_harmful` vs `fit_harmless` ([`logistic_probe`], [`PROBE_L2`]).
pub fn probe_separation(
    fit_harmful: &Activations,
    fit_harmless: &Activations,
    harmful: &Activations,
    harmless: &Activations,
) -> Vec<Separation> {
    let (n_layer, n_pos) = fit_harmful
        .acts
        .first()
        .map_or((0, 0), |a| (a.len(), a.first().map_or(0, |p| p.len())));
    let mut out = Vec::new();
    for l in 0..n_layer {
        for p in 0..n_pos {
            let probe = logistic_probe(fit_harmful, fit_harmless, l, p, PROBE_L2);
            let score = |acts: &Activations| -> Vec<f64> {
                acts.acts.iter().map(|a| probe.score(&a[l][p])).collect()
            };
            let (h, b) = (score(harmful), score(harmless));
            out.push(Separation::of_scores(l, p, &h, &b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_by_hand() {
        assert_eq!(auc(&[3.0, 4.0], &[1.0, 2.0]), 1.0);
        assert_eq!(auc(&[1.0, 2.0], &[3.0, 4.0]), 0.0);
        // Pairs: (2,1) win, (2,3) loss, (3,1) win, (3,3) tie -> 2.5 / 4.
        assert_eq!(auc(&[2.0, 3.0], &[1.0, 3.0]), 0.625);
        assert_eq!(auc(&[], &[1.0]), 0.5);
    }

    #[test]
    fn tpr_at_fpr_by_hand() {
        let neg: Vec<f64> = (1..=10).map(f64::from).collect();
        // FPR 0.2 allows the two highest negatives (10, 9): threshold 8.
        let pos = [8.0, 8.5, 9.5, 11.0, 2.0];
        assert_eq!(tpr_at_fpr(&pos, &neg, 0.2), 3.0 / 5.0);
        assert_eq!(tpr_at_fpr(&pos, &neg, 0.0), 1.0 / 5.0);
        assert_eq!(tpr_at_fpr(&pos, &neg, 1.0), 1.0);
    }

    #[test]
    fn a_direction_that_splits_the_sets_has_auc_one() {
        // Two prompts per set, one layer, one position, d = 2; the carrier is +x.
        let act = |x: f32, y: f32| vec![vec![vec![x, y]]];
        let harmful = Activations {
            acts: vec![act(2.0, 5.0), act(3.0, -5.0)],
        };
        let harmless = Activations {
            acts: vec![act(-1.0, 9.0), act(0.0, -9.0)],
        };
        let c = crate::carriers::difference_of_means(&harmful, &harmless, None, None);
        let s = separation(&c, &harmful, &harmless);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].auc, s[0].tpr_at_fpr_0_2), (1.0, 1.0));
    }

    /// Two classes that differ along x by 1, with noise of sd 10 along y that is shared with x
    /// (x = signal + 0.1 y): the difference of means points along x and drowns in the shared
    /// noise, the logistic probe subtracts it (the Bayes direction is x - 0.1 y).
    fn correlated_noise(n: usize, seed: u64) -> (Activations, Activations) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw = |shift: f64| {
            let acts = (0..n)
                .map(|_| {
                    let y: f64 = rng.gen_range(-10.0..10.0) * 1.7;
                    let signal = shift + rng.gen_range(-0.3..0.3);
                    vec![vec![vec![(signal + 0.1 * y) as f32, y as f32]]]
                })
                .collect();
            Activations { acts }
        };
        (draw(0.5), draw(-0.5))
    }

    #[test]
    fn logistic_probe_beats_the_difference_of_means_under_correlated_noise() {
        let (fh, fl) = correlated_noise(200, 1);
        let (hh, hl) = correlated_noise(200, 2);
        let c = crate::carriers::difference_of_means(&fh, &fl, None, None);
        let mean_diff = separation(&c, &hh, &hl)[0].auc;
        let probe = probe_separation(&fh, &fl, &hh, &hl)[0].auc;
        assert!(mean_diff < 0.85, "difference of means AUC {mean_diff}");
        assert!(probe > 0.99, "probe AUC {probe}");
        // The probe recovers the Bayes direction x - 0.1 y up to scale.
        let p = logistic_probe(&fh, &fl, 0, 0, PROBE_L2);
        let cos = (p.w[0] - 0.1 * p.w[1]) / (p.w[0].hypot(p.w[1]) * 1.01f64.sqrt());
        assert!(cos > 0.99, "cos {cos}, w {:?}", p.w);
        // Harmful scores positive, harmless negative.
        assert!(p.score(&[0.5, 0.0]) > 0.0 && p.score(&[-0.5, 0.0]) < 0.0);
    }

    #[test]
    fn logistic_probe_matches_the_closed_form_of_one_point_per_class() {
        // One coordinate, harmful at +1 and harmless at -1: standardized z = +-1, the optimum of
        // ln(1 + e^-w) + lambda w^2 (bias 0 by symmetry) solves e^-w / (1 + e^-w) = 2 lambda w.
        let one = |x: f32| Activations {
            acts: vec![vec![vec![vec![x]]]],
        };
        let lambda = 0.05;
        let p = logistic_probe(&one(1.0), &one(-1.0), 0, 0, lambda);
        let w = p.w[0];
        let residual = (-w).exp() / (1.0 + (-w).exp()) - 2.0 * lambda * w;
        assert!(residual.abs() < 1e-9, "w {w}, residual {residual}");
        assert!(p.b.abs() < 1e-9);
        // Empty classes give a zero probe, not a panic.
        let empty = Activations { acts: vec![] };
        assert_eq!(logistic_probe(&empty, &one(1.0), 0, 0, lambda).w, vec![0.0]);
    }
}
