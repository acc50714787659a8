//! `safegeo trajectory`: behaviour and geometry at every anchor of one or more training runs,
//! then the table and the HTML report. Each anchor is an independent job (`--shard i/n`);
//! its results live in `OUT/anchors/ID/` and every step skips what is already there, so an
//! interrupted run resumes and shards merge by running `--merge-only` once all are done.
use crate::common::{self, JudgeBackendArgs};
use anyhow::{bail, Context, Result};
use common::display as s;
use safegeo_report::trajectory::{self, AnchorInfo};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct TrajectoryArgs {
    /// Anchor checkpoints (`RUN/ckpt-NNNNNN` folders written by `safegeo train`; a shell glob
    /// such as runs/*/ckpt-* works). The run folder's name becomes the recipe label.
    #[arg(long, num_args = 1..)]
    pub anchors: Vec<PathBuf>,
    /// The base model the runs started from (.gguf, HF folder or known name): measured as the
    /// anchor every drift is taken against.
    #[arg(long)]
    pub base: Option<String>,
    /// Report folder: anchors/ID/ per anchor, trajectory.json, trajectory.csv, trajectory.md,
    /// index.html.
    #[arg(long)]
    pub out: PathBuf,
    /// Run only anchors i, i+n, i+2n, ... of the sorted list (`i/n`, 0-based) for a cluster
    /// scheduler; merge with --merge-only when every shard is done.
    #[arg(long)]
    pub shard: Option<String>,
    /// Measure nothing: assemble the table and the report from OUT/anchors/.
    #[arg(long)]
    pub merge_only: bool,
    /// Behaviour suites evaluated at every anchor.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "jbb-harmful,jbb-benign,xstest"
    )]
    pub suite: Vec<String>,
    /// Prompts per suite (deterministic sample).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Fixed-source attack test cases (`safegeo attack ... --out DIR` -> DIR/test_cases.jsonl),
    /// generated once and replayed unchanged at every anchor: the `asr_fixed` column.
    #[arg(long)]
    pub test_cases: Option<PathBuf>,
    /// Also re-run the test cases' attack against every anchor (`asr_adaptive`; costly for GCG).
    #[arg(long, requires = "test_cases")]
    pub adaptive: bool,
    /// Judges (as for `safegeo eval`).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "substring,xstest-prefix"
    )]
    pub judge: Vec<crate::common::Judge>,
    #[command(flatten)]
    pub backend: JudgeBackendArgs,
    /// Maximum new tokens per evaluated reply.
    #[arg(value_parser = crate::common::at_least_one, long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Harmful and harmless prompt sets of the carriers (*-train splits or files).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "harmful-train,harmless-train"
    )]
    pub carrier_sets: Vec<String>,
    /// Harmful and harmless validation sets of the selection.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "harmful-val,harmless-val"
    )]
    pub val: Vec<String>,
    /// Prompts per set for the carriers.
    #[arg(long, default_value_t = 64)]
    pub n_carrier: usize,
    /// Validation prompts per set for the selection.
    #[arg(long, default_value_t = 16)]
    pub n_val: usize,
    /// Screening prompts per set in the selection.
    #[arg(long, default_value_t = 4)]
    pub screen: usize,
    /// Selection finalists measured on all validation prompts.
    #[arg(long, default_value_t = 4)]
    pub finalists: usize,
    /// Select among carriers at every position instead of t_post only (~6x slower).
    #[arg(long)]
    pub all_positions: bool,
    /// Select among the orthogonalized carriers (heretic: `r - (r.g) g`, `g` the harmless
    /// mean's direction; `select --orth`). On safety-trained checkpoints of the default model
    /// their ablation costs far less KL than the plain ones'.
    #[arg(long)]
    pub orth: bool,
    /// Maximum KL for admissibility.
    #[arg(value_parser = crate::common::finite, long, default_value_t = 0.1)]
    pub kl_max: f64,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    /// Device.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the table as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One anchor to measure.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub info: AnchorInfo,
    pub id: String,
}

fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("ckpt-")?.parse().ok()
}

/// The anchors in a stable order: the base first, then by (recipe, step).
pub fn anchors_of(paths: &[PathBuf], base: Option<&str>) -> Result<Vec<Anchor>> {
    let mut out = Vec::new();
    if let Some(b) = base {
        out.push(Anchor {
            info: AnchorInfo {
                recipe: "base".into(),
                name: "base".into(),
                step: 0,
                model: b.to_string(),
            },
            id: "base".into(),
        });
    }
    let mut rest = Vec::new();
    for p in paths {
        if !p.join("config.json").is_file() {
            bail!(
                "{} is not a checkpoint (no config.json)\n  fix: pass the ckpt-NNNNNN folders that `safegeo train --out RUN` writes, e.g. --anchors RUN/ckpt-*",
                p.display()
            );
        }
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let step = step_of(&name).with_context(|| {
            format!("{}: anchor folders are named ckpt-NNNNNN (the training step)\n  fix: pass checkpoints written by `safegeo train`; give the starting model as --base", p.display())
        })?;
        let recipe = p
            .canonicalize()
            .ok()
            .and_then(|c| {
                c.parent()
                    .and_then(|r| r.file_name())
                    .map(|n| n.to_string_lossy().to_string())
            })
            .unwrap_or_else(|| "run".into());
        rest.push(Anchor {
            id: format!("{recipe}__{name}"),
            info: AnchorInfo {
                recipe,
                name,
                step,
                model: p.display().to_string(),
            },
        });
    }
    rest.sort_by(|a, b| (&a.info.recipe, a.info.step).cmp(&(&b.info.recipe, b.info.step)));
    let mut seen = std::collections::HashSet::new();
    for a in &rest {
        if !seen.insert(a.id.clone()) {
            bail!("anchor {} is given twice", a.id);
        }
    }
    out.extend(rest);
    if out.is_empty() {
        bail!("no anchors\n  fix: pass --anchors RUN/ckpt-* and/or --base MODEL");
    }
    Ok(out)
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s.split_once('/').context("--shard takes i/n (e.g. 0/4)")?;
    let (i, n): (usize, usize) = (i.trim().parse()?, n.trim().parse()?);
    if n == 0 || i >= n {
        bail!("--shard {s}: need 0 <= i < n");
    }
    Ok((i, n))
}

fn judge_argv(a: &TrajectoryArgs) -> Vec<String> {
    let names: Vec<&str> = a.judge.iter().map(|j| j.as_str()).collect();
    let mut v = vec!["--judge".into(), names.join(",")];
    let b = &a.backend;
    if let Some(u) = &b.judge_endpoint {
        v.extend(["--judge-endpoint".into(), u.clone()]);
    }
    if let Some(m) = &b.judge_model {
        v.extend(["--judge-model".into(), m.clone()]);
    }
    if let Some(p) = &b.judge_model_path {
        v.extend(["--judge-model-path".into(), s(p)]);
    }
    v.extend(["--judge-key-env".into(), b.judge_key_env.clone()]);
    v.extend(["--judge-timeout".into(), b.judge_timeout.to_string()]);
    v
}

fn data_argv(a: &TrajectoryArgs) -> Vec<String> {
    a.data
        .data_dir
        .as_ref()
        .map(|d| vec!["--data-dir".into(), s(d)])
        .unwrap_or_default()
}

/// Measure one anchor; every step is skipped when its output exists.
fn measure(a: &TrajectoryArgs, anchor: &Anchor, dir: &Path) -> Result<()> {
    // Each anchor's folder has one writer; shards of one trajectory share the output folder.
    safegeo_runtime::files::lock_dir(dir)?;
    let info_path = dir.join("anchor.json");
    if let Ok(text) = std::fs::read_to_string(&info_path) {
        let old: AnchorInfo = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt", info_path.display()))?;
        if old != anchor.info {
            bail!(
                "{} holds results of another anchor ({})\n  fix: use a new --out folder",
                dir.display(),
                old.model
            );
        }
    } else {
        safegeo_runtime::files::write_atomic(
            &info_path,
            serde_json::to_string_pretty(&anchor.info)?.as_bytes(),
        )?;
    }
    let model = anchor.info.model.clone();
    let common_eval = |out: &Path| -> Vec<String> {
        let mut v = vec![
            "--model".into(),
            model.clone(),
            "--device".into(),
            a.device.clone(),
            "--limit".into(),
            a.limit.to_string(),
            "--max-new-tokens".into(),
            a.max_new_tokens.to_string(),
            "--batch-size".into(),
            a.batch_size.to_string(),
            "--out".into(),
            s(out),
            "--quiet".into(),
        ];
        v.extend(judge_argv(a));
        v.extend(data_argv(a));
        v
    };
    let eval_dir = dir.join("eval");
    if !eval_dir.join("summary.json").is_file() {
        crate::common::note!("[{}] behaviour evaluation", anchor.id);
        let mut v = common_eval(&eval_dir);
        v.extend(["--suite".into(), a.suite.join(",")]);
        if let Some(tc) = &a.test_cases {
            v.extend(["--test-cases".into(), s(tc)]);
        }
        crate::cmd::eval::run(common::args_of(&v)?)?;
    }
    if a.adaptive {
        let adaptive_dir = dir.join("adaptive");
        if !adaptive_dir.join("summary.json").is_file() {
            crate::common::note!("[{}] adaptive attack and its evaluation", anchor.id);
            let mut v = common_eval(&adaptive_dir);
            v.extend([
                "--suite".into(),
                String::new(),
                "--test-cases".into(),
                s(a.test_cases.as_ref().expect("clap requires it")),
                "--adaptive".into(),
            ]);
            crate::cmd::eval::run(common::args_of(&v)?)?;
        }
    }
    let geo = dir.join("geometry");
    if !geo.join("geometry.json").is_file() {
        crate::common::note!("[{}] carriers", anchor.id);
        let mut v = vec![
            "--model".into(),
            model.clone(),
            "--device".into(),
            a.device.clone(),
            "--n".into(),
            a.n_carrier.to_string(),
            "--out".into(),
            s(&geo),
            "--harmful".into(),
            a.carrier_sets[0].clone(),
            "--harmless".into(),
            a.carrier_sets[1].clone(),
        ];
        v.extend(data_argv(a));
        crate::cmd::geometry::carriers::run(common::args_of(&v)?)?;
    }
    if !geo.join("selection.json").is_file() {
        crate::common::note!("[{}] carrier selection", anchor.id);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(geo.join("carriers.json"))?)?;
        let n_pos = meta["n_pos"]
            .as_u64()
            .context("carriers.json has no n_pos")?;
        let mut v = vec![
            s(&geo),
            "--model".into(),
            model.clone(),
            "--device".into(),
            a.device.clone(),
            "--n-val".into(),
            a.n_val.to_string(),
            "--screen".into(),
            a.screen.to_string(),
            "--finalists".into(),
            a.finalists.to_string(),
            "--kl-max".into(),
            a.kl_max.to_string(),
            "--val".into(),
            a.val.join(","),
            // The report's stand-in carrier and bypass-by-layer curve read every bypass.
            "--bypass-all".into(),
        ];
        if !a.all_positions {
            v.extend(["--positions".into(), (n_pos - 1).to_string()]);
        }
        if a.orth {
            v.push("--orth".into());
        }
        v.extend(data_argv(a));
        crate::cmd::geometry::select::run(common::args_of(&v)?)?;
    }
    Ok(())
}

/// Assemble trajectory.{json,csv,md} and index.html from every finished anchor in OUT.
pub fn merge(out: &Path, json: bool) -> Result<Vec<trajectory::Row>> {
    let anchors_dir = out.join("anchors");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&anchors_dir)
        .with_context(|| format!("{}: no anchors measured yet\n  fix: run `safegeo trajectory --anchors ... --out {}` first", anchors_dir.display(), out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("anchor.json").is_file())
        .collect();
    dirs.sort();
    let rows = trajectory::collect(&dirs)?;
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        safegeo_runtime::files::write_atomic(&out.join(name), bytes)?;
        Ok(())
    };
    write(
        "trajectory.json",
        serde_json::to_string_pretty(&rows)?.as_bytes(),
    )?;
    write("trajectory.csv", trajectory::csv(&rows).as_bytes())?;
    write("trajectory.md", trajectory::markdown(&rows).as_bytes())?;
    let sweeps: Vec<safegeo_report::html::SweepFigure> = dirs
        .iter()
        .filter_map(|d| {
            let text = std::fs::read_to_string(d.join("geometry/sweep.json")).ok()?;
            Some(safegeo_report::html::SweepFigure {
                anchor: d.file_name()?.to_string_lossy().to_string(),
                sweep: serde_json::from_str(&text).ok()?,
            })
        })
        .collect();
    let notes = vec![format!(
        "{} anchors. Geometry: carriers from harmful-train/harmless-train, selection on harmful-val/harmless-val (see each anchor's geometry/selection.json for its settings).",
        rows.len()
    )];
    write(
        "index.html",
        safegeo_report::html::page(&rows, &sweeps, &notes)?.as_bytes(),
    )?;
    if json {
        common::print_json(&rows)?;
    } else {
        print!("{}", trajectory::markdown(&rows));
        println!("report: {}", out.join("index.html").display());
    }
    Ok(rows)
}

pub fn run(a: TrajectoryArgs) -> Result<()> {
    a.backend.check()?;
    if a.merge_only {
        merge(&a.out, a.json)?;
        return Ok(());
    }
    if a.carrier_sets.len() != 2 || a.val.len() != 2 {
        bail!("--carrier-sets and --val each take two sets: HARMFUL,HARMLESS");
    }
    let anchors = anchors_of(&a.anchors, a.base.as_deref())?;
    let (shard, shards) = a
        .shard
        .as_deref()
        .map(parse_shard)
        .transpose()?
        .unwrap_or((0, 1));
    let t0 = std::time::Instant::now();
    for (i, anchor) in anchors.iter().enumerate() {
        if i % shards != shard {
            continue;
        }
        let t = std::time::Instant::now();
        measure(&a, anchor, &a.out.join("anchors").join(&anchor.id))
            .with_context(|| format!("anchor {} (re-run the same command to resume)", anchor.id))?;
        crate::common::note!("[{}] done in {:.0}s", anchor.id, t.elapsed().as_secs_f64());
    }
    crate::common::note!(
        "trajectory: {} anchors in {:.0}s",
        anchors.len(),
        t0.elapsed().as_secs_f64()
    );
    if shards > 1 {
        let pending: Vec<&str> = anchors
            .iter()
            .filter(|x| {
                !a.out
                    .join("anchors")
                    .join(&x.id)
                    .join("geometry/selection.json")
                    .is_file()
            })
            .map(|x| x.id.as_str())
            .collect();
        if !pending.is_empty() {
            crate::common::note!(
                "shard {shard}/{shards} done; {} anchors still pending in other shards. When all are done: safegeo trajectory --merge-only --out {}",
                pending.len(),
                a.out.display()
            );
            return Ok(());
        }
    }
    merge(&a.out, a.json)?;
    Ok(())
}
