//! Runtime invariants on tiny random models (no checkpoint needed, seconds to run).
use candle_core::{DType, Device, Tensor, Var, D};
use safegeo_runtime::testing::tiny_model;
use safegeo_runtime::{
    generate, Arch, GenerateConfig, Hooks, Intervention, KvCache, Layout, LogitsAt, Model, NoHooks,
    Phase, Positions, Scope, Site,
};

const ARCHS: [Arch; 3] = [Arch::Llama, Arch::Qwen2, Arch::Gemma3];

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn last_logits(m: &Model, prompts: &[Vec<u32>]) -> Tensor {
    let (ids, layout) = m.pad_batch(prompts).unwrap();
    m.forward_ids(
        &ids,
        &layout,
        None,
        LogitsAt::Last,
        Phase::Prompt,
        &mut NoHooks,
    )
    .unwrap()
    .unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 9, 13, 2, 7, 30, 11],
        vec![3, 4],
        vec![20, 21, 22, 23, 24, 25, 26, 27, 28, 40],
    ]
}

#[test]
fn batched_logits_equal_unbatched() {
    for arch in ARCHS {
        let m = tiny_model(arch, 7, DType::F32).unwrap();
        let batched = last_logits(&m, &prompts());
        for (i, p) in prompts().iter().enumerate() {
            let single = last_logits(&m, std::slice::from_ref(p));
            let d = max_abs(&batched.narrow(0, i, 1).unwrap(), &single);
            assert!(d <= 1e-4, "{arch:?} row {i}: max abs diff {d}");
        }
    }
}

#[test]
fn batched_greedy_generation_equals_unbatched() {
    for arch in ARCHS {
        let m = tiny_model(arch, 11, DType::F32).unwrap();
        let cfg = GenerateConfig {
            max_new_tokens: 12,
            ..Default::default()
        };
        let batched = generate(&m, &prompts(), &cfg, &mut NoHooks).unwrap();
        for (i, p) in prompts().iter().enumerate() {
            let single = generate(&m, std::slice::from_ref(p), &cfg, &mut NoHooks).unwrap();
            assert_eq!(batched[i].ids, single[0].ids, "{arch:?} row {i}");
        }
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    for arch in ARCHS {
        let m = tiny_model(arch, 3, DType::F32).unwrap();
        let seq: Vec<u32> = (2..46).collect(); // 8 prefilled + 36 decoded: the cache grows twice
        let full = last_logits(&m, std::slice::from_ref(&seq));
        let mut cache = KvCache::new(m.cfg.n_layer);
        let layout = Layout::dense(1);
        let head = Tensor::new(&seq[..8], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.forward_ids(
            &head,
            &layout,
            Some(&mut cache),
            LogitsAt::None,
            Phase::Prompt,
            &mut NoHooks,
        )
        .unwrap();
        let mut last = None;
        for &t in &seq[8..] {
            let x = Tensor::new(&[t], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            last = m
                .forward_ids(
                    &x,
                    &layout,
                    Some(&mut cache),
                    LogitsAt::Last,
                    Phase::Generated,
                    &mut NoHooks,
                )
                .unwrap();
        }
        let d = max_abs(&full, &last.unwrap());
        assert!(d <= 1e-4, "{arch:?}: {d}");
    }
}

#[test]
fn sliding_window_changes_long_range_attention_only() {
    // Gemma's local layers see 4 tokens: a change 6 tokens back must still reach the output through
    // the global layer, and a model with no window must differ from one with it.
    let m = tiny_model(Arch::Gemma3, 5, DType::F32).unwrap();
    let a = last_logits(&m, &[(2..12).collect()]);
    let mut m2 = tiny_model(Arch::Gemma3, 5, DType::F32).unwrap();
    m2.cfg.sliding_window = None;
    let b = last_logits(&m2, &[(2..12).collect()]);
    assert!(max_abs(&a, &b) > 1e-4, "sliding window had no effect");
    let short: Vec<u32> = (2..5).collect();
    assert!(
        max_abs(
            &last_logits(&m, std::slice::from_ref(&short)),
            &last_logits(&m2, &[short])
        ) < 1e-5
    );
}

#[test]
fn ablation_removes_the_direction_everywhere() {
    let m = tiny_model(Arch::Llama, 1, DType::F32).unwrap();
    let r = Tensor::new(
        &[
            1f32, -2., 0.5, 3., 0., 1., 1., -1., 2., 0., 0., 1., -1., 0.5, 0.25, 1.,
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mut hooks = Hooks::capture(
        &[Site::ResidPre, Site::AttnOut, Site::MlpOut],
        Positions::All,
    );
    hooks.interventions.push(Intervention::ablate(&r).unwrap());
    let (ids, layout) = m.pad_batch(&prompts()).unwrap();
    m.forward_ids(
        &ids,
        &layout,
        None,
        LogitsAt::None,
        Phase::Prompt,
        &mut hooks,
    )
    .unwrap();
    let unit = safegeo_runtime::unit(&r).unwrap();
    for ((_, l), x) in &hooks.captured.acts {
        let proj = x
            .broadcast_mul(&unit)
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = x
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            proj <= 1e-5 * scale.max(1.0),
            "layer {l}: residual projection {proj}"
        );
    }
    assert_eq!(hooks.captured.acts.len(), 3 * m.cfg.n_layer);
}

#[test]
fn activation_addition_adds_exactly_c_v_at_its_layer() {
    let m = tiny_model(Arch::Qwen2, 2, DType::F32).unwrap();
    let v = Tensor::arange(0f32, 16., &Device::Cpu).unwrap();
    let run = |iv: Vec<Intervention>| {
        let mut h = Hooks::capture(&[Site::ResidPre], Positions::All);
        h.interventions = iv;
        let (ids, layout) = m.pad_batch(&[vec![4, 5, 6]]).unwrap();
        m.forward_ids(&ids, &layout, None, LogitsAt::None, Phase::Prompt, &mut h)
            .unwrap();
        h.captured
    };
    let base = run(vec![]);
    let added = run(vec![Intervention::Add {
        vector: v.clone(),
        coef: -0.5,
        layer: 1,
        scope: Scope::All,
    }]);
    let diff =
        (added.get(Site::ResidPre, 1).unwrap() - base.get(Site::ResidPre, 1).unwrap()).unwrap();
    let expect = (v * -0.5)
        .unwrap()
        .reshape((1, 1, 16))
        .unwrap()
        .broadcast_as(diff.shape())
        .unwrap();
    assert!(max_abs(&diff, &expect) < 1e-5);
    assert!(
        max_abs(
            added.get(Site::ResidPre, 0).unwrap(),
            base.get(Site::ResidPre, 0).unwrap()
        ) == 0.0
    );
    // Scope::Generated leaves the prompt pass untouched.
    let gen_only = run(vec![Intervention::Add {
        vector: Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
        coef: 3.0,
        layer: 1,
        scope: Scope::Generated,
    }]);
    assert!(
        max_abs(
            gen_only.get(Site::ResidPre, 1).unwrap(),
            base.get(Site::ResidPre, 1).unwrap()
        ) == 0.0
    );
}

/// Mean of `log_softmax(logits) * weights` over all positions: a scalar touching every path.
fn objective(m: &Model, x: Tensor, weights: &Tensor) -> Tensor {
    let layout = Layout::dense(x.dim(0).unwrap());
    let logits = differentiable_logits(m, x, &layout);
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    (lp * weights).unwrap().sum_all().unwrap()
}

/// Logits at every position, on the differentiable path.
fn differentiable_logits(m: &Model, x: Tensor, layout: &Layout) -> Tensor {
    m.forward_embeds(
        x,
        layout,
        None,
        LogitsAt::All,
        Phase::Prompt,
        true,
        &mut NoHooks,
    )
    .unwrap()
    .unwrap()
}

/// LoRA's B starts at zero; give it values so that A's gradient is not trivially zero.
fn give_lora_b_values(vars: &[Var], dtype: DType) {
    for (i, v) in vars.iter().enumerate().skip(1).step_by(2) {
        let t = Tensor::ones(v.as_tensor().shape(), dtype, &Device::Cpu)
            .unwrap()
            .affine(0.1 * i as f64, 0.0)
            .unwrap();
        v.set(&t).unwrap();
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

fn fd_check(name: &str, var: &Var, analytic: &Tensor, f: &dyn Fn() -> f64) {
    let flat = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let orig = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let shape = var.as_tensor().shape().clone();
    let eps = 1e-5;
    for i in (0..orig.len()).step_by((orig.len() / 7).max(1)) {
        let mut v = orig.clone();
        v[i] += eps;
        var.set(&Tensor::from_vec(v.clone(), &shape, &Device::Cpu).unwrap())
            .unwrap();
        let up = f();
        v[i] -= 2.0 * eps;
        var.set(&Tensor::from_vec(v, &shape, &Device::Cpu).unwrap())
            .unwrap();
        let down = f();
        var.set(&Tensor::from_vec(orig.clone(), &shape, &Device::Cpu).unwrap())
            .unwrap();
        let numeric = (up - down) / (2.0 * eps);
        let err = (numeric - flat[i]).abs();
        assert!(
            err <= 1e-6 + 1e-4 * numeric.abs(),
            "{name}[{i}]: analytic {} vs numeric {numeric}",
            flat[i]
        );
    }
}

fn weights_for(m: &Model, t: usize) -> Tensor {
    Tensor::arange(0f64, (t * m.cfg.vocab) as f64, &Device::Cpu)
        .unwrap()
        .affine(0.37, 0.0)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((1, t, m.cfg.vocab))
        .unwrap()
}

#[test]
fn onehot_input_gradient_matches_finite_differences() {
    for arch in ARCHS {
        let m = tiny_model(arch, 21, DType::F64).unwrap();
        let ids = [3u32, 8, 15, 4, 42];
        let mut oh = vec![0f64; ids.len() * m.cfg.vocab];
        for (i, &t) in ids.iter().enumerate() {
            oh[i * m.cfg.vocab + t as usize] = 1.0;
        }
        let onehot = Var::from_vec(oh, (ids.len(), m.cfg.vocab), &Device::Cpu).unwrap();
        let w = weights_for(&m, ids.len());
        let f = || {
            let x = m
                .scale_embeddings(
                    onehot
                        .as_tensor()
                        .matmul(&m.embed)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                )
                .unwrap();
            objective(&m, x, &w)
        };
        let grads = f().backward().unwrap();
        let g = grads.get(onehot.as_tensor()).unwrap().clone();
        fd_check(&format!("{arch:?} onehot"), &onehot, &g, &|| scalar(&f()));
    }
}

#[test]
fn full_weight_gradients_match_finite_differences() {
    for arch in ARCHS {
        let mut m = tiny_model(arch, 31, DType::F64).unwrap();
        let vars = m.make_trainable().unwrap();
        let ids = Tensor::new(&[[3u32, 9, 27, 4]], &Device::Cpu).unwrap();
        let w = weights_for(&m, 4);
        let f = |m: &Model| objective(m, m.embed_ids(&ids).unwrap(), &w);
        let grads = f(&m).backward().unwrap();
        // Embedding (also the tied head), a norm, and a few block weights.
        for (k, v) in vars
            .iter()
            .enumerate()
            .filter(|(k, _)| [0, 1, 2, 4, 7, 10].contains(k))
        {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{arch:?} var {k} has no gradient"))
                .clone();
            fd_check(&format!("{arch:?} var {k}"), v, &g, &|| scalar(&f(&m)));
        }
    }
}

/// The f32 training path (fused kernels with written-out backward) gives the same gradients for
/// every weight as the f64 path (exact composites, checked against finite differences above).
#[test]
fn fused_f32_gradients_equal_the_checked_f64_composites() {
    for (arch, lora) in ARCHS.iter().flat_map(|&a| [(a, false), (a, true)]) {
        let grads_of = |dtype: DType| {
            let mut m = tiny_model(arch, 31, dtype).unwrap();
            let vars = if lora {
                let vars = m.attach_lora(2, 4.0, &["q", "o", "up", "down"], 0).unwrap();
                give_lora_b_values(&vars, dtype);
                vars
            } else {
                m.make_trainable().unwrap()
            };
            // Two rows, the second left-padded: masked attention rows take part too.
            let (ids, layout) = m.pad_batch(&[vec![3, 9, 27, 4, 8], vec![5, 6, 7]]).unwrap();
            let logits = differentiable_logits(&m, m.embed_ids(&ids).unwrap(), &layout);
            let w = weights_for(&m, 10)
                .reshape((2, 5, m.cfg.vocab))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let lp = safegeo_runtime::log_softmax_last(&logits).unwrap();
            let grads = (lp * w).unwrap().sum_all().unwrap().backward().unwrap();
            vars.iter()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        let (fused, exact) = (grads_of(DType::F32), grads_of(DType::F64));
        for (k, (a, b)) in fused.iter().zip(&exact).enumerate() {
            let scale = safegeo_runtime::testing::max_abs(b);
            let err = max_abs(a, b);
            assert!(
                err <= 1e-3 * scale.max(1e-6),
                "{arch:?} lora={lora} var {k}: {err} vs scale {scale}"
            );
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    for arch in ARCHS {
        let mut m = tiny_model(arch, 41, DType::F64).unwrap();
        let vars = m.attach_lora(2, 4.0, &["q", "v", "down"], 0).unwrap();
        give_lora_b_values(&vars, DType::F64);
        let ids = Tensor::new(&[[5u32, 6, 7, 33, 2]], &Device::Cpu).unwrap();
        let w = weights_for(&m, 5);
        let f = |m: &Model| objective(m, m.embed_ids(&ids).unwrap(), &w);
        let grads = f(&m).backward().unwrap();
        for (k, v) in vars.iter().enumerate().take(6) {
            let g = grads.get(v.as_tensor()).unwrap().clone();
            fd_check(&format!("{arch:?} lora {k}"), v, &g, &|| scalar(&f(&m)));
        }
    }
}

#[test]
fn lora_on_chosen_layers_adapts_only_those() {
    let mut m = tiny_model(Arch::Llama, 9, DType::F32).unwrap();
    let vars = m
        .attach_lora_at(4, 8.0, &["q", "down"], Some(&[1]), 1)
        .unwrap();
    assert_eq!(vars.len(), 4, "A and B for q and down of block 1");
    for (i, b) in m.blocks.iter_mut().enumerate() {
        for (name, l) in b.linears_mut() {
            let want = i == 1 && (name == "q" || name == "down");
            assert_eq!(l.lora.is_some(), want, "block {i} {name}");
        }
    }
    let e = m
        .attach_lora_at(4, 8.0, &["q"], Some(&[0, 2]), 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer 2 does not exist") && e.contains("0-1"),
        "{e}"
    );
}

#[test]
fn lora_with_zero_b_leaves_outputs_unchanged() {
    let base = tiny_model(Arch::Llama, 9, DType::F32).unwrap();
    let mut m = tiny_model(Arch::Llama, 9, DType::F32).unwrap();
    m.attach_lora(4, 8.0, &["q", "k", "v", "o"], 1).unwrap();
    assert_eq!(
        max_abs(
            &last_logits(&base, &prompts()),
            &last_logits(&m, &prompts())
        ),
        0.0
    );
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let m = tiny_model(Arch::Llama, 1, DType::F32).unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: 1100,
        ..Default::default()
    };
    let e = generate(&m, &[vec![3, 4]], &cfg, &mut NoHooks).unwrap_err();
    assert!(e.to_string().contains("exceeds the context length"), "{e}");
    let e = generate(&m, &[vec![]], &GenerateConfig::default(), &mut NoHooks).unwrap_err();
    assert!(e.to_string().contains("empty prompt"), "{e}");
    let e = m
        .tok
        .encode_chat(&[safegeo_runtime::Message::new("user", "  ")], true)
        .unwrap_err();
    assert!(e.to_string().contains("empty prompt"), "{e}");
    let bad = GenerateConfig {
        temperature: -1.0,
        ..Default::default()
    };
    assert!(generate(&m, &[vec![3]], &bad, &mut NoHooks).is_err());
}

#[test]
fn sampling_is_seeded_and_batch_independent() {
    let m = tiny_model(Arch::Llama, 4, DType::F32).unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: 10,
        temperature: 1.0,
        top_p: 0.9,
        seed: 5,
        ..Default::default()
    };
    let a =
        safegeo_runtime::generate_seeded(&m, &prompts(), &[1, 2, 3], &cfg, &mut NoHooks).unwrap();
    let b =
        safegeo_runtime::generate_seeded(&m, &prompts()[1..2], &[2], &cfg, &mut NoHooks).unwrap();
    assert_eq!(a[1].ids, b[0].ids);
    let c =
        safegeo_runtime::generate_seeded(&m, &prompts()[1..2], &[99], &cfg, &mut NoHooks).unwrap();
    assert_ne!(b[0].ids, c[0].ids, "different seeds gave the same sample");
}

#[test]
fn hf_folders_load_to_the_same_function_as_gguf_layout() {
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        safegeo_runtime::testing::write_tiny_hf(arch, 17, dir.path()).unwrap();
        let hf = safegeo_runtime::load_model(dir.path(), &Device::Cpu).unwrap();
        let mem = tiny_model(arch, 17, DType::F32).unwrap();
        let d = max_abs(
            &last_logits(&hf, &prompts()),
            &last_logits(&mem, &prompts()),
        );
        assert!(
            d < 1e-4,
            "{arch:?}: HF folder differs from the GGUF-layout model by {d}"
        );
        let ids = hf
            .tok
            .encode_chat(&[safegeo_runtime::Message::new("user", "w3 w4")], false)
            .unwrap();
        assert_eq!(hf.tok.decode(&ids, false).unwrap(), "w3 w4 w0");
    }
}

#[test]
fn shared_prefix_logits_equal_plain_batched_logits() {
    for arch in ARCHS {
        let m = tiny_model(arch, 23, DType::F32).unwrap();
        let prefix: Vec<u32> = (10..22).collect();
        let prompts: Vec<Vec<u32>> = [vec![3u32, 4, 5], vec![7], vec![30, 31, 32, 33, 34, 35]]
            .iter()
            .map(|s| [prefix.clone(), s.clone()].concat())
            .collect();
        let shared = m.last_logits(&prompts, &mut NoHooks).unwrap();
        let plain = last_logits(&m, &prompts).squeeze(1).unwrap();
        let d = max_abs(&shared, &plain);
        assert!(d <= 1e-4, "{arch:?}: {d}");
        // With an intervention active in both passes.
        let r = Tensor::ones(16, DType::F32, &Device::Cpu).unwrap();
        let mut h1 = Hooks::with_interventions(vec![Intervention::ablate(&r).unwrap()]);
        let mut h2 = Hooks::with_interventions(vec![Intervention::ablate(&r).unwrap()]);
        let a = m.last_logits(&prompts, &mut h1).unwrap();
        let (ids, layout) = m.pad_batch(&prompts).unwrap();
        let b = m
            .forward_ids(&ids, &layout, None, LogitsAt::Last, Phase::Prompt, &mut h2)
            .unwrap()
            .unwrap()
            .squeeze(1)
            .unwrap();
        assert!(max_abs(&a, &b) <= 1e-4, "{arch:?} with ablation");
    }
}

#[test]
fn grouped_edits_in_one_forward_equal_each_edit_alone() {
    // Three candidate directions (and additions at different layers) measured in one batch,
    // with and without a shared prefix, against one forward per candidate.
    for arch in ARCHS {
        let m = tiny_model(arch, 29, DType::F32).unwrap();
        let dirs: Vec<Tensor> = (0..3)
            .map(|k| {
                let v: Vec<f32> = (0..16).map(|i| ((i * (k + 2)) % 7) as f32 - 3.0).collect();
                safegeo_runtime::unit(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap()).unwrap()
            })
            .collect();
        let layers = vec![1usize, 0, 1];
        let prefix: Vec<u32> = (10..22).collect();
        let with_prefix: Vec<Vec<u32>> = [vec![3u32, 4, 5], vec![7], vec![30, 31, 32, 33]]
            .iter()
            .map(|s| [prefix.clone(), s.clone()].concat())
            .collect();
        for prompts in [prompts(), with_prefix] {
            let n = prompts.len();
            let stacked = Tensor::stack(&dirs, 0).unwrap();
            let groups = |iv: Intervention| {
                let mut h = Hooks::with_interventions(vec![iv]);
                m.last_logits_grouped(&prompts, 3, &mut h).unwrap()
            };
            let ablated = groups(Intervention::AblateGroups {
                directions: stacked.clone(),
                scope: Scope::All,
            });
            let added = groups(Intervention::AddGroups {
                vectors: (stacked.clone() * 4.0).unwrap(),
                layers: layers.clone(),
                scope: Scope::All,
            });
            assert_eq!(ablated.dims(), &[3 * n, m.cfg.vocab]);
            for (k, r) in dirs.iter().enumerate() {
                let alone = |iv: Intervention| {
                    let mut h = Hooks::with_interventions(vec![iv]);
                    m.last_logits(&prompts, &mut h).unwrap()
                };
                let a = alone(Intervention::ablate(r).unwrap());
                let d = max_abs(&ablated.narrow(0, k * n, n).unwrap(), &a);
                assert!(d <= 1e-4, "{arch:?} ablation {k}: {d}");
                let b = alone(Intervention::Add {
                    vector: r.clone(),
                    coef: 4.0,
                    layer: layers[k],
                    scope: Scope::All,
                });
                let d = max_abs(&added.narrow(0, k * n, n).unwrap(), &b);
                assert!(d <= 1e-4, "{arch:?} addition {k}: {d}");
                // The edits differ, so a mix-up of groups would show.
                assert!(
                    max_abs(&a, &b) > 1e-2,
                    "{arch:?}: edits {k} too alike to test"
                );
            }
        }
        // A batch that does not split into the groups is an error, not a silent broadcast.
        let mut h = Hooks::with_interventions(vec![Intervention::AblateGroups {
            directions: Tensor::stack(&dirs[..2], 0).unwrap(),
            scope: Scope::All,
        }]);
        assert!(m.last_logits_grouped(&prompts(), 3, &mut h).is_err());
    }
}

#[test]
fn restarting_from_a_tape_equals_the_full_forward_for_edits_at_or_above_the_restart() {
    for arch in ARCHS {
        let m = tiny_model(arch, 31, DType::F32).unwrap();
        let prefix: Vec<u32> = (10..22).collect();
        let with_prefix: Vec<Vec<u32>> = [vec![3u32, 4, 5], vec![7], vec![30, 31, 32, 33]]
            .iter()
            .map(|s| [prefix.clone(), s.clone()].concat())
            .collect();
        let vectors = Tensor::randn(0f32, 2.0, (2, 16), &Device::Cpu).unwrap();
        for prompts in [prompts(), with_prefix] {
            let (tape, _) = m.tape(&prompts).unwrap();
            assert_eq!(tape.suffix.len(), m.cfg.n_layer);
            for (first, layers) in [(0usize, vec![0usize, 1]), (1, vec![1, 1])] {
                let hooks = || {
                    Hooks::with_interventions(vec![Intervention::AddGroups {
                        vectors: vectors.clone(),
                        layers: layers.clone(),
                        scope: Scope::All,
                    }])
                };
                let full = m.last_logits_grouped(&prompts, 2, &mut hooks()).unwrap();
                let from = m
                    .last_logits_grouped_from(&prompts, &tape, 2, first, &mut hooks())
                    .unwrap();
                let d = max_abs(&full, &from);
                assert!(d <= 1e-4, "{arch:?} from layer {first}: {d}");
            }
            // The restart really skips work: an edit below it is not applied.
            let below = |first| {
                let mut h = Hooks::with_interventions(vec![Intervention::AddGroups {
                    vectors: vectors.narrow(0, 0, 1).unwrap(),
                    layers: vec![0],
                    scope: Scope::All,
                }]);
                m.last_logits_grouped_from(&prompts, &tape, 1, first, &mut h)
                    .unwrap()
            };
            let plain = m.last_logits(&prompts, &mut NoHooks).unwrap();
            assert!(max_abs(&below(1), &plain) <= 1e-4, "{arch:?}");
            assert!(max_abs(&below(0), &plain) > 1e-3, "{arch:?}");
        }
    }
}

#[test]
fn prompt_except_last_leaves_the_tail_unsteered() {
    let m = tiny_model(Arch::Llama, 2, DType::F32).unwrap();
    let v = Tensor::ones(16, DType::F32, &Device::Cpu).unwrap();
    let run = |scope: Scope| {
        let mut h = Hooks::capture(&[Site::ResidPre], Positions::All);
        h.interventions = vec![Intervention::Add {
            vector: v.clone(),
            coef: 2.0,
            layer: 1,
            scope,
        }];
        let (ids, layout) = m.pad_batch(&[vec![4, 5, 6, 7, 8]]).unwrap();
        m.forward_ids(&ids, &layout, None, LogitsAt::None, Phase::Prompt, &mut h)
            .unwrap();
        h.captured.get(Site::ResidPre, 1).unwrap().clone()
    };
    let all = run(Scope::Prompt);
    let part = run(Scope::PromptExceptLast(2));
    assert!(
        max_abs(
            &all.narrow(1, 0, 3).unwrap(),
            &part.narrow(1, 0, 3).unwrap()
        ) == 0.0
    );
    let diff = max_abs(
        &all.narrow(1, 3, 2).unwrap(),
        &part.narrow(1, 3, 2).unwrap(),
    );
    assert!(
        (diff - 2.0).abs() < 1e-5,
        "the last two tokens must miss exactly the +2 shift: {diff}"
    );
}
