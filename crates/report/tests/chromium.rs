//! The report renders in a real browser: headless Chromium loads index.html from disk, with no
//! console errors, and its DOM holds the table and every figure.
//!
//! Chromium is found as $SAFEGEO_CHROMIUM or `chromium` / `chromium-browser` on PATH (Debian:
//! `apt-get install chromium`; `.ci/run` installs it). Without it the test says so and passes,
//! unless SAFEGEO_REQUIRE_CHROMIUM=1 (set by `.ci/run` once it installed Chromium).
use safegeo_report::html::{page, SweepFigure};
use safegeo_report::trajectory::{AnchorInfo, Est, Row};
use std::process::Command;

fn chromium() -> Option<String> {
    if let Ok(p) = std::env::var("SAFEGEO_CHROMIUM") {
        return Some(p);
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|c| c.to_string())
}

fn row(recipe: &str, step: u64, asr: f64, layer: usize, admissible: bool) -> Row {
    let e = |v: f64| {
        Some(Est {
            value: v,
            lo: (v - 0.1).max(0.0),
            hi: (v + 0.1).min(1.0),
            n: 30,
        })
    };
    Row {
        dir: Default::default(),
        anchor: AnchorInfo {
            recipe: recipe.into(),
            name: format!("ckpt-{step:06}"),
            step,
            model: "m".into(),
        },
        asr_fixed: e(asr),
        asr_adaptive: None,
        strongreject: None,
        harmful_refusal: e(1.0 - asr),
        benign_refusal: e(0.2),
        xstest_over_refusal: e(0.3),
        utility_ce: None,
        judges: vec!["substring".into()],
        carrier_layer: Some(layer),
        carrier_pos: Some(4),
        admissible,
        carrier_rule: Some(if admissible { "absolute" } else { "stand-in" }.into()),
        selection_note: if admissible {
            String::new()
        } else {
            "no admissible carrier: induce <= 0 for 4".into()
        },
        baseline_harmful_score: Some(-1.0),
        effective_rank: Some(2.5),
        effective_rank_spread: Some((2.2, 2.8)),
        coupling: Some(0.4),
        coupling_interval: None,
        drift_prev_interval: None,
        drift_base_interval: None,
        drift_prev_deg: Some(20.0),
        drift_base_deg: Some(30.0),
        carrier_cos_base: Some(0.8),
        bypass_by_layer: (0..30).map(|l| -((l as f64) / 10.0).sin()).collect(),
    }
}

#[test]
fn report_renders_in_headless_chromium_without_errors() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("SAFEGEO_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "SAFEGEO_REQUIRE_CHROMIUM=1 but no Chromium found (set SAFEGEO_CHROMIUM or install chromium)"
        );
        eprintln!("SKIPPED: no Chromium on this machine (apt-get install chromium, or set SAFEGEO_CHROMIUM)");
        return;
    };
    let mut base = row("base", 0, 0.9, 12, false);
    base.anchor.name = "base".into();
    let rows = vec![
        base,
        row("r2d2", 2, 0.5, 14, true),
        row("r2d2", 4, 0.3, 14, true),
        row("sft", 12, 0.4, 13, false),
        row("sft", 24, 0.2, 15, true),
    ];
    let sweep = SweepFigure {
        anchor: "sft__ckpt-000024".into(),
        sweep: serde_json::json!({"effects": [
            {"direction": "refusal", "coef": -1.0, "metric": "harmful_refusal_rate", "value": 0.1, "control": 0.8, "effect": -0.7, "lo": -0.9, "hi": -0.5},
            {"direction": "refusal", "coef": 1.0, "metric": "harmful_refusal_rate", "value": 1.0, "control": 0.8, "effect": 0.2, "lo": 0.1, "hi": 0.3}
        ]}),
    };
    let html = page(&rows, &[sweep], &["a note".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.html");
    std::fs::write(&path, &html).unwrap();
    let profile = dir.path().join("profile");
    let out = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            &format!("file://{}", path.display()),
        ])
        .output()
        .expect("run chromium");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {stderr}");
    for line in stderr.lines() {
        assert!(
            !(line.contains("CONSOLE")
                || line.contains("Uncaught")
                || line.contains("Failed to load")),
            "the page logged an error: {line}"
        );
    }
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("safegeo trajectory report"),
        "title missing: {dom:.500}"
    );
    // Five anchor rows plus the header row, six figures (five trajectory + one sweep).
    assert_eq!(dom.matches("<tr>").count(), 6, "table rows");
    assert_eq!(dom.matches("<svg").count(), 6, "figures");
    assert!(dom.contains("<figcaption>"));
}
