//! The geometry pipeline on a tiny model: carriers, select, sweep, drift, abliterate, eval with an intervention.
use crate::common::*;

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
    // Every layer's post-instruction positions are candidates; t_inst is not.
    let csv = std::fs::read_to_string(geo.join("selection.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + 2 * (meta["n_pos"].as_u64().unwrap() as usize - 1)
    );
    assert!(csv
        .lines()
        .skip(1)
        .all(|l| !l.split(',').nth(1).unwrap().eq("0")));
    let sel: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(geo.join("selection.json")).unwrap())
            .unwrap();
    // Both cut-offs the protocol names have their verdict.
    for cut in ["none", "0.8"] {
        let v = &sel["by_cutoff"][cut];
        assert!(
            v["selected"].is_object() || v["reason"].is_string(),
            "{sel}"
        );
    }
    // The selection names its rule, or says why neither rule selects a carrier; the model's
    // own floor (random-direction KL) is reported beside it.
    assert!(
        sel["result"]["rule"].is_string()
            || sel["result"]["reason"]
                .as_str()
                .unwrap()
                .contains("no carrier passes either rule"),
        "{sel}"
    );
    assert_eq!(
        sel["baseline"]["random_direction_kl"]
            .as_array()
            .unwrap()
            .len(),
        16
    );
    assert!(sel["baseline"]["random_direction_kl_p95"].is_f64(), "{sel}");
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
    // Causal sweep against random controls, on prompts the selection never saw: the selection's
    // own validation sets are refused, by name or by file.
    fails_with(
        &safegeo(
            &[
                "sweep",
                g,
                "--carrier",
                "1:0",
                "--val",
                &format!("{harm},{harmless}"),
            ],
            h,
        ),
        2,
        "chose its carrier on these prompts",
    );
    let (harm2, harmless2) = (
        prompt_file(h, "harm2.jsonl", 3, "harmful", 6),
        prompt_file(h, "harmless2.jsonl", 31, "benign", 6),
    );
    let out = safegeo(
        &[
            "sweep",
            g,
            "--carrier",
            "1:0",
            "--val",
            &format!("{harm2},{harmless2}"),
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
    // 2 directions x (2 coefficients + ablation) x 7 metrics, the judged replies' refusal among
    // them.
    let eff = eff.as_array().unwrap();
    assert_eq!(eff.len(), 2 * 3 * 7);
    assert!(eff
        .iter()
        .any(|e| e["metric"] == "harmful_refusal_judged" && e["value"].is_f64()));
    assert!(
        std::fs::read_to_string(geo.join("sweep.csv"))
            .unwrap()
            .lines()
            .count()
            > 1
    );
    // A llama.cpp control vector can only add at layers 2 and above: the tiny model's two layers
    // are refused with the reason.
    let cv = h.join("cv.gguf");
    fails_with(
        &safegeo(
            &[
                "control-vector",
                g,
                "--carrier",
                "1:1",
                "--coef",
                "2",
                "--out",
                cv.to_str().unwrap(),
            ],
            h,
        ),
        2,
        "layer 2 or above",
    );
    assert!(!cv.exists());
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
