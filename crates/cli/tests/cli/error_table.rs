//! The README's error table is what the binary does: every row is triggered here, exits with the
//! row's code, and prints words the row quotes (and a fix line). A row added to the README
//! without a trigger, or a trigger whose row is gone, fails the test.
use crate::common::*;

/// The table's rows: (class, exit code, message column).
fn readme_rows() -> Vec<(String, i32, String)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let start = readme
        .lines()
        .position(|l| l.starts_with("| class | exit |"))
        .expect("the README has an error table");
    readme
        .lines()
        .skip(start + 2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            (
                cells[0].to_string(),
                cells[1].parse().expect("an exit code"),
                cells[2].to_string(),
            )
        })
        .collect()
}

#[test]
fn every_row_of_the_readme_error_table_is_what_the_binary_does() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let tiny = |name: &str| {
        let dir = h.join(name);
        write_tiny_hf(Arch::Llama, 6, &dir).unwrap();
        dir
    };
    let forward = |m: &Path| safegeo(&["forward", "-m", m.to_str().unwrap(), "--chat", "w1"], h);
    let edit_json = |path: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(path, v.to_string()).unwrap();
    };
    let base = tiny("base");
    let m = base.to_str().unwrap();
    let harm = prompt_file(h, "harm.jsonl", 1, "harmful", 4);
    let benign = prompt_file(h, "benign.jsonl", 20, "benign", 4);
    let eval = |extra: &[&str], out: &str| {
        let mut args = vec!["eval", "-m", m, "--suite", &harm, "--max-new-tokens", "2"];
        args.extend_from_slice(extra);
        args.extend(["--out", out]);
        safegeo(&args, h)
    };
    let out_dir = |name: &str| h.join(name).to_str().unwrap().to_string();

    // (class as the README names it, the run that triggers it, words of the message).
    type Trigger<'a> = Box<dyn Fn() -> Output + 'a>;
    let triggers: Vec<(&str, Trigger, &str)> = vec![
        (
            "model file missing",
            Box::new(|| forward(Path::new("/nonexistent/model.gguf"))),
            "model not found",
        ),
        (
            "corrupt or truncated GGUF or safetensors",
            Box::new(|| {
                let bad = h.join("bad.gguf");
                std::fs::write(&bad, b"this is not a model").unwrap();
                forward(&bad)
            }),
            "is not a valid GGUF file",
        ),
        (
            "checksum mismatch",
            Box::new(|| {
                let models = h.join("models");
                std::fs::create_dir_all(&models).unwrap();
                std::fs::write(models.join("SmolLM2-135M-Instruct.Q4_1.gguf"), b"GGUF x").unwrap();
                safegeo(&["model", "fetch"], h)
            }),
            "checksum mismatch for",
        ),
        (
            "unknown architecture",
            Box::new(|| {
                let p = h.join("bloom.gguf");
                write_gguf(&p, "bloom");
                forward(&p)
            }),
            "unsupported model architecture",
        ),
        (
            "unsupported quantization / missing tensor / no tokenizer",
            Box::new(|| {
                let dir = tiny("notok");
                std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
                forward(&dir)
            }),
            "",
        ),
        (
            "an impossible configuration, or a weight holding NaN / infinity",
            Box::new(|| {
                let dir = tiny("eps");
                edit_json(&dir.join("config.json"), &|c| {
                    c["rms_norm_eps"] = (-1e-5).into()
                });
                forward(&dir)
            }),
            "inconsistent model configuration",
        ),
        (
            "a tensor whose shape disagrees with the configuration",
            Box::new(|| {
                let dir = tiny("shape");
                edit_json(&dir.join("config.json"), &|c| {
                    let i = c["intermediate_size"].as_u64().unwrap();
                    c["intermediate_size"] = (2 * i).into();
                });
                forward(&dir)
            }),
            "but the configuration asks for",
        ),
        (
            "a shard outside the model folder",
            Box::new(|| {
                let dir = tiny("shard");
                let map = serde_json::json!({"weight_map": {"model.embed_tokens.weight": "../x.safetensors"}});
                std::fs::write(dir.join("model.safetensors.index.json"), map.to_string()).unwrap();
                forward(&dir)
            }),
            "lies outside the model folder",
        ),
        (
            "non-finite logits (NaN or infinity) from a forward pass",
            Box::new(|| {
                // Finite weights whose product overflows: the final norm scaled to 1e38.
                let dir = tiny("overflow");
                let weights = dir.join("model.safetensors");
                let mut t = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
                let n = t["model.norm.weight"].dims1().unwrap();
                t.insert(
                    "model.norm.weight".into(),
                    Tensor::from_vec(vec![1e38f32; n], n, &Device::Cpu).unwrap(),
                );
                candle_core::safetensors::save(&t, &weights).unwrap();
                // Backtraces stay out of the message even when the user asks Rust for them.
                Command::new(env!("CARGO_BIN_EXE_safegeo"))
                    .args(["forward", "-m", dir.to_str().unwrap(), "--chat", "w1"])
                    .env("SAFEGEO_HOME", h)
                    .env("RUST_BACKTRACE", "1")
                    .output()
                    .unwrap()
            }),
            "the forward pass produced non-finite logits",
        ),
        (
            "bad chat template",
            Box::new(|| {
                let dir = tiny("template");
                edit_json(&dir.join("tokenizer_config.json"), &|t| {
                    t["chat_template"] = "{% if %}".into()
                });
                forward(&dir)
            }),
            "chat template error",
        ),
        (
            "hostile chat template (memory)",
            Box::new(|| {
                let dir = tiny("bomb");
                edit_json(&dir.join("tokenizer_config.json"), &|t| {
                    t["chat_template"] =
                        "{{ (('a' * 100000000)|replace('a', 'aaaaaaaaaa'))|length }}".into()
                });
                forward(&dir)
            }),
            "needs more than 256 MiB of memory",
        ),
        (
            "prompt too long / empty (a chat template that renders nothing included)",
            Box::new(|| safegeo(&["forward", "-m", m, "--chat", "  "], h)),
            "empty prompt",
        ),
        (
            "dataset missing",
            Box::new(|| {
                let nodata = out_dir("nodata");
                let o = out_dir("ev-missing");
                safegeo(
                    &[
                        "eval",
                        "-m",
                        m,
                        "--suite",
                        "jbb-harmful",
                        "--data-dir",
                        &nodata,
                        "--out",
                        &o,
                    ],
                    h,
                )
            }),
            "not found: looked for",
        ),
        (
            "unknown dataset / empty after filtering / unparsable file",
            Box::new(|| {
                let o = out_dir("ev-unknown");
                safegeo(&["eval", "-m", m, "--suite", "no-such-set", "--out", &o], h)
            }),
            "",
        ),
        (
            "bad option value (NaN and infinities included)",
            Box::new(|| {
                safegeo(
                    &["generate", "-m", m, "--chat", "w1", "--temperature", "nan"],
                    h,
                )
            }),
            "",
        ),
        (
            "judge endpoint unreachable or failing",
            Box::new(|| {
                eval(
                    &[
                        "--judge",
                        "harmbench",
                        "--judge-endpoint",
                        "http://127.0.0.1:9/v1",
                        "--judge-model",
                        "j",
                        "--judge-timeout",
                        "1",
                    ],
                    &out_dir("ev-endpoint"),
                )
            }),
            "failed: cannot connect",
        ),
        (
            "judge endpoint not an http(s) URL",
            Box::new(|| eval(&["--judge-endpoint", "ftp://judge/v1"], &out_dir("ev-url"))),
            "is not an http(s) URL",
        ),
        (
            "LLM judge without a backend",
            Box::new(|| eval(&["--judge", "harmbench"], &out_dir("ev-nojudge"))),
            "LLM judges need a judge model",
        ),
        (
            "results folder made with other settings",
            Box::new(|| {
                let o = out_dir("ev-settings");
                assert!(eval(&[], &o).status.success());
                eval(&["--seed", "1"], &o)
            }),
            "holds a run with different settings",
        ),
        (
            "results folder in use",
            Box::new(|| {
                let o = out_dir("ev-busy");
                // This test process holds the folder's lock while the binary tries to write.
                safegeo_runtime::files::lock_dir(Path::new(&o)).unwrap();
                eval(&[], &o)
            }),
            "is in use by another safegeo run (PID",
        ),
        (
            "bad scenario file",
            Box::new(|| {
                let bad = h.join("bad-scenarios");
                std::fs::create_dir_all(&bad).unwrap();
                std::fs::write(bad.join("bad.toml"), "name = 3\n").unwrap();
                let o = out_dir("dec");
                safegeo(
                    &[
                        "deception",
                        "-m",
                        m,
                        "--scenarios",
                        bad.to_str().unwrap(),
                        "--runs",
                        "1",
                        "--out",
                        &o,
                    ],
                    h,
                )
            }),
            "scenario ",
        ),
        (
            "not a checkpoint (trajectory)",
            Box::new(|| {
                let o = out_dir("traj");
                safegeo(
                    &["trajectory", "--anchors", &out_dir("nope"), "--out", &o],
                    h,
                )
            }),
            "is not a checkpoint (no config.json)",
        ),
        (
            "carriers of another shape (drift, select)",
            Box::new(|| {
                // Carriers one layer deep and three wide, recorded as the tiny model's.
                let dir = h.join("odd-carriers");
                std::fs::create_dir_all(&dir).unwrap();
                let c = safegeo_geometry::carriers::Carriers {
                    refusal: vec![vec![vec![1.0, 0.0, 0.0]]],
                    refusal_orth: vec![vec![vec![1.0, 0.0, 0.0]]],
                    mean_harmful: vec![vec![vec![0.0; 3]]],
                    mean_harmless: vec![vec![vec![0.0; 3]]],
                };
                safegeo_geometry::store::save(&c, &[], &dir.join("carriers.safetensors")).unwrap();
                std::fs::write(
                    dir.join("carriers.json"),
                    serde_json::json!({"model": m, "n_pos": 1}).to_string(),
                )
                .unwrap();
                let sets = format!("{harm},{benign}");
                safegeo(&["select", dir.to_str().unwrap(), "--val", &sets], h)
            }),
            "do not fit this model's shape",
        ),
        (
            "calibrate: base model unknown",
            Box::new(|| {
                let o = out_dir("cal-nobase");
                safegeo(
                    &[
                        "calibrate",
                        "-m",
                        m,
                        "--knob",
                        "interpolate",
                        "--val",
                        &harm,
                        "--target-refusal",
                        "0.5",
                        "--out",
                        &o,
                    ],
                    h,
                )
            }),
            "has no checkpoint.json naming its base model",
        ),
        (
            "calibrate: probes of another run",
            Box::new(|| {
                let o = h.join("cal-probes");
                std::fs::create_dir_all(o.join("probes")).unwrap();
                std::fs::write(
                    o.join("probes/probes.json"),
                    "{\"checkpoint\": \"another\"}",
                )
                .unwrap();
                safegeo(
                    &[
                        "calibrate",
                        "-m",
                        m,
                        "--base",
                        m,
                        "--knob",
                        "interpolate",
                        "--val",
                        &harm,
                        "--target-refusal",
                        "0.5",
                        "--out",
                        o.to_str().unwrap(),
                    ],
                    h,
                )
            }),
            "holds probes of another calibration",
        ),
        (
            "calibrate: wrong side of a suite",
            Box::new(|| {
                let o = out_dir("cal-side");
                safegeo(
                    &[
                        "calibrate",
                        "-m",
                        m,
                        "--base",
                        m,
                        "--knob",
                        "interpolate",
                        "--val",
                        &benign,
                        "--target-refusal",
                        "0.5",
                        "--out",
                        &o,
                    ],
                    h,
                )
            }),
            "it must hold harmful prompts only",
        ),
    ];

    let rows = readme_rows();
    let classes: Vec<&str> = rows.iter().map(|(c, _, _)| c.as_str()).collect();
    let triggered: Vec<&str> = triggers.iter().map(|(c, _, _)| *c).collect();
    assert_eq!(
        classes, triggered,
        "the README's rows and this test's triggers differ"
    );
    for ((class, code, message), (_, trigger, words)) in rows.iter().zip(&triggers) {
        let out = trigger();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{class}: {err}");
        assert!(err.contains(words), "{class}: expected `{words}` in: {err}");
        assert!(
            message.contains(words),
            "{class}: the README's message column does not quote `{words}`: {message}"
        );
        // Our own errors end in a fix line; clap's own option errors point to --help instead.
        assert!(
            err.contains("fix:") || err.contains("try '--help'"),
            "{class}: no fix line: {err}"
        );
        assert!(!err.contains("panicked"), "{class}: {err}");
        assert!(
            !err.to_lowercase().contains("stack backtrace"),
            "{class}: {err}"
        );
    }
}
