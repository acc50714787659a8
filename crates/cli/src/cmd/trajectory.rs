//! `safegeo trajectory`: behaviour and geometry at every anchor of one or more training runs,
//! then the table and the HTML report. Each anchor is an independent job (`--shard i/n`);
//! its results live in `OUT/anchors/ID/` and every step skips what is already there, so an
//! interrupted run resumes and shards merge by running `--merge-only` once all are done.
use crate::cmd::eval::EvalArgs;
use crate::cmd::geometry::carriers::{estimate_into, CarriersJob};
use crate::cmd::geometry::select::{select_into_with_progress, SelectionBudget};
use crate::common::{self, JudgeBackendArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use safegeo_report::trajectory::{self, AnchorInfo};
use std::path::{Path, PathBuf};

/// The carriers' harmful and harmless prompt sets unless `--carrier-sets` says otherwise.
pub const CARRIER_SETS: &str = "harmful-train,harmless-train";
/// Prompts per suite unless `--limit` says otherwise.
pub const LIMIT: usize = 50;
/// New tokens per reply unless `--max-new-tokens` says otherwise.
pub const MAX_NEW_TOKENS: usize = 64;
/// Carrier prompts per set unless `--n-carrier` says otherwise.
pub const N_CARRIER: usize = 64;

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
    #[arg(long, value_delimiter = ',', default_value = crate::cmd::eval::DEFAULT_SUITES)]
    pub suite: Vec<String>,
    /// Prompts per suite (deterministic sample).
    #[arg(long, default_value_t = LIMIT)]
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
        default_value = crate::cmd::eval::DEFAULT_JUDGES
    )]
    pub judge: Vec<crate::common::Judge>,
    #[command(flatten)]
    pub backend: JudgeBackendArgs,
    /// Maximum new tokens per evaluated reply.
    #[arg(value_parser = crate::common::at_least_one, long, default_value_t = MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
    /// Harmful and harmless prompt sets of the carriers (*-train splits or files).
    #[arg(long, value_delimiter = ',', default_value = CARRIER_SETS)]
    pub carrier_sets: Vec<String>,
    /// Prompts per set for the carriers.
    #[arg(long, default_value_t = N_CARRIER)]
    pub n_carrier: usize,
    #[command(flatten)]
    pub budget: SelectionBudget,
    /// Where no rule selects a carrier at an anchor, measure its geometry at this carrier
    /// (LAYER:POS) [default: the carrier selected at the latest anchor of its run that has one].
    #[arg(long, value_parser = layer_pos)]
    pub reference_carrier: Option<(usize, usize)>,
    /// Select among carriers at every position instead of t_post only (~6x slower).
    #[arg(long)]
    pub all_positions: bool,
    /// Select among the orthogonalized carriers (heretic: `r - (r.g) g`, `g` the harmless
    /// mean's direction; `select --orth`). On safety-trained checkpoints of the default model
    /// their ablation costs far less KL than the plain ones'.
    #[arg(long)]
    pub orth: bool,
    /// Prompts decoded together.
    #[arg(long, default_value_t = crate::cmd::eval::BATCH_SIZE)]
    pub batch_size: usize,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    #[command(flatten)]
    pub device: common::DeviceArgs,
    /// Print the table as JSON.
    #[arg(long)]
    pub json: bool,
}

impl TrajectoryArgs {
    /// The behaviour evaluation of one anchor.
    fn eval_job(&self, model: &ModelArgs, suites: Vec<String>, out: PathBuf) -> EvalArgs {
        EvalArgs {
            judge: self.judge.clone(),
            backend: self.backend.clone(),
            data: self.data.clone(),
            limit: Some(self.limit),
            max_new_tokens: self.max_new_tokens,
            batch_size: self.batch_size,
            test_cases: self.test_cases.clone(),
            ..EvalArgs::new(model.clone(), suites, out)
        }
    }

    /// The carriers of one anchor.
    fn carriers_job(&self, out: PathBuf) -> CarriersJob {
        CarriersJob {
            n: self.n_carrier,
            data_dir: self.data.data_dir.clone(),
            ..CarriersJob::new(&self.carrier_sets[0], &self.carrier_sets[1], out)
        }
    }

    /// Everything cheap that every anchor's steps would check, before any anchor is measured:
    /// a refused option is bad input, not an interrupted run to resume.
    fn check(&self) -> Result<()> {
        self.backend.check()?;
        if self.carrier_sets.len() != 2 || self.budget.val.len() != 2 {
            bail!("--carrier-sets and --val each take two sets: HARMFUL,HARMLESS");
        }
        let model = ModelArgs::default();
        let out = PathBuf::new();
        crate::cmd::eval::check(&self.eval_job(&model, self.suite.clone(), out.clone()))?;
        crate::cmd::geometry::carriers::check(&self.carriers_job(out))?;
        for set in &self.budget.val {
            crate::cmd::geometry::prompts(set, 1, 0, self.data.data_dir.as_deref())?;
        }
        Ok(())
    }

    /// A trajectory of `anchors` into `out`, every other setting at its default.
    pub fn new(anchors: Vec<PathBuf>, out: PathBuf) -> Self {
        use crate::cmd::eval::{default_judges, list, BATCH_SIZE, DEFAULT_SUITES};
        TrajectoryArgs {
            anchors,
            base: None,
            out,
            shard: None,
            merge_only: false,
            suite: list(DEFAULT_SUITES),
            limit: LIMIT,
            test_cases: None,
            adaptive: false,
            judge: default_judges(),
            backend: JudgeBackendArgs::default(),
            max_new_tokens: MAX_NEW_TOKENS,
            carrier_sets: list(CARRIER_SETS),
            n_carrier: N_CARRIER,
            budget: SelectionBudget::default(),
            reference_carrier: None,
            all_positions: false,
            orth: false,
            batch_size: BATCH_SIZE,
            data: common::DataArgs::default(),
            device: common::DeviceArgs::default(),
            json: false,
        }
    }
}

fn layer_pos(s: &str) -> std::result::Result<(usize, usize), String> {
    let (l, p) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: give the carrier as LAYER:POS, e.g. 20:5"))?;
    let num = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{s}`: LAYER and POS are whole numbers"))
    };
    Ok((num(l)?, num(p)?))
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

/// The model in `slot`, loaded on first use.
fn loaded<'a>(
    slot: &'a mut Option<safegeo_runtime::Model>,
    args: &ModelArgs,
) -> Result<&'a safegeo_runtime::Model> {
    if slot.is_none() {
        *slot = Some(common::load(args)?);
    }
    Ok(slot.as_ref().expect("loaded above"))
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
    // The anchor's recipe, kept beside its results so that the merge can compare the arms.
    let recipe_path = dir.join("recipe.json");
    if !recipe_path.is_file() {
        let ck = Path::new(&anchor.info.model).join("checkpoint.json");
        if let Ok(text) = std::fs::read_to_string(&ck) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", ck.display()))?;
            if let Some(r) = v.get("recipe_file") {
                safegeo_runtime::files::write_atomic(
                    &recipe_path,
                    serde_json::to_string_pretty(r)?.as_bytes(),
                )?;
            }
        }
    }
    // One model per anchor, loaded when a step needs it.
    let model_args = ModelArgs::of(&anchor.info.model, &a.device);
    let mut slot: Option<safegeo_runtime::Model> = None;
    let eval_job = |out: PathBuf, suites: Vec<String>| a.eval_job(&model_args, suites, out);
    let eval_dir = dir.join("eval");
    if !eval_dir.join("summary.json").is_file() {
        crate::common::note!("[{}] behaviour evaluation", anchor.id);
        let job = eval_job(eval_dir, a.suite.clone());
        crate::cmd::eval::evaluate(loaded(&mut slot, &model_args)?, &job)?;
    }
    if a.adaptive {
        let adaptive_dir = dir.join("adaptive");
        if !adaptive_dir.join("summary.json").is_file() {
            crate::common::note!("[{}] adaptive attack and its evaluation", anchor.id);
            let mut job = eval_job(adaptive_dir, Vec::new());
            job.adaptive = true;
            crate::cmd::eval::evaluate(loaded(&mut slot, &model_args)?, &job)?;
        }
    }
    let geo = dir.join("geometry");
    if !geo.join("geometry.json").is_file() {
        crate::common::note!("[{}] carriers", anchor.id);
        estimate_into(
            loaded(&mut slot, &model_args)?,
            &a.carriers_job(geo.clone()),
        )?;
    }
    if !geo.join("selection.json").is_file() {
        crate::common::note!("[{}] carrier selection", anchor.id);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(geo.join("carriers.json"))?)?;
        let n_pos = meta["n_pos"]
            .as_u64()
            .context("carriers.json has no n_pos")? as usize;
        let mut job = a.budget.job(geo.clone());
        job.orth = a.orth;
        job.data_dir = a.data.data_dir.clone();
        // The report's stand-in carrier and bypass-by-layer curve read every bypass.
        job.config.bypass_all = true;
        if !a.all_positions {
            job.config.positions = Some(vec![n_pos - 1]);
        }
        select_into_with_progress(loaded(&mut slot, &model_args)?, &job)?;
    }
    Ok(())
}

/// What the merge says of the arms compared: per pair of runs, matched or the settings in which
/// they differ besides their recipes' own losses and data (from each anchor's recipe.json).
fn arm_notes(dirs: &[PathBuf]) -> Result<Vec<String>> {
    use safegeo_train::recipe_file::{compare_arms, RecipeFile};
    let mut arms: Vec<(String, RecipeFile)> = Vec::new();
    let mut unknown = Vec::new();
    let mut notes = Vec::new();
    for d in dirs {
        let info: AnchorInfo =
            serde_json::from_str(&std::fs::read_to_string(d.join("anchor.json"))?)?;
        if info.recipe == "base" {
            continue;
        }
        let path = d.join("recipe.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            if !unknown.contains(&info.recipe) {
                unknown.push(info.recipe.clone());
            }
            continue;
        };
        let r: RecipeFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a recipe", path.display()))?;
        match arms.iter().find(|(l, _)| *l == info.recipe) {
            None => arms.push((info.recipe.clone(), r)),
            Some((_, first)) if *first != r => notes.push(format!(
                "the anchors of {} come from different recipes ({} differs)",
                info.recipe,
                first.differences(&r).join(", ")
            )),
            Some(_) => {}
        }
    }
    notes.extend(compare_arms(&arms));
    if !unknown.is_empty() {
        notes.push(format!(
            "the recipe of {} is not recorded (their checkpoints name none: not written by `safegeo train`), so their settings were not compared",
            unknown.join(", ")
        ));
    }
    Ok(notes)
}

/// Assemble trajectory.{json,csv,md} and index.html from every finished anchor in OUT.
pub fn merge(
    out: &Path,
    json: bool,
    reference: Option<(usize, usize)>,
) -> Result<Vec<trajectory::Row>> {
    let anchors_dir = out.join("anchors");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&anchors_dir)
        .with_context(|| format!("{}: no anchors measured yet\n  fix: run `safegeo trajectory --anchors ... --out {}` first", anchors_dir.display(), out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("anchor.json").is_file())
        .collect();
    dirs.sort();
    let rows = trajectory::collect(&dirs, reference)?;
    let arms = arm_notes(&dirs)?;
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        safegeo_runtime::files::write_atomic(&out.join(name), bytes)?;
        Ok(())
    };
    write(
        "trajectory.json",
        serde_json::to_string_pretty(&rows)?.as_bytes(),
    )?;
    write("trajectory.csv", trajectory::csv(&rows).as_bytes())?;
    let mut markdown = trajectory::markdown(&rows);
    for n in &arms {
        markdown.push_str(&format!("\n{n}\n"));
    }
    write("trajectory.md", markdown.as_bytes())?;
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
    let mut notes = arms.clone();
    notes.push(format!(
        "{} anchors. Geometry: carriers from harmful-train/harmless-train, selection on harmful-val/harmless-val (see each anchor's geometry/selection.json for its settings).",
        rows.len()
    ));
    write(
        "index.html",
        safegeo_report::html::page(&rows, &sweeps, &notes)?.as_bytes(),
    )?;
    if json {
        common::print_json(&rows)?;
    } else {
        print!("{markdown}");
        println!("report: {}", out.join("index.html").display());
    }
    Ok(rows)
}

pub fn run(a: TrajectoryArgs) -> Result<()> {
    if a.merge_only {
        merge(&a.out, a.json, a.reference_carrier)?;
        return Ok(());
    }
    let anchors = anchors_of(&a.anchors, a.base.as_deref())?;
    a.check()?;
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
    merge(&a.out, a.json, a.reference_carrier)?;
    Ok(())
}
