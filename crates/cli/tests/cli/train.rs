//! `train` and `calibrate`.
use crate::common::*;

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
fn a_recipe_prints_resolved_and_an_override_changes_exactly_its_field() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let print = |extra: &[&str]| -> safegeo_train::recipe_file::RecipeFile {
        let mut args = vec!["train", "--print-recipe"];
        args.extend_from_slice(extra);
        let o = safegeo(&args, h);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        // The printed file is itself a recipe that `--recipe FILE` takes back unchanged.
        let file = h.join("printed.toml");
        std::fs::write(&file, &text).unwrap();
        safegeo_train::recipe_file::load(file.to_str().unwrap()).unwrap()
    };
    let sft = print(&[]);
    assert_eq!(sft.name, "sft");
    for (option, value, field) in [
        ("--lora-rank", "8", "adapters.rank"),
        ("--steps", "7", "schedule.steps"),
        ("--decision-weight", "2", "decision.weight"),
        ("--opening-bias", "-1", "operating_point.opening_bias"),
        ("--n-harmful", "5", "data.n_harmful"),
        ("--seed", "3", "seed"),
    ] {
        let changed = print(&[option, value]);
        assert_eq!(sft.differences(&changed), [field], "{option}");
    }
    let r2d2 = print(&["--recipe", "r2d2", "--gcg-width", "16"]);
    assert_eq!(
        sft.differences(&r2d2),
        ["kind", "r2d2.gcg_width", "r2d2.preset"]
    );
    // An unknown field in a recipe file is bad input that names it.
    let bad = h.join("bad.toml");
    std::fs::write(&bad, "extends = \"sft\"\n[schedule]\nstesp = 3\n").unwrap();
    fails_with(
        &safegeo(
            &["train", "--recipe", bad.to_str().unwrap(), "--print-recipe"],
            h,
        ),
        2,
        "unknown field `stesp`",
    );
}
