//! `deception`: judging, resume and bad input.
use crate::common::*;

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
