//! One clear error per class of bad input, with its exit code, and nothing left behind.
use crate::common::*;

#[test]
fn bad_input_classes_get_named_errors() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // Missing file.
    fails_with(
        &safegeo(
            &["forward", "-m", "/nonexistent/model.gguf", "--chat", "hi"],
            h,
        ),
        3,
        "model not found",
    );
    // Corrupt GGUF (bad magic) and truncated GGUF (header promises more than the file has).
    let bad = h.join("bad.gguf");
    std::fs::write(&bad, b"this is not a model").unwrap();
    fails_with(
        &safegeo(&["forward", "-m", bad.to_str().unwrap(), "--chat", "hi"], h),
        3,
        "not a valid GGUF",
    );
    let good = h.join("x.gguf");
    write_gguf(&good, "llama");
    let bytes = std::fs::read(&good).unwrap();
    let cut = h.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 16]).unwrap();
    fails_with(
        &safegeo(&["forward", "-m", cut.to_str().unwrap(), "--chat", "hi"], h),
        3,
        "truncated",
    );
    // Unsupported quantization type id in a tensor header.
    let mut q = bytes.clone();
    let name = b"token_embd.weight";
    let pos = q.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let dtype_at = pos + 4 + 2 * 8; // n_dims (u32), two u64 dims, then the dtype
    q[dtype_at..dtype_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let qp = h.join("quant.gguf");
    std::fs::write(&qp, &q).unwrap();
    fails_with(
        &safegeo(&["forward", "-m", qp.to_str().unwrap(), "--chat", "hi"], h),
        3,
        "not a valid GGUF",
    );
    // Unknown architecture.
    let gpt = h.join("gpt.gguf");
    write_gguf(&gpt, "bloom");
    fails_with(
        &safegeo(&["forward", "-m", gpt.to_str().unwrap(), "--chat", "hi"], h),
        3,
        "unsupported model architecture `bloom`",
    );
    // Missing tokenizer.
    let dir = h.join("notok");
    write_tiny_hf(Arch::Llama, 1, &dir).unwrap();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    fails_with(
        &safegeo(&["forward", "-m", dir.to_str().unwrap(), "--chat", "hi"], h),
        3,
        "tokenizer.json is missing",
    );
    // Empty prompt, and a prompt longer than the context.
    let dir = h.join("tiny");
    write_tiny_hf(Arch::Llama, 1, &dir).unwrap();
    fails_with(
        &safegeo(
            &["forward", "-m", dir.to_str().unwrap(), "--chat", "   "],
            h,
        ),
        2,
        "empty prompt",
    );
    let long = vec!["w1"; 1100].join(" ");
    fails_with(
        &safegeo(
            &["generate", "-m", dir.to_str().unwrap(), "--chat", &long],
            h,
        ),
        2,
        "exceeds the context length",
    );
    // Checksum mismatch of a cached default model.
    let models = h.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(
        models.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        b"GGUF tampered",
    )
    .unwrap();
    fails_with(&safegeo(&["model", "fetch"], h), 3, "checksum mismatch");
    // Bad option values.
    fails_with(
        &safegeo(
            &[
                "generate",
                "-m",
                dir.to_str().unwrap(),
                "--chat",
                "w1",
                "--temperature=-1",
            ],
            h,
        ),
        2,
        "temperature",
    );
}

#[test]
fn a_bad_block_cache_budget_is_named_with_its_fix() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_safegeo"))
        .args(["model", "list"])
        .env("SAFEGEO_HOME", home.path())
        .env("SAFEGEO_BLOCK_CACHE_MB", "lots")
        .output()
        .unwrap();
    fails_with(&out, 2, "SAFEGEO_BLOCK_CACHE_MB=\"lots\"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("fix:"));
}

#[test]
fn bad_training_options_are_refused_before_the_model_loads() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let out = h.join("run");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "-m",
            "/nonexistent/model.gguf",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        safegeo(&args, h)
    };
    // (options, the error's words); every one exits 2 and writes nothing. A soup's own options
    // are checked by its first member before anything is written.
    let refused: &[(&[&str], &str)] = &[
        (&["--decision-boundary", "1.5"], "--decision-boundary 1.5"),
        (&["--soup", "0"], "--soup 0: a soup has at least one member"),
        (
            &["--soup", "2", "--decision-boundary", "1.5"],
            "--decision-boundary 1.5",
        ),
        (
            &["--recipe", "rlhf"],
            "invalid value 'rlhf' for '--recipe <RECIPE>'",
        ),
        (
            &["--decision-harmful-share", "1"],
            "--decision-harmful-share 1: use a share strictly between 0 and 1",
        ),
        (
            &["--opening-bias-target", "1.5"],
            "--opening-bias-target 1.5: use a share of harmful-val above 0 and at most 1",
        ),
        (
            &["--opening-bias", "-1", "--opening-bias-target", "0.7"],
            "cannot be used with",
        ),
    ];
    for (options, words) in refused {
        fails_with(&run(options), 2, words);
        assert!(!out.exists(), "{options:?} left {}", out.display());
    }
}
