//! `trajectory`: sharded anchors, merge, the table and the report.
use crate::common::*;

#[test]
fn trajectory_measures_sharded_anchors_merges_and_writes_the_report() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let base = h.join("base");
    write_tiny_hf(Arch::Llama, 4, &base).unwrap();
    // Two "training runs" with anchors: tiny models with other seeds stand in for checkpoints,
    // each recording its run's recipe as `safegeo train` does.
    for (run, seeds) in [("sft", [5u64, 6]), ("r2d2", [7, 8])] {
        let recipe = safegeo_train::recipe_file::load(run).unwrap();
        for (i, seed) in seeds.iter().enumerate() {
            let ck = h.join(run).join(format!("ckpt-{:06}", (i + 1) * 10));
            write_tiny_hf(Arch::Llama, *seed, &ck).unwrap();
            std::fs::write(
                ck.join("checkpoint.json"),
                serde_json::json!({"step": (i + 1) * 10, "recipe_file": recipe}).to_string(),
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
        // Geometry columns carry intervals over prompts, as the behaviour columns do.
        let (lo, hi) = (
            r["coupling_interval"][0].as_f64(),
            r["coupling_interval"][1].as_f64(),
        );
        assert!(lo.is_some() && hi.is_some() && lo <= hi, "{r}");
        assert!(r["effective_rank_spread"].is_array(), "{r}");
        if r["anchor"]["recipe"] != "base" {
            let d = r["drift_prev_deg"].as_f64().unwrap();
            assert!((0.0..=90.0).contains(&d), "{r}");
            assert!(r["drift_base_deg"].as_f64().is_some());
            // Drift carries a paired bootstrap interval over the prompts too.
            for key in ["drift_prev_interval", "drift_base_interval"] {
                let (lo, hi) = (r[key][0].as_f64(), r[key][1].as_f64());
                assert!(lo.is_some() && hi.is_some() && lo <= hi, "{key}: {r}");
            }
        }
    }
    let csv = std::fs::read_to_string(out_dir.join("trajectory.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6);
    // The arms' recipes are compared: sft and r2d2 as built in are matched.
    let md = std::fs::read_to_string(out_dir.join("trajectory.md")).unwrap();
    assert!(md.contains("arms r2d2 and sft are matched"), "{md}");
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
    // Arms whose settings differ beyond their recipes' own are named field by field.
    for step in ["000010", "000020"] {
        let path = out_dir.join(format!("anchors/r2d2__ckpt-{step}/recipe.json"));
        let mut r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        r["adapters"]["rank"] = 8.into();
        std::fs::write(&path, r.to_string()).unwrap();
    }
    let merged = safegeo(&["trajectory", "--merge-only", "--out", o], h);
    assert!(merged.status.success());
    let md = std::fs::read_to_string(out_dir.join("trajectory.md")).unwrap();
    assert!(
        md.contains("arms r2d2 and sft differ in: adapters.rank"),
        "{md}"
    );
    assert!(std::fs::read_to_string(out_dir.join("index.html"))
        .unwrap()
        .contains("differ in: adapters.rank"));
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
