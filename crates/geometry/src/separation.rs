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
use crate::carriers::{Activations, Carriers};
use crate::linalg::normalize;
use serde::Serialize;

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
            out.push(Separation {
                layer: l,
                pos: p,
                auc: auc(&h, &b),
                tpr_at_fpr_0_2: tpr_at_fpr(&h, &b, 0.2),
            });
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
}
