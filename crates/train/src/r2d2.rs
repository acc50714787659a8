//! R2D2 (HarmBench's dynamic adversarial training, docs/protocol.md §6).
//!
//! A persistent pool of test cases (behaviour, adversarial suffix, harmful target). At every
//! training step each case's suffix gets `gcg_steps` GCG steps against the current model
//! (suffixes persist across steps), and the loss is
//! `L = L_sft + away_weight * L_away + toward_weight * L_toward` where
//! - `L_toward`: cross-entropy of the refusal (plus end of turn) after behaviour + suffix;
//! - `L_away`: `-(1/N) sum log(1 - p_t)` over the target tokens, terms with `log p_t < -5` dropped;
//! - `L_sft`: the SFT batch (refusals and utility anchor).
//!
//! Every `reset_every` steps a `reset_fraction` of the pool is replaced by fresh behaviours.
//! Targets are the base model's own compliant replies to the training prompts (first
//! `target_tokens` tokens), so no external harmful text is needed.
use crate::data::{Example, OwnReply};
use crate::recipes::ExampleRecipe;
use crate::trainer::{target_logprobs, MicroLoss, Recipe};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use safegeo_attacks::gcg::{Gcg, GcgConfig, GcgState};
use safegeo_attacks::SplitPrompt;
use safegeo_runtime::{Model, NoHooks};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Every knob; [`R2d2Config::reference`] is HarmBench's run, the default a CPU-sized one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct R2d2Config {
    /// Test cases in the pool.
    pub pool_size: usize,
    /// GCG steps per case per training step.
    pub gcg_steps: usize,
    /// Replace part of the pool every this many steps.
    pub reset_every: usize,
    /// Share of the pool replaced.
    pub reset_fraction: f64,
    /// Weight of the away loss.
    pub away_weight: f64,
    /// Weight of the toward loss.
    pub toward_weight: f64,
    /// The refusal trained toward.
    pub refusal: String,
    /// Initial suffix.
    pub suffix_init: String,
    /// Target length in tokens.
    pub target_tokens: usize,
    /// GCG settings of the inner loop.
    pub gcg: GcgConfig,
}

impl Default for R2d2Config {
    /// CPU-sized: 4 cases, 1 GCG step of width 64 / top-k 64 per training step, 10-token suffix.
    fn default() -> Self {
        Self {
            pool_size: 4,
            gcg_steps: 1,
            reset_every: 50,
            reset_fraction: 0.2,
            away_weight: 0.5,
            toward_weight: 0.5,
            refusal: "Sorry, I can't do that.".into(),
            suffix_init: ["!"; 10].join(" "),
            target_tokens: 16,
            gcg: GcgConfig {
                search_width: 64,
                topk: 64,
                ..Default::default()
            },
        }
    }
}

impl R2d2Config {
    /// HarmBench's reference values (pool 8, 5 GCG steps of width 512 / top-k 256, 20-token
    /// suffix of "!"), for GPU runs.
    pub fn reference() -> Self {
        Self {
            pool_size: 8,
            gcg_steps: 5,
            suffix_init: ["!"; 20].join(" "),
            target_tokens: 20,
            gcg: GcgConfig {
                search_width: 512,
                topk: 256,
                ..Default::default()
            },
            ..Self::default()
        }
    }
}

/// One test case of the pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolCase {
    /// Index of the behaviour in the training prompts.
    pub behavior: usize,
    /// GCG state (the suffix persists across training steps).
    pub gcg: GcgState,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
struct PoolState {
    cases: Vec<PoolCase>,
    next_behavior: usize,
}

/// The R2D2 recipe.
pub struct R2d2 {
    cfg: R2d2Config,
    sft: ExampleRecipe,
    behaviors: Vec<OwnReply>,
    system: Option<String>,
    pool: PoolState,
    /// GCG's token mask, computed once (it decodes the whole vocabulary).
    disallowed: Option<std::sync::Arc<[bool]>>,
}

impl R2d2 {
    /// R2D2 over harmful behaviours (with the base model's replies as targets) and an SFT recipe.
    pub fn new(
        cfg: R2d2Config,
        sft: ExampleRecipe,
        behaviors: Vec<OwnReply>,
        system: Option<String>,
    ) -> Result<Self> {
        if behaviors.is_empty() || cfg.pool_size == 0 {
            return Err(Error::Invalid(
                "R2D2 needs harmful behaviours and a pool of at least one case".into(),
            ));
        }
        Ok(Self {
            cfg,
            sft,
            behaviors,
            system,
            pool: PoolState::default(),
            disallowed: None,
        })
    }

    fn split(&self, model: &Model, behavior: usize) -> Result<SplitPrompt> {
        SplitPrompt::for_behavior(
            &model.tok,
            self.system.as_deref(),
            &self.behaviors[behavior].prompt,
        )
    }

    fn target(&self, model: &Model, behavior: usize) -> Result<String> {
        let ids = model.tok.encode(&self.behaviors[behavior].reply, false)?;
        let text = model
            .tok
            .decode(&ids[..ids.len().min(self.cfg.target_tokens)], true)?;
        Ok(if text.trim().is_empty() {
            "Sure, here is how to do that".into()
        } else {
            text
        })
    }

    fn disallowed(&mut self, model: &Model) -> Result<std::sync::Arc<[bool]>> {
        if self.disallowed.is_none() {
            let mask = safegeo_attacks::gcg::disallowed_tokens(
                &model.tok,
                model.cfg.vocab,
                self.cfg.gcg.allow_non_ascii,
            )?;
            self.disallowed = Some(mask.into());
        }
        Ok(self.disallowed.clone().expect("set above"))
    }

    fn gcg_cfg(&self, step: usize, case: usize) -> GcgConfig {
        GcgConfig {
            optim_str_init: self.cfg.suffix_init.clone(),
            num_steps: usize::MAX,
            seed: self.cfg.gcg.seed ^ ((step * 1009 + case) as u64),
            ..self.cfg.gcg.clone()
        }
    }

    fn fresh_case(&mut self, model: &Model, step: usize, slot: usize) -> Result<PoolCase> {
        let behavior = self.pool.next_behavior % self.behaviors.len();
        self.pool.next_behavior += 1;
        let prompt = self.split(model, behavior)?;
        let target = self.target(model, behavior)?;
        let mask = self.disallowed(model)?;
        let gcg = Gcg::with_disallowed(model, &prompt, &target, self.gcg_cfg(step, slot), mask)?;
        Ok(PoolCase {
            behavior,
            gcg: gcg.init(&mut NoHooks)?,
        })
    }

    /// Fill or reset the pool, then run the inner GCG steps on every case.
    fn update_pool(&mut self, model: &Model, step: usize) -> Result<()> {
        while self.pool.cases.len() < self.cfg.pool_size {
            let slot = self.pool.cases.len();
            let c = self.fresh_case(model, step, slot)?;
            self.pool.cases.push(c);
        }
        if step > 0 && self.cfg.reset_every > 0 && step.is_multiple_of(self.cfg.reset_every) {
            let n = ((self.cfg.pool_size as f64 * self.cfg.reset_fraction).round() as usize)
                .clamp(1, self.cfg.pool_size);
            // The oldest cases (lowest behaviour counter) are replaced first.
            for slot in 0..n {
                let c = self.fresh_case(model, step, slot)?;
                self.pool.cases[slot] = c;
            }
            self.pool.cases.rotate_left(n);
        }
        for i in 0..self.pool.cases.len() {
            let behavior = self.pool.cases[i].behavior;
            let prompt = self.split(model, behavior)?;
            let target = self.target(model, behavior)?;
            let mask = self.disallowed(model)?;
            let gcg = Gcg::with_disallowed(model, &prompt, &target, self.gcg_cfg(step, i), mask)?;
            for _ in 0..self.cfg.gcg_steps {
                gcg.step(&mut self.pool.cases[i].gcg, &mut NoHooks)?;
            }
        }
        Ok(())
    }

    /// The away and toward losses over the pool.
    fn adversarial_losses(&self, model: &Model) -> Result<(Option<Tensor>, Tensor, usize)> {
        let mut away = Vec::new();
        let mut toward = Vec::new();
        for c in &self.pool.cases {
            let p = self.split(model, c.behavior)?;
            let prompt: Vec<u32> = p
                .before
                .iter()
                .chain(c.gcg.current_ids())
                .chain(&p.after)
                .copied()
                .collect();
            let target = model.tok.encode(&self.target(model, c.behavior)?, false)?;
            away.push(Example::reply(prompt.clone(), target, "adversarial"));
            let mut refusal = model.tok.encode(&self.cfg.refusal, false)?;
            refusal.extend(model.tok.stop_ids.first().copied());
            toward.push(Example::reply(prompt, refusal, "adversarial"));
        }
        let (lp_away, t1) = target_logprobs(model, &away.iter().collect::<Vec<_>>())?;
        let (lp_toward, t2) = target_logprobs(model, &toward.iter().collect::<Vec<_>>())?;
        let toward_loss = (lp_toward.mean_all()? * -1.0)?;
        // Away: -(1/N) sum log(1 - p_t), dropping terms with log p_t < -5 (already unlikely).
        let values = lp_away.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let kept: Vec<u32> = (0..values.len() as u32)
            .filter(|&i| values[i as usize] >= -5.0)
            .collect();
        let away_loss = if kept.is_empty() {
            None
        } else {
            let idx = Tensor::new(kept.as_slice(), lp_away.device())?;
            let p = lp_away.index_select(&idx, 0)?.exp()?;
            let one_minus = (p.neg()? + 1.0)?.clamp(1e-6, 1.0)?;
            Some((one_minus.log()?.mean_all()? * -1.0)?)
        };
        Ok((away_loss, toward_loss, t1 + t2))
    }
}

impl Recipe for R2d2 {
    fn name(&self) -> &'static str {
        "r2d2"
    }

    fn micro_loss(&mut self, model: &Model, step: usize, micro: usize) -> Result<MicroLoss> {
        if micro != 0 {
            return Err(Error::Invalid(
                "r2d2 runs one micro-batch per step (use --grad-accum 1)".into(),
            ));
        }
        let t_gcg = std::time::Instant::now();
        self.update_pool(model, step)?;
        let gcg_seconds = t_gcg.elapsed().as_secs_f64();
        let sft = self.sft.micro_loss(model, step, 0)?;
        let (away, toward, tokens) = self.adversarial_losses(model)?;
        let mut parts = BTreeMap::new();
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        parts.insert("sft".into(), scalar(&sft.loss)?);
        parts.insert("toward".into(), scalar(&toward)?);
        let mut loss = (sft.loss + (toward * self.cfg.toward_weight)?)?;
        if let Some(a) = away {
            parts.insert("away".into(), scalar(&a)?);
            loss = (loss + (a * self.cfg.away_weight)?)?;
        }
        let gcg_mean = self
            .pool
            .cases
            .iter()
            .map(|c| c.gcg.best_loss())
            .sum::<f64>()
            / self.pool.cases.len() as f64;
        parts.insert("gcg_target_loss".into(), gcg_mean);
        Ok(MicroLoss {
            loss,
            tokens: sft.tokens + tokens,
            parts,
            seconds: BTreeMap::from([("gcg_inner_loop".to_string(), gcg_seconds)]),
        })
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.pool).unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.pool = serde_json::from_value(state.clone())
            .map_err(|e| Error::Invalid(format!("R2D2 pool state: {e}")))?;
        Ok(())
    }
}
