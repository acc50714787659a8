//! Hostile inputs: absurd GGUF headers, memory-hungry chat templates, judge API keys.
use crate::common::*;

#[test]
fn absurd_gguf_headers_are_refused_before_allocation() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let header = |tensors: u64, kvs: u64, rest: &[u8]| {
        let mut v = b"GGUF".to_vec();
        v.extend(3u32.to_le_bytes());
        v.extend(tensors.to_le_bytes());
        v.extend(kvs.to_le_bytes());
        v.extend_from_slice(rest);
        v.extend([0u8; 64]);
        v
    };
    let mut huge_string = (1u64 << 60).to_le_bytes().to_vec();
    huge_string.extend(b"general.architecture");
    let mut huge_tensor = 1u64.to_le_bytes().to_vec();
    huge_tensor.extend(b"t");
    huge_tensor.extend(2u32.to_le_bytes());
    huge_tensor.extend((1u64 << 32).to_le_bytes());
    huge_tensor.extend((1u64 << 32).to_le_bytes());
    huge_tensor.extend(0u32.to_le_bytes());
    huge_tensor.extend(0u64.to_le_bytes());
    for (name, bytes, needle) in [
        (
            "kvs.gguf",
            header(0, 1_000_000_000, &[]),
            "metadata entries cannot fit",
        ),
        (
            "string.gguf",
            header(0, 1, &huge_string),
            "declares 1152921504606846976 bytes",
        ),
        (
            "tensor.gguf",
            header(1, 0, &huge_tensor),
            "refusing to allocate",
        ),
    ] {
        let p = h.join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = safegeo(&["forward", "-m", p.to_str().unwrap(), "--chat", "hi"], h);
        fails_with(&out, 3, needle);
    }
}

#[test]
fn judge_api_keys_never_reach_outputs_or_logs() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let m = model.to_str().unwrap();
    let key = "sk-test-5ecret-key-9876";
    let (url, auth) = judge_server("Yes");
    let suite = h.join("s.jsonl");
    std::fs::write(
        &suite,
        "{\"id\": \"a\", \"prompt\": \"w1 w2\", \"label\": \"harmful\"}\n",
    )
    .unwrap();
    let scen = tiny_scenarios(h);
    let (ev_dir, dec_dir) = (h.join("ev"), h.join("dec"));
    let runs: Vec<Vec<&str>> = vec![
        vec![
            "-vv",
            "eval",
            "-m",
            m,
            "--suite",
            suite.to_str().unwrap(),
            "--judge",
            "harmbench,xstest",
            "--judge-endpoint",
            &url,
            "--judge-model",
            "judge",
            "--max-new-tokens",
            "3",
            "--out",
            ev_dir.to_str().unwrap(),
        ],
        vec![
            "-vv",
            "deception",
            "-m",
            m,
            "--scenarios",
            scen.to_str().unwrap(),
            "--strategy",
            "refusal",
            "--runs",
            "2",
            "--max-new-tokens",
            "3",
            "--judge",
            "llm",
            "--judge-endpoint",
            &url,
            "--judge-model",
            "judge",
            "--out",
            dec_dir.to_str().unwrap(),
        ],
    ];
    for args in runs {
        let out = Command::new(env!("CARGO_BIN_EXE_safegeo"))
            .args(&args)
            .env("SAFEGEO_HOME", h)
            .env("SAFEGEO_JUDGE_API_KEY", key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for stream in [&out.stdout, &out.stderr] {
            assert!(
                !String::from_utf8_lossy(stream).contains(key),
                "key in the console output"
            );
        }
    }
    assert!(
        !auth.lock().unwrap().is_empty(),
        "the judge was never called"
    );
    assert!(
        auth.lock().unwrap().iter().all(|a| a.ends_with(key)),
        "the key went out as the bearer token"
    );
    // Every file written anywhere under SAFEGEO_HOME and the output folders.
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(h, &mut files);
    assert!(files.len() > 5);
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(key),
            "key written to {}",
            f.display()
        );
    }
}

#[test]
fn chat_templates_that_blow_up_memory_are_stopped_before_taking_it() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 13, &model).unwrap();
    let config = model.join("tokenizer_config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    // Each costs little fuel and asks for gigabytes to terabytes.
    for bomb in [
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "{{ ((['a' * 10000000] * 1000)|join)|length }}",
        // Found by fuzzing (a timeout without the guard): joins nested on a string's characters.
        "{{ ((((('abcdefghij' * 4)|join('x' * 40))|join('y' * 100))|join('z' * 50))|join('w' * 40))|length }}",
        "{{ (('a' * 100000000)|replace('a', 'aaaaaaaaaa'))|length }}",
    ] {
        let mut tc: serde_json::Value = serde_json::from_str(&original).unwrap();
        tc["chat_template"] = bomb.into();
        std::fs::write(&config, tc.to_string()).unwrap();
        let out = safegeo(&["forward", "-m", model.to_str().unwrap(), "--chat", "hi"], h);
        fails_with(&out, 2, "rendering the chat template needs more than 256 MiB");
        fails_with(&out, 2, "--no-template");
    }
    // The raw-text way out works on the same model.
    let out = safegeo(
        &[
            "forward",
            "-m",
            model.to_str().unwrap(),
            "--chat",
            "w1 w2",
            "--no-template",
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shards_outside_the_model_folder_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    // A valid shard, moved out of the folder: reachable only by escaping it.
    std::fs::rename(
        model.join("model.safetensors"),
        h.join("outside.safetensors"),
    )
    .unwrap();
    let m = model.to_str().unwrap();
    let index = model.join("model.safetensors.index.json");
    let outside = h.join("outside.safetensors");
    for name in [
        "../outside.safetensors".to_string(),
        outside.display().to_string(),
        "/etc/passwd".to_string(),
    ] {
        let map = serde_json::json!({"weight_map": {"model.embed_tokens.weight": name}});
        std::fs::write(&index, map.to_string()).unwrap();
        fails_with(
            &safegeo(&["forward", "-m", m, "--chat", "w1"], h),
            3,
            "lies outside the model folder",
        );
    }
    // A link inside the folder that leads out of it is refused too, with or without an index.
    std::os::unix::fs::symlink(&outside, model.join("model.safetensors")).unwrap();
    let map = serde_json::json!({"weight_map": {"model.embed_tokens.weight": "model.safetensors"}});
    std::fs::write(&index, map.to_string()).unwrap();
    fails_with(
        &safegeo(&["forward", "-m", m, "--chat", "w1"], h),
        3,
        "lies outside the model folder",
    );
    std::fs::remove_file(&index).unwrap();
    fails_with(
        &safegeo(&["forward", "-m", m, "--chat", "w1"], h),
        3,
        "lies outside the model folder",
    );
    // The same shard inside the folder loads.
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    std::fs::rename(&outside, model.join("model.safetensors")).unwrap();
    let out = safegeo(&["forward", "-m", m, "--chat", "w1"], h);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tensors_whose_shape_disagrees_with_the_config_are_named_model_errors() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let weights = model.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    let m = model.to_str().unwrap();
    // The same elements under swapped dimensions: the element count cannot catch it.
    for name in [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ] {
        let mut t = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        let w = &t[name];
        let (a, b) = w.dims2().unwrap();
        assert_ne!(a, b, "{name} is square: swapping proves nothing");
        let swapped = w.reshape((b, a)).unwrap();
        t.insert(name.to_string(), swapped);
        candle_core::safetensors::save(&t, &weights).unwrap();
        fails_with(
            &safegeo(&["forward", "-m", m, "--chat", "w1"], h),
            3,
            "but the configuration asks for",
        );
        std::fs::write(&weights, &good).unwrap();
    }
    // A chat template that renders nothing is an empty prompt, not a crash.
    let config = model.join("tokenizer_config.json");
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    tc["chat_template"] = "{% for m in messages %}{% endfor %}".into();
    std::fs::write(&config, tc.to_string()).unwrap();
    fails_with(
        &safegeo(&["forward", "-m", m, "--chat", "w1"], h),
        2,
        "the chat template renders them to nothing",
    );
    let out = safegeo(&["forward", "-m", m, "--chat", "w1"], h);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn impossible_configs_and_non_finite_weights_are_model_errors() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let m = model.to_str().unwrap();
    let config = model.join("config.json");
    let good = std::fs::read_to_string(&config).unwrap();
    for (key, value, words) in [
        ("rms_norm_eps", serde_json::json!(-1e-5), "RMS norm epsilon"),
        ("rope_theta", serde_json::json!(0.0), "RoPE base"),
        (
            "max_position_embeddings",
            serde_json::json!(0),
            "context length 0",
        ),
    ] {
        let mut c: serde_json::Value = serde_json::from_str(&good).unwrap();
        c[key] = value;
        std::fs::write(&config, c.to_string()).unwrap();
        fails_with(&safegeo(&["forward", "-m", m, "--chat", "w1"], h), 3, words);
    }
    std::fs::write(&config, &good).unwrap();
    // A NaN in one weight is named before anything runs on it.
    let weights = model.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let name = "model.layers.1.post_attention_layernorm.weight";
    let n = t[name].dims1().unwrap();
    let mut v = vec![1f32; n];
    v[n / 2] = f32::NAN;
    t.insert(name.into(), Tensor::from_vec(v, n, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, &weights).unwrap();
    fails_with(
        &safegeo(&["forward", "-m", m, "--chat", "w1"], h),
        3,
        "blk.1.ffn_norm.weight` holds NaN or infinite values",
    );
    // A corrupt safetensors file is a model problem too, named as one.
    std::fs::write(&weights, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    fails_with(
        &safegeo(&["forward", "-m", m, "--chat", "w1"], h),
        3,
        "unreadable safetensors",
    );
}

#[test]
fn tokenizer_problems_and_unfollowable_links_are_named_model_errors() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let m = model.to_str().unwrap();
    let forward = |m: &str| safegeo(&["forward", "-m", m, "--chat", "w1"], h);
    // A malformed tokenizer_config.json is a model problem with its fix, not bad input.
    let tc = model.join("tokenizer_config.json");
    let good_tc = std::fs::read_to_string(&tc).unwrap();
    std::fs::write(&tc, "{\"chat_template\": ").unwrap();
    let out = forward(m);
    fails_with(&out, 3, "tokenizer_config.json: not valid JSON");
    assert!(String::from_utf8_lossy(&out.stderr).contains("fix:"));
    std::fs::write(&tc, &good_tc).unwrap();
    // A tokenizer with more tokens than the embedding has rows.
    let tj = model.join("tokenizer.json");
    let good_tj = std::fs::read_to_string(&tj).unwrap();
    let mut t: serde_json::Value = serde_json::from_str(&good_tj).unwrap();
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    let n = vocab.len();
    for i in 0..1000 {
        vocab.insert(format!("extra{i}"), (n + i).into());
    }
    std::fs::write(&tj, t.to_string()).unwrap();
    fails_with(&forward(m), 3, "tokens but the embedding only");
    std::fs::write(&tj, &good_tj).unwrap();
    assert!(forward(m).status.success());
    // Links: a loop and a dangling link say what they are.
    let looped = h.join("loop");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    fails_with(&forward(looped.to_str().unwrap()), 3, "a link loop");
    let dangling = h.join("dangling");
    std::os::unix::fs::symlink(h.join("gone"), &dangling).unwrap();
    fails_with(
        &forward(dangling.to_str().unwrap()),
        3,
        "which does not exist",
    );
}

#[test]
fn a_gguf_whose_tensor_shape_disagrees_with_its_metadata_is_a_model_error() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let good = h.join("tiny.gguf");
    safegeo_runtime::testing::write_tiny_gguf(1, &good, |_| Ok(())).unwrap();
    let out = safegeo(
        &[
            "forward",
            "-m",
            good.to_str().unwrap(),
            "--chat",
            "w1",
            "--no-template",
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same elements under swapped dimensions: the few-row kernels panicked on these.
    for name in ["blk.0.ffn_gate.weight", "blk.1.attn_k.weight"] {
        let bad = h.join("swapped.gguf");
        safegeo_runtime::testing::write_tiny_gguf(1, &bad, |w| {
            let (a, b) = w[name].dims2()?;
            assert_ne!(a, b, "{name} is square: swapping proves nothing");
            let swapped = w[name].reshape((b, a))?;
            w.insert(name.to_string(), swapped);
            Ok(())
        })
        .unwrap();
        for quantized in [false, true] {
            let mut args = vec![
                "forward",
                "-m",
                bad.to_str().unwrap(),
                "--chat",
                "w1",
                "--no-template",
            ];
            if quantized {
                args.push("--quantized");
            }
            fails_with(&safegeo(&args, h), 3, "but the configuration asks for");
        }
    }
}
