//! Geometry numbers (docs/protocol.md §2): effective rank of the carrier family with bootstrap
//! resamples, harmfulness/refusal coupling, the belief scores of Zhao et al., and drift.
use crate::carriers::{difference_of_means, Activations, Carriers};
use crate::linalg::{cosine, effective_rank, normalize, principal_angles};
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Effective rank at one layer, with its spread over bootstrap resamples.
#[derive(Debug, Clone, Serialize)]
pub struct ErankReport {
    /// Layer.
    pub layer: usize,
    /// What the rows of `M` are.
    pub matrix: String,
    /// `erank(M)`.
    pub erank: f64,
    /// erank of each bootstrap resample's positions alone (spread of the estimate).
    pub bootstrap_min: f64,
    /// See `bootstrap_min`.
    pub bootstrap_max: f64,
    /// Rows of `M`.
    pub rows: usize,
}

/// **(ours)** `M` = unit refusal carriers at `layer` across the post-instruction positions
/// (and `t_inst`), recomputed on `resamples` bootstrap resamples of the prompt sets.
pub fn effective_rank_at(
    harmful: &Activations,
    harmless: &Activations,
    layer: usize,
    resamples: usize,
    seed: u64,
) -> ErankReport {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (nh, nl) = (harmful.len(), harmless.len());
    let mut rows = Vec::new();
    let mut per = Vec::new();
    for b in 0..resamples.max(1) {
        let (ih, il): (Vec<usize>, Vec<usize>) = if b == 0 {
            ((0..nh).collect(), (0..nl).collect())
        } else {
            (
                (0..nh).map(|_| rng.gen_range(0..nh)).collect(),
                (0..nl).map(|_| rng.gen_range(0..nl)).collect(),
            )
        };
        let c = difference_of_means(harmful, harmless, Some(&ih), Some(&il));
        let unit: Vec<Vec<f64>> = c.refusal[layer].iter().map(|r| normalize(r)).collect();
        per.push(effective_rank(&unit));
        rows.extend(unit);
    }
    ErankReport {
        layer,
        matrix: format!(
            "rows = unit refusal carriers at layer {layer} over {} positions (t_inst + post-instruction) x {} prompt resamples (the first is the full set)",
            harmful.acts[0][layer].len(),
            resamples.max(1)
        ),
        erank: effective_rank(&rows),
        bootstrap_min: per.iter().copied().fold(f64::INFINITY, f64::min),
        bootstrap_max: per.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        rows: rows.len(),
    }
}

/// `|cos(h_l, r_{l,p})|` per layer, for the refusal carrier at position `pos`.
pub fn coupling_curve(c: &Carriers, pos: usize) -> Vec<f64> {
    (0..c.n_layer())
        .map(|l| cosine(c.harmfulness(l), &c.refusal[l][pos]).abs())
        .collect()
}

/// Belief score of Zhao et al.: `Delta(h) = mean_l [cos(h_l, mu^A_l) - cos(h_l, mu^B_l)]`, with
/// `h_l` one prompt's activation and `mu^A`, `mu^B` the two class means, at position `pos`.
pub fn belief_score(acts_of_prompt: &[Vec<Vec<f32>>], c: &Carriers, pos: usize) -> f64 {
    let n = c.n_layer();
    let mut total = 0.0;
    for (l, layer) in acts_of_prompt.iter().enumerate().take(n) {
        let h: Vec<f64> = layer[pos].iter().map(|&x| x as f64).collect();
        total += cosine(&h, &c.mean_harmful[l][pos]) - cosine(&h, &c.mean_harmless[l][pos]);
    }
    total / n as f64
}

/// Drift between two anchors' carriers.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    /// Principal angles (degrees) between the top-`k` subspaces at each layer.
    pub principal_angles_deg: Vec<Vec<f64>>,
    /// Cosine of the two anchors' carriers at each layer (at position `pos`).
    pub cosine_per_layer: Vec<f64>,
}

/// Principal angles per layer between the top-`k` subspaces (right singular vectors) of the
/// carriers over positions, and the cosine of the carriers at `pos`, for anchors `a` and `b`.
pub fn drift(a: &Carriers, b: &Carriers, pos: usize, k: usize) -> Drift {
    use crate::linalg::top_right_singular_vectors as top;
    let mut angles = Vec::new();
    let mut cos = Vec::new();
    for l in 0..a.n_layer().min(b.n_layer()) {
        let ang = principal_angles(&top(&a.refusal[l], k), &top(&b.refusal[l], k));
        angles.push(ang.iter().map(|x| x.to_degrees()).collect());
        cos.push(cosine(&a.refusal[l][pos], &b.refusal[l][pos]));
    }
    Drift {
        principal_angles_deg: angles,
        cosine_per_layer: cos,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acts(rows: Vec<Vec<f32>>) -> Activations {
        Activations {
            acts: rows.into_iter().map(|x| vec![vec![x.clone(), x]]).collect(),
        }
    }

    #[test]
    fn a_single_planted_direction_has_effective_rank_one_and_full_coupling() {
        // Prompts vary only along e0, harmful ones shifted by +3 e0: every resample's carrier is
        // a positive multiple of e0.
        let harmless = acts(vec![
            vec![0.1, 1.0, -0.3],
            vec![-0.2, 1.0, -0.3],
            vec![0.0, 1.0, -0.3],
        ]);
        let harmful = acts(vec![
            vec![3.1, 1.0, -0.3],
            vec![2.8, 1.0, -0.3],
            vec![3.0, 1.0, -0.3],
        ]);
        let e = effective_rank_at(&harmful, &harmless, 0, 5, 1);
        assert!((e.erank - 1.0).abs() < 1e-6 && e.rows == 10, "{e:?}");
        let c = difference_of_means(&harmful, &harmless, None, None);
        assert!((coupling_curve(&c, 1)[0] - 1.0).abs() < 1e-12);
        let d = drift(&c, &c, 0, 2);
        assert!(d.principal_angles_deg[0].iter().all(|a| a.abs() < 1e-4));
        assert!((d.cosine_per_layer[0] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn belief_score_is_positive_for_a_harmful_like_activation() {
        let harmless = acts(vec![vec![0.0, 1.0], vec![0.0, 1.2]]);
        let harmful = acts(vec![vec![1.0, 0.0], vec![1.2, 0.1]]);
        let c = difference_of_means(&harmful, &harmless, None, None);
        assert!(belief_score(&harmful.acts[0], &c, 0) > 0.5);
        assert!(belief_score(&harmless.acts[0], &c, 0) < -0.5);
    }
}
