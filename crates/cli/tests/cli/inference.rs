//! Inference commands: forward, generate, bench, and output into a closed pipe.
use crate::common::*;

#[test]
fn forward_json_on_a_tiny_hf_folder() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("tiny");
    write_tiny_hf(Arch::Llama, 3, &dir).unwrap();
    let out = safegeo(
        &[
            "forward",
            "-m",
            dir.to_str().unwrap(),
            "--chat",
            "w1 w2 w3",
            "--top",
            "5",
            "--json",
        ],
        home.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_ids"].as_array().unwrap().len(), 4);
    assert_eq!(v["top_ids"].as_array().unwrap().len(), 5);
    assert_eq!(v["resid_pre_norms"].as_array().unwrap().len(), 2);
    let top: Vec<f64> = v["top_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(top.windows(2).all(|w| w[0] >= w[1]));
    assert!(v["logsumexp"].as_f64().unwrap() >= top[0]);
}

#[test]
fn generate_jsonl_batch_keeps_order_and_fields() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("tiny");
    write_tiny_hf(Arch::Qwen2, 5, &dir).unwrap();
    let input = home.path().join("in.jsonl");
    let output = home.path().join("out.jsonl");
    std::fs::write(&input, "{\"id\": 1, \"chat\": \"w1 w2 w3 w4 w5\"}\n{\"id\": 2, \"messages\": [{\"role\": \"user\", \"content\": \"w7\"}]}\n").unwrap();
    let out = safegeo(
        &[
            "generate",
            "-m",
            dir.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--max-new-tokens",
            "5",
            "--batch-size",
            "2",
        ],
        home.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], 1);
    assert_eq!(rows[1]["id"], 2);
    for r in &rows {
        assert!(r["response"].is_string());
        assert!(r["response_ids"].as_array().unwrap().len() <= 5);
    }

    // --output is checked before the model loads (a missing model would be exit 3): never the
    // input, never an existing file without --force, never into a missing folder.
    let written = std::fs::read(&output).unwrap();
    let (i, o) = (input.to_str().unwrap(), output.to_str().unwrap());
    let missing = home.path().join("no/such/dir/out.jsonl");
    let m = "/nonexistent/model.gguf";
    for (args, words) in [
        (
            vec!["--output", o],
            "exists\n  fix: name another file, or add --force",
        ),
        (vec!["--output", i, "--force"], "is the input file"),
        (
            vec!["--output", missing.to_str().unwrap()],
            "does not exist",
        ),
    ] {
        let mut all = vec!["generate", "-m", m, "--input", i];
        all.extend(args);
        fails_with(&safegeo(&all, home.path()), 2, words);
    }
    assert_eq!(
        std::fs::read(&output).unwrap(),
        written,
        "the output was touched"
    );
    assert!(std::fs::read_to_string(&input)
        .unwrap()
        .starts_with("{\"id\": 1"));
    // With --force the file is replaced whole, through the atomic writer.
    let args = [
        "generate",
        "-m",
        dir.to_str().unwrap(),
        "--input",
        i,
        "--output",
        o,
    ];
    let out = safegeo(
        &[&args[..], &["--force", "--max-new-tokens", "2"]].concat(),
        home.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(std::fs::read(&output).unwrap(), written);
    assert!(!home.path().join("out.jsonl.tmp").exists());
}

/// `bench` measures quantized decoding in a process of its own (its pool setting is per process)
/// and merges the two numbers into the same report; unselected workloads stay null.
#[test]
fn bench_measures_quantized_decoding_in_its_own_process() {
    let model = safegeo_runtime::fetch::ensure(&safegeo_runtime::fetch::SMOLLM2, false)
        .expect("fetch the default model (needs pip and PyPI)");
    let dir = tempfile::tempdir().unwrap();
    let out = safegeo(
        &[
            "bench",
            "--only",
            "sgemm,decode-quantized",
            "--reps",
            "1",
            "--json",
            "--model",
            model.to_str().unwrap(),
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    assert!(err.contains("(own process)"), "stderr: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "sgemm_gflops",
        "decode_b1_quantized_tok_s",
        "decode_b32_quantized_tok_s",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert!(v["prefill_capture_tok_s"].is_null(), "{v}");
    // A training recipe asked for by name needs the training splits, and says where to point.
    let out = safegeo(
        &[
            "bench",
            "--only",
            "train-sft",
            "--data-dir",
            dir.path().join("no-data").to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {err}");
    assert!(
        err.contains("harmful-train") && err.contains("--data-dir"),
        "stderr: {err}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_safegeo"))
        .args(["model", "list", "--json"])
        .env("SAFEGEO_HOME", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before anything is written.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "panic: {err}");
}
