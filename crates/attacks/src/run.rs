//! Run one attack over a set of behaviours, writing `test_cases.jsonl` as it goes (one line per
//! finished behaviour; a re-run skips them, and GCG/AutoDAN resume mid-behaviour from `state/`).
use crate::autodan::{AutoDan, AutoDanConfig};
use crate::gcg::{Gcg, GcgConfig};
use crate::insertion::{forced_ids, plan, InsertionConfig};
use crate::prefill::{prefill_case, PrefillConfig};
use crate::{target_for, user_messages, Error, Item, Result, SplitPrompt, TestCase};
use safegeo_data::judges::refusal_score::{refusal_token_ids, REFUSAL_OPENINGS};
use safegeo_data::test_cases::{append_test_case, read_test_cases};
use safegeo_runtime::{generate, GenerateConfig, Model, Observer};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

/// An attack with its configuration (recorded in every test case, and enough to re-run it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "attack", rename_all = "kebab-case")]
pub enum AttackSpec {
    /// Direct request (`k = 0`) or prefill.
    Prefill(PrefillConfig),
    /// Random (`candidates = 1`) or worst insertion.
    Insertion(InsertionConfig),
    /// GCG.
    Gcg(GcgConfig),
    /// AutoDAN.
    Autodan(AutoDanConfig),
}

impl AttackSpec {
    /// The attack's name as written in test cases.
    pub fn name(&self) -> &'static str {
        match self {
            AttackSpec::Prefill(c) if c.k == 0 => "direct",
            AttackSpec::Prefill(_) => "prefill",
            AttackSpec::Insertion(c) if c.candidates > 1 => "worst-insertion",
            AttackSpec::Insertion(_) => "insertion",
            AttackSpec::Gcg(_) => "gcg",
            AttackSpec::Autodan(_) => "autodan",
        }
    }

    /// Read back the spec recorded in a test case.
    pub fn from_case(case: &TestCase) -> Result<Self> {
        serde_json::from_value(case.config.clone()).map_err(|e| {
            Error::Invalid(format!(
                "test case {} has no re-runnable attack configuration ({e})",
                case.behavior_id
            ))
        })
    }
}

/// Events reported while attacking.
pub enum Event<'a> {
    /// A behaviour started (index, total, id).
    Behavior(usize, usize, &'a str),
    /// An optimization step finished (step, best loss).
    Step(usize, f64),
}

/// Where outputs go and what the prompts look like.
pub struct RunSpec<'a> {
    /// Output folder (`test_cases.jsonl`, `state/`).
    pub out: &'a Path,
    /// System prompt (else the template's default).
    pub system: Option<&'a str>,
    /// Replies decoded together (insertion's own replies).
    pub batch_size: usize,
}

fn base_case(model: &Model, spec: &AttackSpec, dataset: &str, item: &Item) -> Result<TestCase> {
    Ok(TestCase {
        attack: spec.name().into(),
        dataset: dataset.into(),
        behavior_id: item.id.clone(),
        behavior: item.behavior.clone().unwrap_or_else(|| item.prompt.clone()),
        request: item.prompt.clone(),
        context: item.context.clone(),
        category: item.category.clone(),
        messages: Vec::new(),
        prefill: None,
        insertion: None,
        target: target_for(item),
        loss_trace: Vec::new(),
        succeeded: false,
        config: serde_json::to_value(spec).map_err(|e| Error::Invalid(e.to_string()))?,
        source_model: model.source.display().to_string(),
    })
}

/// Attack every item of `items` (from dataset `dataset`); returns all test cases in the file.
pub fn run_attack(
    model: &Model,
    spec: &AttackSpec,
    dataset: &str,
    items: &[Item],
    run: &RunSpec,
    obs: &mut dyn Observer,
    report: &mut dyn FnMut(Event),
) -> Result<Vec<TestCase>> {
    if items.is_empty() {
        return Err(Error::Invalid("no behaviours to attack".into()));
    }
    std::fs::create_dir_all(run.out.join("state")).map_err(|e| Error::io(run.out, e))?;
    let file = run.out.join("test_cases.jsonl");
    let done: HashSet<String> = if file.exists() {
        read_test_cases(&file)?
            .into_iter()
            .map(|c| c.behavior_id)
            .collect()
    } else {
        HashSet::new()
    };
    let todo: Vec<(usize, &Item)> = items
        .iter()
        .enumerate()
        .filter(|(_, it)| !done.contains(&it.id))
        .collect();
    let total = items.len();
    match spec {
        AttackSpec::Insertion(cfg) => {
            cfg.check()?;
            let refusal_ids = refusal_token_ids(&model.tok, REFUSAL_OPENINGS)?;
            for chunk in todo.chunks(run.batch_size.max(1)) {
                let prompts: Vec<Vec<u32>> = chunk
                    .iter()
                    .map(|(_, it)| {
                        model
                            .tok
                            .encode_chat(&user_messages(run.system, &it.prompt), false)
                    })
                    .collect::<std::result::Result<_, _>>()?;
                let gen = GenerateConfig {
                    max_new_tokens: cfg.own_reply_tokens,
                    ..Default::default()
                };
                let own = generate(model, &prompts, &gen, obs)?;
                for (((i, it), prompt), own) in chunk.iter().zip(&prompts).zip(own) {
                    report(Event::Behavior(*i, total, &it.id));
                    let mut case = base_case(model, spec, dataset, it)?;
                    let continuation = model.tok.encode(&case.target, false)?;
                    let ins = plan(
                        model,
                        prompt,
                        &own.ids,
                        &continuation,
                        &refusal_ids,
                        cfg,
                        cfg.seed.wrapping_add(*i as u64),
                        obs,
                    )?;
                    case.prefill = Some(model.tok.decode(&forced_ids(&own.ids, &ins), false)?);
                    case.messages = user_messages(run.system, &it.prompt);
                    case.insertion = Some(ins);
                    append_test_case(&file, &case)?;
                }
            }
        }
        _ => {
            for (i, it) in todo {
                report(Event::Behavior(i, total, &it.id));
                let mut case = base_case(model, spec, dataset, it)?;
                let state = run
                    .out
                    .join("state")
                    .join(format!("{}.json", sanitize(&it.id)));
                match spec {
                    AttackSpec::Prefill(cfg) => {
                        let (messages, prefill) =
                            prefill_case(&model.tok, run.system, &it.prompt, &case.target, cfg)?;
                        case.messages = messages;
                        case.prefill = prefill;
                    }
                    AttackSpec::Gcg(cfg) => {
                        let prompt = SplitPrompt::for_behavior(&model.tok, run.system, &it.prompt)?;
                        let gcg = Gcg::new(model, &prompt, &case.target, cfg.clone())?;
                        let st =
                            gcg.run(Some(&state), obs, &mut |s, l| report(Event::Step(s, l)))?;
                        let suffix = model.tok.decode(st.result_ids(), false)?;
                        case.messages = prompt.fill(&suffix);
                        case.loss_trace = st.best_losses.clone();
                        case.succeeded = st.stopped_early;
                    }
                    AttackSpec::Autodan(cfg) => {
                        let ad =
                            AutoDan::new(model, run.system, &it.prompt, &case.target, cfg.clone())?;
                        let st =
                            ad.run(Some(&state), obs, &mut |s, l| report(Event::Step(s, l)))?;
                        case.messages = ad.prompt().fill(&ad.user_text(&st.best.0));
                        case.loss_trace = st.best_losses.clone();
                        case.succeeded = st.succeeded;
                    }
                    AttackSpec::Insertion(_) => unreachable!("handled above"),
                }
                append_test_case(&file, &case)?;
                let _ = std::fs::remove_file(&state);
            }
        }
    }
    read_test_cases(&file)
}

/// Items to re-attack from recorded test cases (adaptive evaluation).
pub fn items_from_cases(cases: &[TestCase]) -> Vec<Item> {
    cases
        .iter()
        .map(|c| Item {
            id: c.behavior_id.clone(),
            prompt: if c.request.is_empty() {
                c.behavior.clone()
            } else {
                c.request.clone()
            },
            behavior: Some(c.behavior.clone()),
            context: c.context.clone(),
            category: c.category.clone(),
            kind: None,
            label: "harmful".into(),
            target: Some(c.target.clone()),
            messages: None,
            prefill: None,
        })
        .collect()
}

fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
