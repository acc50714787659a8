//! `eval`: results, resume after kill -9, and local LLM judges.
use crate::common::*;

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
