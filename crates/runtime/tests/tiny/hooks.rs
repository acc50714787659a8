//! Interventions on the residual stream: ablation, addition, grouped edits, restarts from a tape.
use super::*;

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

#[test]
fn non_finite_logits_are_an_error_naming_the_block_where_they_started() {
    let m = tiny_model(Arch::Llama, 3, DType::F32).unwrap();
    let run = |coef: f64| {
        let mut h = Hooks::with_interventions(vec![Intervention::Add {
            vector: Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
            coef,
            layer: 1,
            scope: Scope::All,
        }]);
        let (ids, layout) = m.pad_batch(&[vec![4, 5, 6]]).unwrap();
        m.forward_ids(&ids, &layout, None, LogitsAt::Last, Phase::Prompt, &mut h)
    };
    assert!(run(0.5).is_ok());
    let err = run(f64::INFINITY).unwrap_err().to_string();
    assert!(
        err.contains("non-finite logits") && err.contains("block 1"),
        "{err}"
    );
}

#[test]
fn a_control_vector_adds_where_safegeo_adds_under_llama_cpp_indexing() {
    use safegeo_runtime::control_vector::{read_control_vector, write_control_vector};
    // Three blocks: safegeo layer 2 (the input of block 2) is the output of block 1, which
    // llama.cpp steers with `direction.1`.
    let m = tiny_model(Arch::Gemma3, 5, DType::F32).unwrap();
    assert_eq!(m.cfg.n_layer, 3);
    let v: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 8.0).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cv.gguf");
    write_control_vector(
        &path,
        &v.iter().map(|x| 1.5 * x).collect::<Vec<_>>(),
        2,
        3,
        "gemma3",
    )
    .unwrap();
    let (content, _) = safegeo_runtime::open_gguf(&path).unwrap();
    let text = |k: &str| content.metadata[k].to_string().unwrap().clone();
    assert_eq!(text("general.architecture"), "controlvector");
    assert_eq!(text("controlvector.model_hint"), "gemma3");
    assert_eq!(
        content.metadata["controlvector.layer_count"]
            .to_u32()
            .unwrap(),
        2
    );
    let dirs = read_control_vector(&path).unwrap();
    assert_eq!(dirs.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2]);
    assert!(dirs[1].1.iter().all(|&x| x == 0.0));
    // llama.cpp adds direction.i to block i's output, safegeo's layer i + 1: the file's
    // additions give the logits of adding 1.5 v at layer 2.
    let logits = |ivs: Vec<Intervention>| {
        let mut h = Hooks::with_interventions(ivs);
        let (ids, layout) = m.pad_batch(&[vec![4, 5, 6]]).unwrap();
        m.forward_ids(&ids, &layout, None, LogitsAt::Last, Phase::Prompt, &mut h)
            .unwrap()
            .unwrap()
    };
    let from_file: Vec<Intervention> = dirs
        .iter()
        .map(|(i, d)| Intervention::Add {
            vector: Tensor::new(d.as_slice(), &Device::Cpu).unwrap(),
            coef: 1.0,
            layer: i + 1,
            scope: Scope::All,
        })
        .collect();
    let direct = vec![Intervention::Add {
        vector: Tensor::new(v.as_slice(), &Device::Cpu).unwrap(),
        coef: 1.5,
        layer: 2,
        scope: Scope::All,
    }];
    assert!(max_abs(&logits(from_file), &logits(direct)) < 1e-5);
    // Layers 0 and 1 cannot be written: llama.cpp never steers block 0's output.
    let err = write_control_vector(&path, &v, 1, 3, "gemma3")
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 2 or above"), "{err}");
}
