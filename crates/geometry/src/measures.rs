//! Geometry numbers (docs/protocol.md §2): the effective-rank family of the refusal carrier with
//! bootstrap intervals, harmfulness/refusal coupling, the belief scores of Zhao et al., and drift.
use crate::carriers::{difference_of_means, Activations, Carriers};
use crate::linalg::{cosine, effective_rank, normalize, principal_angles, singular_values};
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// The shape of a stack of unit vectors' singular values `sigma`, three ways (docs/protocol.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spectrum {
    /// Roy and Vetterli's effective rank: `exp(H(p))`, `p_i = sigma_i / sum sigma`.
    pub erank: f64,
    /// Participation ratio: `(sum sigma^2)^2 / sum sigma^4`.
    pub participation_ratio: f64,
    /// The first singular value's share of the energy: `sigma_1^2 / sum sigma^2`.
    pub top_energy_share: f64,
}

impl Spectrum {
    /// The three measures of the matrix whose rows are `rows`.
    pub fn of(rows: &[Vec<f64>]) -> Spectrum {
        let s = singular_values(rows);
        let energy: f64 = s.iter().map(|x| x * x).sum();
        let fourth: f64 = s.iter().map(|x| x.powi(4)).sum();
        let (participation_ratio, top_energy_share) = if energy > 0.0 {
            (energy * energy / fourth, s[0] * s[0] / energy)
        } else {
            (0.0, 0.0)
        };
        Spectrum {
            erank: effective_rank(rows),
            participation_ratio,
            top_energy_share,
        }
    }
}

/// A value on the full prompt sets with its bootstrap bias correction and 95% interval.
///
/// Noise in the carriers spreads their singular values, so every measure here reads higher on
/// noisier carriers, and resampling the prompts adds noise: resampled values sit above the
/// full-set value. The interval is therefore the basic (reflected) bootstrap interval
/// `[2v - q97.5, 2v - q2.5]`, which corrects for that bias, and `bias_corrected` is
/// `2v - mean(resampled)`, the value it centres on; both may lie below `value`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    /// On the full sets.
    pub value: f64,
    /// `2 value - mean over resamples`.
    pub bias_corrected: f64,
    /// Lower end of the basic bootstrap 95% interval.
    pub lo: f64,
    /// Upper end of the basic bootstrap 95% interval.
    pub hi: f64,
}

impl Interval {
    /// `value` with the basic bootstrap interval of its `resampled` values.
    pub fn of(value: f64, resampled: &mut [f64]) -> Interval {
        if resampled.is_empty() {
            return Interval {
                value,
                bias_corrected: value,
                lo: value,
                hi: value,
            };
        }
        resampled.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| resampled[(q * (resampled.len() - 1) as f64).round() as usize];
        let mean = resampled.iter().sum::<f64>() / resampled.len() as f64;
        Interval {
            value,
            bias_corrected: 2.0 * value - mean,
            lo: 2.0 * value - at(0.975),
            hi: 2.0 * value - at(0.025),
        }
    }
}

/// One stack's measures with their intervals.
#[derive(Debug, Clone, Serialize)]
pub struct StackReport {
    /// What the rows are.
    pub matrix: String,
    /// Rows of the matrix.
    pub rows: usize,
    /// Roy-Vetterli effective rank.
    pub erank: Interval,
    /// Participation ratio.
    pub participation_ratio: Interval,
    /// First singular value's energy share.
    pub top_energy_share: Interval,
}

/// The effective rank of the refusal carrier at one layer: of the stack across positions, and
/// of the stack across a window of layers at the last position.
#[derive(Debug, Clone, Serialize)]
pub struct ErankReport {
    /// Layer.
    pub layer: usize,
    /// Rows = unit refusal carriers at this layer across the post-instruction positions.
    pub positions: StackReport,
    /// Rows = unit refusal carriers at the last position across the layers of the window.
    pub layers: StackReport,
    /// Bootstrap resamples behind the intervals.
    pub resamples: usize,
}

/// Which rows the stacks hold.
#[derive(Debug, Clone, Copy)]
pub struct StackSpec {
    /// Layers on each side of the measured one in the layer stack.
    pub window: usize,
    /// Put `t_inst` in the position stack too (it is the harmfulness carrier's position).
    pub with_t_inst: bool,
}

impl Default for StackSpec {
    fn default() -> Self {
        StackSpec {
            window: 2,
            with_t_inst: false,
        }
    }
}

/// Unit rows of the two stacks at `layer` from one set of carriers.
fn stacks(c: &Carriers, layer: usize, spec: StackSpec) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let first = if spec.with_t_inst {
        0
    } else {
        1.min(c.n_pos() - 1)
    };
    let positions = c.refusal[layer][first..]
        .iter()
        .map(|r| normalize(r))
        .collect();
    let last = c.n_pos() - 1;
    let (lo, hi) = (
        layer.saturating_sub(spec.window),
        (layer + spec.window).min(c.n_layer() - 1),
    );
    let layers = (lo..=hi).map(|l| normalize(&c.refusal[l][last])).collect();
    (positions, layers)
}

/// **(ours)** The effective-rank family at every layer: each measure on the full prompt sets,
/// and its 95% interval over `resamples` bootstrap resamples of the prompts (one matrix per
/// resample, never pooled). A resample count changes the interval's precision, not the value.
pub fn effective_ranks(
    harmful: &Activations,
    harmless: &Activations,
    spec: StackSpec,
    resamples: usize,
    seed: u64,
) -> Vec<ErankReport> {
    let full = difference_of_means(harmful, harmless, None, None);
    let resampled = resample_carriers(harmful, harmless, resamples, seed);
    effective_ranks_of(&full, &resampled, spec)
}

/// The carriers of `resamples` bootstrap resamples of the prompts (harmful and harmless drawn
/// independently, with replacement), in a seeded order.
pub fn resample_carriers(
    harmful: &Activations,
    harmless: &Activations,
    resamples: usize,
    seed: u64,
) -> Vec<Carriers> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (nh, nl) = (harmful.len(), harmless.len());
    (0..resamples)
        .map(|_| {
            let ih: Vec<usize> = (0..nh).map(|_| rng.gen_range(0..nh)).collect();
            let il: Vec<usize> = (0..nl).map(|_| rng.gen_range(0..nl)).collect();
            difference_of_means(harmful, harmless, Some(&ih), Some(&il))
        })
        .collect()
}

/// `|cos(h_l, r_{l,p})|` at every layer and position, with its basic bootstrap 95% interval over
/// the `resampled` carriers.
pub fn coupling_intervals(full: &Carriers, resampled: &[Carriers]) -> Vec<Vec<Interval>> {
    let at = |c: &Carriers, l: usize, p: usize| cosine(c.harmfulness(l), &c.refusal[l][p]).abs();
    (0..full.n_layer())
        .map(|l| {
            (0..full.n_pos())
                .map(|p| {
                    let mut v: Vec<f64> = resampled.iter().map(|c| at(c, l, p)).collect();
                    Interval::of(at(full, l, p), &mut v)
                })
                .collect()
        })
        .collect()
}

/// [`effective_ranks`] from carriers already estimated on the full sets and on resamples.
pub fn effective_ranks_of(
    full: &Carriers,
    resampled: &[Carriers],
    spec: StackSpec,
) -> Vec<ErankReport> {
    let n_layer = full.n_layer();
    let resamples = resampled.len();
    // Per resample and layer: the two stacks' spectra.
    let per: Vec<Vec<(Spectrum, Spectrum)>> = resampled
        .iter()
        .map(|c| {
            (0..n_layer)
                .map(|l| {
                    let (p, w) = stacks(c, l, spec);
                    (Spectrum::of(&p), Spectrum::of(&w))
                })
                .collect()
        })
        .collect();
    (0..n_layer)
        .map(|l| {
            let (p, w) = stacks(full, l, spec);
            let report = |rows: &[Vec<f64>], which: fn(&(Spectrum, Spectrum)) -> Spectrum, matrix: String| {
                let point = Spectrum::of(rows);
                let pick = |f: fn(&Spectrum) -> f64| {
                    let mut v: Vec<f64> = per.iter().map(|r| f(&which(&r[l]))).collect();
                    Interval::of(f(&point), &mut v)
                };
                StackReport {
                    matrix,
                    rows: rows.len(),
                    erank: pick(|s| s.erank),
                    participation_ratio: pick(|s| s.participation_ratio),
                    top_energy_share: pick(|s| s.top_energy_share),
                }
            };
            let first = if spec.with_t_inst { "t_inst and " } else { "" };
            ErankReport {
                layer: l,
                positions: report(
                    &p,
                    |x| x.0,
                    format!("unit refusal carriers at layer {l} across the {first}post-instruction positions"),
                ),
                layers: report(
                    &w,
                    |x| x.1,
                    format!(
                        "unit refusal carriers at the last position across layers {}-{}",
                        l.saturating_sub(spec.window),
                        (l + spec.window).min(n_layer - 1)
                    ),
                ),
                resamples,
            }
        })
        .collect()
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
        let e = &effective_ranks(&harmful, &harmless, StackSpec::default(), 5, 1)[0];
        // One post-instruction position: a one-row stack, rank 1 in every resample.
        assert_eq!(e.positions.rows, 1);
        assert!((e.positions.erank.value - 1.0).abs() < 1e-6, "{e:?}");
        assert!((e.positions.erank.hi - 1.0).abs() < 1e-6, "{e:?}");
        let c = difference_of_means(&harmful, &harmless, None, None);
        assert!((coupling_curve(&c, 1)[0] - 1.0).abs() < 1e-12);
        // Every resample's carriers lie along e0 too: coupling 1 with a degenerate interval.
        let ci = coupling_intervals(&c, &resample_carriers(&harmful, &harmless, 8, 3));
        assert_eq!((ci.len(), ci[0].len()), (1, 2));
        for i in &ci[0] {
            assert!(
                (i.value - 1.0).abs() < 1e-12 && (i.lo - 1.0).abs() < 1e-9,
                "{i:?}"
            );
        }
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

    #[test]
    fn the_spectrum_measures_match_hand_computed_values() {
        // Five unit rows with pairwise cosine 0.9: Gram = 0.1 I + 0.9 J, so sigma^2 = 4.6 once and
        // 0.1 four times. erank = exp(H(sigma / sum sigma)) = 3.2325, participation ratio =
        // 25 / (4.6^2 + 4 * 0.01) = 1.1792, top energy share = 4.6 / 5 = 0.92.
        let rows: Vec<Vec<f64>> = (0..5)
            .map(|i| {
                let mut r = vec![0.0; 6];
                r[0] = 0.9f64.sqrt();
                r[i + 1] = 0.1f64.sqrt();
                r
            })
            .collect();
        let s = Spectrum::of(&rows);
        let (big, small) = (4.6f64.sqrt(), 0.1f64.sqrt());
        let total = big + 4.0 * small;
        let h = -(big / total) * (big / total).ln() - 4.0 * (small / total) * (small / total).ln();
        assert!(
            (s.erank - h.exp()).abs() < 1e-9 && (s.erank - 3.234).abs() < 1e-3,
            "{s:?}"
        );
        assert!((s.participation_ratio - 25.0 / 21.2).abs() < 1e-9, "{s:?}");
        assert!((s.top_energy_share - 0.92).abs() < 1e-9, "{s:?}");
        // Orthonormal rows: every measure says "as many directions as rows".
        let eye: Vec<Vec<f64>> = (0..3)
            .map(|i| (0..3).map(|j| f64::from(u8::from(i == j))).collect())
            .collect();
        let s = Spectrum::of(&eye);
        assert!((s.erank - 3.0).abs() < 1e-9 && (s.participation_ratio - 3.0).abs() < 1e-9);
        assert!((s.top_energy_share - 1.0 / 3.0).abs() < 1e-9);
    }

    /// `n` prompts per set, one layer, `1 + dirs.len()` positions (`t_inst` first, which gets the
    /// first direction too), width 8: harmful prompts are shifted by 2 along the position's
    /// direction, and every activation carries seeded Gaussian noise of scale `noise`.
    fn planted(dirs: &[usize], n: usize, noise: f64, seed: u64) -> (Activations, Activations) {
        planted_wide(dirs, n, noise, seed, 8)
    }

    /// [`planted`] at width `width`.
    fn planted_wide(
        dirs: &[usize],
        n: usize,
        noise: f64,
        seed: u64,
        width: usize,
    ) -> (Activations, Activations) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Box-Muller.
        let mut gauss = move || {
            let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
            noise * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        };
        let mut set = |shift: f32| Activations {
            acts: (0..n)
                .map(|_| {
                    let positions = std::iter::once(dirs[0]).chain(dirs.iter().copied());
                    vec![positions
                        .map(|d| {
                            (0..width)
                                .map(|j| {
                                    let base = if j == d { shift } else { 0.0 };
                                    base + gauss() as f32
                                })
                                .collect()
                        })
                        .collect()]
                })
                .collect(),
        };
        let harmful = set(2.0);
        let harmless = set(0.0);
        (harmful, harmless)
    }

    #[test]
    fn planted_rank_one_and_rank_two_carriers_read_about_one_and_two() {
        let spec = StackSpec::default();
        // Six post-instruction positions all along e0: rank 1. Roy-Vetterli's erank weighs
        // singular values linearly, so it needs little noise to read near 1.
        let (h, l) = planted(&[0; 6], 64, 0.02, 7);
        let e = &effective_ranks(&h, &l, spec, 20, 1)[0].positions;
        assert_eq!(e.rows, 6);
        assert!(e.erank.value < 1.2, "{e:?}");
        assert!(e.participation_ratio.value < 1.01, "{e:?}");
        assert!(e.top_energy_share.value > 0.99, "{e:?}");
        // Three along e0, three along e1: rank 2.
        let (h, l) = planted(&[0, 0, 0, 1, 1, 1], 64, 0.02, 7);
        let e = &effective_ranks(&h, &l, spec, 20, 1)[0].positions;
        assert!((1.9..2.3).contains(&e.erank.value), "{e:?}");
        assert!((1.95..2.05).contains(&e.participation_ratio.value), "{e:?}");
        assert!((0.45..0.55).contains(&e.top_energy_share.value), "{e:?}");
        // With more noise every measure reads higher; the bias correction moves back toward
        // the planted rank.
        let (h, l) = planted(&[0, 0, 0, 1, 1, 1], 64, 0.3, 7);
        let e = &effective_ranks(&h, &l, spec, 40, 1)[0].positions;
        assert!(e.erank.value > 2.3, "{e:?}");
        assert!(e.erank.bias_corrected < e.erank.value, "{e:?}");
        assert!(e.erank.lo < e.erank.hi, "{e:?}");
        assert!((1.9..2.2).contains(&e.participation_ratio.value), "{e:?}");
    }

    #[test]
    fn more_resamples_sharpen_the_interval_but_do_not_move_the_value() {
        // Pooling resamples' rows into one matrix (the measure this replaces) grows with their
        // count; one matrix per resample does not.
        // Wide enough that resamples' noise has room: 256, as a model's hidden size has more.
        let (h, l) = planted_wide(&[0, 0, 0, 1, 1, 1], 32, 0.1, 3, 256);
        let spec = StackSpec::default();
        let few = &effective_ranks(&h, &l, spec, 10, 1)[0].positions.erank;
        let many = &effective_ranks(&h, &l, spec, 40, 1)[0].positions.erank;
        assert_eq!(few.value, many.value);
        assert!(many.lo <= few.hi && few.lo <= many.hi, "{few:?} {many:?}");
        assert!(
            (few.bias_corrected - many.bias_corrected).abs() < (many.hi - many.lo),
            "{few:?} {many:?}"
        );
        // The pooled stack's erank for comparison: it climbs past the interval as resamples
        // add rows.
        let pooled = |k: usize| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let mut rows = Vec::new();
            for _ in 0..k {
                let ih: Vec<usize> = (0..h.len()).map(|_| rng.gen_range(0..h.len())).collect();
                let il: Vec<usize> = (0..l.len()).map(|_| rng.gen_range(0..l.len())).collect();
                let c = difference_of_means(&h, &l, Some(&ih), Some(&il));
                rows.extend(stacks(&c, 0, spec).0);
            }
            effective_rank(&rows)
        };
        let (p10, p40) = (pooled(10), pooled(40));
        assert!(
            p40 - p10 > many.hi - many.lo,
            "pooled {p10} -> {p40} vs {many:?}"
        );
    }

    #[test]
    fn the_layer_stack_spans_the_window_at_the_last_position() {
        // Three layers, the carrier along e_l at layer l: the window of +-1 around layer 1 holds
        // three orthogonal rows.
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut set = |shift: f32| Activations {
            acts: (0..8)
                .map(|_| {
                    (0..3)
                        .map(|layer| {
                            (0..2)
                                .map(|_| {
                                    (0..4)
                                        .map(|j| {
                                            (if j == layer { shift } else { 0.0 })
                                                + rng.gen_range(-0.01f32..0.01)
                                        })
                                        .collect()
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect(),
        };
        let (h, l) = (set(1.0), set(0.0));
        let spec = StackSpec {
            window: 1,
            with_t_inst: false,
        };
        let e = effective_ranks(&h, &l, spec, 4, 1);
        assert_eq!(e[1].layers.rows, 3);
        assert!(
            (e[1].layers.participation_ratio.value - 3.0).abs() < 0.05,
            "{:?}",
            e[1]
        );
        assert_eq!(e[0].layers.rows, 2, "the window is cut at the first layer");
    }
}
