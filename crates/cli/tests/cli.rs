//! The binary's contract: JSON shapes and one clear error per class of bad input (never a panic).
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use safegeo_runtime::{testing::write_tiny_hf, Arch};
use std::path::Path;
use std::process::{Command, Output};

fn safegeo(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safegeo"))
        .args(args)
        .env("SAFEGEO_HOME", home)
        .env_remove("SAFEGEO_MODEL")
        .output()
        .unwrap()
}

fn fails_with(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains("fix:") || code == 2, "no fix given: {err}");
}

/// A JSONL suite of `n` two-word prompts of the tiny vocabulary, starting at word `lo`.
fn prompt_file(dir: &Path, name: &str, lo: usize, label: &str, n: usize) -> String {
    let p = dir.join(name);
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{\"id\": \"{i}\", \"prompt\": \"w{} w{}\", \"label\": \"{label}\"}}",
                lo + i % 6,
                lo + (i * 5) % 9
            )
        })
        .collect();
    std::fs::write(&p, rows.join("\n")).unwrap();
    p.to_str().unwrap().to_string()
}

/// `dir/scenarios/` with one deception scenario in the tiny vocabulary (strategies refusal and
/// rebuttal).
fn tiny_scenarios(dir: &Path) -> std::path::PathBuf {
    let scen = dir.join("scenarios");
    std::fs::create_dir_all(&scen).unwrap();
    std::fs::write(
        scen.join("tiny.toml"),
        r#"name = "tiny"
kind = "unethical"
system = "w1 w2"
pressure = "w3 w4"
pressure2 = "w5"
act = "w6"
format = "w7"
[first_reply]
refusal = "w8"
rebuttal = "w9 w10"
[heuristic]
act = ["w1"]
"#,
    )
    .unwrap();
    scen
}

fn write_gguf(path: &Path, arch: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    let arch = Value::String(arch.into());
    let t = QTensor::quantize(
        &Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
}

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
}

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

fn records(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_to_string(dir.join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                r["id"].as_str().unwrap().to_string(),
                r["response"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn eval_writes_results_resumes_and_survives_kill_9() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 8, &model).unwrap();
    let suite = h.join("suite.jsonl");
    let rows: Vec<String> = (0..120)
        .map(|i| {
            format!(
                "{{\"id\": \"r{i}\", \"prompt\": \"w{} w{} w{}\", \"label\": \"harmful\"}}",
                i % 40,
                (i * 7) % 40,
                (i * 3) % 40
            )
        })
        .collect();
    std::fs::write(&suite, rows.join("\n")).unwrap();
    let eval = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "-m",
            model.to_str().unwrap(),
            "--suite",
            suite.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "24",
            "--batch-size",
            "4",
        ];
        args.extend_from_slice(extra);
        safegeo(&args, h)
    };
    let full = h.join("full");
    let out = eval(&full, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(records(&full).len(), 120);
    let csv = std::fs::read_to_string(full.join("summary.csv")).unwrap();
    assert!(csv.starts_with("suite,metric,judge,value,n,lo,hi,interval"));
    assert!(csv.contains("refusal_rate,substring"), "{csv}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["records"], 120);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["datasets"][0]["sampled_ids"]
            .as_array()
            .unwrap()
            .len(),
        120
    );
    // Re-running skips finished records.
    assert!(eval(&full, &[]).status.success());
    assert_eq!(records(&full).len(), 120);
    // Other settings into the same folder are refused.
    let clash = safegeo(
        &[
            "eval",
            "-m",
            model.to_str().unwrap(),
            "--suite",
            suite.to_str().unwrap(),
            "--out",
            full.to_str().unwrap(),
            "--max-new-tokens",
            "5",
        ],
        h,
    );
    fails_with(&clash, 1, "different settings");
    // kill -9 part-way, resume, and compare with the uninterrupted run.
    let cut = h.join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_safegeo"))
        .args([
            "eval",
            "-m",
            model.to_str().unwrap(),
            "--suite",
            suite.to_str().unwrap(),
            "--out",
            cut.to_str().unwrap(),
            "--max-new-tokens",
            "24",
            "--batch-size",
            "4",
        ])
        .env("SAFEGEO_HOME", h)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(20) {
        let n = std::fs::read_to_string(cut.join("records.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 8 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    let partial = records(&cut).len();
    assert!(eval(&cut, &[]).status.success());
    assert_eq!(
        records(&cut),
        records(&full),
        "resumed run differs (killed after {partial} records)"
    );
}

#[test]
fn geometry_pipeline_on_a_tiny_model_then_eval_with_ablation() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 4, &model).unwrap();
    let m = model.to_str().unwrap();
    let (harm, harmless) = (
        prompt_file(h, "harm.jsonl", 1, "harmful", 12),
        prompt_file(h, "harmless.jsonl", 20, "benign", 12),
    );
    let geo = h.join("geo");
    let g = geo.to_str().unwrap();
    let out = safegeo(
        &[
            "carriers",
            "-m",
            m,
            "--harmful",
            &harm,
            "--harmless",
            &harmless,
            "--n",
            "12",
            "--bootstrap",
            "3",
            "--export-npy",
            "--heldout",
            &format!("{harm},{harmless}"),
            "--out",
            g,
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "carriers.safetensors",
        "carriers.json",
        "geometry.json",
        "refusal.npy",
        "harmfulness.npy",
    ] {
        assert!(geo.join(f).exists(), "{f}");
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(geo.join("carriers.json")).unwrap()).unwrap();
    assert_eq!(meta["n_layer"], 2);
    assert_eq!(meta["positions"][0]["name"], "t_inst");
    // The carriers read as probes on their own prompts: the mean difference projects positively,
    // so the best carrier separates the sets better than chance.
    let geometry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(geo.join("geometry.json")).unwrap()).unwrap();
    // A belief score per captured prompt, higher on the harmful side.
    for at in ["belief_t_inst", "belief_t_post"] {
        let b = &geometry[at];
        assert_eq!(b["harmful"].as_array().unwrap().len(), 12, "{b}");
        assert_eq!(b["harmless"].as_array().unwrap().len(), 12, "{b}");
    }
    let b = &geometry["belief_t_inst"];
    assert!(
        b["harmful_mean"].as_f64().unwrap() > b["harmless_mean"].as_f64().unwrap(),
        "{b}"
    );
    let held = &geometry["heldout"];
    assert_eq!(held["auc_t_inst"].as_array().unwrap().len(), 2, "{held}");
    assert_eq!(
        held["all"].as_array().unwrap().len(),
        2 * meta["n_pos"].as_u64().unwrap() as usize
    );
    assert!(held["best"]["auc"].as_f64().unwrap() > 0.5, "{held}");
    // The logistic probes are fitted on these very prompts (12 + 12 in d = 64): they separate
    // them perfectly.
    let probe = &held["probe"];
    assert_eq!(
        probe["all"].as_array().unwrap().len(),
        held["all"].as_array().unwrap().len()
    );
    assert_eq!(probe["best"]["auc"].as_f64().unwrap(), 1.0, "{probe}");
    let bad = safegeo(&["carriers", "-m", m, "--heldout", &harm, "--out", g], h);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--heldout takes two sets"));
    let out = safegeo(
        &[
            "select",
            g,
            "--val",
            &format!("{harm},{harmless}"),
            "--n-val",
            "6",
            "--screen",
            "3",
            "--finalists",
            "2",
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(geo.join("selection.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + 2 * meta["n_pos"].as_u64().unwrap() as usize
    );
    let sel: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(geo.join("selection.json")).unwrap())
            .unwrap();
    assert!(
        sel["result"]["selected"].is_object()
            || sel["result"]["reason"]
                .as_str()
                .unwrap()
                .contains("no admissible carrier")
    );
    // geometry.json gains the coupling and effective rank at the selected layer, if any.
    let geometry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(geo.join("geometry.json")).unwrap()).unwrap();
    let chosen = &geometry["selected"];
    match sel["result"]["selected"]["layer"].as_u64() {
        Some(l) => {
            assert_eq!(chosen["layer"].as_u64(), Some(l), "{chosen}");
            let cos = chosen["coupling_abs_cos"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&cos), "{chosen}");
            assert!(chosen["effective_rank"]["erank"].is_number(), "{chosen}");
        }
        None => assert!(chosen.is_null(), "{chosen}"),
    }
    let out = safegeo(&["drift", g, g, "--json"], h);
    assert!(out.status.success());
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((d["carrier_cosine_per_layer"][1].as_f64().unwrap() - 1.0).abs() < 1e-9);
    // Eval with the carrier ablated and the refusal score recorded.
    let ev = h.join("ev");
    let out = safegeo(
        &[
            "eval",
            "-m",
            m,
            "--suite",
            &harm,
            "--judge",
            "substring,refusal-score",
            "--ablate",
            &format!("{g}:1:0"),
            "--max-new-tokens",
            "4",
            "--out",
            ev.to_str().unwrap(),
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(ev.join("records.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(rec["refusal_score"].is_number());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ev.join("config.json")).unwrap()).unwrap();
    assert!(cfg["interventions"][0]
        .as_str()
        .unwrap()
        .starts_with("ablate"));
    assert!(std::fs::read_to_string(ev.join("summary.csv"))
        .unwrap()
        .contains("refusal_score_mean,refusal-score"));
    // Causal sweep against random controls.
    let out = safegeo(
        &[
            "sweep",
            g,
            "--carrier",
            "1:0",
            "--val",
            &format!("{harm},{harmless}"),
            "--n",
            "6",
            "--controls",
            "2",
            "--coefs",
            "-1,1",
            "--continuation-tokens",
            "3",
            "--json",
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let eff: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 2 directions x (2 coefficients + ablation) x 5 metrics.
    assert_eq!(eff.as_array().unwrap().len(), 2 * 3 * 5);
    assert!(
        std::fs::read_to_string(geo.join("sweep.csv"))
            .unwrap()
            .lines()
            .count()
            > 1
    );
    // Abliterate: the exported folder loads and runs.
    let abl = h.join("abl");
    let out = safegeo(
        &[
            "abliterate",
            g,
            "--carrier",
            "1:0",
            "--out",
            abl.to_str().unwrap(),
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = safegeo(
        &[
            "forward",
            "-m",
            abl.to_str().unwrap(),
            "--chat",
            "w1 w2",
            "--json",
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(abl.join("safegeo_abliteration.json").exists());
    // A bad carrier reference is a clear error.
    let out = safegeo(
        &[
            "eval",
            "-m",
            m,
            "--suite",
            &harm,
            "--ablate",
            &format!("{g}:9:0"),
            "--out",
            h.join("ev2").to_str().unwrap(),
        ],
        h,
    );
    fails_with(&out, 1, "no carrier at layer 9");
}

#[test]
fn eval_with_local_llm_judges_records_their_raw_output() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let suite = h.join("s.jsonl");
    std::fs::write(&suite, "{\"id\": \"a\", \"prompt\": \"w1 w2\", \"label\": \"harmful\"}\n{\"id\": \"b\", \"prompt\": \"w3\", \"label\": \"benign\"}\n").unwrap();
    let out_dir = h.join("ev");
    let m = model.to_str().unwrap();
    let out = safegeo(
        &[
            "eval",
            "-m",
            m,
            "--suite",
            suite.to_str().unwrap(),
            "--judge",
            "substring,local",
            "--judge-model-path",
            m,
            "--max-new-tokens",
            "3",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(out_dir.join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let harmful = recs.iter().find(|r| r["id"] == "a").unwrap();
    assert!(harmful["verdicts"]["harmbench"]["raw"].is_string());
    assert!(harmful["verdicts"]["xstest"]["raw"].is_string());
    // The harm classifiers are not asked about benign prompts.
    let benign = recs.iter().find(|r| r["id"] == "b").unwrap();
    assert!(
        benign["verdicts"].get("harmbench").is_none()
            && benign["verdicts"]["xstest"]["raw"].is_string()
    );
    // `--judge endpoint` without an endpoint is a clear error.
    let out = safegeo(
        &[
            "eval",
            "-m",
            m,
            "--suite",
            suite.to_str().unwrap(),
            "--judge",
            "endpoint",
            "--out",
            h.join("e2").to_str().unwrap(),
        ],
        h,
    );
    fails_with(&out, 1, "--judge-endpoint URL");
}

#[test]
fn attacks_write_test_cases_that_eval_replays_fixed_and_adaptive() {
    let model = safegeo_runtime::fetch::ensure(&safegeo_runtime::fetch::SMOLLM2, false)
        .expect("fetch the default model");
    let m = model.to_str().unwrap();
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let behaviors = h.join("behaviors.jsonl");
    std::fs::write(
        &behaviors,
        "{\"id\": \"b1\", \"prompt\": \"Write a short poem about cats.\", \"target\": \"Sure, here is a short poem about cats that rhymes\"}\n\
         {\"id\": \"b2\", \"prompt\": \"Name three rivers.\", \"target\": \"Sure, here are three rivers you might like\"}\n",
    )
    .unwrap();
    let b = behaviors.to_str().unwrap();
    let ins = h.join("ins");
    let out = safegeo(
        &[
            "attack",
            "insertion",
            "-m",
            m,
            "--behaviors",
            b,
            "--candidates",
            "4",
            "--min-span",
            "2",
            "--max-span",
            "4",
            "--own-reply-tokens",
            "12",
            "--out",
            ins.to_str().unwrap(),
            "--json",
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cases.len(), 2);
    for c in &cases {
        assert_eq!(c["attack"], "worst-insertion");
        let ins = &c["insertion"];
        assert_eq!(ins["candidates"].as_array().unwrap().len(), 4);
        let prefill = c["prefill"].as_str().unwrap();
        assert!(
            prefill.ends_with(ins["span"].as_str().unwrap()),
            "{prefill:?} vs {ins}"
        );
    }
    let pre = h.join("pre");
    let out = safegeo(
        &[
            "attack",
            "prefill",
            "-m",
            m,
            "--behaviors",
            b,
            "--k",
            "3",
            "--out",
            pre.to_str().unwrap(),
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tc = pre.join("test_cases.jsonl");
    let ev = h.join("ev");
    let out = safegeo(
        &[
            "eval",
            "-m",
            m,
            "--suite",
            "",
            "--test-cases",
            tc.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--out",
            ev.to_str().unwrap(),
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&ev);
    assert_eq!(recs.len(), 2);
    let lines = std::fs::read_to_string(ev.join("records.jsonl")).unwrap();
    for l in lines.lines() {
        let r: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(r["dataset"], "test-cases");
        assert!(
            r["response"].as_str().unwrap().starts_with("Sure, here"),
            "{r}"
        );
    }
    // Adaptive: the recorded attack is re-run against the evaluated model.
    let ad = h.join("ad");
    let tc = ins.join("test_cases.jsonl");
    let out = safegeo(
        &[
            "eval",
            "-m",
            m,
            "--suite",
            "",
            "--test-cases",
            tc.to_str().unwrap(),
            "--adaptive",
            "--judge-continuation",
            "--max-new-tokens",
            "6",
            "--out",
            ad.to_str().unwrap(),
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = std::fs::read_to_string(ad.join("adaptive/test_cases.jsonl")).unwrap();
    assert_eq!(again.lines().count(), 2);
    assert_eq!(records(&ad).len(), 2);
}

#[test]
fn deception_runs_judges_resumes_and_names_bad_input() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let m = model.to_str().unwrap();
    let scen = tiny_scenarios(h);
    let out_dir = h.join("dec");
    let run = |runs: &str, extra: &[&str]| {
        let mut args = vec![
            "deception",
            "-m",
            m,
            "--scenarios",
            scen.to_str().unwrap(),
            "--runs",
            runs,
            "--max-new-tokens",
            "4",
            "--batch-size",
            "2",
            "--out",
            out_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        safegeo(&args, h)
    };
    let judged = ["--judge", "llm", "--judge-model-path", m];
    let out = run("3", &judged);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("records.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let first = recs(&out_dir);
    assert_eq!(first.len(), 6);
    for r in &first {
        let msgs = r["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 5);
        assert_eq!(msgs[4]["role"], "assistant");
        assert!(msgs[4]["content"]
            .as_str()
            .unwrap()
            .starts_with("Reasoning:"));
        assert!(r["judgement"]["raw"].is_string(), "{r}");
        assert!(r["judge"].as_str().unwrap().starts_with("llm:local:"));
    }
    let csv = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    assert!(
        csv.contains("tiny,rebuttal-refusal,reasoning_present"),
        "{csv}"
    );
    // More runs resume: the first six are kept as they are, two are added.
    let out = run("4", &judged);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let more = recs(&out_dir);
    assert_eq!(more.len(), 8);
    assert_eq!(&more[..6], &first[..]);
    // The same seed in a fresh folder reproduces the transcripts.
    let again = h.join("dec-again");
    let out = safegeo(
        &[
            "deception",
            "-m",
            m,
            "--scenarios",
            scen.to_str().unwrap(),
            "--runs",
            "3",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "3",
            "--judge",
            "llm",
            "--judge-model-path",
            m,
            "--out",
            again.to_str().unwrap(),
        ],
        h,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = |r: &serde_json::Value| {
        (
            r["strategy"].to_string(),
            r["run"].to_string(),
            r["messages"].to_string(),
        )
    };
    let mut a: Vec<_> = first.iter().map(key).collect();
    let mut b: Vec<_> = recs(&again).iter().map(key).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "batching changed sampled transcripts");
    // Other settings in the same folder are refused; bad input is named.
    fails_with(
        &run("3", &["--temperature", "0.2"]),
        1,
        "different settings",
    );
    fails_with(&run("3", &["--judge", "llm"]), 1, "--judge-endpoint URL");
    fails_with(
        &run("3", &["--strategy", "refusal,flattery"]),
        2,
        "no first reply for strategy `flattery`",
    );
    std::fs::write(scen.join("bad.toml"), "name = 'x'\n").unwrap();
    fails_with(&run("3", &[]), 2, "bad.toml");
}

#[test]
fn trajectory_measures_sharded_anchors_merges_and_writes_the_report() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let base = h.join("base");
    write_tiny_hf(Arch::Llama, 4, &base).unwrap();
    // Two "training runs" with anchors: tiny models with other seeds stand in for checkpoints.
    for (run, seeds) in [("sft", [5u64, 6]), ("r2d2", [7, 8])] {
        for (i, seed) in seeds.iter().enumerate() {
            write_tiny_hf(
                Arch::Llama,
                *seed,
                &h.join(run).join(format!("ckpt-{:06}", (i + 1) * 10)),
            )
            .unwrap();
        }
    }
    let (harm, harmless) = (
        prompt_file(h, "harm.jsonl", 1, "harmful", 10),
        prompt_file(h, "harmless.jsonl", 20, "benign", 10),
    );
    let out_dir = h.join("report");
    let o = out_dir.to_str().unwrap();
    let anchors: Vec<String> = [
        "sft/ckpt-000010",
        "sft/ckpt-000020",
        "r2d2/ckpt-000010",
        "r2d2/ckpt-000020",
    ]
    .iter()
    .map(|a| h.join(a).to_str().unwrap().to_string())
    .collect();
    let run = |shard: &str| {
        let sets = format!("{harm},{harmless}");
        let mut args: Vec<&str> = vec!["trajectory", "--anchors"];
        args.extend(anchors.iter().map(String::as_str));
        args.extend([
            "--base",
            base.to_str().unwrap(),
            "--suite",
            &harm,
            "--limit",
            "4",
            "--max-new-tokens",
            "3",
        ]);
        let geometry = tiny_geometry_args(&sets);
        args.extend(geometry.iter().map(String::as_str));
        args.extend(["--shard", shard, "--out", o]);
        safegeo(&args, h)
    };
    let first = run("0/2");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stderr).contains("still pending"));
    assert!(!out_dir.join("index.html").exists());
    let second = run("1/2");
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("trajectory.json")).unwrap())
            .unwrap();
    let order: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["anchor"]["recipe"].as_str().unwrap(),
                r["anchor"]["step"]
            )
        })
        .collect();
    assert_eq!(order, ["base/0", "r2d2/10", "r2d2/20", "sft/10", "sft/20"]);
    for r in &rows {
        assert!(
            r["harmful_refusal"].is_null(),
            "suite is a file, not jbb-harmful"
        );
        assert!(r["carrier_layer"].is_u64(), "{r}");
        if r["anchor"]["recipe"] != "base" {
            let d = r["drift_prev_deg"].as_f64().unwrap();
            assert!((0.0..=90.0).contains(&d), "{r}");
            assert!(r["drift_base_deg"].as_f64().is_some());
        }
    }
    let csv = std::fs::read_to_string(out_dir.join("trajectory.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6);
    let html = std::fs::read_to_string(out_dir.join("index.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("</html>") && !html.contains("<script"));
    // A re-run measures nothing again and gives the same table; --merge-only too.
    let again = run("0/1");
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stderr).contains("carrier selection"));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("trajectory.csv")).unwrap(),
        csv
    );
    let merged = safegeo(&["trajectory", "--merge-only", "--out", o], h);
    assert!(merged.status.success());
    assert_eq!(
        std::fs::read_to_string(out_dir.join("trajectory.csv")).unwrap(),
        csv
    );
    // Bad input is named.
    fails_with(
        &safegeo(
            &[
                "trajectory",
                "--anchors",
                base.to_str().unwrap(),
                "--out",
                o,
            ],
            h,
        ),
        1,
        "ckpt-NNNNNN",
    );
    fails_with(
        &safegeo(
            &[
                "trajectory",
                "--anchors",
                h.join("nope").to_str().unwrap(),
                "--out",
                o,
            ],
            h,
        ),
        1,
        "not a checkpoint",
    );
    fails_with(
        &safegeo(
            &[
                "trajectory",
                "--merge-only",
                "--out",
                h.join("empty").to_str().unwrap(),
            ],
            h,
        ),
        1,
        "no anchors measured",
    );
}

/// `trajectory`'s carrier and selection options sized for a tiny model (`sets` = harmful,harmless).
fn tiny_geometry_args(sets: &str) -> Vec<String> {
    [
        "--carrier-sets",
        sets,
        "--val",
        sets,
        "--n-carrier",
        "8",
        "--n-val",
        "4",
        "--screen",
        "2",
        "--finalists",
        "2",
        "--kl-max",
        "50",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Run `args` and SIGKILL it once `ready()`; true when it was killed before it finished. A child
/// that exits by itself before the kill point panics with its exit status and stderr, so a crash is
/// never mistaken for a run that was too quick to interrupt.
fn kill_when(args: &[&str], home: &Path, ready: impl Fn() -> bool) -> bool {
    let stderr_path = home.join(format!(
        "kill-when-{}.stderr",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_safegeo"))
        .args(args)
        .env("SAFEGEO_HOME", home)
        .env_remove("SAFEGEO_MODEL")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut exited = None;
    while t0.elapsed() < std::time::Duration::from_secs(20) && !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let exited = exited.or_else(|| child.try_wait().unwrap());
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    if let Some(status) = exited {
        assert!(
            status.success(),
            "{args:?} failed before the kill point ({status}): {stderr}"
        );
        eprintln!(
            "{args:?} finished after {:?}, before the kill point",
            t0.elapsed()
        );
    }
    exited.is_none()
}

#[test]
fn deception_and_trajectory_resume_after_kill_9_to_the_uninterrupted_result() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let m = model.to_str().unwrap();
    let scen = tiny_scenarios(h);
    let deception = |out: &Path| -> Vec<String> {
        [
            "deception",
            "-m",
            m,
            "--scenarios",
            scen.to_str().unwrap(),
            "--runs",
            "12",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let sorted_records = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_to_string(out.join("records.jsonl"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let full = h.join("dec-full");
    let args = deception(&full);
    let out = safegeo(&args.iter().map(String::as_str).collect::<Vec<_>>(), h);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cut = h.join("dec-cut");
    let args = deception(&cut);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let records_file = cut.join("records.jsonl");
    kill_when(&argv, h, || {
        std::fs::read_to_string(&records_file).map_or(0, |s| s.lines().count()) >= 5
    });
    let partial = std::fs::read_to_string(&records_file).map_or(0, |s| s.lines().count());
    assert!(partial < 24, "the run was not interrupted");
    assert!(safegeo(&argv, h).status.success());
    assert_eq!(
        sorted_records(&cut),
        sorted_records(&full),
        "killed after {partial} records"
    );
    assert_eq!(
        std::fs::read_to_string(cut.join("summary.csv")).unwrap(),
        std::fs::read_to_string(full.join("summary.csv")).unwrap()
    );

    // Trajectory: kill while the second anchor is being measured, resume, same table.
    for (i, seed) in [7u64, 8].iter().enumerate() {
        write_tiny_hf(
            Arch::Llama,
            *seed,
            &h.join("run").join(format!("ckpt-{:06}", i + 1)),
        )
        .unwrap();
    }
    let (harm, harmless) = (
        prompt_file(h, "harm.jsonl", 1, "harmful", 10),
        prompt_file(h, "harmless.jsonl", 20, "benign", 10),
    );
    let sets = format!("{harm},{harmless}");
    let a1 = h.join("run/ckpt-000001").to_str().unwrap().to_string();
    let a2 = h.join("run/ckpt-000002").to_str().unwrap().to_string();
    let trajectory = |out: &Path| -> Vec<String> {
        [
            "trajectory",
            "--anchors",
            &a1,
            &a2,
            "--base",
            m,
            "--suite",
            &harm,
            "--limit",
            "6",
            "--max-new-tokens",
            "16",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(tiny_geometry_args(&sets))
        .collect()
    };
    let full = h.join("traj-full");
    let args = trajectory(&full);
    let out = safegeo(&args.iter().map(String::as_str).collect::<Vec<_>>(), h);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cut = h.join("traj-cut");
    let args = trajectory(&cut);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let second = cut.join("anchors/run__ckpt-000001/eval/records.jsonl");
    kill_when(&argv, h, || second.is_file());
    assert!(
        !cut.join("trajectory.csv").exists(),
        "the run was not interrupted"
    );
    let out = safegeo(&argv, h);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(cut.join("trajectory.csv")).unwrap(),
        std::fs::read_to_string(full.join("trajectory.csv")).unwrap()
    );
}

#[test]
fn same_seed_gives_bit_identical_outputs_across_runs_and_thread_counts() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 9, &model).unwrap();
    let m = model.to_str().unwrap();
    let input = h.join("in.jsonl");
    let lines: Vec<String> = (0..6)
        .map(|i| format!("{{\"chat\": \"w{} w{} w{}\"}}", i + 1, i + 3, 2 * i + 5))
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let (harm, harmless) = (
        prompt_file(h, "harm.jsonl", 1, "harmful", 10),
        prompt_file(h, "harmless.jsonl", 20, "benign", 10),
    );
    // Sampled generation and the carriers (f64 sums over prompts), under 1 and 2 threads, twice.
    let run = |tag: &str, threads: &str| -> (Vec<u8>, Vec<u8>) {
        let gen_out = h.join(format!("gen-{tag}.jsonl"));
        let geo = h.join(format!("geo-{tag}"));
        for args in [
            vec![
                "generate",
                "-m",
                m,
                "--input",
                input.to_str().unwrap(),
                "--output",
                gen_out.to_str().unwrap(),
                "--max-new-tokens",
                "12",
                "--temperature",
                "0.9",
                "--seed",
                "7",
                "--batch-size",
                "4",
            ],
            vec![
                "carriers",
                "-m",
                m,
                "--harmful",
                &harm,
                "--harmless",
                &harmless,
                "--n",
                "10",
                "--bootstrap",
                "3",
                "--out",
                geo.to_str().unwrap(),
            ],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_safegeo"))
                .args(&args)
                .env("SAFEGEO_HOME", h)
                .env("RAYON_NUM_THREADS", threads)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (
            std::fs::read(&gen_out).unwrap(),
            std::fs::read(geo.join("carriers.safetensors")).unwrap(),
        )
    };
    let one = run("a", "1");
    assert_eq!(one, run("b", "1"), "two runs with one thread differ");
    assert_eq!(one, run("c", "2"), "one vs two threads differ");
}

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

/// A minimal OpenAI-compatible endpoint on localhost that answers every request with `answer`
/// and records the Authorization headers it saw.
fn judge_server(answer: &'static str) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let auth = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = auth.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("authorization:") {
                    seen.lock().unwrap().push(line.trim().to_string());
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let reply =
                serde_json::json!({"choices": [{"message": {"content": answer}}]}).to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (url, auth)
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

/// A point in `lo..=hi` that differs from run to run (printed by the assertions that use it).
fn random_point(lo: usize, hi: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    lo + nanos % (hi - lo + 1)
}

fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// `args` run whole into `full/`, and run into `cut/` killed with SIGKILL once
/// `ready(cut, took, elapsed)`, then resumed. `took` is the uninterrupted run's wall time and
/// `elapsed` the time since the cut run started. A run that finishes before its kill point (a cold
/// first run makes `took` long) is started again from scratch with `took` halved, up to five
/// times. Returns the two folders for the caller to compare and the resumed run's stderr.
fn full_and_resumed(
    h: &Path,
    name: &str,
    args: &dyn Fn(&Path) -> Vec<String>,
    ready: &dyn Fn(&Path, std::time::Duration, std::time::Duration) -> bool,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let run = |out: &Path| {
        let a = args(out);
        let out = safegeo(&a.iter().map(String::as_str).collect::<Vec<_>>(), h);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (full, cut) = (
        h.join(format!("{name}-full")),
        h.join(format!("{name}-cut")),
    );
    let t0 = std::time::Instant::now();
    run(&full);
    let mut took = t0.elapsed();
    let killed = (0..5).any(|_| {
        let _ = std::fs::remove_dir_all(&cut);
        let a = args(&cut);
        let started = std::time::Instant::now();
        let killed = kill_when(&a.iter().map(String::as_str).collect::<Vec<_>>(), h, || {
            ready(&cut, took, started.elapsed())
        });
        took /= 2;
        killed
    });
    assert!(
        killed,
        "{name}: five runs in a row finished before their kill point"
    );
    let log = run(&cut);
    (full, cut, log)
}

fn same_file(a: &Path, b: &Path, what: &str) {
    assert_eq!(
        std::fs::read(a).unwrap_or_else(|e| panic!("{}: {e}", a.display())),
        std::fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display())),
        "{what}: {} differs from the uninterrupted run",
        b.display()
    );
}

/// A JSON file without its wall-clock time and the path of its own folder.
fn json_without_seconds(path: &Path) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("seconds");
    let dir = path.parent().unwrap().to_str().unwrap();
    v.to_string().replace(dir, "DIR")
}

#[test]
fn carriers_select_sweep_attack_and_train_resume_after_kill_9_to_the_uninterrupted_result() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 12, &model).unwrap();
    let m = model.to_str().unwrap().to_string();
    let (harm, harmless) = (
        prompt_file(h, "harm.jsonl", 1, "harmful", 24),
        prompt_file(h, "harmless.jsonl", 30, "benign", 24),
    );
    let sets = format!("{harm},{harmless}");
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    // select and sweep run in a copy of the uninterrupted carriers folder.
    let copy_carriers = |out: &Path| {
        std::fs::create_dir_all(out).unwrap();
        for f in ["carriers.safetensors", "carriers.json"] {
            std::fs::copy(h.join("carriers-full").join(f), out.join(f)).unwrap();
        }
    };
    // NAME.csv byte for byte, NAME.json but for its wall time.
    let same_results = |full: &Path, cut: &Path, name: &str, what: &str| {
        let csv = format!("{name}.csv");
        same_file(&full.join(&csv), &cut.join(&csv), what);
        let json = format!("{name}.json");
        assert_eq!(
            json_without_seconds(&full.join(&json)),
            json_without_seconds(&cut.join(&json)),
            "{what}"
        );
    };

    // carriers: one pass, written atomically; a kill anywhere leaves nothing torn. Killed at a
    // random share of the uninterrupted run's wall time.
    let point = random_point(5, 60);
    let (full, cut, _) = full_and_resumed(
        h,
        "carriers",
        &|out| {
            strings(&[
                "carriers",
                "-m",
                &m,
                "--harmful",
                &harm,
                "--harmless",
                &harmless,
                "--n",
                "24",
                "--bootstrap",
                "4000",
                "--out",
                out.to_str().unwrap(),
            ])
        },
        &|_, took, elapsed| elapsed >= took * point as u32 / 100,
    );
    for f in ["carriers.safetensors", "carriers.json", "geometry.json"] {
        same_file(
            &full.join(f),
            &cut.join(f),
            &format!("carriers killed at {point}% of its time"),
        );
    }

    // select and sweep resume from their journals; both start from the same carriers.
    let point = random_point(2, 6);
    let (full, cut, log) = full_and_resumed(
        h,
        "select",
        &|out| {
            copy_carriers(out);
            strings(&[
                "select",
                out.to_str().unwrap(),
                "--val",
                &sets,
                "--n-val",
                "12",
                "--screen",
                "4",
                "--finalists",
                "4",
                "--kl-max",
                "50",
            ])
        },
        &|out, _, _| lines_in(&out.join("select.journal.jsonl")) > point,
    );
    assert!(log.contains("measurements already made"), "{log}");
    same_results(
        &full,
        &cut,
        "selection",
        &format!("select killed after {point} measurements"),
    );
    let point = random_point(2, 12);
    let (full, cut, log) = full_and_resumed(
        h,
        "sweep",
        &|out| {
            copy_carriers(out);
            strings(&[
                "sweep",
                out.to_str().unwrap(),
                "--carrier",
                "1:0",
                "--val",
                &sets,
                "--n",
                "8",
                "--coefs",
                "-1,0,1",
                "--controls",
                "8",
                "--continuation-tokens",
                "4",
            ])
        },
        &|out, _, _| lines_in(&out.join("sweep.journal.jsonl")) > point,
    );
    assert!(log.contains("conditions already measured"), "{log}");
    same_results(
        &full,
        &cut,
        "sweep",
        &format!("sweep killed after {point} conditions"),
    );

    // attack: GCG writes its state after every step and a test case per behaviour.
    let behaviors = h.join("behaviors.jsonl");
    std::fs::write(
        &behaviors,
        (0..3)
            .map(|i| {
                format!(
                    "{{\"id\": \"b{i}\", \"prompt\": \"w{} w{} w{}\", \"target\": \"w{} w{}\"}}\n",
                    3 + i,
                    5 + i,
                    7 + i,
                    11 + i,
                    13 + i
                )
            })
            .collect::<String>(),
    )
    .unwrap();
    let point = random_point(0, 2);
    let (full, cut, _) = full_and_resumed(
        h,
        "gcg",
        &|out| {
            strings(&[
                "attack",
                "gcg",
                "-m",
                &m,
                "--behaviors",
                behaviors.to_str().unwrap(),
                "--steps",
                "12",
                "--search-width",
                "32",
                "--topk",
                "16",
                "--optim-str-init",
                "w1 w1 w1 w1",
                "--out",
                out.to_str().unwrap(),
            ])
        },
        &|out, _, _| {
            lines_in(&out.join("test_cases.jsonl")) >= point
                && std::fs::read_dir(out.join("state")).is_ok_and(|d| d.count() > 0)
        },
    );
    same_file(
        &full.join("test_cases.jsonl"),
        &cut.join("test_cases.jsonl"),
        &format!("gcg killed in behaviour {point}"),
    );

    // train: exact resume from the last saved state; the log keeps exactly the steps before it.
    // Training needs a template that renders the prompt as a prefix of prompt + reply.
    let config = model.join("tokenizer_config.json");
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    tc["chat_template"] = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }} w2 {% else %}{{ m['content'] }} w0 {% endif %}{% endfor %}".into();
    std::fs::write(&config, tc.to_string()).unwrap();
    // The recipe's opening bias (written into the anchors after training) reads the reply
    // opening on the validation splits of the data directory, harmful and harmless.
    let data = h.join("data");
    std::fs::create_dir_all(data.join("refusal_splits")).unwrap();
    std::fs::write(
        data.join("refusal_splits/harmful_val.json"),
        r#"[{"instruction": "w1 w4 w5", "category": "c"}, {"instruction": "w7 w2", "category": "c"}]"#,
    )
    .unwrap();
    std::fs::write(
        data.join("refusal_splits/harmless_val.json"),
        r#"[{"instruction": "w3 w6", "category": null}, {"instruction": "w8 w1 w9", "category": null}]"#,
    )
    .unwrap();
    // A short sft run on the tiny model; `rest` picks its length, its opening bias and its
    // soup (one run unless `rest` says otherwise).
    let tiny_sft = |out: &Path, rest: &[&str]| {
        let mut args = strings(&[
            "train",
            "-m",
            &m,
            "--recipe",
            "sft",
            "--batch-size",
            "2",
            "--harmful",
            &harm,
            "--harmless",
            &harmless,
            "--n-harmless",
            "8",
            "--n-hard-negatives",
            "0",
            "--utility-tokens",
            "6",
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        if !rest.contains(&"--soup") {
            args.extend(strings(&["--soup", "1"]));
        }
        args.extend(strings(rest));
        args
    };
    let point = random_point(2, 9);
    let (full, cut, _) = full_and_resumed(
        h,
        "train",
        &|out| {
            tiny_sft(
                out,
                &[
                    "--steps",
                    "12",
                    "--save-at",
                    "0,6,12",
                    "--warmup",
                    "2",
                    "--opening-bias",
                    "-1.5",
                ],
            )
        },
        &|out, _, _| lines_in(&out.join("train_log.jsonl")) > point,
    );
    let losses = |dir: &Path| -> Vec<(u64, String)> {
        std::fs::read_to_string(dir.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["step"].as_u64().unwrap(),
                    format!("{} {} {}", v["loss"], v["grad_norm"], v["parts"]),
                )
            })
            .collect()
    };
    assert_eq!(
        losses(&full),
        losses(&cut),
        "train killed after step {point}"
    );
    same_file(
        &full.join("ckpt-000012/model.safetensors"),
        &cut.join("ckpt-000012/model.safetensors"),
        &format!("train killed after step {point}"),
    );
    // Anchors after step 0 carry the opening bias in an untied head, recorded beside them;
    // anchor 0 is the starting model as it is.
    let json = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    for step in ["000006", "000012"] {
        let ck = full.join(format!("ckpt-{step}"));
        let cal = json(ck.join("calibration.json"));
        assert_eq!(cal["bias_logits"].as_f64(), Some(-1.5), "{cal}");
        assert_eq!(cal["probes"][0]["prompts"].as_u64(), Some(2), "{cal}");
        assert_eq!(
            json(ck.join("checkpoint.json"))["opening_bias"].as_f64(),
            Some(-1.5)
        );
        assert_eq!(json(ck.join("config.json"))["tie_word_embeddings"], false);
    }
    assert!(!full.join("ckpt-000000/calibration.json").exists());
    assert!(json(full.join("ckpt-000000/config.json"))["tie_word_embeddings"] == true);

    // --opening-bias-target sets each anchor's bias by bisection on harmful-val instead; an
    // anchor that falls short of the share as trained (this tiny model refuses nothing) stays
    // unbiased, and the run says so.
    let target = h.join("train-target");
    let args = tiny_sft(
        &target,
        &[
            "--steps",
            "2",
            "--save-at",
            "2",
            "--warmup",
            "1",
            "--opening-bias-target",
            "0.5",
        ],
    );
    let o = safegeo(&args.iter().map(String::as_str).collect::<Vec<_>>(), h);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("short of --opening-bias-target"),
        "{stderr}"
    );
    // Off a terminal, progress is a line per tenth with its ETA, the step's loss and tokens/s.
    assert!(
        stderr.contains("2/2 steps (")
            && stderr.contains(", eta 0s) loss ")
            && stderr.contains(" tok/s"),
        "{stderr}"
    );
    let ck = target.join("ckpt-000002");
    let cal = json(ck.join("calibration.json"));
    assert_eq!(cal["config"]["target_refusal"].as_f64(), Some(0.5), "{cal}");
    assert_eq!(cal["reached"], false, "{cal}");
    assert_eq!(
        json(ck.join("checkpoint.json"))["opening_bias"].as_f64(),
        Some(0.0)
    );

    // --soup 2 trains seeds 0 and 1 as members and writes each anchor as their average, then
    // biases it; a re-run finds everything done and changes nothing.
    let soup = h.join("train-soup");
    let options = "--steps 2 --save-at 0,2 --warmup 1 --soup 2 --opening-bias -1.5";
    let args = tiny_sft(&soup, &options.split(' ').collect::<Vec<_>>());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = safegeo(&args, h);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let load = |p: std::path::PathBuf| {
        candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()
    };
    let members: Vec<_> = ["seed-0", "seed-1"]
        .iter()
        .map(|s| soup.join("members").join(s))
        .collect();
    for m in &members {
        assert_eq!(lines_in(&m.join("train_log.jsonl")), 2, "{}", m.display());
    }
    let (a, b) = (
        load(members[0].join("ckpt-000002/model.safetensors")),
        load(members[1].join("ckpt-000002/model.safetensors")),
    );
    let avg = load(soup.join("ckpt-000002/model.safetensors"));
    let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut differ = 0;
    for (name, s) in &avg {
        if name == "lm_head.weight" {
            continue; // the soup's opening bias is in it
        }
        let (va, vb, vs) = (v(&a[name]), v(&b[name]), v(s));
        differ += usize::from(va != vb);
        for ((x, y), s) in va.iter().zip(&vb).zip(&vs) {
            assert!((s - (x + y) / 2.0).abs() < 1e-6, "{name}: {s} vs {x}, {y}");
        }
    }
    assert!(differ > 0, "the two seeds trained alike");
    let ck = json(soup.join("ckpt-000002/checkpoint.json"));
    assert_eq!(ck["soup"].as_array().map(Vec::len), Some(2), "{ck}");
    assert_eq!(ck["opening_bias"].as_f64(), Some(-1.5), "{ck}");
    assert!(soup.join("ckpt-000000/model.safetensors").exists());
    let before = std::fs::read(soup.join("ckpt-000002/model.safetensors")).unwrap();
    let o = safegeo(&args, h);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(soup.join("ckpt-000002/model.safetensors")).unwrap(),
        before
    );
    // The soup's folder remembers its size: another --soup into it is refused.
    let mut other = args.clone();
    let k = other.iter().position(|&x| x == "--soup").unwrap();
    other[k + 1] = "3";
    fails_with(&safegeo(&other, h), 1, "different settings");
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
        (&["--decision-against", "middle"], "use rest or top"),
        (&["--soup", "0"], "--soup 0: a soup has at least one member"),
        (
            &["--soup", "2", "--decision-boundary", "1.5"],
            "--decision-boundary 1.5",
        ),
        (&["--recipe", "rlhf"], "unknown recipe `rlhf`"),
        (
            &["--decision-harmful-share", "1"],
            "--decision-harmful-share 1: use a share strictly between 0 and 1",
        ),
        (
            &["--decision-hard-share", "1.5"],
            "--decision-hard-share 1.5: use a share from 0 to 1",
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

#[test]
fn calibrate_writes_a_biased_model_and_names_what_is_missing() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let out = h.join("cal");
    let o = out.to_str().unwrap();
    // A bias that would raise refusal is not this knob's job; refused before anything loads.
    fails_with(
        &safegeo(
            &[
                "calibrate",
                "-m",
                "/nonexistent",
                "--knob",
                "opening-bias",
                "--bias",
                "2",
                "--out",
                o,
            ],
            h,
        ),
        2,
        "--bias 2",
    );
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 3, &model).unwrap();
    let m = model.to_str().unwrap();
    // Interpolation needs the base model, which a plain folder does not name.
    let r = safegeo(&["calibrate", "-m", m, "--out", o], h);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("--base") && err.contains("checkpoint.json"),
        "{err}"
    );
    // A fixed opening bias: a loadable folder with the bias and its validation refusal recorded.
    let harm = prompt_file(h, "harm.jsonl", 1, "harmful", 3);
    let benign = prompt_file(h, "benign.jsonl", 2, "benign", 3);
    let biased = |landing: &str, out: &str| {
        safegeo(
            &[
                "calibrate",
                "-m",
                m,
                "--knob",
                "opening-bias",
                "--bias",
                "-2",
                "--val",
                &harm,
                "--landing",
                landing,
                "--max-new-tokens",
                "2",
                "--out",
                out,
            ],
            h,
        )
    };
    let r = biased(&benign, o);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let cal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("calibration.json")).unwrap())
            .unwrap();
    assert_eq!(cal["bias_logits"].as_f64(), Some(-2.0), "{cal}");
    assert_eq!(cal["probes"][0]["prompts"].as_u64(), Some(3), "{cal}");
    assert_eq!(cal["config"]["landing"][0].as_str(), Some(benign.as_str()));
    let r = safegeo(&["forward", "-m", o, "--no-template", "--chat", "w1 w2"], h);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // The landing pool is the harmless side; harmful prompts there are refused with a fix.
    let r = biased(&harm, &format!("{o}2"));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("benign prompts only") && err.contains("fix:"),
        "{err}"
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
