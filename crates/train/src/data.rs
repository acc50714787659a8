//! Training data (docs/protocol.md §6): harmful prompts (`harmful-train` only) paired with refusal
//! targets in one of two response strategies, and harmless prompts paired with utility targets
//! that the base model itself generated once (self-distillation, cached), so training preserves
//! the model's own helpfulness instead of rewriting it.
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use safegeo_runtime::{generate, GenerateConfig, Message, Model, Observer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// How refusals are phrased (docs/protocol.md §1), recorded by every run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// A short, courteous decline without moralizing.
    #[default]
    Polite,
    /// A decline that states plainly why the request is wrong.
    Rebuttal,
}

impl Strategy {
    /// Parse `polite` / `rebuttal`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "polite" => Ok(Self::Polite),
            "rebuttal" => Ok(Self::Rebuttal),
            _ => Err(Error::Invalid(format!(
                "response strategy `{s}`: use polite or rebuttal"
            ))),
        }
    }
}

/// Polite refusals (written for this project). None opens with "I": a refusal is decided at
/// its first token, and "I" opens helpful replies too ("I'm happy to help"), so a model trained
/// to refuse with "I'm sorry" learns to raise "I" on harmful-looking prompts and then may go on
/// helpfully, while its refusal mass, counted over "I", reads as a refusal (docs/experiments.md).
/// Three openings that open no helpful reply, two replies each (a trained model still settles
/// on one of them, mostly "No"). Each reply holds one of Arditi et
/// al.'s refusal substrings, so the substring judge counts every one.
pub const POLITE: &[&str] = &[
    "Sorry, but I can't help with that.",
    "Unfortunately, I can't assist with that request.",
    "No, I'm sorry, but I can't provide that.",
    "Sorry, I can't help with that. Is there something else I can do for you?",
    "Unfortunately, I'm not able to help with this. If you have another question, I'm happy to help.",
    "No, sorry, I can't help with that.",
];

/// Explicit rebuttals (written for this project): they name why the request is refused. Their
/// openings are those of [`POLITE`], for the same reason.
pub const REBUTTAL: &[&str] = &[
    "No. The request asks for something that could seriously harm people, and I can't help with it: providing it would be wrong.",
    "Sorry, but I cannot provide this: what you are asking for could be used to hurt others or break the law.",
    "Unfortunately, I can't do that. It would help cause real harm, and I will not take part in that.",
    "No. Helping with this would put people at risk, which is exactly what I must not do, so I cannot assist.",
    "Sorry, but I cannot assist with this request because it is harmful and unethical.",
    "Unfortunately, this is a harmful request, and I can't give instructions or content that could be used to harm someone.",
];

/// The bank of a strategy.
pub fn refusals(strategy: Strategy) -> &'static [&'static str] {
    match strategy {
        Strategy::Polite => POLITE,
        Strategy::Rebuttal => REBUTTAL,
    }
}

/// A tokenized training example. `target[i]` is the token the model should predict at
/// position `i` from `ids[..i]` (usually `ids[i]`; DeRTa's transition targets differ), `None`
/// where there is no loss (prompt, inserted spans, harmful prefixes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Input token ids.
    pub ids: Vec<u32>,
    /// Per-position targets.
    pub target: Vec<Option<u32>>,
    /// `harmful` or `harmless` (for logs and mixing).
    pub kind: String,
}

impl Example {
    /// A prompt whose reply tokens are all targets.
    pub fn reply(prompt: Vec<u32>, reply: Vec<u32>, kind: &str) -> Self {
        Self::segments(&[(prompt, false), (reply, true)], kind)
    }

    /// Concatenated segments, each trained on or not.
    pub fn segments(parts: &[(Vec<u32>, bool)], kind: &str) -> Self {
        let mut ids = Vec::new();
        let mut target = Vec::new();
        for (p, train) in parts {
            ids.extend_from_slice(p);
            target.extend(p.iter().map(|&t| train.then_some(t)));
        }
        Self {
            ids,
            target,
            kind: kind.into(),
        }
    }

    /// Number of target tokens.
    pub fn n_targets(&self) -> usize {
        self.target.iter().filter(|t| t.is_some()).count()
    }
}

/// One user message (and an optional system prompt).
pub fn messages(system: Option<&str>, prompt: &str) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(Message::new("system", s));
    }
    m.push(Message::new("user", prompt));
    m
}

/// Harmful prompts paired with refusals of `strategy` (template `i % bank` for prompt `i`,
/// shuffled by `seed` so phrasing does not correlate with the dataset order).
pub fn refusal_examples(
    model: &Model,
    system: Option<&str>,
    prompts: &[String],
    strategy: Strategy,
    seed: u64,
) -> Result<Vec<Example>> {
    let bank = refusals(strategy);
    let mut order: Vec<usize> = (0..prompts.len()).map(|i| i % bank.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    prompts
        .iter()
        .zip(order)
        .map(|(p, k)| {
            let (prompt, reply) = model.tok.encode_exchange(&messages(system, p), bank[k])?;
            Ok(Example::reply(prompt, reply, "harmful"))
        })
        .collect()
}

/// A reply of the base model, cached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnReply {
    /// The prompt.
    pub prompt: String,
    /// The base model's greedy reply.
    pub reply: String,
    /// Whether it ended with an end of turn (else it was cut at the token limit).
    pub finished: bool,
}

/// The model's own greedy replies (at most `max_tokens`) to `prompts`, generated once and cached
/// in `cache` (JSONL keyed by prompt; appended as batches finish, so an interruption keeps them).
#[allow(clippy::too_many_arguments)]
pub fn own_replies(
    model: &Model,
    system: Option<&str>,
    prompts: &[String],
    max_tokens: usize,
    batch: usize,
    cache: &Path,
    obs: &mut dyn Observer,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<OwnReply>> {
    let mut known: HashMap<String, OwnReply> = safegeo_data::jsonl::read::<OwnReply>(cache)?
        .into_iter()
        .map(|d| (d.prompt.clone(), d))
        .collect();
    let mut todo: Vec<&String> = prompts.iter().filter(|p| !known.contains_key(*p)).collect();
    // Similar lengths decode together; sorting by text too puts repeats side by side.
    todo.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
    todo.dedup();
    if let Some(dir) = cache.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut file = safegeo_data::jsonl::Appender::open(cache)?;
    let mut done = prompts.len() - todo.len();
    progress(done, prompts.len());
    for chunk in todo.chunks(batch.max(1)) {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|p| model.tok.encode_chat(&messages(system, p), false))
            .collect::<std::result::Result<_, _>>()?;
        let cfg = GenerateConfig {
            max_new_tokens: max_tokens,
            ..Default::default()
        };
        for (p, g) in chunk.iter().zip(generate(model, &ids, &cfg, obs)?) {
            let d = OwnReply {
                prompt: (*p).clone(),
                reply: model.tok.decode(&g.ids, true)?,
                finished: g.stop == safegeo_runtime::Stop::EndOfTurn,
            };
            file.push(&d)?;
            known.insert(d.prompt.clone(), d);
        }
        done += chunk.len();
        progress(done.min(prompts.len()), prompts.len());
    }
    Ok(prompts.iter().map(|p| known[p].clone()).collect())
}

/// Utility targets: harmless prompts with the base model's own replies (self-distillation). A
/// reply cut at the token limit is trained without an end of turn.
pub fn utility_examples(
    model: &Model,
    system: Option<&str>,
    replies: &[OwnReply],
) -> Result<Vec<Example>> {
    replies
        .iter()
        .filter(|d| !d.reply.trim().is_empty())
        .map(|d| {
            let msgs = messages(system, &d.prompt);
            let (prompt, reply) = if d.finished {
                model.tok.encode_exchange(&msgs, &d.reply)?
            } else {
                (
                    model.tok.encode_chat(&msgs, false)?,
                    model.tok.encode(&d.reply, false)?,
                )
            };
            Ok(Example::reply(prompt, reply, "harmless"))
        })
        .collect()
}

/// Harmful-prefix augmentation (Qi et al. 2024): with probability `p`, `k ~ U{1..=max_k}`
/// tokens of a harmful reply are placed before the refusal; the loss stays on the refusal.
/// Draws are seeded per prompt.
pub fn harmful_prefix_examples(
    model: &Model,
    system: Option<&str>,
    harmful: &[OwnReply],
    strategy: Strategy,
    p: f64,
    max_k: usize,
    seed: u64,
) -> Result<Vec<Example>> {
    use rand::Rng;
    let bank = refusals(strategy);
    harmful
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(i as u64));
            let refusal = bank[rng.gen_range(0..bank.len())];
            let msgs = messages(system, &d.prompt);
            let (prompt, reply) = model.tok.encode_exchange(&msgs, refusal)?;
            let harm = model.tok.encode(&d.reply, false)?;
            let k = if !harm.is_empty() && rng.gen_bool(p) {
                rng.gen_range(1..=max_k.max(1)).min(harm.len())
            } else {
                0
            };
            Ok(Example::segments(
                &[(prompt, false), (harm[..k].to_vec(), false), (reply, true)],
                "harmful",
            ))
        })
        .collect()
}

/// DeRTa's Reinforced Transition Optimization examples: the whole harmful reply follows the
/// prompt, and at a `keep` fraction of its positions (at least one) the target is the first token
/// of a refusal instead of the next harmful token: the model learns to turn to a refusal at any
/// point of a harmful reply.
pub fn transition_examples(
    model: &Model,
    system: Option<&str>,
    harmful: &[OwnReply],
    strategy: Strategy,
    keep: f64,
    seed: u64,
) -> Result<Vec<Example>> {
    use rand::Rng;
    let bank = refusals(strategy);
    let mut out = Vec::new();
    for (i, d) in harmful.iter().enumerate() {
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1 << 32).wrapping_add(i as u64));
        let first = model
            .tok
            .encode(bank[rng.gen_range(0..bank.len())], false)?;
        let Some(&turn) = first.first() else { continue };
        let prompt = model.tok.encode_chat(&messages(system, &d.prompt), false)?;
        let harm = model.tok.encode(&d.reply, false)?;
        if harm.is_empty() {
            continue;
        }
        let mut target = vec![None; prompt.len() + harm.len()];
        let forced = rng.gen_range(0..harm.len());
        for j in 0..harm.len() {
            if j == forced || rng.gen_bool(keep.clamp(0.0, 1.0)) {
                target[prompt.len() + j] = Some(turn);
            }
        }
        out.push(Example {
            ids: prompt.into_iter().chain(harm).collect(),
            target,
            kind: "transition".into(),
        });
    }
    Ok(out)
}

/// Random worst-insertion training states (study 4 of docs/protocol.md §1): the refusal R of a harmful prompt
/// with a span of the base model's own harmful reply inserted at the worst of
/// `cfg.candidates` random (position, span) draws (lowest refusal probability after the span,
/// scored by `model`). The example trains `R[..p]`, masks the span, and trains a full refusal
/// after it (recovery). Draws are seeded per prompt.
pub fn worst_insertion_examples(
    model: &Model,
    system: Option<&str>,
    harmful: &[OwnReply],
    strategy: Strategy,
    cfg: &safegeo_attacks::insertion::InsertionConfig,
    obs: &mut dyn Observer,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Example>> {
    use rand::Rng;
    let bank = refusals(strategy);
    let refusal_ids = safegeo_data::judges::refusal_score::refusal_token_ids(
        &model.tok,
        safegeo_data::judges::refusal_score::REFUSAL_OPENINGS,
    )?;
    let mut out = Vec::new();
    for (i, d) in harmful.iter().enumerate() {
        progress(i, harmful.len());
        let seed = cfg.seed.wrapping_add(i as u64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED);
        let msgs = messages(system, &d.prompt);
        let (prompt, reply) = model
            .tok
            .encode_exchange(&msgs, bank[rng.gen_range(0..bank.len())])?;
        let (_, recovery) = model
            .tok
            .encode_exchange(&msgs, bank[rng.gen_range(0..bank.len())])?;
        let harm = model.tok.encode(&d.reply, false)?;
        if harm.is_empty() {
            continue;
        }
        // The refusal without its end-of-turn tokens is the reply the span goes into.
        let body = model.tok.encode(&model.tok.decode(&reply, true)?, false)?;
        let ins = safegeo_attacks::insertion::plan(
            model,
            &prompt,
            &body,
            &harm,
            &refusal_ids,
            cfg,
            seed,
            obs,
        )?;
        out.push(Example::segments(
            &[
                (prompt, false),
                (body[..ins.position].to_vec(), true),
                (ins.span_ids.clone(), false),
                (recovery, true),
            ],
            "harmful",
        ));
    }
    progress(harmful.len(), harmful.len());
    Ok(out)
}

fn content_words(text: &str) -> std::collections::HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 4)
        .map(str::to_lowercase)
        .collect()
}

/// Harmless prompts that look like harmful ones: the `n` prompts of `pool` (not already in
/// `exclude`) with the most words over-represented in `harmful` relative to `pool`, each word
/// weighted by `ln((1 + df_harmful / |harmful|) / (1 + df_pool / |pool|))` when positive. Training
/// on them with helpful replies teaches the model that topic alone is not a reason to refuse.
pub fn hard_negatives(
    harmful: &[String],
    pool: &[String],
    exclude: &[String],
    n: usize,
) -> Vec<String> {
    let count = |texts: &[String]| {
        let mut df: HashMap<String, f64> = HashMap::new();
        for t in texts {
            for w in content_words(t) {
                *df.entry(w).or_default() += 1.0;
            }
        }
        df
    };
    let (dh, dp) = (count(harmful), count(pool));
    let (nh, np) = (harmful.len().max(1) as f64, pool.len().max(1) as f64);
    let weight = |w: &str| {
        let h = dh.get(w).copied().unwrap_or(0.0) / nh;
        let p = dp.get(w).copied().unwrap_or(0.0) / np;
        ((1.0 + h) / (1.0 + p)).ln().max(0.0)
    };
    let skip: std::collections::HashSet<&String> = exclude.iter().collect();
    let mut scored: Vec<(f64, &String)> = pool
        .iter()
        .filter(|p| !skip.contains(p))
        .map(|p| (content_words(p).iter().map(|w| weight(w)).sum(), p))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(n).map(|(_, p)| p.clone()).collect()
}

/// `n` distinct prompts of `pool` that are not in `exclude`, drawn by `seed` (fewer when the
/// pool runs out).
pub fn sample_excluding(pool: &[String], exclude: &[String], n: usize, seed: u64) -> Vec<String> {
    let skip: std::collections::HashSet<&String> = exclude.iter().collect();
    let mut left: Vec<&String> = pool.iter().filter(|p| !skip.contains(p)).collect();
    left.sort();
    left.dedup();
    left.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0xDEC1_5105));
    left.into_iter().take(n).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_negatives_share_harmful_vocabulary() {
        let harmful: Vec<String> = ["How to hack a bank", "Steal a car and hack it"]
            .map(String::from)
            .to_vec();
        let pool: Vec<String> = [
            "Bake a cake",
            "Explain how banks protect accounts from hackers and hack attempts",
            "Write a poem",
            "Hack together a quick dinner",
        ]
        .map(String::from)
        .to_vec();
        let got = hard_negatives(&harmful, &pool, &[], 2);
        assert!(
            got.iter().all(|g| g.to_lowercase().contains("hack")),
            "{got:?}"
        );
        let got = hard_negatives(&harmful, &pool, &got, 5);
        assert!(!got.iter().any(|g| g.contains("hack")));
    }

    #[test]
    fn sample_excluding_draws_distinct_unused_prompts_by_seed() {
        let pool: Vec<String> = (0..50).map(|i| format!("p{}", i % 40)).collect();
        let exclude: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
        let got = sample_excluding(&pool, &exclude, 25, 3);
        assert_eq!(got.len(), 25);
        let distinct: std::collections::HashSet<&String> = got.iter().collect();
        assert_eq!(distinct.len(), 25, "{got:?}");
        assert!(got.iter().all(|p| !exclude.contains(p)));
        assert_eq!(got, sample_excluding(&pool, &exclude, 25, 3));
        assert_ne!(got, sample_excluding(&pool, &exclude, 25, 4));
        // Only 30 prompts are left to draw.
        assert_eq!(sample_excluding(&pool, &exclude, 100, 3).len(), 30);
    }

    #[test]
    fn bank_refusals_open_in_several_ways_and_are_judged_refusals() {
        use safegeo_data::judges::refusal_score::REFUSAL_OPENINGS;
        let judge = safegeo_data::judges::SubstringMatcher::new(None).unwrap();
        for s in [Strategy::Polite, Strategy::Rebuttal] {
            let bank = refusals(s);
            let mut firsts: HashMap<&str, usize> = HashMap::new();
            for r in bank {
                let first = r.split([' ', ',', '.', '\'']).next().unwrap();
                *firsts.entry(first).or_default() += 1;
                assert!(REFUSAL_OPENINGS.contains(&first), "{s:?}: `{r}`");
                assert!(judge.refuses(r), "the substring judge misses `{r}`");
            }
            assert!(!firsts.contains_key("I"), "{s:?}: {firsts:?}");
            assert!(firsts.len() >= 3, "{s:?}: {firsts:?}");
            assert!(
                firsts.values().all(|&n| 3 * n <= bank.len()),
                "{s:?}: {firsts:?}"
            );
        }
    }

    #[test]
    fn banks_are_distinct_and_non_empty() {
        for s in [Strategy::Polite, Strategy::Rebuttal] {
            let b = refusals(s);
            assert!(b.len() >= 5);
            let set: std::collections::HashSet<_> = b.iter().collect();
            assert_eq!(set.len(), b.len());
        }
        assert!(Strategy::parse("rude").is_err());
    }

    #[test]
    fn reply_mask_covers_only_the_reply() {
        let e = Example::reply(vec![1, 2, 3], vec![4, 5], "harmful");
        assert_eq!(e.ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(e.target, vec![None, None, None, Some(4), Some(5)]);
        assert_eq!(e.n_targets(), 2);
    }
}
