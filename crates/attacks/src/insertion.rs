//! Random insertion and worst insertion (docs/protocol.md §5, study 4 of docs/protocol.md §1).
//!
//! Random insertion: take the model's own (refusing) reply `R`, choose a position `p` uniformly in
//! `0..=|R|` and a span of `L ~ U{min_span..=max_span}` tokens of a harmful target continuation
//! `T`, force `R[..p] ++ span` as the start of the reply, and let the model continue.
//! Worst insertion: draw `candidates` such (position, span) pairs and keep the one with the lowest
//! score: the probability of a refusal token at the next position, or the negative log-likelihood
//! of the span given `R[..p]`. Every candidate's score is recorded.
use crate::{
    prefix_cache, target_losses, Error, Insertion, InsertionCandidate, Result, TargetLoss,
};
use candle_core::DType;
use rand::{Rng, SeedableRng};
use safegeo_runtime::{Model, Observer};
use serde::{Deserialize, Serialize};

/// How worst insertion ranks candidates (lower = stronger attack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InsertionScore {
    /// Probability mass of refusal opening tokens at the position after the span.
    #[default]
    RefusalProbability,
    /// Mean negative log-likelihood of the span given the prompt and `R[..p]`.
    SpanLikelihood,
}

/// Insertion settings; defaults follow docs/protocol.md §5 (span 5 to 20 tokens).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct InsertionConfig {
    /// Shortest span.
    pub min_span: usize,
    /// Longest span.
    pub max_span: usize,
    /// Candidates drawn (1 = random insertion, more = worst insertion).
    pub candidates: usize,
    /// Ranking of candidates.
    pub score: InsertionScore,
    /// Tokens of the model's own reply generated before inserting.
    pub own_reply_tokens: usize,
    /// Seed (behaviour `i` draws from `seed + i`).
    pub seed: u64,
}

impl Default for InsertionConfig {
    fn default() -> Self {
        Self {
            min_span: 5,
            max_span: 20,
            candidates: 1,
            score: InsertionScore::RefusalProbability,
            own_reply_tokens: 64,
            seed: 0,
        }
    }
}

impl InsertionConfig {
    /// Check the values.
    pub fn check(&self) -> Result<()> {
        if self.min_span == 0 || self.min_span > self.max_span {
            return Err(Error::Invalid(format!(
                "insertion span {}..={} must satisfy 1 <= min <= max",
                self.min_span, self.max_span
            )));
        }
        if self.candidates == 0 {
            return Err(Error::Invalid(
                "insertion needs at least one candidate".into(),
            ));
        }
        Ok(())
    }
}

/// Draw `(position, span_start, span_len)` candidates for a reply of `reply_len` tokens and a
/// continuation of `target_len` tokens.
pub fn draw_candidates(
    reply_len: usize,
    target_len: usize,
    cfg: &InsertionConfig,
    seed: u64,
) -> Vec<(usize, usize, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..cfg.candidates)
        .map(|_| {
            let position = rng.gen_range(0..=reply_len);
            let len = rng
                .gen_range(cfg.min_span..=cfg.max_span)
                .min(target_len)
                .max(1);
            let start = rng.gen_range(0..=target_len - len);
            (position, start, len)
        })
        .collect()
}

/// Plan the insertion for one prompt: score every candidate and keep the lowest.
/// `refusal_ids` are the refusal opening tokens (for [`InsertionScore::RefusalProbability`]).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    model: &Model,
    prompt: &[u32],
    own_reply: &[u32],
    continuation: &[u32],
    refusal_ids: &[u32],
    cfg: &InsertionConfig,
    seed: u64,
    obs: &mut dyn Observer,
) -> Result<Insertion> {
    cfg.check()?;
    if continuation.is_empty() {
        return Err(Error::Invalid(
            "insertion needs a non-empty harmful continuation".into(),
        ));
    }
    let draws = draw_candidates(own_reply.len(), continuation.len(), cfg, seed);
    let forced = |&(p, s, l): &(usize, usize, usize)| -> Vec<u32> {
        own_reply[..p]
            .iter()
            .chain(&continuation[s..s + l])
            .copied()
            .collect()
    };
    let scores: Vec<f64> = match cfg.score {
        InsertionScore::RefusalProbability => {
            let rows: Vec<Vec<u32>> = draws
                .iter()
                .map(|d| prompt.iter().copied().chain(forced(d)).collect())
                .collect();
            let logits = model.last_logits(&rows, obs)?.to_dtype(DType::F64)?;
            safegeo_runtime::log_softmax_last(&logits)?
                .to_vec2::<f64>()?
                .iter()
                .map(|lp| refusal_ids.iter().map(|&i| lp[i as usize].exp()).sum())
                .collect()
        }
        InsertionScore::SpanLikelihood => {
            // The last prompt token stays outside the cache so no row is empty.
            let (last, head) = prompt
                .split_last()
                .ok_or_else(|| Error::Invalid("insertion needs a prompt".into()))?;
            let cache = prefix_cache(model, head, obs)?;
            let mut out = Vec::with_capacity(draws.len());
            for &(p, s, l) in &draws {
                let span = &continuation[s..s + l];
                let middle: Vec<u32> = std::iter::once(*last)
                    .chain(own_reply[..p].iter().copied())
                    .collect();
                let (loss, _) = target_losses(
                    model,
                    &cache,
                    &[middle],
                    span,
                    TargetLoss::CrossEntropy,
                    obs,
                )?;
                out.push(loss[0]);
            }
            out
        }
    };
    let best = (0..draws.len())
        .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
        .expect("at least one candidate");
    let (position, start, len) = draws[best];
    let span_ids = continuation[start..start + len].to_vec();
    Ok(Insertion {
        own_reply: model.tok.decode(own_reply, true)?,
        position,
        span: model.tok.decode(&span_ids, false)?,
        span_ids,
        candidates: draws
            .iter()
            .zip(&scores)
            .map(
                |(&(position, span_start, span_len), &score)| InsertionCandidate {
                    position,
                    span_start,
                    span_len,
                    score,
                },
            )
            .collect(),
    })
}

/// The forced start of the reply for a planned insertion: `R[..p] ++ span`, as ids.
pub fn forced_ids(own_reply: &[u32], ins: &Insertion) -> Vec<u32> {
    own_reply[..ins.position]
        .iter()
        .chain(&ins.span_ids)
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safegeo_runtime::testing::tiny_model;
    use safegeo_runtime::{generate, Arch, GenerateConfig, NoHooks};

    #[test]
    fn draws_respect_bounds() {
        let cfg = InsertionConfig {
            candidates: 200,
            ..Default::default()
        };
        for (p, s, l) in draw_candidates(30, 12, &cfg, 7) {
            assert!(p <= 30);
            assert!((1..=12).contains(&l) && s + l <= 12);
        }
        // Seeded.
        assert_eq!(
            draw_candidates(30, 40, &cfg, 1),
            draw_candidates(30, 40, &cfg, 1)
        );
    }

    #[test]
    fn worst_insertion_keeps_the_lowest_score_and_the_span_lands_where_recorded() {
        let m = tiny_model(Arch::Llama, 9, DType::F32).unwrap();
        let prompt = vec![2u32, 3, 4, 5];
        let own = generate(
            &m,
            std::slice::from_ref(&prompt),
            &GenerateConfig {
                max_new_tokens: 12,
                ..Default::default()
            },
            &mut NoHooks,
        )
        .unwrap()
        .remove(0)
        .ids;
        let continuation: Vec<u32> = (20..40).collect();
        for score in [
            InsertionScore::RefusalProbability,
            InsertionScore::SpanLikelihood,
        ] {
            let cfg = InsertionConfig {
                candidates: 8,
                min_span: 2,
                max_span: 5,
                score,
                ..Default::default()
            };
            let ins = plan(
                &m,
                &prompt,
                &own,
                &continuation,
                &[6, 7],
                &cfg,
                3,
                &mut NoHooks,
            )
            .unwrap();
            assert_eq!(ins.candidates.len(), 8);
            let min = ins
                .candidates
                .iter()
                .map(|c| c.score)
                .fold(f64::INFINITY, f64::min);
            let kept = ins
                .candidates
                .iter()
                .find(|c| c.position == ins.position && c.span_len == ins.span_ids.len())
                .unwrap();
            assert_eq!(kept.score, min);
            // Continue decoding after the forced prefix: the span sits at the recorded position.
            let forced = forced_ids(&own, &ins);
            let out = generate(
                &m,
                std::slice::from_ref(&prompt),
                &GenerateConfig {
                    max_new_tokens: 6,
                    prefix_ids: forced.clone(),
                    ..Default::default()
                },
                &mut NoHooks,
            )
            .unwrap()
            .remove(0)
            .ids;
            assert_eq!(
                &out[ins.position..ins.position + ins.span_ids.len()],
                ins.span_ids.as_slice()
            );
            assert_eq!(&out[..ins.position], &own[..ins.position]);
        }
    }
}
