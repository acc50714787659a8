//! `safegeo sweep`: causal sweeps of the refusal and harmfulness carriers against random
//! controls.
use super::{carriers_model, chosen_carrier, open_journal, prompts, write_json};
use crate::common;
use anyhow::{bail, Result};
use safegeo_data::judges::refusal_score::{refusal_token_ids, REFUSAL_OPENINGS};
use safegeo_geometry::carriers::prompt_ids;
use safegeo_geometry::store;
use safegeo_runtime::NoHooks;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct SweepArgs {
    /// A folder written by `safegeo carriers` (and `safegeo select`).
    pub dir: PathBuf,
    /// The carrier as LAYER:POS, or LAYER:POS:orth for an orthogonalized one [default: the one
    /// selected in DIR/selection.json, of the family it was selected from].
    #[arg(long)]
    pub carrier: Option<String>,
    /// Coefficients in units of the carrier (controls: of the refusal carrier's norm).
    #[arg(value_parser = crate::common::finite,
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-2,-1,-0.5,0,0.5,1,2"
    )]
    pub coefs: Vec<f64>,
    /// Matched random control directions (at least 8 recommended).
    #[arg(long, default_value_t = 8)]
    pub controls: usize,
    /// Harmful and harmless sets the effects are measured on: disjoint from the validation sets
    /// that selected the carrier (a sweep reports effects; the selection chose on validation).
    #[arg(long, value_delimiter = ',', default_value = "jbb-harmful,jbb-benign")]
    pub val: Vec<String>,
    /// Prompts per set.
    #[arg(long, default_value_t = 32)]
    pub n: usize,
    /// New tokens of each greedy reply judged for refusal (substring judge) under every
    /// condition, next to the logit score; 0 = the logit score alone.
    #[arg(long, default_value_t = safegeo_geometry::sweep::SweepConfig::default().reply_tokens)]
    pub reply_tokens: usize,
    /// Tokens of the base model's own continuation used for the utility cross-entropy.
    #[arg(long, default_value_t = 16)]
    pub continuation_tokens: usize,
    /// Model [default: the one recorded in DIR/carriers.json].
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: crate::common::DeviceArgs,
    #[command(flatten)]
    pub data: crate::common::DataArgs,
    /// Seed (prompt sampling, controls, bootstrap).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also run the reply-inversion check (steer the request, ask whether it is harmful).
    #[arg(long)]
    pub reply_inversion: bool,
    /// Print sweep.json's effects as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A sweep measures on prompts the selection never saw: a set that is (by name or by file) one
/// of the validation sets recorded in DIR/selection.json is refused.
fn refuse_overlap(dir: &std::path::Path, sets: &[&safegeo_data::Dataset]) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(dir.join("selection.json")) else {
        return Ok(());
    };
    let sel: serde_json::Value = serde_json::from_str(&text)?;
    for used in ["harmful", "harmless"] {
        let v = &sel["validation"][used];
        for d in sets {
            if v["name"].as_str() == Some(d.name.as_str())
                || v["sha256"].as_str() == Some(d.sha256.as_str())
            {
                return Err(common::invalid!(
                    "--val {}: the selection of {} chose its carrier on these prompts, so effects measured on them would not be held out\n  fix: measure on other sets, e.g. --val jbb-harmful,jbb-benign",
                    d.name,
                    dir.display()
                ));
            }
        }
    }
    Ok(())
}

pub fn run(a: SweepArgs) -> Result<()> {
    use safegeo_geometry::sweep::{effects, sweep, SweepConfig};
    if a.val.len() != 2 {
        bail!("--val takes two sets: harmful,harmless");
    }
    if a.coefs.is_empty() {
        bail!("--coefs needs at least one value");
    }
    let (r, layer, pos, name) = chosen_carrier(&a.dir, a.carrier.as_deref())?;
    let c = store::load(&a.dir.join("carriers.safetensors"))?;
    let h = c.harmfulness(layer).to_vec();
    let model = carriers_model(&a.dir, a.model.as_deref(), &a.device)?;
    let hv = prompts(&a.val[0], a.n, a.seed, a.data.data_dir.as_deref())?;
    let lv = prompts(&a.val[1], a.n, a.seed, a.data.data_dir.as_deref())?;
    refuse_overlap(&a.dir, &[&hv, &lv])?;
    let text =
        |d: &safegeo_data::Dataset| d.items.iter().map(|i| i.prompt.clone()).collect::<Vec<_>>();
    let (h_ids, _) = prompt_ids(&model, &text(&hv))?;
    let (l_ids, _) = prompt_ids(&model, &text(&lv))?;
    // The base model's own continuations of the harmless prompts are the utility reference.
    let gen = safegeo_runtime::GenerateConfig {
        max_new_tokens: a.continuation_tokens,
        ..Default::default()
    };
    let outs = safegeo_runtime::generate(&model, &l_ids, &gen, &mut NoHooks)?;
    let mut refs = Vec::new();
    let mut keep = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        if !o.ids.is_empty() {
            refs.push(safegeo_data::utility::Reference {
                prompt: lv.items[i].prompt.clone(),
                completion: model.tok.decode(&o.ids, false)?,
            });
            keep.push(l_ids[i].clone());
        }
    }
    if refs.is_empty() {
        bail!("the base model produced no continuation for any harmless prompt (raise --continuation-tokens)");
    }
    let refusal_ids = refusal_token_ids(&model.tok, REFUSAL_OPENINGS)?;
    let cfg = SweepConfig {
        coefs: a.coefs.clone(),
        controls: a.controls,
        seed: a.seed,
        reply_tokens: a.reply_tokens,
        ..Default::default()
    };
    let fingerprint = serde_json::json!({
        "carriers": safegeo_runtime::fetch::sha256_file(&a.dir.join("carriers.safetensors"))?,
        "model": common::model_hash(&model.source)?, "config": &cfg, "layer": layer,
        "refusal": &r, "harmfulness": &h, "harmful": &h_ids, "harmless": &keep,
        "refs": refs.iter().map(|x| &x.completion).collect::<Vec<_>>(), "refusal_ids": &refusal_ids,
    });
    let mut journal = open_journal(&a.dir, "sweep", &fingerprint, "conditions already measured")?;
    let t0 = std::time::Instant::now();
    let mut bar = common::Progress::new("conditions");
    let conds = sweep(
        &model,
        &r,
        &h,
        layer,
        &h_ids,
        &keep,
        &refs,
        &refusal_ids,
        &cfg,
        Some(&mut journal),
        &mut |d, t| bar.set(d, t),
    )?;
    bar.finish();
    let eff = effects(&conds, &cfg);
    let inversion = if a.reply_inversion {
        let dirs = vec![
            ("refusal".to_string(), r.clone()),
            ("harmfulness".to_string(), h.clone()),
        ];
        let sets = vec![("harmful", text(&hv)), ("harmless", text(&lv))];
        Some(safegeo_geometry::sweep::reply_inversion(
            &model,
            &sets,
            &dirs,
            layer,
            &[-1.0, 1.0],
            32,
        )?)
    } else {
        None
    };
    let m = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let rate = |v: &[f64]| v.iter().filter(|&&x| x > 0.0).count() as f64 / v.len().max(1) as f64;
    let rows = conds.iter().flat_map(|cnd| {
        let coef = cnd.coef.map_or("ablate".to_string(), |c| c.to_string());
        [
            ("harmful_refusal_rate", rate(&cnd.harmful_scores)),
            ("harmful_refusal_score", m(&cnd.harmful_scores)),
            ("harmless_refusal_rate", rate(&cnd.harmless_scores)),
            ("harmless_kl", m(&cnd.harmless_kl)),
            ("harmless_cross_entropy", m(&cnd.harmless_ce)),
        ]
        .map(|(metric, value)| {
            [
                cnd.direction.clone(),
                coef.clone(),
                metric.to_string(),
                format!("{value:.6}"),
            ]
        })
    });
    let csv = safegeo_data::table::csv_text(&["direction", "coef", "metric", "value"], rows);
    safegeo_runtime::files::write_atomic(&a.dir.join("sweep.csv"), csv.as_bytes())?;
    let out = serde_json::json!({
        "carrier": name, "layer": layer, "pos": pos, "config": cfg, "seconds": t0.elapsed().as_secs_f64(),
        "prompts": {"harmful": {"name": hv.name, "sha256": hv.sha256, "n": h_ids.len()}, "harmless": {"name": lv.name, "sha256": lv.sha256, "n": keep.len()}},
        "note": "coef = None means full ablation; rates use the logit refusal score (> 0); controls are random unit directions scaled to the refusal carrier's norm at the same layer",
        "effects": eff, "conditions": conds, "reply_inversion": inversion,
        "reply_inversion_question": safegeo_geometry::sweep::INVERSION_QUESTION,
    });
    write_json(&a.dir.join("sweep.json"), &out)?;
    if a.json {
        return common::print_json(&out["effects"]);
    }
    println!(
        "{:<12} {:>7} {:<24} {:>9} {:>9} {:>9}  95% interval",
        "direction", "coef", "metric", "value", "control", "effect"
    );
    for e in eff
        .iter()
        .filter(|e| e.metric == "harmful_refusal_rate" || e.metric == "harmless_kl")
    {
        let coef = e.coef.map_or("ablate".to_string(), |c| format!("{c}"));
        println!(
            "{:<12} {:>7} {:<24} {:>9.3} {:>9.3} {:>9.3}  [{:.3}, {:.3}]",
            e.direction, coef, e.metric, e.value, e.control, e.effect, e.lo, e.hi
        );
    }
    if let Some(inv) = &inversion {
        println!(
            "reply inversion ({}):",
            safegeo_geometry::sweep::INVERSION_QUESTION
        );
        for i in inv {
            println!(
                "  {:<12} coef {:>4} on {:<8} yes {:.2} -> {:.2}, flips {:.2}, log-odds shift {:+.3}",
                i.direction, i.coef, i.prompts, i.base_yes_rate, i.steered_yes_rate, i.flip_rate, i.mean_logodds_shift
            );
        }
    }
    crate::common::note!(
        "sweep: {} conditions in {:.1}s -> {}",
        conds.len(),
        t0.elapsed().as_secs_f64(),
        a.dir.join("sweep.json").display()
    );
    Ok(())
}
