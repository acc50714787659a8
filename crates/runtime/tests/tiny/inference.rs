//! Forward passes and generation: batching, the KV cache, sliding windows, sampling, loading.
use super::*;

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

/// Writes the seeds of the `gguf_model` fuzz target: the tiny Llama as a GGUF file, and the same
/// file with one projection's dimensions swapped (a shape that disagrees with the metadata).
/// Run: `SAFEGEO_FUZZ_SEEDS=fuzz/corpus/gguf_model cargo test --release -p safegeo-runtime
/// --test tiny -- --ignored write_gguf_model_seeds`.
#[test]
#[ignore = "writes fuzz seeds; run by hand"]
fn write_gguf_model_seeds() {
    let dir = std::path::PathBuf::from(std::env::var("SAFEGEO_FUZZ_SEEDS").unwrap());
    std::fs::create_dir_all(&dir).unwrap();
    safegeo_runtime::testing::write_tiny_gguf(1, &dir.join("seed_tiny"), |_| Ok(())).unwrap();
    safegeo_runtime::testing::write_tiny_gguf(1, &dir.join("seed_shape-mismatch"), |w| {
        let name = "blk.0.ffn_gate.weight";
        let (a, b) = w[name].dims2()?;
        let swapped = w[name].reshape((b, a))?;
        w.insert(name.to_string(), swapped);
        Ok(())
    })
    .unwrap();
}
