//! `safegeo carriers` and `safegeo select`: refusal geometry of a model.
use crate::common::{self, ModelArgs};
use anyhow::{bail, Context, Result};
use safegeo_data::jsonl::Journal;
use safegeo_data::judges::refusal_score::{refusal_scores, refusal_token_ids, REFUSAL_OPENINGS};
use safegeo_data::{load_dataset, LoadSpec};
use safegeo_geometry::carriers::{capture, difference_of_means, prompt_ids};
use safegeo_geometry::measures::{belief_score, coupling_curve, effective_rank_at};
use safegeo_geometry::select::{select, SelectConfig};
use safegeo_geometry::separation::{probe_separation, separation, Separation};
use safegeo_geometry::{linalg, store};
use safegeo_runtime::NoHooks;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct CarriersArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Harmful prompts (a *-train split: carriers are estimated, never evaluated, here).
    #[arg(long, default_value = "harmful-train")]
    pub harmful: String,
    /// Harmless prompts.
    #[arg(long, default_value = "harmless-train")]
    pub harmless: String,
    /// Prompts per set (Arditi et al.: 128).
    #[arg(long, default_value_t = 128)]
    pub n: usize,
    /// Sampling seed (Arditi et al.: 42).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep only harmful prompts the model refuses (refusal score > 0) and harmless ones it
    /// accepts (< 0).
    #[arg(long)]
    pub filter: bool,
    /// Bootstrap resamples for the effective rank.
    #[arg(long, default_value_t = 20)]
    pub bootstrap: usize,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Data directory [default: $SAFEGEO_DATA, else ../shared/data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Also write refusal.npy and harmfulness.npy.
    #[arg(long)]
    pub export_npy: bool,
    /// Held-out sets (harmful,harmless; evaluation sets are fine, e.g. jbb-harmful,jbb-benign):
    /// how well every carrier, read as a linear probe, separates them (AUC and the true-positive
    /// rate at a 0.2 false-positive rate), written to geometry.json under `heldout`.
    #[arg(long, value_delimiter = ',')]
    pub heldout: Option<Vec<String>>,
    /// Output folder: carriers.safetensors, carriers.json, geometry.json.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct SelectArgs {
    /// A folder written by `safegeo carriers`.
    pub dir: PathBuf,
    /// Model [default: the one recorded in DIR/carriers.json].
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Device.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Harmful and harmless validation sets.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "harmful-val,harmless-val"
    )]
    pub val: Vec<String>,
    /// Validation prompts per set (Arditi et al.: 32).
    #[arg(long, default_value_t = 32)]
    pub n_val: usize,
    /// Maximum KL on harmless prompts under ablation.
    #[arg(long, default_value_t = 0.1)]
    pub kl_max: f64,
    /// Candidates must lie below this fraction of the layers (Arditi: 0.8; default none).
    #[arg(long, default_value_t = 1.0)]
    pub layer_cutoff: f64,
    /// Harmful and harmless prompts (each) of the first stage over every candidate: bypass and
    /// KL in one small forward (0 = none: every candidate is screened in full).
    #[arg(long, default_value_t = 2)]
    pub prescreen: usize,
    /// A first-stage KL above this multiple of --kl-max puts a candidate behind all others when
    /// choosing who goes on (directions that lower refusal by wrecking the model).
    #[arg(long, default_value_t = 3.0)]
    pub prescreen_kl_slack: f64,
    /// Candidates that go on to the screen: the lowest first-stage bypass within the KL slack
    /// first.
    #[arg(long, default_value_t = 48)]
    pub screen_keep: usize,
    /// Prompts per set in the screening stage.
    #[arg(long, default_value_t = 8)]
    pub screen: usize,
    /// Candidates re-measured on all validation prompts.
    #[arg(long, default_value_t = 16)]
    pub finalists: usize,
    /// Also measure bypass for screened and final candidates that already failed the KL, induce
    /// or layer test (they cannot be selected, so by default their bypass is skipped: NaN).
    #[arg(long)]
    pub bypass_all: bool,
    /// Rows per forward pass: candidates whose prompts fit together are measured in one batch,
    /// each ablating or adding its own direction (more rows: bigger matmuls, more memory).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Random unit directions whose ablation KL is measured on the screening prompts, to show
    /// the scale of --kl-max for this model (0 = none).
    #[arg(long, default_value_t = 4)]
    pub random_directions: usize,
    /// Only these position indices are candidates (comma-separated; 0 = t_inst, the last =
    /// t_post; see carriers.json) [default: all].
    #[arg(long, value_delimiter = ',')]
    pub positions: Option<Vec<usize>>,
    /// Use the orthogonalized carriers (heretic: `r - (r.g) g`, `g` the harmless mean's
    /// direction; added at that scale for the induce test).
    #[arg(long)]
    pub orth: bool,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Sampling seed for the validation prompts.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print selection.json to stdout.
    #[arg(long)]
    pub json: bool,
}

/// `DIR/COMMAND.journal.jsonl` for a run identified by `fingerprint` (everything its
/// measurements depend on); says so when it resumes.
fn open_journal<V: serde::Serialize + serde::de::DeserializeOwned>(
    dir: &Path,
    command: &str,
    fingerprint: &serde_json::Value,
    done: &str,
) -> Result<Journal<V>> {
    let journal = Journal::open(&dir.join(format!("{command}.journal.jsonl")), fingerprint)?;
    if !journal.is_empty() {
        eprintln!("{command}: resuming, {} {done}", journal.len());
    }
    Ok(journal)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    safegeo_runtime::files::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())?;
    Ok(())
}

fn prompts(
    name: &str,
    n: usize,
    seed: u64,
    data_dir: Option<&Path>,
) -> Result<safegeo_data::Dataset> {
    Ok(load_dataset(
        name,
        &LoadSpec {
            data_dir,
            limit: Some(n),
            seed,
            ..Default::default()
        },
    )?)
}

pub fn carriers(a: CarriersArgs) -> Result<()> {
    if a.heldout.as_ref().is_some_and(|s| s.len() != 2) {
        bail!("--heldout takes two sets: harmful,harmless (e.g. jbb-harmful,jbb-benign)");
    }
    for name in [&a.harmful, &a.harmless] {
        if let Ok(dn) = safegeo_data::DatasetName::parse(name) {
            if !dn.is_train_split() {
                eprintln!(
                    "warning: `{name}` is not a *-train split; evaluate carriers on other data"
                );
            }
        }
    }
    let harmful = prompts(&a.harmful, a.n, a.seed, a.data_dir.as_deref())?;
    let harmless = prompts(&a.harmless, a.n, a.seed, a.data_dir.as_deref())?;
    let heldout = match &a.heldout {
        Some(sets) => Some((
            prompts(&sets[0], a.n, a.seed, a.data_dir.as_deref())?,
            prompts(&sets[1], a.n, a.seed, a.data_dir.as_deref())?,
        )),
        None => None,
    };
    let model = common::load(&a.model)?;
    let t0 = std::time::Instant::now();
    let text =
        |d: &safegeo_data::Dataset| d.items.iter().map(|i| i.prompt.clone()).collect::<Vec<_>>();
    let (mut h_ids, pos) = prompt_ids(&model, &text(&harmful))?;
    let (mut l_ids, _) = prompt_ids(&model, &text(&harmless))?;
    let refusal_ids = refusal_token_ids(&model.tok, REFUSAL_OPENINGS)?;
    let mut kept = (harmful.items.len(), harmless.items.len());
    if a.filter {
        let hs = refusal_scores(&model, &h_ids, &refusal_ids, a.batch_size, &mut NoHooks)?;
        let ls = refusal_scores(&model, &l_ids, &refusal_ids, a.batch_size, &mut NoHooks)?;
        h_ids = h_ids
            .into_iter()
            .zip(&hs)
            .filter(|(_, &s)| s > 0.0)
            .map(|(i, _)| i)
            .collect();
        l_ids = l_ids
            .into_iter()
            .zip(&ls)
            .filter(|(_, &s)| s < 0.0)
            .map(|(i, _)| i)
            .collect();
        kept = (h_ids.len(), l_ids.len());
        if h_ids.is_empty() || l_ids.is_empty() {
            bail!("--filter kept {} harmful and {} harmless prompts: the model refuses none of the harmful ones (or all harmless ones)\n  fix: run without --filter, or safety-train the model first", kept.0, kept.1);
        }
    }
    let total = h_ids.len() + l_ids.len();
    let mut bar = common::Progress::new("prompts captured");
    let mut done = 0;
    let hacts = capture(&model, &h_ids, pos.post_len, a.batch_size, &mut |n| {
        done += n;
        bar.set(done, total)
    })?;
    let lacts = capture(&model, &l_ids, pos.post_len, a.batch_size, &mut |n| {
        done += n;
        bar.set(done, total)
    })?;
    bar.finish();
    let c = difference_of_means(&hacts, &lacts, None, None);
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    store::save(&c, &a.out.join("carriers.safetensors"))?;
    if a.export_npy {
        let t = store::to_tensors(&c)?;
        store::write_npy(&t["refusal"], &a.out.join("refusal.npy"))?;
        store::write_npy(&t["harmfulness"], &a.out.join("harmfulness.npy"))?;
    }
    // Position names and the tokens at them (from the first harmful prompt).
    let first = &h_ids[0];
    let k = pos.post_len + 1;
    let positions: Vec<serde_json::Value> = (0..k)
        .map(|p| {
            let tok = first[first.len() - k + p];
            let name = if p == 0 { "t_inst".to_string() } else if p == k - 1 { format!("post_{p} (t_post)") } else { format!("post_{p}") };
            serde_json::json!({"index": p, "name": name, "token": model.tok.decode(&[tok], false).unwrap_or_default()})
        })
        .collect();
    let ds = |d: &safegeo_data::Dataset| serde_json::json!({"name": d.name, "sha256": d.sha256, "ids": d.items.iter().map(|i| &i.id).collect::<Vec<_>>()});
    write_json(
        &a.out.join("carriers.json"),
        &serde_json::json!({
            "safegeo_version": env!("CARGO_PKG_VERSION"),
            "model": model.source, "model_sha256": common::model_hash(&model.source)?,
            "n_layer": c.n_layer(), "n_pos": c.n_pos(), "d": model.cfg.hidden,
            "positions": positions,
            "tensors": {"refusal": "[L, P, d] mean harmful - mean harmless", "refusal_orth": "[L, P, d] unit, orthogonal to the harmless mean",
                        "harmfulness": "[L, d] refusal at t_inst", "mean_harmful": "[L, P, d]", "mean_harmless": "[L, P, d]"},
            "harmful": ds(&harmful), "harmless": ds(&harmless), "filter": a.filter,
            "kept": {"harmful": kept.0, "harmless": kept.1}, "seed": a.seed,
        }),
    )?;
    let t_post = c.n_pos() - 1;
    let heldout = match &heldout {
        Some((h, l)) => {
            let (h_ids, hp) = prompt_ids(&model, &text(h))?;
            let (l_ids, lp) = prompt_ids(&model, &text(l))?;
            if hp.post_len != pos.post_len || lp.post_len != pos.post_len {
                bail!("the held-out prompts' post-instruction positions differ from the carriers'");
            }
            let mut bar = common::Progress::new("held-out prompts captured");
            let mut done = 0;
            let total = h_ids.len() + l_ids.len();
            let mut tick = |n| {
                done += n;
                bar.set(done, total)
            };
            let ha = capture(&model, &h_ids, pos.post_len, a.batch_size, &mut tick)?;
            let la = capture(&model, &l_ids, pos.post_len, a.batch_size, &mut tick)?;
            bar.finish();
            let sep = separation(&c, &ha, &la);
            let probe = probe_separation(&hacts, &lacts, &ha, &la);
            let at = |sep: &[Separation], p: usize, f: &dyn Fn(&Separation) -> f64| -> Vec<f64> {
                sep.iter().filter(|s| s.pos == p).map(f).collect()
            };
            let best = |sep: &[Separation]| {
                sep.iter()
                    .max_by(|x, y| {
                        (x.tpr_at_fpr_0_2, x.auc)
                            .partial_cmp(&(y.tpr_at_fpr_0_2, y.auc))
                            .unwrap_or(std::cmp::Ordering::Equal)
                    })
                    .cloned()
            };
            let (best_carrier, best_probe) = (best(&sep), best(&probe));
            for (what, b) in [("carrier", &best_carrier), ("logistic probe", &best_probe)] {
                if let Some(b) = b {
                    eprintln!(
                        "held-out {} vs {}: best {what} layer {} position {}: AUC {:.3}, TPR {:.2} at FPR 0.2",
                        h.name, l.name, b.layer, b.pos, b.auc, b.tpr_at_fpr_0_2
                    );
                }
            }
            serde_json::json!({
                "harmful": ds(h), "harmless": ds(l),
                "auc_t_inst": at(&sep, 0, &|s| s.auc), "auc_t_post": at(&sep, t_post, &|s| s.auc),
                "tpr_at_fpr_0_2_t_inst": at(&sep, 0, &|s| s.tpr_at_fpr_0_2),
                "tpr_at_fpr_0_2_t_post": at(&sep, t_post, &|s| s.tpr_at_fpr_0_2),
                "best": best_carrier, "all": sep,
                "probe": {
                    "auc_t_post": at(&probe, t_post, &|s| s.auc),
                    "tpr_at_fpr_0_2_t_post": at(&probe, t_post, &|s| s.tpr_at_fpr_0_2),
                    "best": best_probe, "all": probe, "l2": safegeo_geometry::separation::PROBE_L2,
                },
                "note": "each carrier read as a linear probe: projection of held-out prompts on the unit carrier; best = highest TPR at FPR 0.2, then AUC. `probe`: a logistic regression fitted at each layer and position on the same capture (standardized activations, L2 `l2`), read the same way",
            })
        }
        None => serde_json::Value::Null,
    };
    let erank: Vec<_> = (0..c.n_layer())
        .map(|l| effective_rank_at(&hacts, &lacts, l, a.bootstrap, a.seed))
        .collect();
    let norms: Vec<Vec<f64>> = c
        .refusal
        .iter()
        .map(|per| per.iter().map(|r| linalg::norm(r)).collect())
        .collect();
    // Belief scores of Zhao et al. for every captured prompt, at t_inst and t_post.
    let beliefs = |p: usize| {
        let of = |acts: &safegeo_geometry::carriers::Activations| -> Vec<f64> {
            acts.acts.iter().map(|x| belief_score(x, &c, p)).collect()
        };
        let (h, l) = (of(&hacts), of(&lacts));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        serde_json::json!({"harmful_mean": mean(&h), "harmless_mean": mean(&l), "harmful": h, "harmless": l})
    };
    write_json(
        &a.out.join("geometry.json"),
        &serde_json::json!({
            "effective_rank": erank,
            "coupling_abs_cos_t_post": coupling_curve(&c, t_post),
            "belief_t_inst": beliefs(0),
            "belief_t_post": beliefs(t_post),
            "refusal_norms": norms,
            "heldout": heldout,
            "note": "coupling = |cos(harmfulness carrier at t_inst, refusal carrier at t_post)| per layer; belief = Zhao et al.'s mean over layers of cos(h_l, mean harmful_l) - cos(h_l, mean harmless_l) for each capture prompt (harmful, harmless) at that position; `safegeo select` adds `selected` (layer, coupling and effective rank there)",
        }),
    )?;
    eprintln!(
        "carriers: {} layers x {} positions from {} harmful / {} harmless prompts in {:.1}s -> {}",
        c.n_layer(),
        c.n_pos(),
        kept.0,
        kept.1,
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

/// The model a carriers folder was made with (or `model` when given), loaded on `device`.
fn carriers_model(dir: &Path, model: Option<&str>, device: &str) -> Result<safegeo_runtime::Model> {
    let text = std::fs::read_to_string(dir.join("carriers.json")).with_context(|| {
        format!(
            "{}: no carriers.json\n  fix: run `safegeo carriers --out {}` first",
            dir.display(),
            dir.display()
        )
    })?;
    let meta: serde_json::Value = serde_json::from_str(&text)?;
    let spec = model
        .map(String::from)
        .or_else(|| meta["model"].as_str().map(String::from));
    common::load(&ModelArgs {
        model: spec,
        device: device.into(),
        quantized: false,
    })
}

/// `--carrier LAYER:POS` in `dir`, or the carrier selected there.
fn chosen_carrier(dir: &Path, carrier: Option<&str>) -> Result<(Vec<f64>, usize, usize, String)> {
    match carrier {
        Some(lp) => crate::cmd::eval::carrier(&format!("{}:{lp}", dir.display())),
        None => crate::cmd::eval::carrier(&dir.display().to_string()),
    }
}

pub fn run_select(a: SelectArgs) -> Result<()> {
    let c = store::load(&a.dir.join("carriers.safetensors"))?;
    if a.val.len() != 2 {
        bail!("--val takes two sets: harmful,harmless");
    }
    let model = carriers_model(&a.dir, a.model.as_deref(), &a.device)?;
    if model.cfg.n_layer != c.n_layer() || model.cfg.hidden != c.refusal[0][0].len() {
        bail!(
            "the carriers in {} do not fit this model's shape",
            a.dir.display()
        );
    }
    let hv = prompts(&a.val[0], a.n_val, a.seed, a.data_dir.as_deref())?;
    let lv = prompts(&a.val[1], a.n_val, a.seed, a.data_dir.as_deref())?;
    let text =
        |d: &safegeo_data::Dataset| d.items.iter().map(|i| i.prompt.clone()).collect::<Vec<_>>();
    let (h_ids, _) = prompt_ids(&model, &text(&hv))?;
    let (l_ids, _) = prompt_ids(&model, &text(&lv))?;
    let refusal_ids = refusal_token_ids(&model.tok, REFUSAL_OPENINGS)?;
    let cfg = SelectConfig {
        kl_max: a.kl_max,
        layer_cutoff: a.layer_cutoff,
        prescreen_prompts: a.prescreen,
        screen_keep: a.screen_keep,
        screen_prompts: a.screen,
        finalists: a.finalists,
        batch: a.batch_size,
        bypass_all: a.bypass_all,
        positions: a.positions.clone(),
        prescreen_kl_slack: a.prescreen_kl_slack,
        random_directions: a.random_directions,
        seed: a.seed,
    };
    // Ablation normalizes either; addition needs the orthogonalized carrier at its own scale.
    let orth_at_scale;
    let carriers = if a.orth {
        orth_at_scale = c.refusal_orth_at_scale();
        &orth_at_scale
    } else {
        &c.refusal
    };
    // Every measurement lands in a journal, so a killed selection resumes where it stopped.
    let fingerprint = serde_json::json!({
        "carriers": safegeo_runtime::fetch::sha256_file(&a.dir.join("carriers.safetensors"))?,
        "model": common::model_hash(&model.source)?, "orth": a.orth, "config": &cfg,
        "harmful": &h_ids, "harmless": &l_ids, "refusal_ids": &refusal_ids,
    });
    let mut journal = open_journal(&a.dir, "select", &fingerprint, "measurements already made")?;
    let t0 = std::time::Instant::now();
    let mut bar = common::Progress::new("candidate measurements");
    let (cands, best, base) = select(
        &model,
        carriers,
        &h_ids,
        &l_ids,
        &refusal_ids,
        &cfg,
        Some(&mut journal),
        &mut |d, t| bar.set(d, t),
    )?;
    bar.finish();
    let mut csv = String::from("layer,pos,bypass,induce,kl,stage,admissible,failed\n");
    for k in &cands {
        csv.push_str(&format!(
            "{},{},{:.6},{:.6},{:.6},{},{},{}\n",
            k.layer,
            k.pos,
            k.bypass,
            k.induce,
            k.kl,
            k.stage,
            k.admissible,
            k.failed.join(";")
        ));
    }
    safegeo_runtime::files::write_atomic(&a.dir.join("selection.csv"), csv.as_bytes())?;
    let full: Vec<_> = cands.iter().filter(|k| k.stage == "full").collect();
    let count = |t: &str| full.iter().filter(|k| k.failed.contains(&t)).count();
    let lowest_kl = full.iter().map(|k| k.kl).fold(f64::INFINITY, f64::min);
    let rk = &base.random_direction_kl;
    let random_kl = if rk.is_empty() {
        "not measured".to_string()
    } else {
        format!(
            "mean KL {:.4}, max {:.4} over {}",
            rk.iter().sum::<f64>() / rk.len() as f64,
            rk.iter().fold(0.0f64, |m, &x| m.max(x)),
            rk.len()
        )
    };
    let verdict = match best {
        Some(i) => {
            serde_json::json!({"selected": cands[i], "direction": if a.orth { "refusal_orth" } else { "refusal" }})
        }
        None => serde_json::json!({
            "selected": null,
            "reason": format!(
                "no admissible carrier among {} fully measured candidates: induce <= 0 for {}, KL > {} for {} (lowest {:.3}; ablating a random direction: {}), NaN for {}; {} candidates at or above the layer cut-off left out (baseline refusal score on harmful prompts {:.3}; a model that does not refuse has no refusal carrier to find)",
                full.len(), count("induce"), a.kl_max, count("kl"), lowest_kl, random_kl, count("nan"), cands.iter().filter(|k| k.stage == "cutoff").count(), base.harmful_score
            ),
        }),
    };
    let out = serde_json::json!({
        "config": cfg, "seconds": t0.elapsed().as_secs_f64(),
        "baseline": {"harmful_refusal_score": base.harmful_score, "harmless_refusal_score": base.harmless_score,
            "random_direction_kl": &base.random_direction_kl},
        "validation": {"harmful": {"name": hv.name, "sha256": hv.sha256}, "harmless": {"name": lv.name, "sha256": lv.sha256}},
        "refusal_token_ids": refusal_ids, "result": verdict,
    });
    write_json(&a.dir.join("selection.json"), &out)?;
    // geometry.json gains the numbers at the selected layer (or loses stale ones).
    let geometry_path = a.dir.join("geometry.json");
    if let Ok(text) = std::fs::read_to_string(&geometry_path) {
        let mut geo: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", geometry_path.display()))?;
        geo["selected"] = match best {
            Some(i) => {
                let (l, p) = (cands[i].layer, cands[i].pos);
                serde_json::json!({
                    "layer": l, "pos": p, "direction": if a.orth { "refusal_orth" } else { "refusal" },
                    "coupling_abs_cos": linalg::cosine(c.harmfulness(l), &carriers[l][p]).abs(),
                    "effective_rank": geo["effective_rank"].get(l).cloned().unwrap_or_default(),
                })
            }
            None => serde_json::Value::Null,
        };
        write_json(&geometry_path, &geo)?;
    }
    if a.json {
        common::print_json(&out)?;
    } else if let Some(i) = best {
        let k = &cands[i];
        println!("selected carrier: layer {} position {} (bypass {:.3}, induce {:.3}, KL {:.4}); baseline harmful score {:.3}", k.layer, k.pos, k.bypass, k.induce, k.kl, base.harmful_score);
    } else {
        println!("{}", out["result"]["reason"].as_str().unwrap_or_default());
    }
    eprintln!(
        "select: {} candidates in {:.1}s -> {}",
        cands.len(),
        t0.elapsed().as_secs_f64(),
        a.dir.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct DriftArgs {
    /// Carriers folder of the first anchor.
    pub a: PathBuf,
    /// Carriers folder of the second anchor.
    pub b: PathBuf,
    /// Dimension of the compared subspaces (top right singular vectors over positions).
    #[arg(long, default_value_t = 3)]
    pub k: usize,
    /// Position index for the per-layer carrier cosine [default: the last, t_post].
    #[arg(long)]
    pub pos: Option<usize>,
    /// Write the result here as JSON as well.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn selected(dir: &Path) -> Option<(usize, usize)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("selection.json")).ok()?).ok()?;
    let s = &v["result"]["selected"];
    Some((s["layer"].as_u64()? as usize, s["pos"].as_u64()? as usize))
}

pub fn drift(a: DriftArgs) -> Result<()> {
    let ca = store::load(&a.a.join("carriers.safetensors"))?;
    let cb = store::load(&a.b.join("carriers.safetensors"))?;
    if ca.n_layer() != cb.n_layer()
        || ca.n_pos() != cb.n_pos()
        || ca.refusal[0][0].len() != cb.refusal[0][0].len()
    {
        bail!("the two anchors' carriers have different shapes (layers, positions or width): compare checkpoints of one model");
    }
    let pos = a.pos.unwrap_or(ca.n_pos() - 1);
    if pos >= ca.n_pos() {
        bail!("--pos {pos} is out of range (0..{})", ca.n_pos());
    }
    let d = safegeo_geometry::measures::drift(&ca, &cb, pos, a.k.max(1));
    let (sa, sb) = (selected(&a.a), selected(&a.b));
    let selected_cos = match (sa, sb) {
        (Some((la, pa)), Some((lb, pb))) => Some(serde_json::json!({
            "a": {"layer": la, "pos": pa}, "b": {"layer": lb, "pos": pb},
            "layer_shift": lb as i64 - la as i64,
            "cosine_at_a_layer": linalg::cosine(&ca.refusal[la][pa], &cb.refusal[la][pa]),
            "cosine_of_selected": linalg::cosine(&ca.refusal[la][pa], &cb.refusal[lb][pb]),
        })),
        _ => None,
    };
    let out = serde_json::json!({
        "a": a.a, "b": a.b, "k": a.k, "pos": pos,
        "principal_angles_deg": d.principal_angles_deg, "carrier_cosine_per_layer": d.cosine_per_layer,
        "selected": selected_cos,
        "note": if selected_cos.is_none() { "run `safegeo select` on both anchors to compare selected carriers" } else { "" },
    });
    if let Some(p) = &a.out {
        write_json(p, &out)?;
    }
    if a.json {
        return common::print_json(&out);
    }
    println!(
        "{:>5}  {:>10}  principal angles (deg, top-{})",
        "layer", "cos(r_a,r_b)", a.k
    );
    for (l, (c, ang)) in d
        .cosine_per_layer
        .iter()
        .zip(&d.principal_angles_deg)
        .enumerate()
    {
        let a: Vec<String> = ang.iter().map(|x| format!("{x:.1}")).collect();
        println!("{l:>5}  {c:>10.3}  {}", a.join(" "));
    }
    if let Some(s) = &out["selected"].as_object() {
        println!("selected carriers: {}", serde_json::to_string(s)?);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct AbliterateArgs {
    /// A folder written by `safegeo carriers` (and `safegeo select`).
    pub dir: PathBuf,
    /// The carrier as LAYER:POS, or LAYER:POS:orth for an orthogonalized one [default: the one
    /// selected in DIR/selection.json, of the family it was selected from].
    #[arg(long)]
    pub carrier: Option<String>,
    /// Model [default: the one recorded in DIR/carriers.json].
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Output Hugging Face folder (config, safetensors, tokenizer, chat template).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn abliterate(a: AbliterateArgs) -> Result<()> {
    let (r, layer, pos, name) = chosen_carrier(&a.dir, a.carrier.as_deref())?;
    let mut model = carriers_model(&a.dir, a.model.as_deref(), "cpu")?;
    safegeo_geometry::abliterate::orthogonalize_weights(&mut model, &r)?;
    safegeo_runtime::export_hf(&mut model, &a.out)?;
    write_json(
        &a.out.join("safegeo_abliteration.json"),
        &serde_json::json!({"source_model": model.source, "carrier": name, "layer": layer, "pos": pos,
            "edit": "W <- W - r r^T W on the embedding, attention output and MLP down projections; LM head untied"}),
    )?;
    println!(
        "abliterated model (carrier layer {layer} position {pos}) -> {}",
        a.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct SweepArgs {
    /// A folder written by `safegeo carriers` (and `safegeo select`).
    pub dir: PathBuf,
    /// The carrier as LAYER:POS, or LAYER:POS:orth for an orthogonalized one [default: the one
    /// selected in DIR/selection.json, of the family it was selected from].
    #[arg(long)]
    pub carrier: Option<String>,
    /// Coefficients in units of the carrier (controls: of the refusal carrier's norm).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-2,-1,-0.5,0,0.5,1,2"
    )]
    pub coefs: Vec<f64>,
    /// Matched random control directions (at least 8 recommended).
    #[arg(long, default_value_t = 8)]
    pub controls: usize,
    /// Harmful and harmless evaluation sets.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "harmful-val,harmless-val"
    )]
    pub val: Vec<String>,
    /// Prompts per set.
    #[arg(long, default_value_t = 32)]
    pub n: usize,
    /// Tokens of the base model's own continuation used for the utility cross-entropy.
    #[arg(long, default_value_t = 16)]
    pub continuation_tokens: usize,
    /// Model [default: the one recorded in DIR/carriers.json].
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
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

pub fn run_sweep(a: SweepArgs) -> Result<()> {
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
    let model = carriers_model(&a.dir, a.model.as_deref(), "cpu")?;
    let hv = prompts(&a.val[0], a.n, a.seed, a.data_dir.as_deref())?;
    let lv = prompts(&a.val[1], a.n, a.seed, a.data_dir.as_deref())?;
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
    let mut csv = String::from("direction,coef,metric,value\n");
    for cnd in &conds {
        let coef = cnd.coef.map_or("ablate".to_string(), |c| c.to_string());
        let m = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let rate =
            |v: &[f64]| v.iter().filter(|&&x| x > 0.0).count() as f64 / v.len().max(1) as f64;
        for (metric, value) in [
            ("harmful_refusal_rate", rate(&cnd.harmful_scores)),
            ("harmful_refusal_score", m(&cnd.harmful_scores)),
            ("harmless_refusal_rate", rate(&cnd.harmless_scores)),
            ("harmless_kl", m(&cnd.harmless_kl)),
            ("harmless_cross_entropy", m(&cnd.harmless_ce)),
        ] {
            csv.push_str(&format!("{},{coef},{metric},{value:.6}\n", cnd.direction));
        }
    }
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
    eprintln!(
        "sweep: {} conditions in {:.1}s -> {}",
        conds.len(),
        t0.elapsed().as_secs_f64(),
        a.dir.join("sweep.json").display()
    );
    Ok(())
}
