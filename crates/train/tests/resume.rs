//! The trainer on a tiny model: an interrupted run resumes to the same losses as an
//! uninterrupted one, and anchor checkpoints load as plain models equal to the trained one.
use candle_core::{DType, Device};
use safegeo_runtime::testing::tiny_model;
use safegeo_runtime::{load_model, Arch, NoHooks};
use safegeo_train::data::Example;
use safegeo_train::recipes::ExampleRecipe;
use safegeo_train::trainer::{train, LogLine, LoraConfig, MicroLoss, Recipe, TrainConfig};

fn examples() -> Vec<Example> {
    (0..12u32)
        .map(|i| {
            let prompt = vec![2, 3 + i % 5, 7, 9 + i % 3];
            let reply = vec![20 + i % 7, 30 + i % 4, 1];
            Example::reply(
                prompt,
                reply,
                if i % 3 == 0 { "harmful" } else { "harmless" },
            )
        })
        .collect()
}

/// Fails once at `fail_at`, like a kill in the middle of a step.
struct Flaky {
    inner: ExampleRecipe,
    fail_at: Option<usize>,
}

impl Recipe for Flaky {
    fn name(&self) -> &'static str {
        "sft"
    }
    fn micro_loss(
        &mut self,
        model: &safegeo_runtime::Model,
        step: usize,
        micro: usize,
    ) -> safegeo_train::Result<MicroLoss> {
        if Some(step) == self.fail_at {
            self.fail_at = None;
            return Err(safegeo_train::Error::Invalid("interrupted".into()));
        }
        let mut m = self.inner.micro_loss(model, step, micro)?;
        // A phase of the recipe's own (R2D2's inner GCG loop, say), at least as long as said.
        std::thread::sleep(std::time::Duration::from_millis(10));
        m.seconds.insert("own_phase".into(), 0.01);
        Ok(m)
    }
}

fn log(dir: &std::path::Path) -> Vec<LogLine> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run(cfg: &TrainConfig, dir: &std::path::Path, fail_at: Option<usize>) -> bool {
    let mut model = tiny_model(Arch::Llama, 11, DType::F32).unwrap();
    let mut recipe = Flaky {
        inner: ExampleRecipe::new("sft", examples(), 3, 2, 5).unwrap(),
        fail_at,
    };
    train(&mut model, &mut recipe, cfg, dir, &mut |_, _, _| {}).is_ok()
}

#[test]
fn resumed_run_equals_uninterrupted_run_and_anchors_load() {
    for lora in [
        Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        }),
        // Adapters on the last block only: the first stays out of the backward pass.
        Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            layers: Some(vec![1]),
            ..Default::default()
        }),
        None,
    ] {
        let cfg = TrainConfig {
            steps: 7,
            batch_size: 3,
            grad_accum: 2,
            lr: 5e-3,
            warmup_steps: 2,
            lora: lora.clone(),
            seed: 5,
            save_at: vec![0, 3, 7],
            state_every: 2,
            ..Default::default()
        };
        let a = tempfile::tempdir().unwrap();
        assert!(run(&cfg, a.path(), None));
        let b = tempfile::tempdir().unwrap();
        assert!(
            !run(&cfg, b.path(), Some(5)),
            "the flaky recipe must fail once"
        );
        assert!(run(&cfg, b.path(), None), "resume");
        let (la, lb) = (log(a.path()), log(b.path()));
        assert_eq!(la.len(), 7);
        assert_eq!(lb.len(), 7);
        for (x, y) in la.iter().zip(&lb) {
            assert_eq!(x.step, y.step);
            assert!(
                (x.loss - y.loss).abs() < 1e-5,
                "step {}: {} vs {}",
                x.step,
                x.loss,
                y.loss
            );
        }
        assert!(la[6].loss < la[0].loss, "training lowers the loss: {la:?}");
        // A recipe's own phase is summed over the step's micro-batches; the trainer's phases
        // are measured and the step's other work is in neither.
        for l in &la {
            assert_eq!(l.seconds["own_phase"], 0.02);
            let (fb, opt) = (l.seconds["forward_backward"], l.seconds["optimizer"]);
            let step = l.tokens as f64 / l.tokens_per_s;
            assert!(fb > 0.0 && opt > 0.0 && fb + opt <= step, "{l:?}");
        }
        // The last anchor is a plain model that computes what the trained model computes.
        let mut trained = tiny_model(Arch::Llama, 11, DType::F32).unwrap();
        let mut recipe = ExampleRecipe::new("sft", examples(), 3, 2, 5).unwrap();
        let c = tempfile::tempdir().unwrap();
        train(&mut trained, &mut recipe, &cfg, c.path(), &mut |_, _, _| {}).unwrap();
        let anchor = load_model(&c.path().join("ckpt-000007"), &Device::Cpu).unwrap();
        let base = load_model(&c.path().join("ckpt-000000"), &Device::Cpu).unwrap();
        let prompts = vec![vec![2u32, 3, 7, 9, 20]];
        let want = trained.last_logits(&prompts, &mut NoHooks).unwrap();
        let got = anchor.last_logits(&prompts, &mut NoHooks).unwrap();
        let before = base.last_logits(&prompts, &mut NoHooks).unwrap();
        let diff = |x: &candle_core::Tensor, y: &candle_core::Tensor| {
            safegeo_runtime::testing::max_abs(&(x - y).unwrap())
        };
        assert!(
            diff(&want, &got) < 1e-4,
            "anchor differs by {}",
            diff(&want, &got)
        );
        assert!(diff(&want, &before) > 1e-3, "training changed nothing");
    }
}
