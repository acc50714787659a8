//! `safegeo eval`: behaviour evaluation on benchmark suites.
use crate::common::{self, ModelArgs};
use anyhow::{bail, Context, Result};
use safegeo_data::eval::{run_eval, EvalSpec};
use safegeo_data::judges::{Judge, PrefixMatcher, SubstringMatcher};
use safegeo_runtime::GenerateConfig;
use std::path::PathBuf;

/// The suites evaluated unless `--suite` says otherwise.
pub const DEFAULT_SUITES: &str = "jbb-harmful,jbb-benign,xstest";
/// The judges unless `--judge` says otherwise.
pub const DEFAULT_JUDGES: &str = "substring,xstest-prefix";

/// A comma-separated list as a vector (a default of a list option).
pub fn list(s: &str) -> Vec<String> {
    s.split(',').map(String::from).collect()
}

/// The default judges.
pub fn default_judges() -> Vec<common::Judge> {
    use clap::ValueEnum;
    list(DEFAULT_JUDGES)
        .iter()
        .map(|j| common::Judge::from_str(j, false).expect("a known judge"))
        .collect()
}

/// Concurrent requests per LLM judge.
pub const JUDGE_CONCURRENCY: usize = 4;
/// New tokens per evaluated reply.
pub const MAX_NEW_TOKENS: usize = 128;
/// Prompts decoded together.
pub const BATCH_SIZE: usize = 16;

#[derive(clap::Args, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated suites: harmbench-val, xstest, strongreject-small, jbb-harmful, jbb-benign,
    /// advbench, alpaca, harmful-val, harmless-val, or .jsonl/.csv files with a `prompt` column.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_SUITES)]
    pub suite: Vec<String>,
    /// Judges, comma-separated. The LLM judges need --judge-endpoint or --judge-model-path;
    /// without them, ASR is the string-match proxy (said in results).
    #[arg(long, value_enum, value_delimiter = ',', default_value = DEFAULT_JUDGES)]
    pub judge: Vec<common::Judge>,
    #[command(flatten)]
    pub backend: common::JudgeBackendArgs,
    /// Concurrent requests per LLM judge.
    #[arg(long, default_value_t = JUDGE_CONCURRENCY)]
    pub judge_concurrency: usize,
    /// Replace the substring judge's list (JSON array or one per line).
    #[arg(long)]
    pub substring_list: Option<PathBuf>,
    /// Replace the prefix judge's list.
    #[arg(long)]
    pub prefix_list: Option<PathBuf>,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    /// Sample at most N prompts per suite (deterministic with --seed).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed for sampling prompts and decoding.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Maximum new tokens per reply (HarmBench uses 512; shorter is faster and is recorded).
    #[arg(value_parser = crate::common::at_least_one, long, default_value_t = MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
    /// Prompts decoded together.
    #[arg(long, default_value_t = BATCH_SIZE)]
    pub batch_size: usize,
    /// System prompt (else the chat template's default).
    #[arg(long)]
    pub system: Option<String>,
    /// Output folder: records.jsonl, summary.json, summary.csv, config.json. Re-running resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// Attack test cases to replay unchanged (`safegeo attack ... --out DIR` writes
    /// DIR/test_cases.jsonl): fixed-source evaluation, reported as the suite `test-cases`.
    /// Use `--suite ''` to evaluate only them.
    #[arg(long)]
    pub test_cases: Option<PathBuf>,
    /// With --test-cases: re-run the attack recorded in them (same configuration, same
    /// behaviours) against the evaluated model into OUT/adaptive/, and evaluate those cases
    /// instead (adaptive evaluation).
    #[arg(long, requires = "test_cases")]
    pub adaptive: bool,
    /// Judge only the text generated after a test case's forced prefix (for insertion attacks,
    /// whose forced text holds the model's own refusal opening). Records keep the whole reply.
    #[arg(long)]
    pub judge_continuation: bool,
    /// Keep only items of this category or kind in every suite (e.g. `contextual`, `copyright` or
    /// a HarmBench semantic category; an XSTest type; a JBB category).
    #[arg(long)]
    pub category: Option<String>,
    /// Column of user suite files that holds the prompt.
    #[arg(long)]
    pub prompt_column: Option<String>,
    #[command(flatten)]
    pub steer: InterventionArgs,
    /// Reference completions of harmless prompts (JSONL with prompt/chat and completion/response,
    /// e.g. `safegeo generate` output from the base model): reports utility cross-entropy.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print nothing on success (results are in --out).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// `--ablate` / `--add`: interventions active while the model runs (evaluation or attack).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct InterventionArgs {
    /// Ablate a carrier while the model runs: DIR (the selected carrier in DIR/selection.json,
    /// orthogonalized if `select --orth` chose it) or DIR:LAYER:POS (DIR:LAYER:POS:orth for the
    /// orthogonalized one), DIR being a `safegeo carriers` folder.
    #[arg(long)]
    pub ablate: Option<String>,
    /// Add a carrier at its layer while the model runs: DIR:COEF or DIR:LAYER:POS:COEF
    /// (DIR:LAYER:POS:orth:COEF for an orthogonalized one).
    #[arg(long, allow_hyphen_values = true)]
    pub add: Option<String>,
}

/// What [`judges`] would refuse, found without building any judge: a local LLM judge loads a
/// model, which the checks before the evaluated model loads must not do.
fn check_judges(a: &EvalArgs) -> Result<()> {
    use common::Judge as J;
    let llm = a.judge.iter().any(|j| {
        matches!(
            j,
            J::Harmbench | J::Strongreject | J::Xstest | J::Endpoint | J::Local
        )
    });
    if a.judge.contains(&J::Endpoint) && a.backend.judge_endpoint.is_none() {
        bail!("--judge endpoint has no endpoint\n  fix: add --judge-endpoint URL --judge-model NAME (any OpenAI-compatible server)");
    }
    if a.judge.contains(&J::Local) && a.backend.judge_model_path.is_none() {
        bail!("--judge local has no model\n  fix: add --judge-model-path MODEL (.gguf or Hugging Face folder)");
    }
    if llm && a.backend.judge_endpoint.is_none() && a.backend.judge_model_path.is_none() {
        bail!("LLM judges need a judge model\n  fix: pass --judge-endpoint URL --judge-model NAME, or --judge-model-path MODEL, or use --judge substring,xstest-prefix");
    }
    if a.judge.is_empty() {
        bail!("--judge needs at least one judge");
    }
    // The string matchers read their lists here, cheaply.
    for j in &a.judge {
        match j {
            J::Substring => drop(SubstringMatcher::new(a.substring_list.as_deref())?),
            J::XstestPrefix => drop(PrefixMatcher::new(a.prefix_list.as_deref())?),
            _ => {}
        }
    }
    Ok(())
}

fn judges(a: &EvalArgs) -> Result<Vec<Box<dyn Judge>>> {
    use safegeo_data::judges::llm::{Completer, LlmJudge, LlmJudgeKind};
    let mut out: Vec<Box<dyn Judge>> = Vec::new();
    let cache = Some(safegeo_runtime::fetch::home().join("judge-cache"));
    let make_completer = || -> Result<std::sync::Arc<dyn Completer>> {
        a.backend.completer(&a.model.device)?.ok_or_else(|| anyhow::anyhow!("LLM judges need a judge model\n  fix: pass --judge-endpoint URL --judge-model NAME, or --judge-model-path MODEL, or use --judge substring,xstest-prefix"))
    };
    let mut shared: Option<std::sync::Arc<dyn Completer>> = None;
    let mut completer = || -> Result<std::sync::Arc<dyn Completer>> {
        if let Some(c) = &shared {
            return Ok(c.clone());
        }
        let c = make_completer()?;
        shared = Some(c.clone());
        Ok(c)
    };
    use common::Judge as J;
    // `endpoint` and `local` name the backend: all three LLM judges through it.
    let expanded: Vec<J> = a
        .judge
        .iter()
        .flat_map(|&j| match j {
            J::Endpoint | J::Local => {
                vec![J::Harmbench, J::Strongreject, J::Xstest]
            }
            other => vec![other],
        })
        .collect();
    if a.judge.contains(&J::Endpoint) && a.backend.judge_endpoint.is_none() {
        bail!("--judge endpoint has no endpoint\n  fix: add --judge-endpoint URL --judge-model NAME (any OpenAI-compatible server)");
    }
    if a.judge.contains(&J::Local) && a.backend.judge_model_path.is_none() {
        bail!("--judge local has no model\n  fix: add --judge-model-path MODEL (.gguf or Hugging Face folder)");
    }
    for j in expanded {
        match j {
            J::Substring => out.push(Box::new(SubstringMatcher::new(
                a.substring_list.as_deref(),
            )?)),
            J::XstestPrefix => out.push(Box::new(PrefixMatcher::new(a.prefix_list.as_deref())?)),
            J::RefusalScore => {} // computed in the evaluation loop from the prompt
            J::Harmbench | J::Strongreject | J::Xstest => out.push(Box::new(LlmJudge::new(
                LlmJudgeKind::parse(j.as_str())?,
                completer()?,
                cache.clone(),
            ))),
            J::Endpoint | J::Local => unreachable!("expanded into the three LLM judges"),
        }
    }
    if out.is_empty() && !a.judge.contains(&J::RefusalScore) {
        bail!("--judge needs at least one judge");
    }
    Ok(out)
}

/// A carrier chosen on the command line: `DIR` (the one selected in DIR/selection.json, of the
/// family it was selected from: plain or orthogonalized by `select --orth`) or `DIR:LAYER:POS`
/// (plain), `DIR:LAYER:POS:orth` (orthogonalized). An orthogonalized carrier comes at the plain
/// carrier's scale along its own direction, as `select` adds it.
pub fn carrier(spec: &str) -> Result<(Vec<f64>, usize, usize, String)> {
    let parts: Vec<&str> = spec.split(':').collect();
    let dir = PathBuf::from(parts[0]);
    let (layer, pos, orth) = match parts.len() {
        1 => {
            let text = std::fs::read_to_string(dir.join("selection.json")).with_context(|| {
                format!("{}: no selection.json\n  fix: run `safegeo select {}` or name the carrier as DIR:LAYER:POS", dir.display(), dir.display())
            })?;
            let sel: serde_json::Value = serde_json::from_str(&text)?;
            let s = &sel["result"]["selected"];
            let orth = sel["result"]["direction"].as_str() == Some("refusal_orth");
            match (s["layer"].as_u64(), s["pos"].as_u64()) {
                (Some(l), Some(p)) => (l as usize, p as usize, orth),
                _ => bail!(
                    "{}: no admissible carrier was selected\n  fix: name one as DIR:LAYER:POS",
                    dir.display()
                ),
            }
        }
        3 | 4 => (
            parts[1].parse().context("LAYER must be a number")?,
            parts[2].parse().context("POS must be a number")?,
            match parts.get(3) {
                None => false,
                Some(&"orth") => true,
                Some(other) => bail!("carrier `{spec}`: `{other}` is not a family; use DIR:LAYER:POS or DIR:LAYER:POS:orth"),
            },
        ),
        _ => bail!("carrier `{spec}`: use DIR, DIR:LAYER:POS or DIR:LAYER:POS:orth"),
    };
    let c = safegeo_geometry::store::load(&dir.join("carriers.safetensors"))?;
    if layer >= c.n_layer() || pos >= c.n_pos() {
        bail!(
            "no carrier at layer {layer} position {pos} in {} (it has {} layers x {} positions)\n  fix: pick LAYER and POS in range (positions are named in carriers.json)",
            dir.display(),
            c.n_layer(),
            c.n_pos()
        );
    }
    let r = if orth {
        c.orth_at_scale(layer, pos)
    } else {
        c.refusal[layer][pos].clone()
    };
    let suffix = if orth { ":orth" } else { "" };
    Ok((
        r,
        layer,
        pos,
        format!("{}:{layer}:{pos}{suffix}", dir.display()),
    ))
}

pub fn interventions(
    a: &InterventionArgs,
    dev: &candle_core::Device,
) -> Result<(Vec<safegeo_runtime::Intervention>, Vec<String>)> {
    use safegeo_runtime::{Intervention, Scope};
    let tensor = |v: &[f64]| {
        candle_core::Tensor::from_vec(
            v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            v.len(),
            dev,
        )
    };
    let mut out = Vec::new();
    let mut described = Vec::new();
    if let Some(spec) = &a.ablate {
        let (r, _, _, name) = carrier(spec)?;
        out.push(Intervention::ablate(&tensor(&r)?)?);
        described.push(format!("ablate {name} at every layer"));
    }
    if let Some(spec) = &a.add {
        let (head, coef) = spec
            .rsplit_once(':')
            .context("--add needs DIR:COEF or DIR:LAYER:POS:COEF")?;
        let coef: f64 = crate::common::finite(coef)
            .map_err(|e| crate::common::invalid!("--add {spec}: COEF {e}"))?;
        let (r, layer, _, name) = carrier(head)?;
        out.push(Intervention::Add {
            vector: tensor(&r)?,
            coef,
            layer,
            scope: Scope::All,
        });
        described.push(format!("add {coef} x {name} at layer {layer}"));
    }
    Ok((out, described))
}

pub fn run(a: EvalArgs) -> Result<()> {
    check(&a)?;
    // Everything cheap is checked before the model loads.
    interventions(&a.steer, &common::device(&a.model.device)?)?;
    let model = common::load(&a.model)?;
    let summary = evaluate(&model, &a)?;
    if a.quiet {
        return Ok(());
    }
    if a.json {
        return common::print_json(&summary);
    }
    println!(
        "{:<20} {:<38} {:<14} {:>7} {:>5}  95% interval",
        "suite", "metric", "judge", "value", "n"
    );
    for r in &summary.rows {
        let e = &r.estimate;
        println!(
            "{:<20} {:<38} {:<14} {:>7.3} {:>5}  [{:.3}, {:.3}]",
            r.suite, r.metric, r.judge, e.value, e.n, e.lo, e.hi
        );
    }
    if let Some(t) = summary.generated_tokens_per_s {
        println!("generation: {t:.1} new tokens/s (batch {})", a.batch_size);
    }
    for g in &summary.agreement {
        println!(
            "agreement on {}: {} vs {}: kappa {} over {} replies ({:.0}% disagree)",
            g.suite,
            g.judges[0],
            g.judges[1],
            g.kappa.map_or("undefined".into(), |k| format!("{k:.2}")),
            g.n,
            100.0 * g.disagreement
        );
    }
    for n in &summary.notes {
        println!("note: {n}");
    }
    println!("results in {}", a.out.display());
    Ok(())
}

/// The options' own checks: the judge backend, something to evaluate, the judges, the suites.
pub(crate) fn check(a: &EvalArgs) -> Result<()> {
    a.backend.check()?;
    if a.suites().is_empty() && a.test_cases.is_none() {
        bail!("nothing to evaluate: give --suite NAMES and/or --test-cases FILE");
    }
    if let Some(p) = &a.test_cases {
        safegeo_data::test_cases::test_case_dataset(p)?;
    }
    check_judges(a)?;
    for s in a.suites() {
        let spec = safegeo_data::LoadSpec {
            data_dir: a.data.data_dir.as_deref(),
            limit: Some(1),
            prompt_column: a.prompt_column.as_deref(),
            category: a.category.as_deref(),
            ..Default::default()
        };
        safegeo_data::load_dataset(&s, &spec)?;
    }
    Ok(())
}

impl EvalArgs {
    /// The suites named, without empty names (`--suite ''` evaluates test cases only).
    fn suites(&self) -> Vec<String> {
        self.suite
            .iter()
            .filter(|s| !s.trim().is_empty())
            .cloned()
            .collect()
    }

    /// An evaluation of `suites` into `out` with every other setting at its default.
    pub fn new(model: ModelArgs, suites: Vec<String>, out: PathBuf) -> Self {
        EvalArgs {
            model,
            suite: suites,
            judge: default_judges(),
            backend: common::JudgeBackendArgs::default(),
            judge_concurrency: JUDGE_CONCURRENCY,
            substring_list: None,
            prefix_list: None,
            data: common::DataArgs::default(),
            limit: None,
            seed: 0,
            max_new_tokens: MAX_NEW_TOKENS,
            batch_size: BATCH_SIZE,
            system: None,
            out,
            test_cases: None,
            adaptive: false,
            judge_continuation: false,
            category: None,
            prompt_column: None,
            steer: InterventionArgs::default(),
            reference: None,
            json: false,
            quiet: true,
        }
    }
}

/// Evaluate `model` as `a` says into `a.out` (resuming what is there): config.json,
/// records.jsonl, summary.{json,csv}. Shared with `trajectory`.
pub fn evaluate(
    model: &safegeo_runtime::Model,
    a: &EvalArgs,
) -> Result<safegeo_data::eval::Summary> {
    check(a)?;
    let mut a = a.clone();
    a.suite = a.suites();
    let test_cases = a
        .test_cases
        .as_ref()
        .map(|p| safegeo_data::test_cases::test_case_dataset(p))
        .transpose()?;
    let judges = judges(&a)?;
    let (ivs, iv_described) = interventions(&a.steer, &model.device)?;
    let mut hooks = safegeo_runtime::Hooks::with_interventions(ivs);
    if a.adaptive {
        let source = a.test_cases.clone().expect("clap requires --test-cases");
        let cases = safegeo_data::test_cases::read_test_cases(&source)?;
        let spec = safegeo_attacks::run::AttackSpec::from_case(&cases[0])?;
        let items = safegeo_attacks::run::items_from_cases(&cases);
        let out = a.out.join("adaptive");
        let run = safegeo_attacks::run::RunSpec {
            out: &out,
            system: a.system.as_deref(),
            batch_size: a.batch_size,
        };
        crate::cmd::attack::attack_with_progress(
            model,
            &spec,
            &cases[0].dataset,
            &items,
            &run,
            &mut hooks,
        )?;
        a.test_cases = Some(out.join("test_cases.jsonl"));
    }
    let spec = EvalSpec {
        suites: a.suite.clone(),
        data_dir: a.data.data_dir.clone(),
        limit: a.limit,
        seed: a.seed,
        generation: GenerateConfig {
            max_new_tokens: a.max_new_tokens,
            seed: a.seed,
            ..Default::default()
        },
        batch_size: a.batch_size,
        system: a.system.clone(),
        out: a.out.clone(),
        judge_workers: a.judge_concurrency.max(1),
        reference: a.reference.clone(),
        refusal_score: a.judge.contains(&common::Judge::RefusalScore),
        prompt_column: a.prompt_column.clone(),
        category: a.category.clone(),
        test_cases: a.test_cases.clone(),
        judge_continuation: a.judge_continuation,
    };
    let config = serde_json::json!({
        "safegeo_version": env!("CARGO_PKG_VERSION"),
        "model": model.source,
        "model_sha256": common::model_hash(&model.source)?,
        "datasets": a.suite.iter().map(|s| {
            let spec = safegeo_data::LoadSpec { data_dir: a.data.data_dir.as_deref(), limit: a.limit, seed: a.seed, prompt_column: a.prompt_column.as_deref(), category: a.category.as_deref() };
            let d = safegeo_data::load_dataset(s, &spec)?;
            Ok(serde_json::json!({"name": d.name, "path": d.path, "sha256": d.sha256, "total": d.total,
                "sampled_ids": d.items.iter().map(|i| i.id.clone()).collect::<Vec<_>>()}))
        }).collect::<Result<Vec<_>>>()?,
        "test_cases": test_cases.as_ref().map(|d| serde_json::json!({"path": d.path, "sha256": d.sha256, "total": d.total})),
        "adaptive": a.adaptive, "judge_continuation": a.judge_continuation,
        "judges": a.judge,
        "interventions": iv_described,
        "category": a.category,
        "judge_backend": a.backend.describe(),
        "generation": spec.generation, "batch_size": a.batch_size, "system": a.system, "seed": a.seed,
        "reference": a.reference.as_ref().map(|p| -> Result<_> { Ok(serde_json::json!({"path": p, "sha256": safegeo_runtime::fetch::sha256_file(p)?})) }).transpose()?,
    });
    common::check_or_write_config(&a.out, &config)?;
    let mut bar = common::Progress::new("replies");
    let summary = run_eval(model, &judges, &spec, &mut hooks, &mut |done, total| {
        bar.set(done, total)
    })
    .with_context(|| {
        format!(
            "evaluation into {} (re-run the same command to resume)",
            a.out.display()
        )
    })?;
    bar.finish();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safegeo_geometry::carriers::Carriers;

    #[test]
    fn a_selected_carrier_comes_from_the_family_it_was_selected_from() {
        let dir = tempfile::tempdir().unwrap();
        // One layer, two positions, width 2. Position 1: r = (3, 4), orthogonalized direction
        // u = (0, 1), so at the plain carrier's scale (r . u) u = (0, 4).
        let c = Carriers {
            refusal: vec![vec![vec![1.0, 0.0], vec![3.0, 4.0]]],
            refusal_orth: vec![vec![vec![1.0, 0.0], vec![0.0, 1.0]]],
            mean_harmful: vec![vec![vec![0.0; 2]; 2]],
            mean_harmless: vec![vec![vec![0.0; 2]; 2]],
        };
        safegeo_geometry::store::save(&c, &[], &dir.path().join("carriers.safetensors")).unwrap();
        let d = dir.path().display().to_string();
        let select = |direction: &str| {
            let sel = serde_json::json!({"result": {"selected": {"layer": 0, "pos": 1}, "direction": direction}});
            std::fs::write(dir.path().join("selection.json"), sel.to_string()).unwrap();
            carrier(&d).unwrap()
        };
        let (r, layer, pos, name) = select("refusal_orth");
        assert_eq!((r, layer, pos), (vec![0.0, 4.0], 0, 1));
        assert!(name.ends_with(":0:1:orth"), "{name}");
        assert_eq!(select("refusal").0, vec![3.0, 4.0]);
        assert_eq!(carrier(&format!("{d}:0:1")).unwrap().0, vec![3.0, 4.0]);
        assert_eq!(carrier(&format!("{d}:0:1:orth")).unwrap().0, vec![0.0, 4.0]);
        let err = carrier(&format!("{d}:0:1:ortho")).unwrap_err().to_string();
        assert!(err.contains("not a family"), "{err}");
        let err = format!("{:#}", carrier(&format!("{d}:3:0")).unwrap_err());
        assert!(err.contains("1 layers x 2 positions"), "{err}");
    }
}
