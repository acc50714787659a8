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
    // Using it is refused the same way: a cached model is checked on its first use after it
    // changed, not only when fetched.
    fails_with(
        &safegeo(&["forward", "--chat", "hi"], h),
        3,
        "checksum mismatch",
    );
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
            "`rlhf` is neither a built-in recipe (sft, r2d2",
        ),
        (
            &["--recipe", "sft", "--pool-size", "4"],
            "the R2D2 options apply to an r2d2 recipe",
        ),
        (
            &[
                "--recipe",
                "sft-calibrated",
                "--decision-harmful-share",
                "1",
            ],
            "--decision-harmful-share 1: use a share strictly between 0 and 1",
        ),
        (
            &["--opening-bias-target", "1.5"],
            "--opening-bias-target 1.5: use a share of the calibration set above 0 and at most 1",
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

#[test]
fn non_finite_numbers_bad_endpoints_and_unknown_judges_are_bad_input() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let m = model.to_str().unwrap();
    let suite = h.join("s.jsonl");
    std::fs::write(&suite, "{\"id\": \"a\", \"prompt\": \"w1 w2\"}\n").unwrap();
    let s = suite.to_str().unwrap();
    let out = h.join("ev");
    let o = out.to_str().unwrap();
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "-m", m, "--suite", s, "--out", o];
        args.extend_from_slice(extra);
        safegeo(&args, h)
    };
    // (options, the error's words): every one exits 2 before anything is generated or written.
    let refused: &[(&[&str], &str)] = &[
        (&["--add", "/any/carriers:NaN"], "is not a finite number"),
        (&["--add", "/any/carriers:1e999"], "is not a finite number"),
        (&["--judge-timeout", "0"], "--judge-timeout"),
        (
            &["--judge-endpoint", "ftp://judge/v1"],
            "is not an http(s) URL",
        ),
        (&["--judge-endpoint", "http:///v1"], "names no host"),
        (
            &["--judge", "gpt"],
            "[possible values: substring, xstest-prefix",
        ),
        // Zero new tokens leaves nothing to judge (an empty reply would count as compliance).
        (&["--max-new-tokens", "0"], "0 leaves nothing to work on"),
    ];
    for (options, words) in refused {
        fails_with(&eval(options), 2, words);
        assert!(!out.exists(), "{options:?} left {o}");
    }
    // A credential in a refused endpoint is not echoed back.
    let shown = eval(&[
        "--judge-endpoint",
        "ftp://user:pw-5ecret@judge/v1?api_key=qk-5ecret",
    ]);
    let err = String::from_utf8_lossy(&shown.stderr);
    assert!(
        !err.contains("pw-5ecret") && !err.contains("qk-5ecret"),
        "{err}"
    );
    for args in [
        ["generate", "--chat", "w1", "--temperature", "nan"],
        ["generate", "--chat", "w1", "--top-p", "nan"],
        ["deception", "--runs", "1", "--temperature", "nan"],
        ["deception", "--runs", "1", "--max-new-tokens", "0"],
    ] {
        let words = match args[4] {
            "0" => "0 leaves nothing to work on",
            _ => "is not a finite number",
        };
        let mut args = args.to_vec();
        args.extend(["-m", m]);
        fails_with(&safegeo(&args, h), 2, words);
    }
    for bad in ["--lr=inf", "--lr=-inf", "--decision-boundary=NaN"] {
        fails_with(
            &safegeo(&["train", "-m", m, bad, "--out", o], h),
            2,
            "is not a finite number",
        );
    }
}

#[test]
fn a_second_writer_of_an_output_folder_is_refused_with_the_holders_pid() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let (harm, harmless) = (
        prompt_file(h, "harm.jsonl", 1, "harmful", 24),
        prompt_file(h, "harmless.jsonl", 30, "benign", 24),
    );
    let out = h.join("geo");
    let args = [
        "carriers",
        "-m",
        model.to_str().unwrap(),
        "--harmful",
        &harm,
        "--harmless",
        &harmless,
        "--n",
        "24",
        // Long enough to be running when the second writer comes.
        "--bootstrap",
        "400000",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut first = Command::new(env!("CARGO_BIN_EXE_safegeo"))
        .args(args)
        .env("SAFEGEO_HOME", h)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(".safegeo.lock");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the first run never took its lock"
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = safegeo(&args, h);
    let _ = first.kill();
    let _ = first.wait();
    fails_with(
        &second,
        1,
        &format!("is in use by another safegeo run (PID {})", first.id()),
    );
    // Once the holder is gone (killed, not even cleaned up), the folder is free again.
    let free = safegeo(
        &[&args[..9], &["--bootstrap", "2"], &args[11..]].concat(),
        h,
    );
    assert!(
        free.status.success(),
        "{}",
        String::from_utf8_lossy(&free.stderr)
    );
}

#[test]
fn an_os_error_is_printed_once() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let suite = prompt_file(h, "s.jsonl", 1, "harmful", 2);
    let file = h.join("a-file");
    std::fs::write(&file, b"").unwrap();
    let out = safegeo(
        &[
            "eval",
            "-m",
            model.to_str().unwrap(),
            "--suite",
            &suite,
            "--out",
            file.join("results").to_str().unwrap(),
        ],
        h,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
}
