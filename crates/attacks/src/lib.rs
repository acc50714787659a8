//! Attacks on refusal (docs/protocol.md §5), each in one file that reads top to bottom like the
//! algorithm: [`prefill`], [`insertion`] (random and worst insertion), [`gcg`] (nanoGCG's feature
//! set) and [`autodan`]. Every attack turns behaviours into [`TestCase`]s that
//! `safegeo eval --test-cases` replays on any model. What they share lives here: the chat prompt
//! split around an adversarial string, targets, and batched target losses over a cached prefix.
#![deny(missing_docs)]

pub mod autodan;
pub mod gcg;
pub mod insertion;
pub mod prefill;
pub mod run;

use candle_core::{DType, Tensor, D};
pub use safegeo_data::test_cases::{Insertion, InsertionCandidate, TestCase};
pub use safegeo_data::{Error, Item, Result};
use safegeo_runtime::{KvCache, LogitsAt, Message, Model, Observer, Phase, Tok};

/// Where the adversarial string goes in the user message.
pub const PLACEHOLDER: &str = "{optim_str}";

/// A chat prompt split around the adversarial string: `before ++ adversarial ++ after` is what the
/// model reads (each side tokenized on its own, as nanoGCG does).
#[derive(Debug, Clone)]
pub struct SplitPrompt {
    /// Ids of everything before the adversarial string (template, system prompt, behaviour).
    pub before: Vec<u32>,
    /// Ids after it (the template's post-instruction tokens).
    pub after: Vec<u32>,
    /// The conversation with [`PLACEHOLDER`] in the last user message.
    pub messages: Vec<Message>,
}

impl SplitPrompt {
    /// Split `messages` (the last user message holding [`PLACEHOLDER`]) as the model's chat
    /// template renders them.
    pub fn new(tok: &Tok, messages: Vec<Message>) -> Result<Self> {
        let text = tok.render_chat(&messages)?;
        let (before, after) = text.split_once(PLACEHOLDER).ok_or_else(|| {
            Error::Invalid(format!(
                "the prompt must contain {PLACEHOLDER} exactly once in its last user message"
            ))
        })?;
        Ok(Self {
            before: tok.encode_rendered(before)?,
            after: tok.encode(after, false)?,
            messages,
        })
    }

    /// `behaviour` followed by a space and the adversarial string, as the user's message.
    pub fn for_behavior(tok: &Tok, system: Option<&str>, behavior: &str) -> Result<Self> {
        Self::new(
            tok,
            user_messages(system, &format!("{behavior} {PLACEHOLDER}")),
        )
    }

    /// The conversation with the adversarial string filled in.
    pub fn fill(&self, adversarial: &str) -> Vec<Message> {
        self.messages
            .iter()
            .map(|m| Message::new(&m.role, m.content.replace(PLACEHOLDER, adversarial)))
            .collect()
    }
}

/// A conversation of an optional system prompt and one user message.
pub fn user_messages(system: Option<&str>, user: &str) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(Message::new("system", s));
    }
    m.push(Message::new("user", user));
    m
}

/// The affirmative target of an item: its own (AdvBench, JBB) or a generic affirmative opening.
pub fn target_for(item: &Item) -> String {
    item.target
        .clone()
        .unwrap_or_else(|| "Sure, here is what you asked for".to_string())
}

/// How candidates are scored against the target.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TargetLoss {
    /// Mean cross-entropy of the target tokens.
    CrossEntropy,
    /// Mellowmax of the negative target logits with this alpha (nanoGCG's option).
    Mellowmax(f64),
}

/// Loss of every row from target logits `(b, n, V)` as a tensor `(b,)` (differentiable).
pub fn target_loss_tensor(logits: &Tensor, target: &[u32], loss: TargetLoss) -> Result<Tensor> {
    let (b, n, _) = logits.dims3()?;
    let idx = Tensor::new(target, logits.device())?
        .reshape((1, n, 1))?
        .repeat((b, 1, 1))?;
    Ok(match loss {
        TargetLoss::CrossEntropy => {
            let lp = safegeo_runtime::log_softmax_last(logits)?;
            (lp.gather(&idx, D::Minus1)?.squeeze(2)?.mean(1)? * -1.0)?
        }
        TargetLoss::Mellowmax(alpha) => {
            let x = (logits.gather(&idx, D::Minus1)?.squeeze(2)? * -alpha)?;
            let max = x.max_keepdim(1)?;
            let lse = (x.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?;
            ((lse.squeeze(1)? - (n as f64).ln())? / alpha)?
        }
    })
}

/// Losses of rows `middle ++ target` after a frozen `prefix` cache, plus whether greedy decoding
/// from each row's middle already reproduces the target (teacher-forced argmax).
/// Rows may differ in length; they are padded after the prefix.
pub fn target_losses(
    model: &Model,
    prefix: &KvCache,
    middles: &[Vec<u32>],
    target: &[u32],
    loss: TargetLoss,
    obs: &mut dyn Observer,
) -> Result<(Vec<f64>, Vec<bool>)> {
    if target.is_empty() {
        return Err(Error::Invalid("the attack target is empty".into()));
    }
    let n = target.len();
    let rows: Vec<Vec<u32>> = middles
        .iter()
        .map(|m| m.iter().chain(&target[..n - 1]).copied().collect())
        .collect();
    let (ids, mut layout) = model.pad_batch(&rows)?;
    layout.pad_at = prefix.len();
    let mut cache = prefix.clone();
    let logits = model
        .forward_ids(
            &ids,
            &layout,
            Some(&mut cache),
            LogitsAt::Tail(n),
            Phase::Prompt,
            obs,
        )?
        .expect("logits requested")
        .to_dtype(DType::F32)?;
    let losses = target_loss_tensor(&logits, target, loss)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let argmax = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
    let hits = argmax.iter().map(|r| r.as_slice() == target).collect();
    Ok((losses, hits))
}

/// Read an attack's resumable state from `path` if it exists (`what` names the attack in errors).
pub fn load_state<T: serde::de::DeserializeOwned>(
    path: Option<&std::path::Path>,
    what: &str,
) -> Result<Option<T>> {
    let Some(p) = path.filter(|p| p.exists()) else {
        return Ok(None);
    };
    let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::Invalid(format!(
            "{}: unreadable {what} state ({e}); delete it to restart this behaviour",
            p.display()
        ))
    })
}

/// Write an attack's state atomically (after every step).
pub fn save_state<T: serde::Serialize>(path: Option<&std::path::Path>, state: &T) -> Result<()> {
    if let Some(p) = path {
        let json = serde_json::to_vec(state).map_err(|e| Error::Invalid(e.to_string()))?;
        safegeo_runtime::files::write_atomic(p, &json)?;
    }
    Ok(())
}

/// A frozen cache of `ids` (one row), the prefix every candidate shares.
pub fn prefix_cache(model: &Model, ids: &[u32], obs: &mut dyn Observer) -> Result<KvCache> {
    Ok(model.cache_prefix(ids, obs)?.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safegeo_runtime::testing::tiny_model;
    use safegeo_runtime::{Arch, NoHooks};

    #[test]
    fn cached_prefix_losses_equal_uncached() {
        let m = tiny_model(Arch::Llama, 5, DType::F32).unwrap();
        let prefix = vec![1u32, 7, 9, 4, 22, 3];
        let middles = vec![vec![5u32, 6, 7], vec![8u32, 2], vec![11u32, 12, 13, 14]];
        let target = [30u32, 31, 2];
        let cache = prefix_cache(&m, &prefix, &mut NoHooks).unwrap();
        let (cached, _) = target_losses(
            &m,
            &cache,
            &middles,
            &target,
            TargetLoss::CrossEntropy,
            &mut NoHooks,
        )
        .unwrap();
        let empty = KvCache::new(m.cfg.n_layer).freeze();
        for (mid, &c) in middles.iter().zip(&cached) {
            let whole: Vec<u32> = prefix.iter().chain(mid).copied().collect();
            let (plain, _) = target_losses(
                &m,
                &empty,
                &[whole],
                &target,
                TargetLoss::CrossEntropy,
                &mut NoHooks,
            )
            .unwrap();
            assert!((plain[0] - c).abs() < 1e-4, "{} vs {c}", plain[0]);
        }
        // The frozen prefix is reusable: a second call gives the same numbers.
        let (again, _) = target_losses(
            &m,
            &cache,
            &middles,
            &target,
            TargetLoss::CrossEntropy,
            &mut NoHooks,
        )
        .unwrap();
        assert_eq!(cached, again);
    }

    #[test]
    fn mellowmax_matches_its_formula() {
        // Two rows, n = 2, V = 3; target ids [0, 2].
        let logits = Tensor::new(
            &[
                [[1.0f32, 2.0, 3.0], [0.5, 0.0, -1.0]],
                [[0.0, 0.0, 0.0], [2.0, 1.0, 4.0]],
            ],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let alpha = 2.0;
        let got = target_loss_tensor(&logits, &[0, 2], TargetLoss::Mellowmax(alpha))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mm = |a: f64, b: f64| ((((-a * alpha).exp() + (-b * alpha).exp()) / 2.0).ln()) / alpha;
        assert!((got[0] as f64 - mm(1.0, -1.0)).abs() < 1e-5);
        assert!((got[1] as f64 - mm(0.0, 4.0)).abs() < 1e-5);
        let ce = target_loss_tensor(&logits, &[0, 2], TargetLoss::CrossEntropy)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let lse = |v: &[f64]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want = -((1.0 - lse(&[1.0, 2.0, 3.0])) + (-1.0 - lse(&[0.5, 0.0, -1.0]))) / 2.0;
        assert!((ce[0] as f64 - want).abs() < 1e-5);
    }
}
