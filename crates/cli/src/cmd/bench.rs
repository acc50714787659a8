//! `safegeo bench`: this machine's sgemm peak and the runtime's throughput on the default model,
//! measured in one run. Compare with `bench/reference.py` (PyTorch transformers, llama.cpp).
use crate::common::{self, ModelArgs};
use anyhow::Result;
use candle_core::{Device, Tensor, D};
use rand::{Rng, SeedableRng};
use safegeo_runtime::{Hooks, KvCache, Layout, LogitsAt, Model, NoHooks, Phase, Positions, Site};
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Repetitions per measurement (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Skip the backward and optimizer measurements (they take most of the time).
    #[arg(long)]
    pub no_backward: bool,
    /// Also time GCG steps (20-token suffix, search width 512, top-k 256; nanoGCG's defaults)
    /// on "Write a short poem about cats." (compare: bench/gcg_reference.py).
    #[arg(long)]
    pub gcg: bool,
    /// Only the GCG measurement (same as `--only gcg`).
    #[arg(long)]
    pub gcg_only: bool,
    /// Run only these workloads (comma-separated), e.g. `--only fwd-bwd-full` to profile one.
    /// Default: all but `gcg`.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Workload>,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// One measured workload of `safegeo bench`.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    /// sgemm 1024^3, the machine's f32 matmul peak (prefill's MFU is relative to it).
    Sgemm,
    /// Prefill 32 x 64 tokens with every resid_pre captured.
    Prefill,
    /// Greedy decoding at batch 1 and 32, f32 weights.
    Decode,
    /// Greedy decoding at batch 1 and 32 with the GGUF's quantized weights.
    DecodeQuantized,
    /// The SFT recipe's step: batch 8 x 96, LoRA r=16 on all projections, + AdamW.
    SftStep,
    /// Forward + backward over 256 tokens, LoRA r=8 on q and v.
    FwdBwdLora,
    /// Forward + backward over 256 tokens, every weight trainable.
    FwdBwdFull,
    /// One AdamW step over every parameter.
    Adamw,
    /// GCG steps (20-token suffix, search width 512, top-k 256).
    Gcg,
    /// `safegeo train --recipe sft` with its defaults (LoRA r=16 on blocks 40%-, batch 8 plus a
    /// decision batch of 32 prompts) on 16 harmful-train and 32 harmless-train prompts: one
    /// warm-up step, then `--reps` steps.
    TrainSft,
    /// `safegeo train --recipe r2d2` (cpu preset: pool 4, one GCG step of width 64 per case),
    /// GCG inner loop included: one warm-up step (it fills the pool), then one step.
    TrainR2d2,
}

#[derive(serde::Serialize, Default)]
struct BenchReport {
    model: String,
    threads: usize,
    /// The library that runs the large f32 products (and the sgemm measured).
    gemm_backend: String,
    sgemm_gflops: Option<f64>,
    prefill_capture_tok_s: Option<f64>,
    prefill_capture_mfu: Option<f64>,
    decode_b1_tok_s: Option<f64>,
    decode_b32_tok_s: Option<f64>,
    decode_b1_quantized_tok_s: Option<f64>,
    decode_b32_quantized_tok_s: Option<f64>,
    fwd_bwd_lora_r8_tok_s: Option<f64>,
    fwd_bwd_full_tok_s: Option<f64>,
    adamw_step_s: Option<f64>,
    /// The SFT recipe's training step: batch 8 x 96 tokens, LoRA r=16 on all seven
    /// projections, forward + backward + AdamW.
    sft_step_lora_r16_b8_tok_s: Option<f64>,
    gcg_step_s: Option<f64>,
    /// `safegeo train --recipe sft`: training tokens per second and seconds per step.
    train_sft_tok_s: Option<f64>,
    train_sft_step_s: Option<f64>,
    /// `safegeo train --recipe r2d2`: training tokens per second (tokens of the SFT batch and
    /// the away/toward losses; the GCG inner loop's forwards are not counted but its time is),
    /// seconds per step, and the GCG inner loop's seconds within it.
    train_r2d2_tok_s: Option<f64>,
    train_r2d2_step_s: Option<f64>,
    train_r2d2_gcg_s: Option<f64>,
    peak_rss_mb: f64,
}

/// Steady-state rate of a `safegeo train` recipe.
struct RecipeRate {
    tok_s: f64,
    step_s: f64,
    /// Mean seconds per step in each of the step's named phases.
    seconds: std::collections::BTreeMap<String, f64>,
}

/// Runs the built-in recipe `recipe` (rank-16 adapters, a small prompt set, no anchors) for
/// `warm + measured` steps into a temporary folder, and reports the `measured` steps. The
/// self-distilled replies come from the cache `safegeo train` uses, generated on the first run
/// (not timed).
fn train_recipe(a: &BenchArgs, recipe: &str, warm: usize, measured: usize) -> Result<RecipeRate> {
    let out = tempfile::tempdir()?;
    let mut r = safegeo_train::recipe_file::load(recipe)?;
    r.schedule.steps = warm + measured;
    r.schedule.save_at.clear();
    r.data.n_harmful = Some(16);
    r.data.n_harmless = 32;
    r.data.n_hard_negatives = 0;
    // Rank 16, as in every recorded measurement (docs/performance.md), whatever the recipe's.
    r.adapters.rank = 16;
    r.adapters.alpha = 32.0;
    let (mut model, mut plan) =
        super::train::prepare(&a.model, &r, a.data.data_dir.clone(), out.path())?;
    let lines = safegeo_train::trainer::train(
        &mut model,
        plan.recipe.as_mut(),
        &plan.train,
        out.path(),
        &mut |_, _, _| {},
    )?;
    let timed = &lines[warm..];
    let secs: f64 = timed.iter().map(|l| l.tokens as f64 / l.tokens_per_s).sum();
    let tokens: usize = timed.iter().map(|l| l.tokens).sum();
    let mut seconds = std::collections::BTreeMap::new();
    for l in timed {
        for (k, v) in &l.seconds {
            *seconds.entry(k.clone()).or_insert(0.0) += v / timed.len() as f64;
        }
    }
    Ok(RecipeRate {
        tok_s: tokens as f64 / secs,
        step_s: secs / timed.len() as f64,
        seconds,
    })
}

/// Seconds per GCG step with nanoGCG's defaults (mean of `steps` steps after the first).
fn gcg_step(model: &Model, steps: usize) -> Result<f64> {
    use safegeo_attacks::gcg::{Gcg, GcgConfig};
    let prompt = safegeo_attacks::SplitPrompt::for_behavior(
        &model.tok,
        None,
        "Write a short poem about cats.",
    )?;
    let cfg = GcgConfig {
        num_steps: steps + 1,
        ..Default::default()
    };
    let gcg = Gcg::new(model, &prompt, "Sure, here is a short poem about cats", cfg)?;
    let mut state = gcg.init(&mut NoHooks)?;
    gcg.step(&mut state, &mut NoHooks)?;
    let t0 = Instant::now();
    for _ in 0..steps {
        gcg.step(&mut state, &mut NoHooks)?;
    }
    Ok(t0.elapsed().as_secs_f64() / steps as f64)
}

fn best<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn random_ids(rows: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows)
        .map(|_| (0..len).map(|_| r.gen_range(100..vocab as u32)).collect())
        .collect()
}

fn sgemm_gflops(reps: usize) -> Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    // Through a frozen linear layer (`a b^T`): the path and library the model's products take.
    let layer = safegeo_runtime::Linear::new(b, None);
    let s = best(reps + 2, || {
        layer.forward(&a, false)?;
        Ok(())
    })?;
    Ok(2.0 * (n * n * n) as f64 / s / 1e9)
}

fn prefill(model: &Model, reps: usize) -> Result<(f64, f64)> {
    let (b, t) = (32, 64);
    let (ids, layout) = model.pad_batch(&random_ids(b, t, model.cfg.vocab, 1))?;
    let s = best(reps, || {
        let mut hooks = Hooks::capture(&[Site::ResidPre, Site::FinalNormInput], Positions::All);
        model.forward_ids(
            &ids,
            &layout,
            None,
            LogitsAt::Last,
            Phase::Prompt,
            &mut hooks,
        )?;
        Ok(())
    })?;
    let head = 2.0 * (model.cfg.hidden * model.cfg.vocab) as f64;
    let flops = (b * t) as f64 * (model.cfg.flops_per_token() - head) + b as f64 * head;
    Ok(((b * t) as f64 / s, flops / s))
}

fn decode(model: &Model, batch: usize, steps: usize) -> Result<f64> {
    let prompts = random_ids(batch, 16, model.cfg.vocab, 2);
    let (ids, layout) = model.pad_batch(&prompts)?;
    // Room for every position up front, as `generate` reserves it (no regrowth mid-run).
    let mut cache = KvCache::with_capacity(model.cfg.n_layer, 16 + steps);
    let logits = model.forward_ids(
        &ids,
        &layout,
        Some(&mut cache),
        LogitsAt::Last,
        Phase::Prompt,
        &mut NoHooks,
    )?;
    let mut next = logits
        .expect("logits")
        .squeeze(1)?
        .argmax(D::Minus1)?
        .unsqueeze(1)?;
    let t0 = Instant::now();
    for _ in 0..steps {
        let l = model.forward_ids(
            &next,
            &layout,
            Some(&mut cache),
            LogitsAt::Last,
            Phase::Generated,
            &mut NoHooks,
        )?;
        next = l
            .expect("logits")
            .squeeze(1)?
            .argmax(D::Minus1)?
            .unsqueeze(1)?;
    }
    Ok((batch * steps) as f64 / t0.elapsed().as_secs_f64())
}

fn loss(model: &Model, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let x = model.embed_ids(&ids.narrow(1, 0, t - 1)?)?;
    let logits = model
        .forward_embeds(
            x,
            &Layout::dense(b),
            None,
            LogitsAt::All,
            Phase::Prompt,
            true,
            &mut NoHooks,
        )?
        .expect("logits");
    // Mean next-token cross-entropy, computed as the trainer does (`TargetRows::label_log_probs`:
    // one fused node). candle_nn's `cross_entropy` builds its log-softmax from six
    // vocabulary-sized graph nodes.
    let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1::<u32>()?;
    let picked = safegeo_runtime::target_log_probs(&logits.flatten_to(1)?, &targets)?;
    Ok((picked.sum_all()? * (-1.0 / targets.len() as f64))?)
}

fn fwd_bwd(model: &Model, reps: usize, tokens: usize) -> Result<f64> {
    let ids = Tensor::new(random_ids(1, tokens + 1, model.cfg.vocab, 3), &Device::Cpu)?;
    let s = best(reps, || {
        safegeo_runtime::backward(&loss(model, &ids)?)?;
        Ok(())
    })?;
    Ok(tokens as f64 / s)
}

/// Tokens/s of the SFT recipe's step shape (see `sft_step_lora_r16_b8_tok_s`).
fn sft_step(a: &BenchArgs, reps: usize) -> Result<f64> {
    let (batch, tokens) = (8, 96);
    let mut model = common::load(&a.model)?;
    let vars = model.attach_lora(16, 32.0, &["q", "k", "v", "o", "gate", "up", "down"], 0)?;
    let ids = Tensor::new(
        random_ids(batch, tokens + 1, model.cfg.vocab, 5),
        &Device::Cpu,
    )?;
    let cfg = safegeo_runtime::AdamWConfig {
        lr: 1e-4,
        ..Default::default()
    };
    let mut opt = safegeo_runtime::AdamW::new(vars, cfg)?;
    let s = best(reps, || {
        let grads = safegeo_runtime::backward(&loss(&model, &ids)?)?;
        opt.step(&grads)?;
        Ok(())
    })?;
    Ok((batch * tokens) as f64 / s)
}

impl BenchArgs {
    /// Whether this run measures quantized decoding and nothing else.
    pub fn decodes_quantized_only(&self) -> bool {
        self.only == [Workload::DecodeQuantized] && !self.gcg_only
    }
}

/// Set by `main` when it chose candle's spin limit itself (the user did not set it).
pub const SPIN_LIMIT_DEFAULTED: &str = "SAFEGEO_SPIN_LIMIT_DEFAULTED";

/// `safegeo bench --only decode-quantized --json` as a child process: its two numbers.
fn decode_quantized_in_child(a: &BenchArgs) -> Result<(Option<f64>, Option<f64>)> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    if std::env::var_os(SPIN_LIMIT_DEFAULTED).is_some() {
        // Our own choice for this process, not the user's: let the child choose its own.
        cmd.env_remove("CANDLE_BARRIER_POOL_SPIN_LIMIT")
            .env_remove(SPIN_LIMIT_DEFAULTED);
    }
    cmd.args(["bench", "--only", "decode-quantized", "--json"])
        .args(["--reps", &a.reps.to_string(), "--device", &a.model.device]);
    if let Some(m) = &a.model.model {
        cmd.args(["--model", m]);
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "the quantized-decoding benchmark's process failed ({})",
            out.status
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["decode_b1_quantized_tok_s"].as_f64(),
        v["decode_b32_quantized_tok_s"].as_f64(),
    ))
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn run(a: BenchArgs) -> Result<()> {
    let mut model = common::load(&a.model)?;
    let mut r = BenchReport {
        model: model.source.display().to_string(),
        threads: candle_core::utils::get_num_threads(),
        gemm_backend: safegeo_runtime::blas::backend(),
        ..Default::default()
    };
    let only = if a.gcg_only {
        vec![Workload::Gcg]
    } else {
        a.only.clone()
    };
    let wanted = |w: Workload| {
        if only.is_empty() {
            match w {
                Workload::Gcg => a.gcg,
                Workload::SftStep
                | Workload::TrainSft
                | Workload::TrainR2d2
                | Workload::FwdBwdLora
                | Workload::FwdBwdFull
                | Workload::Adamw => !a.no_backward,
                _ => true,
            }
        } else {
            only.contains(&w)
        }
    };
    let step = |name: &str| crate::common::note!("bench: {name} ...");
    if wanted(Workload::Sgemm) {
        step("sgemm 1024^3");
        r.sgemm_gflops = Some(sgemm_gflops(a.reps)?);
    }
    if wanted(Workload::Prefill) {
        step("prefill 32x64 with residual capture");
        let (tok_s, flops) = prefill(&model, a.reps)?;
        r.prefill_capture_tok_s = Some(tok_s);
        r.prefill_capture_mfu = r.sgemm_gflops.map(|peak| flops / 1e9 / peak);
    }
    if wanted(Workload::Decode) {
        step("decode batch 1");
        r.decode_b1_tok_s = Some(decode(&model, 1, 64)?);
        step("decode batch 32");
        r.decode_b32_tok_s = Some(decode(&model, 32, 64)?);
    }
    if wanted(Workload::DecodeQuantized) && !a.decodes_quantized_only() {
        // In a process of its own: batch-1 decoding wants candle's worker spinning between ops,
        // which is set per process (see `main`), as `generate --quantized` gets it.
        step("decode batch 1 and 32, quantized weights (own process)");
        let (b1, b32) = decode_quantized_in_child(&a)?;
        r.decode_b1_quantized_tok_s = b1;
        r.decode_b32_quantized_tok_s = b32;
    } else if wanted(Workload::DecodeQuantized) {
        let qargs = ModelArgs {
            quantized: true,
            ..a.model.clone()
        };
        let qmodel = common::load(&qargs)?;
        if qmodel.lm_head.quantized.is_some() {
            step("decode batch 1 and 32, quantized weights");
            r.decode_b1_quantized_tok_s = Some(decode(&qmodel, 1, 64)?);
            r.decode_b32_quantized_tok_s = Some(decode(&qmodel, 32, 64)?);
        }
    }
    if wanted(Workload::Gcg) {
        step("GCG steps (width 512, top-k 256, 20-token suffix)");
        r.gcg_step_s = Some(gcg_step(&model, a.reps.max(1))?);
    }
    if wanted(Workload::SftStep) {
        step("SFT training step: batch 8 x 96 tokens, LoRA r=16 on all projections, AdamW");
        r.sft_step_lora_r16_b8_tok_s = Some(sft_step(&a, a.reps)?);
    }
    // The recipes read the training splits: asked for by name, a missing data directory is an
    // error; in the default set it skips them with the reason.
    let recipe_rate = |recipe: &str, measured: usize| -> Result<Option<RecipeRate>> {
        match train_recipe(&a, recipe, 1, measured) {
            Ok(rate) => Ok(Some(rate)),
            Err(e) if only.is_empty() => {
                eprintln!("bench: train-{recipe} skipped: {e:#}");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    };
    if wanted(Workload::TrainSft) {
        step("safegeo train --recipe sft: 1 warm-up step, then --reps steps");
        if let Some(rate) = recipe_rate("sft", a.reps.max(1))? {
            r.train_sft_tok_s = Some(rate.tok_s);
            r.train_sft_step_s = Some(rate.step_s);
        }
    }
    if wanted(Workload::TrainR2d2) {
        step("safegeo train --recipe r2d2 (GCG inner loop included): 1 warm-up step, then 1");
        if let Some(rate) = recipe_rate("r2d2", 1)? {
            r.train_r2d2_tok_s = Some(rate.tok_s);
            r.train_r2d2_step_s = Some(rate.step_s);
            r.train_r2d2_gcg_s = rate.seconds.get("gcg_inner_loop").copied();
        }
    }
    if wanted(Workload::FwdBwdLora) {
        step("forward+backward 256 tokens, LoRA r=8 on q,v");
        let mut lora = common::load(&a.model)?;
        lora.attach_lora(8, 16.0, &["q", "v"], 0)?;
        r.fwd_bwd_lora_r8_tok_s = Some(fwd_bwd(&lora, a.reps, 256)?);
    }
    if wanted(Workload::FwdBwdFull) || wanted(Workload::Adamw) {
        let vars = model.make_trainable()?;
        if wanted(Workload::FwdBwdFull) {
            step("forward+backward 256 tokens, full");
            r.fwd_bwd_full_tok_s = Some(fwd_bwd(&model, a.reps, 256)?);
        }
        if wanted(Workload::Adamw) {
            step("AdamW step, all parameters");
            let ids = Tensor::new(random_ids(1, 257, model.cfg.vocab, 4), &Device::Cpu)?;
            let grads = safegeo_runtime::backward(&loss(&model, &ids)?)?;
            let cfg = safegeo_runtime::AdamWConfig {
                lr: 1e-5,
                ..Default::default()
            };
            let mut opt = safegeo_runtime::AdamW::new(vars, cfg)?;
            r.adamw_step_s = Some(best(a.reps, || Ok(opt.step(&grads)?))?);
        }
    }
    r.peak_rss_mb = peak_rss_mb();
    let (hits, misses, dropped) = safegeo_runtime::block_cache::stats();
    tracing::info!(hits, misses, dropped, "large-block cache");
    if a.json {
        return common::print_json(&r);
    }
    let rows: [(&str, Option<f64>, &str); 18] = [
        ("sgemm 1024^3 (f32)", r.sgemm_gflops, "GFLOP/s"),
        (
            "prefill 32x64, all resid_pre captured",
            r.prefill_capture_tok_s,
            "tok/s",
        ),
        (
            "  MFU vs measured sgemm",
            r.prefill_capture_mfu.map(|m| 100.0 * m),
            "%",
        ),
        ("decode batch 1 (f32 weights)", r.decode_b1_tok_s, "tok/s"),
        ("decode batch 32 (f32 weights)", r.decode_b32_tok_s, "tok/s"),
        (
            "decode batch 1 (quantized weights)",
            r.decode_b1_quantized_tok_s,
            "tok/s",
        ),
        (
            "decode batch 32 (quantized weights)",
            r.decode_b32_quantized_tok_s,
            "tok/s",
        ),
        (
            "forward+backward 256 tok, LoRA r=8",
            r.fwd_bwd_lora_r8_tok_s,
            "tok/s",
        ),
        (
            "forward+backward 256 tok, full",
            r.fwd_bwd_full_tok_s,
            "tok/s",
        ),
        ("AdamW step, all parameters", r.adamw_step_s, "s"),
        (
            "SFT step 8x96 tok, LoRA r=16 all, +AdamW",
            r.sft_step_lora_r16_b8_tok_s,
            "tok/s",
        ),
        ("GCG step, width 512, top-k 256", r.gcg_step_s, "s"),
        ("train --recipe sft", r.train_sft_tok_s, "tok/s"),
        ("  per step", r.train_sft_step_s, "s"),
        ("train --recipe r2d2", r.train_r2d2_tok_s, "tok/s"),
        ("  per step", r.train_r2d2_step_s, "s"),
        ("  of which the GCG inner loop", r.train_r2d2_gcg_s, "s"),
        ("peak RSS", Some(r.peak_rss_mb), "MB"),
    ];
    println!("model: {}  threads: {}", r.model, r.threads);
    println!("f32 products: {}", r.gemm_backend);
    for (label, value, unit) in rows {
        if let Some(x) = value {
            println!("{label:<44} {:>14}", format!("{x:.1} {unit}"));
        }
    }
    Ok(())
}
