//! `safegeo demo`: the README's main job. On the default model: safety-train it two ways (SFT
//! and R2D2) with the CPU recipe, make fixed-source attack test cases once on the base model,
//! measure every anchor (behaviour + geometry) and write the report. Every stage resumes or is
//! skipped when its results exist, so a re-run is quick.
use crate::common::{args_of as parse, display as s};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Output folder: runs/sft, runs/r2d2, attack/, report/ (report/index.html is the result).
    #[arg(long, default_value = "safegeo-demo")]
    pub out: PathBuf,
    /// SFT steps (anchors at the middle and the end).
    #[arg(long, default_value_t = 16)]
    pub sft_steps: usize,
    /// R2D2 steps (anchors at the middle and the end; each step runs GCG on its pool).
    #[arg(long, default_value_t = 4)]
    pub r2d2_steps: usize,
    /// Harmful training prompts (harmful-train) per recipe.
    #[arg(long, default_value_t = 64)]
    pub n_harmful: usize,
    /// Harmless training prompts (harmless-train, self-distilled once and cached).
    #[arg(long, default_value_t = 64)]
    pub n_harmless: usize,
    /// Prompts per evaluation suite at every anchor.
    #[arg(long, default_value_t = 16)]
    pub limit: usize,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let data: Vec<String> = a
        .data
        .data_dir
        .as_ref()
        .map(|d| vec!["--data-dir".into(), s(d)])
        .unwrap_or_default();
    // Fail on missing data before any training starts.
    for name in [
        "harmful-train",
        "harmless-train",
        "harmbench-val",
        "jbb-harmful",
        "jbb-benign",
        "xstest",
        "harmful-val",
        "harmless-val",
    ] {
        safegeo_data::load_dataset(
            name,
            &safegeo_data::LoadSpec {
                data_dir: a.data.data_dir.as_deref(),
                limit: Some(1),
                ..Default::default()
            },
        )
        .with_context(|| format!("the demo needs the `{name}` dataset"))?;
    }
    safegeo_runtime::files::lock_dir(&a.out)?;
    let stage = |name: &str| {
        crate::common::note!(
            "== demo: {name} ({:.0}s so far)",
            t0.elapsed().as_secs_f64()
        );
    };
    let runs = a.out.join("runs");
    let train = |recipe: &str, steps: usize, extra: &[&str]| -> Result<()> {
        let mid = (steps / 2).max(1);
        let mut v: Vec<String> = vec![
            "--recipe".into(),
            recipe.into(),
            "--steps".into(),
            steps.to_string(),
            "--save-at".into(),
            format!("{mid},{steps}"),
            "--n-harmful".into(),
            a.n_harmful.to_string(),
            "--n-harmless".into(),
            a.n_harmless.to_string(),
            "--n-hard-negatives".into(),
            a.n_harmless.to_string(),
            "--batch-size".into(),
            "8".into(),
            // The demo's runs are a few steps long: plain SFT on every block with rank-16
            // adapters and the anchors as trained, as docs/training.md describes. `safegeo train`'s
            // own defaults (the decision stream on blocks 40%-, rank 64, the opening bias) need
            // about 150 steps to pay off.
            "--decision-weight".into(),
            "0".into(),
            "--lora-layers".into(),
            "all".into(),
            "--lora-rank".into(),
            "16".into(),
            "--lora-alpha".into(),
            "32".into(),
            "--opening-bias".into(),
            "0".into(),
            "--soup".into(),
            "1".into(),
            "--out".into(),
            s(&runs.join(recipe)),
        ];
        v.extend(extra.iter().map(|x| x.to_string()));
        v.extend(data.clone());
        crate::cmd::train::run(parse(&v)?)
    };
    stage("SFT");
    train("sft", a.sft_steps, &[])?;
    stage("R2D2");
    train("r2d2", a.r2d2_steps, &[])?;
    let attack = a.out.join("attack");
    if !attack.join("test_cases.jsonl").is_file() || !attack.join("done").is_file() {
        stage(
            "fixed-source test cases (prefill attack on standard HarmBench behaviours, base model)",
        );
        let mut v: Vec<String> = vec![
            "--behaviors".into(),
            "harmbench-val".into(),
            // Standard behaviours: the contextual ones carry ~1,000-token contexts that would
            // dominate the demo's evaluation time.
            "--category".into(),
            "standard".into(),
            "--limit".into(),
            a.limit.to_string(),
            "--out".into(),
            s(&attack),
        ];
        v.extend(data.clone());
        let args: crate::cmd::attack::AttackArgs = parse_attack(v)?;
        crate::cmd::attack::run(args)?;
        std::fs::write(attack.join("done"), b"")?;
    }
    stage("trajectory: behaviour and geometry at every anchor");
    let mut anchors: Vec<String> = Vec::new();
    for recipe in ["sft", "r2d2"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(runs.join(recipe))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy().starts_with("ckpt-")
                        && !n.to_string_lossy().ends_with(".tmp")
                })
            })
            .collect();
        found.sort();
        anchors.extend(found.iter().map(|p| s(p)));
    }
    let mut v: Vec<String> = vec!["--anchors".into()];
    v.extend(anchors);
    v.extend([
        "--base".into(),
        "smollm2-135m-instruct".into(),
        "--test-cases".into(),
        s(&attack.join("test_cases.jsonl")),
        "--limit".into(),
        a.limit.to_string(),
        // CPU budget: short replies, 32+32 carrier prompts, t_post candidates screened on 2
        // prompts per set, 2 finalists on 8.
        "--max-new-tokens".into(),
        "48".into(),
        "--n-carrier".into(),
        "32".into(),
        "--n-val".into(),
        "8".into(),
        "--screen".into(),
        "2".into(),
        "--finalists".into(),
        "2".into(),
        "--out".into(),
        s(&a.out.join("report")),
    ]);
    v.extend(data);
    crate::cmd::trajectory::run(parse(&v)?)?;
    crate::common::note!(
        "== demo: done in {:.0}s; open {}",
        t0.elapsed().as_secs_f64(),
        a.out.join("report/index.html").display()
    );
    Ok(())
}

fn parse_attack(argv: Vec<String>) -> Result<crate::cmd::attack::AttackArgs> {
    let mut full = vec!["prefill".to_string()];
    full.extend(argv);
    parse(&full)
}
