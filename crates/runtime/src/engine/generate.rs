//! Batched greedy and sampled decoding with a KV cache, stop tokens, observers active while
//! decoding, and a forced response prefix.
use crate::engine::hooks::{Observer, Phase};
use crate::engine::model::{KvCache, LogitsAt, Model};
use crate::{Error, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};

/// Decoding settings. Defaults: greedy, 64 new tokens.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerateConfig {
    /// Maximum tokens to generate after the prompt and forced prefix.
    pub max_new_tokens: usize,
    /// `0` = greedy; otherwise softmax temperature.
    pub temperature: f64,
    /// Nucleus sampling mass (1.0 = off).
    pub top_p: f64,
    /// Seed; row `i` of a call samples with `seed + i`.
    pub seed: u64,
    /// Tokens forced at the start of every reply (prefill attack), already tokenized.
    pub prefix_ids: Vec<u32>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            prefix_ids: Vec::new(),
        }
    }
}

/// Why decoding of a row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Stop {
    /// An end-of-sequence or end-of-turn token was produced (not included in `ids`).
    EndOfTurn,
    /// `max_new_tokens` reached.
    MaxTokens,
}

/// One row's output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// Reply ids: the forced prefix, then generated tokens, without the stop token.
    pub ids: Vec<u32>,
    /// Why it stopped.
    pub stop: Stop,
}

fn sample(row: &[f32], cfg: &GenerateConfig, rng: &mut rand::rngs::StdRng) -> u32 {
    let argmax = || {
        row.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 {
                    (i, v)
                } else {
                    b
                }
            })
            .0 as u32
    };
    if cfg.temperature <= 0.0 {
        return argmax();
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, ((v as f64 - max) / cfg.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (n, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= cfg.top_p {
            cut = n + 1;
            break;
        }
    }
    let probs = &probs[..cut];
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.gen::<f64>() * mass;
    for p in probs {
        u -= p.1;
        if u <= 0.0 {
            return p.0 as u32;
        }
    }
    probs.last().map_or_else(argmax, |p| p.0 as u32)
}

/// Generate replies for a batch of tokenized prompts (left-padded together); row `i` samples
/// with seed `cfg.seed + i`.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    obs: &mut dyn Observer,
) -> Result<Vec<Generation>> {
    let seeds: Vec<u64> = (0..prompts.len() as u64)
        .map(|i| cfg.seed.wrapping_add(i))
        .collect();
    generate_seeded(model, prompts, &seeds, cfg, obs)
}

/// [`generate`] with an explicit sampling seed per row (so results do not depend on batching).
pub fn generate_seeded(
    model: &Model,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    cfg: &GenerateConfig,
    obs: &mut dyn Observer,
) -> Result<Vec<Generation>> {
    if seeds.len() != prompts.len() {
        return Err(Error::Invalid(format!(
            "{} seeds for {} prompts",
            seeds.len(),
            prompts.len()
        )));
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if cfg.temperature < 0.0 || !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
        return Err(Error::Invalid(format!(
            "temperature {} must be >= 0 and top_p {} in (0, 1]",
            cfg.temperature, cfg.top_p
        )));
    }
    let full: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| p.iter().chain(cfg.prefix_ids.iter()).copied().collect())
        .collect();
    for p in &full {
        if p.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if p.len() + cfg.max_new_tokens > model.cfg.context_length {
            return Err(Error::ContextOverflow {
                tokens: p.len(),
                new_tokens: cfg.max_new_tokens,
                context: model.cfg.context_length,
            });
        }
    }
    let b = prompts.len();
    let (ids, layout) = model.pad_batch(&full)?;
    let longest = full.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = KvCache::with_capacity(model.cfg.n_layer, longest + cfg.max_new_tokens);
    let mut rngs: Vec<_> = seeds
        .iter()
        .map(|&s| rand::rngs::StdRng::seed_from_u64(s))
        .collect();
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            ids: cfg.prefix_ids.clone(),
            stop: Stop::MaxTokens,
        })
        .collect();
    let mut done = vec![false; b];
    let mut logits = model
        .forward_ids(
            &ids,
            &layout,
            Some(&mut cache),
            LogitsAt::Last,
            Phase::Prompt,
            obs,
        )?
        .expect("logits requested");
    for step in 0..cfg.max_new_tokens {
        let rows: Vec<Vec<f32>> = logits
            .squeeze(1)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for (r, row) in rows.iter().enumerate() {
            let tok = if done[r] {
                model.tok.pad_id
            } else {
                sample(row, cfg, &mut rngs[r])
            };
            if !done[r] {
                if model.tok.stop_ids.contains(&tok) {
                    done[r] = true;
                    out[r].stop = Stop::EndOfTurn;
                } else {
                    out[r].ids.push(tok);
                }
            }
            next.push(tok);
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let input = Tensor::from_vec(next, (b, 1), &model.device)?;
        logits = model
            .forward_ids(
                &input,
                &layout,
                Some(&mut cache),
                LogitsAt::Last,
                Phase::Generated,
                obs,
            )?
            .expect("logits requested");
    }
    Ok(out)
}

/// Split prompts of lengths `lens` (in order) into consecutive batches of at most `max_batch`
/// rows whose padded size `rows x longest` stays within `token_budget` (a row longer than the
/// budget gets a batch of its own). Sort by length first so that batches pad little.
pub fn token_budget_batches(
    lens: &[usize],
    max_batch: usize,
    token_budget: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < lens.len() {
        let mut end = start + 1;
        let mut longest = lens[start];
        while end < lens.len() && end - start < max_batch.max(1) {
            let l = longest.max(lens[end]);
            if l * (end - start + 1) > token_budget {
                break;
            }
            longest = l;
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
mod budget_tests {
    use super::token_budget_batches;

    #[test]
    fn batches_respect_rows_and_padded_tokens() {
        assert!(token_budget_batches(&[], 4, 100).is_empty());
        assert_eq!(
            token_budget_batches(&[10; 10], 4, 1000),
            vec![0..4, 4..8, 8..10]
        );
        // 30 x 3 = 90 fits, a fourth row of 40 would pad to 160.
        assert_eq!(
            token_budget_batches(&[10, 20, 30, 40, 200], 8, 100),
            vec![0..3, 3..4, 4..5]
        );
        let lens = [5, 7, 9, 50, 51, 300];
        let b = token_budget_batches(&lens, 3, 120);
        assert_eq!(b.iter().map(|r| r.len()).sum::<usize>(), lens.len());
        for r in &b {
            let longest = lens[r.clone()].iter().max().unwrap();
            assert!(r.len() <= 3 && (r.len() == 1 || longest * r.len() <= 120));
        }
    }
}
