//! The training loop shared by every recipe: full fine-tuning or LoRA, AdamW with a cosine
//! schedule and warm-up, gradient accumulation and clipping, checkpoints at chosen steps
//! (anchors of a trajectory, loadable by every command), exact resume, and a JSONL log.
use crate::data::Example;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use safegeo_runtime::{AdamW, AdamWConfig, LogitsAt, Model, NoHooks, Phase};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// LoRA adapters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub rank: usize,
    /// Scale numerator (`alpha / rank`).
    pub alpha: f64,
    /// Projections adapted (`q`, `k`, `v`, `o`, `gate`, `up`, `down`).
    pub targets: Vec<String>,
    /// Blocks adapted (`None`: every block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: ["q", "k", "v", "o", "gate", "up", "down"]
                .map(String::from)
                .to_vec(),
            layers: None,
        }
    }
}

/// Optimization settings common to every recipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of the peak (cosine decay).
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// LoRA adapters; `None` = full fine-tuning.
    pub lora: Option<LoraConfig>,
    /// Seed of data order, adapters and recipe randomness.
    pub seed: u64,
    /// Steps at which an anchor checkpoint is written (0 = the starting model).
    pub save_at: Vec<usize>,
    /// Also save resumable state every this many steps.
    pub state_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 60,
            batch_size: 8,
            grad_accum: 1,
            lr: 2e-4,
            warmup_steps: 5,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            lora: Some(LoraConfig::default()),
            seed: 0,
            save_at: vec![0, 10, 20, 40, 60],
            state_every: 5,
        }
    }
}

impl TrainConfig {
    /// Check the values before any work.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            return bad("steps, batch size and gradient accumulation must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("learning rate {} must be positive", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio must be in [0, 1]".into());
        }
        if let Some(&s) = self.save_at.iter().find(|&&s| s > self.steps) {
            return bad(format!(
                "--save-at {s} is beyond --steps {}; checkpoints must be at or before the last step",
                self.steps
            ));
        }
        if let Some(l) = &self.lora {
            if l.rank == 0 || l.targets.is_empty() {
                return bad("LoRA needs rank >= 1 and at least one target projection".into());
            }
            if l.layers.as_ref().is_some_and(Vec::is_empty) {
                return bad("--lora-layers names no layer".into());
            }
        }
        Ok(())
    }

    /// Learning rate at (0-based) optimizer step `step`: linear warm-up, then cosine decay to
    /// `min_lr_ratio * lr` at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = (self.steps - self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What a recipe computes for one micro-batch.
pub struct MicroLoss {
    /// Scalar loss to minimise.
    pub loss: Tensor,
    /// Tokens run forward.
    pub tokens: usize,
    /// Named components for the log (e.g. `sft`, `away`, `toward`).
    pub parts: BTreeMap<String, f64>,
    /// Seconds spent in named phases of the recipe's own work (e.g. R2D2's GCG inner loop).
    pub seconds: BTreeMap<String, f64>,
}

/// A training recipe: the loss of micro-batch `micro` of step `step`, and its resumable state.
pub trait Recipe {
    /// Name written to logs and checkpoints.
    fn name(&self) -> &'static str;
    /// The loss of one micro-batch. Randomness must derive from `(seed, step, micro)` or from
    /// state returned by [`Recipe::state`], so that a resumed run is exact.
    fn micro_loss(&mut self, model: &Model, step: usize, micro: usize) -> Result<MicroLoss>;
    /// State to save in checkpoints (e.g. R2D2's test-case pool).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restore [`Recipe::state`].
    fn restore(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// Log-probabilities `(n,)` of every target token of `batch` (in order), and tokens run forward.
pub fn target_logprobs(model: &Model, batch: &[&Example]) -> Result<(Tensor, usize)> {
    let rows = target_rows(model, batch)?;
    Ok((rows.label_log_probs()?, rows.tokens))
}

/// The next-token distributions at every target position of a batch.
pub struct TargetRows {
    /// Logits `(n, V)` (f32), one row per target token, examples in order.
    pub logits: Tensor,
    /// The target token of each row.
    pub labels: Vec<u32>,
    /// The row of each example's first target.
    pub first: Vec<usize>,
    /// Tokens run forward (padding included).
    pub tokens: usize,
}

impl TargetRows {
    /// Log-probability `(n,)` of each row's label (one fused pass over the vocabulary).
    pub fn label_log_probs(&self) -> Result<Tensor> {
        Ok(safegeo_runtime::target_log_probs(
            &self.logits,
            &self.labels,
        )?)
    }

    /// Log-probabilities `(k, V)` of the rows `at`.
    pub fn log_probs_at(&self, at: &[u32]) -> Result<Tensor> {
        let at = Tensor::new(at, self.logits.device())?;
        Ok(safegeo_runtime::log_softmax_last(
            &self.logits.index_select(&at, 0)?,
        )?)
    }
}

/// One forward over `batch` with the LM head run only where a target is read.
pub fn target_rows(model: &Model, batch: &[&Example]) -> Result<TargetRows> {
    let rows: Vec<Vec<u32>> = batch.iter().map(|e| e.ids.clone()).collect();
    let (ids, layout) = model.pad_batch(&rows)?;
    let (b, t) = ids.dims2()?;
    // Position j of a padded row predicts from its logits at j - 1.
    let mut pick = Vec::new();
    let mut labels = Vec::new();
    let mut first = Vec::with_capacity(batch.len());
    for (r, e) in batch.iter().enumerate() {
        let pad = layout.pad[r];
        first.push(labels.len());
        for (i, tgt) in e.target.iter().enumerate().skip(1) {
            if let Some(tok) = tgt {
                pick.push((r * t + pad + i - 1) as u32);
                labels.push(*tok);
            }
        }
    }
    if labels.is_empty() {
        return Err(Error::Invalid(
            "a training batch has no target tokens".into(),
        ));
    }
    let x = model.embed_ids(&ids)?;
    let logits = model
        .forward_embeds(
            x,
            &layout,
            None,
            LogitsAt::Rows(pick),
            Phase::Prompt,
            true,
            &mut NoHooks,
        )?
        .expect("logits requested")
        .squeeze(0)?;
    Ok(TargetRows {
        logits: logits.to_dtype(DType::F32)?,
        labels,
        first,
        tokens: b * t,
    })
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    /// Optimizer step just taken (1-based).
    pub step: usize,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens run forward this step.
    pub tokens: usize,
    /// Forward+backward tokens per second this step.
    pub tokens_per_s: f64,
    /// Seconds since the run (or resume) started.
    pub elapsed_s: f64,
    /// Loss components.
    pub parts: BTreeMap<String, f64>,
    /// Seconds in named phases of the step: the recipe's own (e.g. `gcg_inner_loop`), then
    /// `forward_backward` (losses and gradients, the recipe's phases excluded) and `optimizer`
    /// (clipping and the AdamW update).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub seconds: BTreeMap<String, f64>,
}

#[derive(Serialize, Deserialize)]
struct ResumeState {
    step: usize,
    recipe: serde_json::Value,
    config: TrainConfig,
}

/// Where a run writes: `ckpt-NNNNNN/` anchors, `state/` for resume, `train_log.jsonl`.
pub struct RunDir {
    /// The folder.
    pub dir: PathBuf,
}

impl RunDir {
    /// The anchor folder of `step`.
    pub fn checkpoint(&self, step: usize) -> PathBuf {
        self.dir.join(format!("ckpt-{step:06}"))
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("train_log.jsonl")
    }
}

fn save_vars(vars: &[Var], opt: &AdamW, path: &Path) -> Result<()> {
    let (_, m, v) = opt.moments()?;
    let mut named = std::collections::HashMap::new();
    for (i, var) in vars.iter().enumerate() {
        let shape = var.as_tensor().shape().clone();
        named.insert(format!("var.{i}"), var.as_tensor().detach());
        named.insert(
            format!("m.{i}"),
            Tensor::from_slice(&m[i], &shape, &candle_core::Device::Cpu)?,
        );
        named.insert(
            format!("v.{i}"),
            Tensor::from_slice(&v[i], &shape, &candle_core::Device::Cpu)?,
        );
    }
    Ok(safegeo_runtime::files::save_tensors_atomic(&named, path)?)
}

fn load_vars(vars: &[Var], opt: &mut AdamW, path: &Path, step: usize) -> Result<()> {
    let dev = vars[0].as_tensor().device().clone();
    let t = candle_core::safetensors::load(path, &dev)?;
    let get = |k: String| {
        t.get(&k).cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "{}: missing {k}; the state belongs to another configuration (delete state/ to restart)",
                path.display()
            ))
        })
    };
    let (mut ms, mut vs) = (Vec::new(), Vec::new());
    for (i, var) in vars.iter().enumerate() {
        let x = get(format!("var.{i}"))?;
        if x.shape() != var.as_tensor().shape() {
            return Err(Error::Invalid(format!(
                "{}: var.{i} has shape {:?}, the model {:?} (delete state/ to restart)",
                path.display(),
                x.dims(),
                var.as_tensor().dims()
            )));
        }
        var.set(&x.to_dtype(var.as_tensor().dtype())?)?;
        ms.push(
            get(format!("m.{i}"))?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?,
        );
        vs.push(
            get(format!("v.{i}"))?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?,
        );
    }
    opt.set_moments(step, ms, vs)?;
    Ok(())
}

/// Train `model` with `recipe` into `out`, resuming from `out/state` when it exists.
/// `progress(step, steps, &line)` is called after every step. Returns the log of this call.
pub fn train(
    model: &mut Model,
    recipe: &mut dyn Recipe,
    cfg: &TrainConfig,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &LogLine),
) -> Result<Vec<LogLine>> {
    cfg.check()?;
    let run = RunDir {
        dir: out.to_path_buf(),
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let vars = match &cfg.lora {
        Some(l) => {
            let targets: Vec<&str> = l.targets.iter().map(String::as_str).collect();
            model.attach_lora_at(l.rank, l.alpha, &targets, l.layers.as_deref(), cfg.seed)?
        }
        None => model.make_trainable()?,
    };
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let mut start = 0;
    // A kill between the two renames of `save_state` leaves only the previous state, whole.
    let old_state = run.dir.join("state.old");
    if !run.state().exists() && old_state.join("trainer.json").exists() {
        std::fs::rename(&old_state, run.state()).map_err(|e| Error::io(&old_state, e))?;
    }
    let state_json = run.state().join("trainer.json");
    if state_json.exists() {
        let s: ResumeState = serde_json::from_slice(
            &std::fs::read(&state_json).map_err(|e| Error::io(&state_json, e))?,
        )
        .map_err(|e| Error::Invalid(format!("{}: {e}", state_json.display())))?;
        if s.config != *cfg {
            return Err(Error::OtherRun(format!(
                "{} holds a run with another configuration\n  fix: use the same options, or a new --out",
                out.display()
            )));
        }
        load_vars(
            &vars,
            &mut opt,
            &run.state().join("vars.safetensors"),
            s.step,
        )?;
        recipe.restore(&s.recipe)?;
        start = s.step;
        tracing::info!("resuming {} at step {start}", out.display());
    }
    // The log keeps exactly the steps before the resume point.
    let mut kept = String::new();
    if let Ok(text) = std::fs::read_to_string(run.log()) {
        for line in text.lines() {
            if let Ok(l) = serde_json::from_str::<LogLine>(line) {
                if l.step <= start {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
    }
    safegeo_runtime::files::write_atomic(&run.log(), kept.as_bytes())?;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(run.log())
        .map_err(|e| Error::io(run.log(), e))?;
    if start == 0 && cfg.save_at.contains(&0) && !run.checkpoint(0).join("config.json").exists() {
        write_checkpoint(model, &run, 0, recipe.name(), None)?;
    }
    let t_run = std::time::Instant::now();
    let mut lines = Vec::new();
    for step in start..cfg.steps {
        let t0 = std::time::Instant::now();
        opt.cfg.lr = cfg.lr_at(step);
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_sum, mut tokens) = (0.0, 0);
        let mut parts: BTreeMap<String, f64> = BTreeMap::new();
        let mut seconds: BTreeMap<String, f64> = BTreeMap::new();
        for micro in 0..cfg.grad_accum {
            let m = recipe.micro_loss(model, step, micro)?;
            for (k, v) in m.seconds {
                *seconds.entry(k).or_default() += v;
            }
            let value = m.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::Invalid(format!(
                    "loss is {value} at step {}; lower --lr (state up to step {} is kept)",
                    step + 1,
                    start.max(step)
                )));
            }
            loss_sum += value;
            tokens += m.tokens;
            for (k, v) in m.parts {
                *parts.entry(k).or_default() += v / cfg.grad_accum as f64;
            }
            let grads = safegeo_runtime::backward(&(m.loss / cfg.grad_accum as f64)?)?;
            for (a, v) in acc.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    *a = Some(match a.take() {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let t_opt = std::time::Instant::now();
        let own: f64 = seconds.values().sum();
        seconds.insert(
            "forward_backward".into(),
            (t_opt.duration_since(t0).as_secs_f64() - own).max(0.0),
        );
        let mut sq = 0.0;
        for g in acc.iter().flatten() {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let grad_norm = sq.sqrt();
        let scale = if cfg.max_grad_norm > 0.0 && grad_norm > cfg.max_grad_norm {
            cfg.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let mut store = GradStore::default();
        for (a, v) in acc.into_iter().zip(&vars) {
            if let Some(g) = a {
                store.insert(v.as_tensor(), if scale < 1.0 { (g * scale)? } else { g });
            }
        }
        opt.step(&store)?;
        seconds.insert("optimizer".into(), t_opt.elapsed().as_secs_f64());
        let secs = t0.elapsed().as_secs_f64();
        let line = LogLine {
            step: step + 1,
            loss: loss_sum / cfg.grad_accum as f64,
            lr: opt.cfg.lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / secs,
            elapsed_s: t_run.elapsed().as_secs_f64(),
            parts,
            seconds,
        };
        writeln!(
            log,
            "{}",
            serde_json::to_string(&line).map_err(|e| Error::Invalid(e.to_string()))?
        )
        .map_err(|e| Error::io(run.log(), e))?;
        log.flush().map_err(|e| Error::io(run.log(), e))?;
        let done = step + 1;
        if cfg.save_at.contains(&done) {
            write_checkpoint(model, &run, done, recipe.name(), Some(&line))?;
        }
        if cfg.save_at.contains(&done) || done % cfg.state_every.max(1) == 0 || done == cfg.steps {
            save_state(&run, &vars, &opt, recipe, cfg, done)?;
        }
        progress(done, cfg.steps, &line);
        lines.push(line);
    }
    Ok(lines)
}

fn save_state(
    run: &RunDir,
    vars: &[Var],
    opt: &AdamW,
    recipe: &dyn Recipe,
    cfg: &TrainConfig,
    step: usize,
) -> Result<()> {
    // Written into a fresh folder and swapped in, so an interruption leaves the old state whole.
    let tmp = run.dir.join("state.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_vars(vars, opt, &tmp.join("vars.safetensors"))?;
    let s = ResumeState {
        step,
        recipe: recipe.state(),
        config: cfg.clone(),
    };
    safegeo_runtime::files::write_atomic(
        &tmp.join("trainer.json"),
        &serde_json::to_vec_pretty(&s).map_err(|e| Error::Invalid(e.to_string()))?,
    )?;
    let old = run.dir.join("state.old");
    let _ = std::fs::remove_dir_all(&old);
    if run.state().exists() {
        std::fs::rename(run.state(), &old).map_err(|e| Error::io(run.state(), e))?;
    }
    std::fs::rename(&tmp, run.state()).map_err(|e| Error::io(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn write_checkpoint(
    model: &mut Model,
    run: &RunDir,
    step: usize,
    recipe: &str,
    line: Option<&LogLine>,
) -> Result<()> {
    let dir = run.checkpoint(step);
    let tmp = run.dir.join(format!("ckpt-{step:06}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    safegeo_runtime::export_hf(model, &tmp)?;
    safegeo_runtime::files::write_atomic(
        &tmp.join("checkpoint.json"),
        &serde_json::to_vec_pretty(&serde_json::json!({
            "step": step, "recipe": recipe, "base_model": model.source,
            "loss": line.map(|l| l.loss),
        }))
        .map_err(|e| Error::Invalid(e.to_string()))?,
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    tracing::info!("checkpoint {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let cfg = TrainConfig {
            steps: 20,
            warmup_steps: 4,
            lr: 1.0,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((cfg.lr_at(0) - 0.25).abs() < 1e-12);
        assert!((cfg.lr_at(3) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(4) - 1.0).abs() < 1e-12);
        // Halfway through the decay: the midpoint of peak and floor.
        assert!((cfg.lr_at(12) - 0.55).abs() < 1e-12);
        assert!((cfg.lr_at(20) - 0.1).abs() < 1e-12);
        for s in 4..20 {
            assert!(cfg.lr_at(s + 1) <= cfg.lr_at(s));
        }
    }

    #[test]
    fn bad_configs_are_errors() {
        let base = TrainConfig::default();
        for bad in [
            TrainConfig {
                steps: 0,
                ..base.clone()
            },
            TrainConfig {
                lr: -1.0,
                ..base.clone()
            },
            TrainConfig {
                save_at: vec![999],
                ..base.clone()
            },
            TrainConfig {
                lora: Some(LoraConfig {
                    rank: 0,
                    ..Default::default()
                }),
                ..base.clone()
            },
        ] {
            assert!(bad.check().is_err());
        }
        assert!(base.check().is_ok());
    }
}
