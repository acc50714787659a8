//! Carrier estimation (docs/protocol.md §2): one capture pass over harmful and harmless prompts,
//! resid_pre at every layer at `t_inst` and every post-instruction position, then
//! `r_{l,i} = mean_harmful x_l(p, i) - mean_harmless x_l(p, i)` accumulated in f64.
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use safegeo_runtime::{Hooks, LogitsAt, Message, Model, Positions, PromptPositions, Site};

/// Activations of one prompt set: `acts[n][l][p]` is a `d`-vector (f32 to halve memory).
pub struct Activations {
    /// Per prompt, per layer, per position (0 = `t_inst`, then the post-instruction positions).
    pub acts: Vec<Vec<Vec<Vec<f32>>>>,
}

impl Activations {
    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.acts.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.acts.is_empty()
    }

    /// Mean over the prompts `idx` (all when `None`) at layer `l`, position `p`, in f64.
    pub fn mean(&self, l: usize, p: usize, idx: Option<&[usize]>) -> Vec<f64> {
        let d = self.acts[0][l][p].len();
        let mut sum = vec![0f64; d];
        let all: Vec<usize>;
        let idx = match idx {
            Some(i) => i,
            None => {
                all = (0..self.acts.len()).collect();
                &all
            }
        };
        for &n in idx {
            for (s, &x) in sum.iter_mut().zip(&self.acts[n][l][p]) {
                *s += x as f64;
            }
        }
        let k = idx.len().max(1) as f64;
        sum.iter().map(|s| s / k).collect()
    }
}

/// Prompt token ids and their named positions under the chat template.
pub fn prompt_ids(model: &Model, prompts: &[String]) -> Result<(Vec<Vec<u32>>, PromptPositions)> {
    let mut ids = Vec::with_capacity(prompts.len());
    let mut post: Option<usize> = None;
    for p in prompts {
        let msgs = [Message::new("user", p.clone())];
        let raw = model.tok.chat_template.is_none();
        let pos = model.tok.prompt_positions(&msgs, raw)?;
        match post {
            None => post = Some(pos.post_len),
            Some(n) if n != pos.post_len => {
                return Err(Error::Invalid(format!(
                    "post-instruction token count differs between prompts ({n} vs {}); the template is not position-stable",
                    pos.post_len
                )))
            }
            _ => {}
        }
        ids.push(model.tok.encode_chat(&msgs, raw)?);
    }
    let post_len = post.ok_or_else(|| Error::Invalid("no prompts".into()))?;
    let len = ids.iter().map(Vec::len).max().unwrap_or(0);
    Ok((ids, PromptPositions { len, post_len }))
}

/// Capture resid_pre at every layer at `t_inst` and the post-instruction positions, at most
/// `batch` prompts per forward pass, prompts of similar length together
/// ([`crate::buckets::length_buckets`]) and the template's shared prefix computed once per
/// forward. Left padding aligns prompt ends, so the last `post_len + 1` tokens of every row are
/// exactly these positions. Activations come back in the order of `ids`.
pub fn capture(
    model: &Model,
    ids: &[Vec<u32>],
    post_len: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Activations> {
    let k = post_len + 1;
    if let Some(short) = ids.iter().find(|p| p.len() < k) {
        return Err(Error::Invalid(format!(
            "a prompt of {} tokens is shorter than the {k} positions to capture",
            short.len()
        )));
    }
    let (order, buckets) = crate::buckets::by_length(ids, batch);
    let mut acts: Vec<Option<Vec<Vec<Vec<f32>>>>> = vec![None; ids.len()];
    for bucket in buckets {
        let which = &order[bucket];
        let chunk: Vec<Vec<u32>> = which.iter().map(|&i| ids[i].clone()).collect();
        let mut hooks = Hooks::capture(&[Site::ResidPre], Positions::LastK(k));
        model.forward_prompts(&chunk, 1, k, LogitsAt::None, &mut hooks)?;
        let per_layer: Vec<Vec<Vec<Vec<f32>>>> = (0..model.cfg.n_layer)
            .map(|l| -> Result<_> {
                let t: &Tensor = hooks
                    .captured
                    .get(Site::ResidPre, l)
                    .ok_or_else(|| Error::Invalid("missing capture".into()))?;
                Ok(t.to_dtype(DType::F32)?.to_vec3::<f32>()?)
            })
            .collect::<Result<_>>()?; // [l][row][p][d]
        for (r, &i) in which.iter().enumerate() {
            acts[i] = Some(per_layer.iter().map(|layer| layer[r].clone()).collect());
        }
        progress(chunk.len());
    }
    Ok(Activations {
        acts: acts
            .into_iter()
            .map(|a| a.expect("every prompt in a bucket"))
            .collect(),
    })
}

/// Carrier candidates and their ingredients, `[l][p][d]` in f64.
#[derive(Debug, Clone)]
pub struct Carriers {
    /// `r_{l,p}` = mean harmful - mean harmless.
    pub refusal: Vec<Vec<Vec<f64>>>,
    /// `normalize(r - (r.g) g)`, `g = normalize(mean harmless)` (heretic).
    pub refusal_orth: Vec<Vec<Vec<f64>>>,
    /// Mean harmful activation.
    pub mean_harmful: Vec<Vec<Vec<f64>>>,
    /// Mean harmless activation.
    pub mean_harmless: Vec<Vec<Vec<f64>>>,
}

impl Carriers {
    /// Harmfulness carrier at layer `l` (Zhao et al.): the difference of means at `t_inst`.
    pub fn harmfulness(&self, l: usize) -> &[f64] {
        &self.refusal[l][0]
    }

    /// Layers.
    pub fn n_layer(&self) -> usize {
        self.refusal.len()
    }

    /// Positions per layer (`t_inst` + post-instruction).
    pub fn n_pos(&self) -> usize {
        self.refusal[0].len()
    }
}

impl Carriers {
    /// The orthogonalized carriers at the plain carriers' scale: `(r . u) u` for each unit `u`
    /// of `refusal_orth`, which is `r - (r.g) g` itself (`u` is its direction and orthogonal to
    /// `g`). Activation addition (`induce`) needs this: a unit vector added to a residual stream
    /// whose norm is in the tens does nothing measurable.
    pub fn refusal_orth_at_scale(&self) -> Vec<Vec<Vec<f64>>> {
        (0..self.n_layer())
            .map(|l| {
                (0..self.n_pos())
                    .map(|p| self.orth_at_scale(l, p))
                    .collect()
            })
            .collect()
    }

    /// [`Carriers::refusal_orth_at_scale`] of one candidate, `(r . u) u` at layer `l`, position
    /// `p`.
    pub fn orth_at_scale(&self, l: usize, p: usize) -> Vec<f64> {
        let (r, u) = (&self.refusal[l][p], &self.refusal_orth[l][p]);
        let along: f64 = r.iter().zip(u).map(|(a, b)| a * b).sum();
        u.iter().map(|x| along * x).collect()
    }
}

/// Difference-of-means carriers over prompt subsets (all prompts when `None`).
pub fn difference_of_means(
    harmful: &Activations,
    harmless: &Activations,
    harmful_idx: Option<&[usize]>,
    harmless_idx: Option<&[usize]>,
) -> Carriers {
    let (nl, np) = (harmful.acts[0].len(), harmful.acts[0][0].len());
    let mut c = Carriers {
        refusal: vec![],
        refusal_orth: vec![],
        mean_harmful: vec![],
        mean_harmless: vec![],
    };
    for l in 0..nl {
        let (mut r, mut ro, mut mh, mut ml) = (vec![], vec![], vec![], vec![]);
        for p in 0..np {
            let a = harmful.mean(l, p, harmful_idx);
            let b = harmless.mean(l, p, harmless_idx);
            let diff: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
            ro.push(orthogonalize(&diff, &b));
            r.push(diff);
            mh.push(a);
            ml.push(b);
        }
        c.refusal.push(r);
        c.refusal_orth.push(ro);
        c.mean_harmful.push(mh);
        c.mean_harmless.push(ml);
    }
    c
}

/// `normalize(r - (r.g) g)` with `g = normalize(mean_harmless)`.
pub fn orthogonalize(r: &[f64], mean_harmless: &[f64]) -> Vec<f64> {
    let g = crate::linalg::normalize(mean_harmless);
    let dot: f64 = r.iter().zip(&g).map(|(a, b)| a * b).sum();
    crate::linalg::normalize(
        &r.iter()
            .zip(&g)
            .map(|(a, b)| a - dot * b)
            .collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acts(v: Vec<Vec<f32>>) -> Activations {
        // one layer, one position
        Activations {
            acts: v.into_iter().map(|x| vec![vec![x]]).collect(),
        }
    }

    #[test]
    fn orthogonalized_carriers_at_scale_are_r_minus_its_component_along_the_harmless_mean() {
        // Harmful mean (3, 5), harmless mean (0, 1): r = (3, 4), g = (0, 1), r - (r.g) g = (3, 0).
        let c = difference_of_means(
            &acts(vec![vec![3.0, 5.0]]),
            &acts(vec![vec![0.0, 1.0]]),
            None,
            None,
        );
        let u = &c.refusal_orth[0][0];
        assert!((u[0] - 1.0).abs() < 1e-12 && u[1].abs() < 1e-12, "{u:?}");
        let scaled = c.refusal_orth_at_scale();
        assert!((scaled[0][0][0] - 3.0).abs() < 1e-12 && scaled[0][0][1].abs() < 1e-12);
    }

    #[test]
    fn capture_in_length_buckets_equals_one_prompt_at_a_time_in_the_callers_order() {
        use safegeo_runtime::testing::tiny_model;
        let m = tiny_model(safegeo_runtime::Arch::Qwen2, 5, DType::F32).unwrap();
        // A 10-token shared prefix, then instructions of lengths out of order.
        let ids: Vec<Vec<u32>> = [7usize, 2, 12, 3, 9, 2, 30]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (0..10)
                    .chain((0..n).map(|j| 11 + ((3 * i + j) % 25)))
                    .map(|t| t as u32)
                    .collect()
            })
            .collect();
        let post_len = 1;
        let together = capture(&m, &ids, post_len, 3, &mut |_| {}).unwrap();
        let alone = capture(&m, &ids, post_len, 1, &mut |_| {}).unwrap();
        assert_eq!(together.acts.len(), ids.len());
        for (i, (a, b)) in together.acts.iter().zip(&alone.acts).enumerate() {
            let d = a
                .iter()
                .flatten()
                .flatten()
                .zip(b.iter().flatten().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "prompt {i}: {d}");
        }
        // Prompts differ, so a mix-up of rows would show.
        let (a, b) = (&together.acts[0][1][0], &together.acts[1][1][0]);
        assert!(a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-3));
        // A prompt shorter than the positions asked for is an error.
        assert!(capture(&m, &[vec![1]], 3, 4, &mut |_| {}).is_err());
    }

    #[test]
    fn difference_of_means_in_f64_matches_a_naive_computation() {
        // Exact in f32 storage, but an f32 running sum (3 * 2^24 + 6) would round.
        let big = 16_777_216.0f32;
        let h = acts(vec![
            vec![big, 1.0],
            vec![big + 2.0, 3.0],
            vec![big + 4.0, 5.0],
        ]);
        let b = acts(vec![vec![big, -1.0], vec![big, 1.0]]);
        let c = difference_of_means(&h, &b, None, None);
        assert_eq!(c.refusal[0][0], vec![2.0, 3.0]);
        let sub = difference_of_means(&h, &b, Some(&[0, 0, 2]), Some(&[1]));
        assert!(
            (sub.refusal[0][0][0] - 4.0 / 3.0).abs() < 1e-7
                && (sub.refusal[0][0][1] - 4.0 / 3.0).abs() < 1e-12
        );
    }

    #[test]
    fn orthogonalized_carrier_is_unit_and_orthogonal_to_the_harmless_mean() {
        let o = orthogonalize(&[3.0, 4.0, 1.0], &[0.0, 2.0, 0.0]);
        assert!((o.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(o[1].abs() < 1e-12);
    }
}
