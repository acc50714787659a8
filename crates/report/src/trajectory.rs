//! The trajectory table (study 1 of docs/protocol.md §1): one row per anchor with behaviour (fixed-source and
//! adaptive ASR, StrongREJECT, XSTest over-refusal, benign refusal, utility) and geometry
//! (carrier layer and admissibility, effective rank, H/R coupling, drift to the previous anchor
//! and to the base), read from the per-anchor result folders that `safegeo trajectory` writes:
//!
//! ```text
//! ANCHOR_DIR/anchor.json            {recipe, name, step, model}
//! ANCHOR_DIR/eval/summary.json      `safegeo eval` (suites + fixed-source test cases)
//! ANCHOR_DIR/adaptive/summary.json  `safegeo eval --adaptive` (optional)
//! ANCHOR_DIR/geometry/              `safegeo carriers` + `safegeo select` (+ optional sweep.json)
//! ```
use crate::{Error, Result};
use safegeo_geometry::carriers::Carriers;
use safegeo_geometry::{linalg, store};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What `safegeo trajectory` records about an anchor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnchorInfo {
    /// Training run (the checkpoint folder's parent name), or `base`.
    pub recipe: String,
    /// Anchor name (`ckpt-000010`, `base`).
    pub name: String,
    /// Training step of the anchor (0 for the base model).
    pub step: u64,
    /// The model folder or file evaluated.
    pub model: String,
}

/// A rate or mean with its 95% interval, as read from a summary.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Est {
    /// Point estimate.
    pub value: f64,
    /// Lower end.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// Sample size.
    pub n: usize,
}

/// One anchor's row of the trajectory table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The anchor.
    pub anchor: AnchorInfo,
    /// ASR of the fixed-source test cases (made once, replayed unchanged).
    pub asr_fixed: Option<Est>,
    /// ASR of the attack re-run against this anchor.
    pub asr_adaptive: Option<Est>,
    /// StrongREJECT score (LLM judge only).
    pub strongreject: Option<Est>,
    /// Refusal rate on JBB harmful prompts.
    pub harmful_refusal: Option<Est>,
    /// Refusal rate on JBB benign prompts (over-refusal).
    pub benign_refusal: Option<Est>,
    /// XSTest safe prompts with any refusal (over-refusal).
    pub xstest_over_refusal: Option<Est>,
    /// Cross-entropy on reference completions of harmless prompts (nats/token; utility).
    pub utility_ce: Option<Est>,
    /// Judges behind the behaviour numbers.
    pub judges: Vec<String>,
    /// Layer of the selected carrier, or of the lowest-bypass candidate when none is admissible.
    pub carrier_layer: Option<usize>,
    /// Its position index.
    pub carrier_pos: Option<usize>,
    /// Whether that carrier passed every test of the absolute rule.
    pub admissible: bool,
    /// The rule that selected the carrier: `absolute`, `floor-relative` (KL within the
    /// random-direction floor), `reference` (no rule selected one here; the run's reference
    /// carrier), or `stand-in` (no reference either; the lowest-bypass candidate stands in).
    pub carrier_rule: Option<String>,
    /// The anchor's folder.
    #[serde(skip)]
    pub dir: PathBuf,
    /// Why nothing was admissible (empty when a carrier was selected).
    pub selection_note: String,
    /// Mean refusal score on harmful validation prompts without edits.
    pub baseline_harmful_score: Option<f64>,
    /// Effective rank of the refusal carriers across positions at the carrier layer.
    pub effective_rank: Option<f64>,
    /// Its basic bootstrap 95% interval (lo, hi).
    pub effective_rank_spread: Option<(f64, f64)>,
    /// |cos(harmfulness carrier, refusal carrier)| at the carrier layer and position.
    pub coupling: Option<f64>,
    /// Its basic bootstrap 95% interval over prompts (lo, hi), when geometry.json has one.
    #[serde(default)]
    pub coupling_interval: Option<(f64, f64)>,
    /// Basic bootstrap 95% interval of `drift_prev_deg` (both anchors' resamples paired).
    #[serde(default)]
    pub drift_prev_interval: Option<(f64, f64)>,
    /// Basic bootstrap 95% interval of `drift_base_deg`.
    #[serde(default)]
    pub drift_base_interval: Option<(f64, f64)>,
    /// Mean principal angle (degrees) between this anchor's and the previous anchor's top-3
    /// carrier subspaces at the carrier layer.
    pub drift_prev_deg: Option<f64>,
    /// The same against the base model.
    pub drift_base_deg: Option<f64>,
    /// Cosine of this anchor's carrier with the base model's at the same layer and position.
    pub carrier_cos_base: Option<f64>,
    /// Per layer: lowest screened refusal score on harmful prompts under ablation of that
    /// layer's candidates (the refusal-score-by-layer curve).
    pub bypass_by_layer: Vec<f64>,
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Judges preferred for a metric, best first (LLM judges before string matchers).
const JUDGE_PREFERENCE: &[&str] = &[
    "harmbench",
    "strongreject",
    "xstest",
    "substring",
    "xstest-prefix",
];

/// On XSTest, its own rubric and its own refusal-opening matcher before the generic substrings.
const XSTEST_JUDGE_PREFERENCE: &[&str] = &["xstest", "xstest-prefix", "substring"];

fn pick(summary: &serde_json::Value, suite: &str, metric: &str) -> Option<(Est, String)> {
    let preference = if suite == "xstest" {
        XSTEST_JUDGE_PREFERENCE
    } else {
        JUDGE_PREFERENCE
    };
    let rows = summary["rows"].as_array()?;
    let matching: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["suite"] == suite && r["metric"] == metric)
        .collect();
    let rank = |r: &&serde_json::Value| {
        let j = r["judge"].as_str().unwrap_or("");
        preference
            .iter()
            .position(|p| *p == j)
            .unwrap_or(preference.len())
    };
    let best = matching.into_iter().min_by_key(rank)?;
    Some((est(best)?, best["judge"].as_str().unwrap_or("").to_string()))
}

/// The estimate of a summary row (`safegeo eval` flattens it into the row).
fn est(row: &serde_json::Value) -> Option<Est> {
    let e = row.get("estimate").unwrap_or(row);
    Some(Est {
        value: e["value"].as_f64()?,
        lo: e["lo"].as_f64()?,
        hi: e["hi"].as_f64()?,
        n: e["n"].as_u64()? as usize,
    })
}

/// One row of `selection.csv`.
#[derive(Debug, Clone)]
struct Cand {
    layer: usize,
    pos: usize,
    bypass: f64,
    stage: String,
}

fn read_selection_csv(path: &Path) -> Vec<Cand> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some(Cand {
                layer: f.first()?.parse().ok()?,
                pos: f.get(1)?.parse().ok()?,
                bypass: f.get(2)?.parse().ok()?,
                stage: f.get(5)?.to_string(),
            })
        })
        .collect()
}

fn load_carriers(dir: &Path) -> Option<Carriers> {
    store::load(&dir.join("geometry/carriers.safetensors")).ok()
}

/// Behaviour and single-anchor geometry of one anchor folder (drift is filled by [`collect`]).
pub fn read_anchor(dir: &Path) -> Result<Row> {
    read_anchor_with(dir, load_carriers(dir).as_ref())
}

/// [`read_anchor`] with the anchor's carriers already loaded.
fn read_anchor_with(dir: &Path, carriers: Option<&Carriers>) -> Result<Row> {
    let info: AnchorInfo = serde_json::from_value(
        read_json(&dir.join("anchor.json"))
            .ok_or_else(|| Error::Missing(dir.join("anchor.json")))?,
    )
    .map_err(|e| Error::Corrupt(dir.join("anchor.json"), e.to_string()))?;
    let eval = read_json(&dir.join("eval/summary.json")).unwrap_or_default();
    let adaptive = read_json(&dir.join("adaptive/summary.json")).unwrap_or_default();
    let mut judges = Vec::new();
    let mut get = |s: &serde_json::Value, suite: &str, metric: &str| {
        pick(s, suite, metric).map(|(e, j)| {
            if !judges.contains(&j) {
                judges.push(j);
            }
            e
        })
    };
    let asr_fixed = get(&eval, "test-cases", "asr");
    let asr_adaptive = get(&adaptive, "test-cases", "asr");
    let strongreject = get(&eval, "strongreject-small", "strongreject_score");
    let harmful_refusal = get(&eval, "jbb-harmful", "refusal_rate");
    let benign_refusal = get(&eval, "jbb-benign", "refusal_rate");
    let xstest_over_refusal = get(&eval, "xstest", "xstest_safe_any_refusal");
    let utility_ce = eval["rows"].as_array().and_then(|rows| {
        rows.iter()
            .find(|r| r["metric"] == "utility_cross_entropy")
            .and_then(est)
    });
    let geo = dir.join("geometry");
    let sel = read_json(&geo.join("selection.json")).unwrap_or_default();
    let cands = read_selection_csv(&geo.join("selection.csv"));
    let selected = &sel["result"]["selected"];
    let rule = sel["result"]["rule"].as_str();
    let (carrier, admissible) = match (selected["layer"].as_u64(), selected["pos"].as_u64()) {
        // Selections that name no rule predate the floor-relative rule: theirs is absolute.
        (Some(l), Some(p)) => (
            Some((l as usize, p as usize)),
            rule.is_none_or(|r| r == "absolute"),
        ),
        _ => {
            // The lowest-bypass fully measured candidate stands in, marked not admissible.
            let best = cands
                .iter()
                .filter(|c| c.stage == "full" && c.bypass.is_finite())
                .min_by(|a, b| a.bypass.total_cmp(&b.bypass));
            (best.map(|c| (c.layer, c.pos)), false)
        }
    };
    let n_layer = cands.iter().map(|c| c.layer + 1).max().unwrap_or(0);
    let bypass_by_layer: Vec<f64> = (0..n_layer)
        .map(|l| {
            cands
                .iter()
                .filter(|c| c.layer == l && c.bypass.is_finite())
                .map(|c| c.bypass)
                .fold(f64::NAN, f64::min)
        })
        .collect();
    let mut row = Row {
        dir: dir.to_path_buf(),
        anchor: info,
        asr_fixed,
        asr_adaptive,
        strongreject,
        harmful_refusal,
        benign_refusal,
        xstest_over_refusal,
        utility_ce,
        judges,
        carrier_layer: carrier.map(|c| c.0),
        carrier_pos: carrier.map(|c| c.1),
        admissible,
        carrier_rule: carrier.map(|_| match (selected.is_object(), rule) {
            (true, Some(r)) => r.to_string(),
            (true, None) => "absolute".to_string(),
            (false, _) => "stand-in".to_string(),
        }),
        selection_note: sel["result"]["reason"].as_str().unwrap_or("").to_string(),
        baseline_harmful_score: sel["baseline"]["harmful_refusal_score"].as_f64(),
        effective_rank: None,
        effective_rank_spread: None,
        coupling: None,
        coupling_interval: None,
        drift_prev_interval: None,
        drift_base_interval: None,
        drift_prev_deg: None,
        drift_base_deg: None,
        carrier_cos_base: None,
        bypass_by_layer,
    };
    if let Some((l, p)) = carrier {
        geometry_at(&mut row, dir, carriers, l, p);
    }
    Ok(row)
}

/// Fill `row`'s single-anchor geometry columns at the carrier `(l, p)` of the anchor in `dir`:
/// the effective rank with its interval (from geometry.json) and the coupling.
fn geometry_at(row: &mut Row, dir: &Path, carriers: Option<&Carriers>, l: usize, p: usize) {
    let geometry = read_json(&dir.join("geometry/geometry.json")).unwrap_or_default();
    let erank = &geometry["effective_rank"][l]["positions"]["erank"];
    row.carrier_layer = Some(l);
    row.carrier_pos = Some(p);
    row.effective_rank = erank["value"].as_f64();
    row.effective_rank_spread = erank["lo"].as_f64().zip(erank["hi"].as_f64());
    row.coupling = match carriers {
        Some(c) if l < c.n_layer() && p < c.n_pos() => {
            Some(linalg::cosine(c.harmfulness(l), &c.refusal[l][p]).abs())
        }
        _ => None,
    };
    let ci = &geometry["coupling_abs_cos"][l][p];
    row.coupling_interval = ci["lo"].as_f64().zip(ci["hi"].as_f64());
}

/// Subspace dimension compared by drift.
pub const DRIFT_K: usize = 3;

/// Mean principal angle (degrees) between the top-[`DRIFT_K`] carrier subspaces of two anchors
/// at `layer`, and the cosine of their carriers at `(layer, pos)`.
fn drift_at(a: &Carriers, b: &Carriers, layer: usize, pos: usize) -> Option<(f64, f64)> {
    if a.n_layer() != b.n_layer() || a.n_pos() != b.n_pos() || layer >= a.n_layer() {
        return None;
    }
    Some(drift_of(&a.refusal, &b.refusal, layer, pos))
}

/// Mean principal angle (degrees) between two refusal-carrier subspaces at `layer` (top
/// [`DRIFT_K`] right singular vectors over positions), and the cosine at `pos`.
fn drift_of(a: &[Vec<Vec<f64>>], b: &[Vec<Vec<f64>>], layer: usize, pos: usize) -> (f64, f64) {
    use linalg::top_right_singular_vectors as top;
    let angles = linalg::principal_angles(&top(&a[layer], DRIFT_K), &top(&b[layer], DRIFT_K));
    let mean = angles.iter().map(|x| x.to_degrees()).sum::<f64>() / angles.len().max(1) as f64;
    let pos = pos.min(a[layer].len() - 1);
    (mean, linalg::cosine(&a[layer][pos], &b[layer][pos]))
}

/// Refusal carriers of bootstrap resamples: resample x layer x position x width.
type Resamples = Vec<Vec<Vec<Vec<f64>>>>;

/// The drift angle's basic bootstrap 95% interval: the two anchors' resamples paired by index
/// (both drew the same prompt indices, so the pairing is the paired bootstrap of the drift).
fn drift_interval(
    a: Option<&Resamples>,
    b: Option<&Resamples>,
    value: f64,
    layer: usize,
    pos: usize,
) -> Option<(f64, f64)> {
    let (a, b) = (a?, b?);
    let fits = |x: &Vec<Vec<Vec<f64>>>| layer < x.len() && pos < x[layer].len();
    let mut v: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| fits(x) && fits(y) && x.len() == y.len())
        .map(|(x, y)| drift_of(x, y, layer, pos).0)
        .collect();
    if v.is_empty() {
        return None;
    }
    let i = safegeo_geometry::measures::Interval::of(value, &mut v);
    Some((i.lo, i.hi))
}

/// Rows of every anchor folder, sorted by (recipe, step) with the base first, with drift to the
/// previous anchor of the same recipe (the base precedes every recipe's first anchor) and to
/// the base.
pub fn collect(anchor_dirs: &[PathBuf], reference: Option<(usize, usize)>) -> Result<Vec<Row>> {
    // Each anchor's carriers are read once and serve its coupling and every drift it enters.
    let mut rows: Vec<(Option<Carriers>, Row)> = anchor_dirs
        .iter()
        .map(|d| {
            let c = load_carriers(d);
            let row = read_anchor_with(d, c.as_ref())?;
            Ok((c, row))
        })
        .collect::<Result<_>>()?;
    // Rows compare like with like: an anchor where no rule selects a carrier is measured at one
    // reference carrier for its whole run (given, or the one selected at the run's latest anchor
    // that has one), not at its own lowest-bypass stand-in.
    let selected = |r: &Row| {
        matches!(
            r.carrier_rule.as_deref(),
            Some("absolute" | "floor-relative")
        )
        .then(|| r.carrier_layer.zip(r.carrier_pos))
        .flatten()
    };
    let latest = |recipe: &str, pick: &dyn Fn(&Row) -> Option<(usize, usize)>| {
        rows.iter()
            .filter(|(_, r)| r.anchor.recipe == recipe)
            .filter_map(|(_, r)| pick(r).map(|c| (r.anchor.step, c)))
            .max_by_key(|(step, _)| *step)
            .map(|(_, c)| c)
    };
    // A run with no selected carrier at all is measured at its latest anchor's stand-in.
    let run_reference = |recipe: &str| {
        reference
            .or_else(|| latest(recipe, &selected))
            .or_else(|| latest(recipe, &|r: &Row| r.carrier_layer.zip(r.carrier_pos)))
    };
    let references: Vec<Option<(usize, usize)>> = rows
        .iter()
        .map(|(_, r)| {
            if selected(r).is_some() {
                None
            } else {
                run_reference(&r.anchor.recipe)
            }
        })
        .collect();
    for ((c, row), reference) in rows.iter_mut().zip(references) {
        if let Some((l, p)) = reference {
            if row.carrier_layer.zip(row.carrier_pos) == Some((l, p)) {
                continue;
            }
            let dir = row.dir.clone();
            geometry_at(row, &dir, c.as_ref(), l, p);
            row.carrier_rule = Some("reference".into());
        }
    }
    rows.sort_by(|a, b| {
        let key = |r: &Row| {
            (
                r.anchor.recipe != "base",
                r.anchor.recipe.clone(),
                r.anchor.step,
            )
        };
        key(&a.1).cmp(&key(&b.1))
    });
    let base = rows.iter().position(|(_, r)| r.anchor.recipe == "base");
    let boots: Vec<Option<Resamples>> = rows
        .iter()
        .map(|(_, r)| store::load_bootstrap(&r.dir.join("geometry/bootstrap.safetensors")))
        .collect();
    let mut out: Vec<Row> = Vec::new();
    for (i, (carriers, row)) in rows.iter().enumerate() {
        let mut row = row.clone();
        if let (Some(l), Some(p), Some(c)) = (row.carrier_layer, row.carrier_pos, carriers) {
            let prev = match i.checked_sub(1) {
                Some(j) if rows[j].1.anchor.recipe == row.anchor.recipe => Some(j),
                _ if row.anchor.recipe != "base" => base,
                _ => None,
            };
            let against = |j: Option<usize>| {
                j.and_then(|j| rows[j].0.as_ref().map(|other| (j, other)))
                    .and_then(|(j, other)| drift_at(other, c, l, p).map(|d| (j, d)))
            };
            let interval = |j: usize, angle: f64| {
                drift_interval(boots[j].as_ref(), boots[i].as_ref(), angle, l, p)
            };
            if let Some((j, (angle, _))) = against(prev) {
                row.drift_prev_deg = Some(angle);
                row.drift_prev_interval = interval(j, angle);
            }
            if let Some((j, (angle, cos))) = against(base.filter(|&b| b != i)) {
                row.drift_base_deg = Some(angle);
                row.drift_base_interval = interval(j, angle);
                row.carrier_cos_base = Some(cos);
            }
        }
        out.push(row);
    }
    Ok(out)
}

fn cell(e: &Option<Est>) -> String {
    e.map_or("-".into(), |e| format!("{:.2}", e.value))
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The table's columns, in order (the seed study's, plus the extras safegeo measures).
pub const COLUMNS: &[&str] = &[
    "recipe",
    "anchor",
    "step",
    "asr_fixed",
    "asr_adaptive",
    "strongreject",
    "harmful_refusal",
    "benign_refusal",
    "xstest_over_refusal",
    "utility_ce",
    "carrier_layer",
    "carrier_rule",
    "effective_rank",
    "coupling",
    "drift_prev_deg",
    "drift_base_deg",
    "baseline_harmful_score",
];

/// One row's cells, in [`COLUMNS`] order.
pub fn cells(r: &Row) -> Vec<String> {
    vec![
        r.anchor.recipe.clone(),
        r.anchor.name.clone(),
        r.anchor.step.to_string(),
        cell(&r.asr_fixed),
        cell(&r.asr_adaptive),
        cell(&r.strongreject),
        cell(&r.harmful_refusal),
        cell(&r.benign_refusal),
        cell(&r.xstest_over_refusal),
        cell(&r.utility_ce),
        r.carrier_layer.map_or("-".into(), |l| l.to_string()),
        r.carrier_rule.clone().unwrap_or_else(|| "-".into()),
        num(r.effective_rank, 2),
        num(r.coupling, 3),
        num(r.drift_prev_deg, 1),
        num(r.drift_base_deg, 1),
        num(r.baseline_harmful_score, 3),
    ]
}

/// The table as CSV.
pub fn csv(rows: &[Row]) -> String {
    safegeo_data::table::csv_text(COLUMNS, rows.iter().map(cells))
}

/// The table as Markdown (for the README and the terminal).
pub fn markdown(rows: &[Row]) -> String {
    let mut out = format!(
        "| {} |\n|{}\n",
        COLUMNS.join(" | "),
        "---|".repeat(COLUMNS.len())
    );
    for r in rows {
        out.push_str(&format!("| {} |\n", cells(r).join(" | ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(rows: &[(&str, &str, &str, f64)]) -> serde_json::Value {
        // The shape `safegeo eval` writes: the estimate flattened into the row.
        let rows: Vec<safegeo_data::eval::SummaryRow> = rows
            .iter()
            .map(|(s, m, j, v)| safegeo_data::eval::SummaryRow {
                suite: s.to_string(),
                metric: m.to_string(),
                judge: j.to_string(),
                estimate: safegeo_data::metrics::Estimate {
                    value: *v,
                    n: 10,
                    lo: v - 0.1,
                    hi: v + 0.1,
                    interval: "wilson",
                },
            })
            .collect();
        serde_json::json!({ "rows": rows })
    }

    fn anchor(
        root: &Path,
        recipe: &str,
        step: u64,
        rows: &[(&str, &str, &str, f64)],
        sel: serde_json::Value,
        csv: &str,
    ) -> PathBuf {
        let d = root.join(format!("{recipe}-{step}"));
        std::fs::create_dir_all(d.join("eval")).unwrap();
        std::fs::create_dir_all(d.join("geometry")).unwrap();
        let info = AnchorInfo {
            recipe: recipe.into(),
            name: format!("ckpt-{step}"),
            step,
            model: "m".into(),
        };
        std::fs::write(d.join("anchor.json"), serde_json::to_string(&info).unwrap()).unwrap();
        std::fs::write(d.join("eval/summary.json"), summary(rows).to_string()).unwrap();
        std::fs::write(d.join("geometry/selection.json"), sel.to_string()).unwrap();
        std::fs::write(d.join("geometry/selection.csv"), csv).unwrap();
        d
    }

    #[test]
    fn rows_prefer_llm_judges_fall_back_to_best_bypass_and_sort_by_recipe_and_step() {
        let root = tempfile::tempdir().unwrap();
        let csv = "layer,pos,bypass,induce,kl,stage,admissible,failed\n0,0,0.5,1,0.01,screen,false,\n1,0,-2.0,-1,0.5,full,false,induce;kl\n1,1,-1.0,1,0.01,full,false,kl\n";
        let none = serde_json::json!({"baseline": {"harmful_refusal_score": 1.5}, "result": {"selected": null, "reason": "no admissible carrier"}});
        let some = serde_json::json!({"baseline": {"harmful_refusal_score": 2.0}, "result": {"selected": {"layer": 0, "pos": 0}}});
        let a = anchor(
            root.path(),
            "sft",
            20,
            &[
                ("test-cases", "asr", "substring", 0.4),
                ("test-cases", "asr", "harmbench", 0.3),
                ("jbb-benign", "refusal_rate", "substring", 0.2),
            ],
            none.clone(),
            csv,
        );
        let b = anchor(
            root.path(),
            "sft",
            10,
            &[
                ("xstest", "xstest_safe_any_refusal", "substring", 0.3),
                ("xstest", "xstest_safe_any_refusal", "xstest-prefix", 0.1),
            ],
            some,
            csv,
        );
        let base = anchor(root.path(), "base", 0, &[], serde_json::json!({}), "");
        let rows = collect(&[a.clone(), b.clone(), base.clone()], None).unwrap();
        let order: Vec<(String, u64)> = rows
            .iter()
            .map(|r| (r.anchor.recipe.clone(), r.anchor.step))
            .collect();
        assert_eq!(
            order,
            vec![("base".into(), 0), ("sft".into(), 10), ("sft".into(), 20)]
        );
        let r20 = &rows[2];
        assert_eq!(r20.asr_fixed.unwrap().value, 0.3, "the LLM judge wins");
        assert_eq!(
            r20.judges,
            vec!["harmbench".to_string(), "substring".to_string()]
        );
        // No rule selects a carrier at step 20: it is measured at its run's reference, the
        // carrier selected at step 10, not at its own lowest-bypass stand-in (layer 1).
        assert_eq!(
            (r20.carrier_layer, r20.carrier_pos, r20.admissible),
            (Some(0), Some(0), false)
        );
        assert_eq!(r20.selection_note, "no admissible carrier");
        assert_eq!(r20.carrier_rule.as_deref(), Some("reference"));
        assert_eq!(r20.bypass_by_layer, vec![0.5, -2.0]);
        let r10 = &rows[1];
        assert_eq!((r10.carrier_layer, r10.admissible), (Some(0), true));
        assert_eq!(r10.carrier_rule.as_deref(), Some("absolute"));
        assert_eq!(
            r10.xstest_over_refusal.unwrap().value,
            0.1,
            "on XSTest its own matcher wins over the substrings"
        );
        assert_eq!(rows[0].carrier_layer, None);
        // A reference named by the caller serves every anchor without a selection; a run with
        // none at all keeps the stand-in.
        let named = collect(&[a.clone(), b.clone(), base.clone()], Some((1, 0))).unwrap();
        assert_eq!(named[2].carrier_layer, Some(1));
        assert_eq!(named[1].carrier_rule.as_deref(), Some("absolute"));
        let alone = collect(std::slice::from_ref(&a), None).unwrap();
        assert_eq!(alone[0].carrier_rule.as_deref(), Some("stand-in"));
        assert_eq!(alone[0].carrier_layer, Some(1));
        // A run with no selection anywhere: every anchor at the latest anchor's stand-in.
        let early_csv = "layer,pos,bypass,induce,kl,stage,admissible,failed\n0,0,-3.0,-1,0.5,full,false,induce;kl\n1,0,-2.0,-1,0.5,full,false,induce;kl\n";
        let early = anchor(root.path(), "r2d2", 5, &[], none.clone(), early_csv);
        let late = anchor(root.path(), "r2d2", 10, &[], none, csv);
        let run = collect(&[early, late], None).unwrap();
        assert_eq!(
            run.iter()
                .map(|r| (r.carrier_layer, r.carrier_rule.clone().unwrap()))
                .collect::<Vec<_>>(),
            vec![(Some(1), "reference".into()), (Some(1), "stand-in".into())]
        );
        let table = markdown(&rows);
        assert_eq!(table.lines().count(), 5);
        assert!(csv_has_header(&super::csv(&rows)));
        assert!(read_anchor(&root.path().join("nope")).is_err());
    }

    fn csv_has_header(s: &str) -> bool {
        s.lines().next() == Some(&COLUMNS.join(",")[..])
    }
}
