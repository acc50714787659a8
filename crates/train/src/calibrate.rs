//! Operating point of a safety-trained checkpoint, set on validation prompts (`safegeo
//! calibrate`). Training fixes how a model ranks requests by harm; where along that ranking it
//! starts to refuse varies from run to run (docs/experiments.md: single runs of one recipe
//! differ by several points of refusal on the same prompts). A knob
//! with one setting `t in [0, 1]` (1 = the checkpoint as trained, smaller = refuses less) is
//! turned to the least setting that still refuses the requested share `R` of held-out harmful
//! prompts:
//!
//! `t* = min { t in [0, 1] : refused_val(model(t)) >= R }`
//!
//! found by bisection (refusal grows with `t`; every probe is recorded, so a violation shows).
//! Two knobs:
//! - `interpolate`: `theta(t) = theta_base + t (theta_ckpt - theta_base)` (WiSE-FT), every change
//!   training made scaled alike;
//! - `opening-bias`: the refusal-opening tokens' logits at the reply's first position shifted by
//!   `beta(t) = -B (1 - t)` (`safegeo_runtime::OpeningBias`, written into an untied LM head),
//!   which moves the greedy threshold along the ranking the checkpoint already has.
//!
//! Refusal is the substring judge on greedy replies to the validation suites (`harmful-val` by
//! default: the refusal-direction validation split, disjoint from the training split and from
//! JailbreakBench). Every probe's replies are kept under `work_dir/scale-T/records.jsonl`, so an
//! interrupted calibration resumes.
use crate::{Error, Result};
use safegeo_data::eval::{prompt_ids, run_eval, EvalSpec, Record};
use safegeo_data::judges::{Judge, SubstringMatcher};
use safegeo_data::{load_dataset, LoadSpec};
use safegeo_runtime::{GenerateConfig, Interpolation, Model, NoHooks, OpeningBias};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What moves the operating point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Knob {
    /// Weight interpolation toward the base model.
    Interpolate,
    /// A negative bias on the refusal-opening tokens at the reply's first position.
    OpeningBias,
}

impl std::str::FromStr for Knob {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "interpolate" => Ok(Knob::Interpolate),
            "opening-bias" => Ok(Knob::OpeningBias),
            o => Err(format!(
                "unknown knob `{o}`: use interpolate or opening-bias"
            )),
        }
    }
}

/// What `safegeo calibrate` aims for and how it measures it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CalibrateConfig {
    /// Share of the validation harmful prompts the calibrated model must refuse (`R`).
    pub target_refusal: f64,
    /// Validation suites of harmful prompts (never a test suite).
    pub suites: Vec<String>,
    /// Bisection stops when the bracket around `s*` is this narrow.
    pub tolerance: f64,
    /// Reply tokens generated per prompt; a refusal shows in its opening.
    pub max_new_tokens: usize,
    /// Prompts decoded together.
    pub batch_size: usize,
    /// Data directory override.
    pub data_dir: Option<PathBuf>,
    /// System prompt (else the template's default), as the evaluation will use it.
    pub system: Option<String>,
    /// The substring judge's list (JSON array or one per line) instead of Arditi's.
    pub substring_list: Option<PathBuf>,
    /// Use this setting instead of searching (its validation refusal is still measured).
    pub fixed_scale: Option<f64>,
    /// What moves the operating point.
    pub knob: Knob,
    /// `opening-bias`: the bias at `t = 0`, in logits (`beta(t) = -max_bias (1 - t)`).
    pub max_bias: f64,
    /// `opening-bias`: the refusal openings whose first tokens are shifted.
    pub openings: Vec<String>,
    /// `opening-bias`: harmless validation suites whose prompts, with the harmful validation
    /// prompts, fit the direction that carries the bias, so that it lands alike on harmful and
    /// harmless requests (`safegeo_runtime::opening_bias`).
    pub landing: Vec<String>,
    /// `opening-bias`: prompts drawn from each landing suite (seeded, deterministic).
    pub landing_limit: usize,
}

impl Default for CalibrateConfig {
    fn default() -> Self {
        CalibrateConfig {
            target_refusal: 0.85,
            suites: vec!["harmful-val".into()],
            tolerance: 1.0 / 64.0,
            max_new_tokens: 48,
            batch_size: 16,
            data_dir: None,
            system: None,
            substring_list: None,
            fixed_scale: None,
            knob: Knob::Interpolate,
            max_bias: 8.0,
            // The first words of the built-in refusal banks (crates/train/src/data.rs), and
            // "I", which opens the base model's own refusals ("I'm sorry for any
            // misunderstanding, but ...") that safety-trained models keep using.
            openings: ["Sorry", "Unfortunately", "No", "I"]
                .map(String::from)
                .to_vec(),
            landing: vec!["harmless-val".into()],
            landing_limit: 256,
        }
    }
}

impl CalibrateConfig {
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if !(self.target_refusal > 0.0 && self.target_refusal <= 1.0) {
            return bad(format!(
                "--target-refusal {} is not a share in (0, 1]",
                self.target_refusal
            ));
        }
        if !(self.tolerance > 0.0 && self.tolerance < 1.0) {
            return bad(format!("--tolerance {} is not in (0, 1)", self.tolerance));
        }
        if let Some(f) = self.fixed_scale.filter(|f| !(0.0..=1.0).contains(f)) {
            return bad(format!("--scale {f} is not in [0, 1]"));
        }
        if !(self.max_bias.is_finite() && self.max_bias > 0.0) {
            return bad(format!(
                "--max-bias {} is not a positive number of logits",
                self.max_bias
            ));
        }
        if self.knob == Knob::OpeningBias && self.openings.is_empty() {
            return bad("--openings is empty".into());
        }
        if self.knob == Knob::OpeningBias && self.landing_limit == 0 && !self.landing.is_empty() {
            return bad("--landing-limit must be at least 1".into());
        }
        if self.suites.is_empty() {
            return bad("no validation suite given (--val)".into());
        }
        if self.max_new_tokens == 0 || self.batch_size == 0 {
            return bad("--max-new-tokens and --batch-size must be at least 1".into());
        }
        Ok(())
    }
}

/// One measured scale.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Probe {
    /// Interpolation scale `s`.
    pub scale: f64,
    /// Validation prompts refused.
    pub refused: usize,
    /// Validation prompts.
    pub prompts: usize,
}

impl Probe {
    /// Share refused.
    pub fn rate(&self) -> f64 {
        self.refused as f64 / self.prompts.max(1) as f64
    }
}

/// The outcome, written to `calibration.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    /// The chosen setting `t*` (1 when even the checkpoint falls short of the target).
    pub scale: f64,
    /// `opening-bias`: the bias written, in logits.
    pub bias_logits: Option<f64>,
    /// `opening-bias`: `h . u` over the reference prompts (min, mean, max): how
    /// evenly the bias lands (1 = exactly `bias_logits` everywhere).
    pub bias_spread: Option<[f32; 3]>,
    /// Whether the checkpoint itself reaches the target (otherwise `scale` is 1 and the
    /// calibrated model is the checkpoint).
    pub reached: bool,
    /// Validation refusal at the chosen scale.
    pub refusal_at_scale: f64,
    /// Every probe, in the order measured.
    pub probes: Vec<Probe>,
    /// The settings.
    pub config: CalibrateConfig,
}

/// Bisection for the least `s` in `[0, 1]` whose measured refusal reaches `target`, given a
/// measurement `refusal(s) -> Probe`. Starts at `s = 1`; when that falls short, stops there.
pub fn search(
    target: f64,
    tolerance: f64,
    refusal: &mut dyn FnMut(f64) -> Result<Probe>,
) -> Result<(f64, bool, Vec<Probe>)> {
    let mut probes = vec![refusal(1.0)?];
    if probes[0].rate() < target {
        return Ok((1.0, false, probes));
    }
    // Invariant: `hi` reaches the target, `lo` does not (or is the unmeasured base).
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while hi - lo > tolerance {
        let mid = 0.5 * (lo + hi);
        let p = refusal(mid)?;
        if p.rate() >= target {
            hi = mid;
        } else {
            lo = mid;
        }
        probes.push(p);
    }
    Ok((hi, true, probes))
}

/// Validation refusal of `model` as it stands, its replies kept in `dir`.
fn measure(model: &Model, cfg: &CalibrateConfig, scale: f64, dir: &Path) -> Result<Probe> {
    let judges: Vec<Box<dyn Judge>> = vec![Box::new(SubstringMatcher::new(
        cfg.substring_list.as_deref(),
    )?)];
    let spec = EvalSpec {
        suites: cfg.suites.clone(),
        data_dir: cfg.data_dir.clone(),
        limit: None,
        seed: 0,
        generation: GenerateConfig {
            max_new_tokens: cfg.max_new_tokens,
            ..Default::default()
        },
        batch_size: cfg.batch_size,
        system: cfg.system.clone(),
        out: dir.to_path_buf(),
        judge_workers: 1,
        reference: None,
        refusal_score: false,
        prompt_column: None,
        category: None,
        test_cases: None,
        judge_continuation: false,
    };
    run_eval(model, &judges, &spec, &mut NoHooks, &mut |_, _| {})?;
    let records: Vec<Record> = safegeo_data::jsonl::read(&dir.join("records.jsonl"))?;
    let refused = records
        .iter()
        .filter(|r| r.verdicts.get("substring").and_then(|v| v.refused) == Some(true))
        .count();
    Ok(Probe {
        scale,
        refused,
        prompts: records.len(),
    })
}

/// Record what `work_dir`'s probes measure, or check that a resumed run measures the same:
/// probes of another checkpoint or other settings must not be read back as this one's.
fn claim_work_dir(
    work_dir: &Path,
    model: &Model,
    base: Option<&Path>,
    cfg: &CalibrateConfig,
) -> Result<()> {
    let what = serde_json::json!({
        "checkpoint": model.source, "base_model": base, "knob": cfg.knob,
        "max_bias": cfg.max_bias, "openings": cfg.openings,
        "landing": cfg.landing, "landing_limit": cfg.landing_limit,
        "suites": cfg.suites, "max_new_tokens": cfg.max_new_tokens,
        "system": cfg.system, "substring_list": cfg.substring_list,
    });
    let path = work_dir.join("probes.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let old: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        if old != what {
            return Err(Error::OtherRun(format!(
                "{} holds probes of another calibration ({old})\n  fix: use another --out, or delete {} to start over",
                work_dir.display(),
                work_dir.display()
            )));
        }
        return Ok(());
    }
    std::fs::create_dir_all(work_dir).map_err(|e| Error::io(work_dir, e))?;
    safegeo_runtime::files::write_atomic(
        &path,
        serde_json::to_string_pretty(&what)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(())
}

/// The validation prompts as the evaluation sends them, after checking that every suite holds
/// harmful prompts only.
fn validation_prompts(model: &Model, cfg: &CalibrateConfig) -> Result<Vec<Vec<u32>>> {
    suite_prompts(model, cfg, &cfg.suites, None, true)
}

/// The prompts of `suites` (at most `limit` of each) as the evaluation sends them; every item
/// must be labelled harmful (`harmful`) or not (`benign` / `safe`).
fn suite_prompts(
    model: &Model,
    cfg: &CalibrateConfig,
    suites: &[String],
    limit: Option<usize>,
    harmful: bool,
) -> Result<Vec<Vec<u32>>> {
    let (want, fits): (&str, fn(&str) -> bool) = if harmful {
        ("harmful", |l| l == "harmful")
    } else {
        ("benign", |l| l == "benign" || l == "safe")
    };
    let mut out = Vec::new();
    for suite in suites {
        let d = load_dataset(
            suite,
            &LoadSpec {
                data_dir: cfg.data_dir.as_deref(),
                category: None,
                limit,
                seed: 0,
                prompt_column: None,
            },
        )?;
        // Checked before anything is generated: a benign suite would calibrate nothing.
        if let Some(it) = d.items.iter().find(|it| !fits(&it.label)) {
            return Err(Error::Invalid(format!(
                "calibration suite {} holds {} prompts; it must hold {want} prompts only\n  fix: use a validation split such as {}, or give a file a `label` column of `{want}`",
                d.name,
                it.label,
                if harmful { "harmful-val" } else { "harmless-val" }
            )));
        }
        for it in &d.items {
            out.push(prompt_ids(model, it, cfg.system.as_deref())?);
        }
    }
    Ok(out)
}

/// The knob, ready to turn.
enum Turn {
    Interpolate(Interpolation),
    Bias(OpeningBias, f64),
}

impl Turn {
    fn apply(&self, model: &mut Model, t: f64) -> Result<()> {
        match self {
            Turn::Interpolate(i) => i.apply(model, t)?,
            Turn::Bias(b, max) => b.apply(model, -max * (1.0 - t))?,
        }
        Ok(())
    }
}

/// Calibrate `model` (the checkpoint, weights merged; `base` is the model it was trained from,
/// needed by the `interpolate` knob): on return `model` holds the calibrated weights.
/// `on_probe` sees each measurement.
pub fn calibrate(
    model: &mut Model,
    base: Option<&mut Model>,
    cfg: &CalibrateConfig,
    work_dir: &Path,
    on_probe: &mut dyn FnMut(&Probe),
) -> Result<Calibration> {
    cfg.check()?;
    let base_source = base.as_ref().map(|b| b.source.clone());
    claim_work_dir(work_dir, model, base_source.as_deref(), cfg)?;
    let prompts = validation_prompts(model, cfg)?;
    let turn = match (cfg.knob, base) {
        (Knob::Interpolate, Some(base)) => Turn::Interpolate(Interpolation::new(model, base)?),
        (Knob::Interpolate, None) => {
            return Err(Error::Invalid(
                "the interpolate knob needs the base model\n  fix: pass --base MODEL".into(),
            ))
        }
        (Knob::OpeningBias, _) => {
            let openings: Vec<&str> = cfg.openings.iter().map(String::as_str).collect();
            let ids =
                safegeo_data::judges::refusal_score::refusal_token_ids(&model.tok, &openings)?;
            let mut pool = prompts;
            pool.extend(suite_prompts(
                model,
                cfg,
                &cfg.landing,
                Some(cfg.landing_limit),
                false,
            )?);
            Turn::Bias(OpeningBias::new(model, &pool, &ids)?, cfg.max_bias)
        }
    };
    let mut refusal = |t: f64| -> Result<Probe> {
        turn.apply(model, t)?;
        let p = measure(model, cfg, t, &work_dir.join(format!("scale-{t:.6}")))?;
        on_probe(&p);
        Ok(p)
    };
    let (scale, reached, probes) = match cfg.fixed_scale {
        Some(t) => {
            let p = refusal(t)?;
            (t, p.rate() >= cfg.target_refusal, vec![p])
        }
        None => search(cfg.target_refusal, cfg.tolerance, &mut refusal)?,
    };
    turn.apply(model, scale)?;
    let refusal_at_scale = probes
        .iter()
        .find(|p| p.scale == scale)
        .map_or(f64::NAN, Probe::rate);
    let (bias_logits, bias_spread) = match &turn {
        Turn::Bias(b, max) => {
            let n = b.spread.len().max(1) as f32;
            let lo = b.spread.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = b.spread.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (
                // max (t - 1), not -max (1 - t): an unbiased model records 0, not -0.
                Some(max * (scale - 1.0)),
                Some([lo, b.spread.iter().sum::<f32>() / n, hi]),
            )
        }
        Turn::Interpolate(_) => (None, None),
    };
    Ok(Calibration {
        scale,
        bias_logits,
        bias_spread,
        reached,
        refusal_at_scale,
        probes,
        config: cfg.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose refusal is a step at `s = edge` out of 100 prompts.
    fn step_at(edge: f64) -> impl FnMut(f64) -> Result<Probe> {
        move |s| {
            Ok(Probe {
                scale: s,
                refused: if s >= edge { 90 } else { 10 },
                prompts: 100,
            })
        }
    }

    #[test]
    fn bisection_brackets_the_least_scale_that_reaches_the_target() {
        for edge in [0.05, 0.3, 0.61, 0.999] {
            let (s, reached, probes) = search(0.85, 1.0 / 64.0, &mut step_at(edge)).unwrap();
            assert!(reached);
            assert!(s >= edge && s - edge <= 1.0 / 64.0, "edge {edge}: {s}");
            // 1 + ceil(log2(64)) probes.
            assert_eq!(probes.len(), 7);
            assert_eq!(probes[0].scale, 1.0);
        }
    }

    #[test]
    fn a_checkpoint_short_of_the_target_is_kept_whole() {
        let (s, reached, probes) = search(0.95, 0.01, &mut step_at(0.5)).unwrap();
        assert_eq!((s, reached, probes.len()), (1.0, false, 1));
    }

    #[test]
    fn refusal_growing_with_scale_is_found_on_a_smooth_curve() {
        // rate(s) = s^2: the least s with rate >= 0.49 is 0.7.
        let mut curve = |s: f64| {
            Ok(Probe {
                scale: s,
                refused: (s * s * 1000.0).round() as usize,
                prompts: 1000,
            })
        };
        let (s, _, _) = search(0.49, 1e-3, &mut curve).unwrap();
        assert!((s - 0.7).abs() <= 1e-3, "{s}");
    }

    fn tiny(seed: u64) -> Model {
        let mut m = safegeo_runtime::testing::tiny_model(
            safegeo_runtime::Arch::Llama,
            seed,
            candle_core::DType::F32,
        )
        .unwrap();
        m.tok.chat_template =
            Some("{% for m in messages %}{{ m['content'] }} {% endfor %}w0".into());
        m
    }

    fn prompts_file(dir: &Path, label: &str) -> PathBuf {
        let p = dir.join(format!("{label}.jsonl"));
        let rows: Vec<String> = (0..3)
            .map(|i| format!("{{\"prompt\": \"w{i} w5\", \"label\": \"{label}\"}}"))
            .collect();
        std::fs::write(&p, rows.join("\n")).unwrap();
        p
    }

    fn tiny_config(dir: &Path, label: &str) -> CalibrateConfig {
        CalibrateConfig {
            suites: vec![prompts_file(dir, label).display().to_string()],
            landing: vec![prompts_file(dir, "benign").display().to_string()],
            max_new_tokens: 3,
            ..Default::default()
        }
    }

    #[test]
    fn a_checkpoint_that_refuses_everything_is_pulled_to_the_least_scale_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.json");
        // The empty needle matches every reply: every probe refuses all prompts.
        std::fs::write(&list, "[\"\"]").unwrap();
        let cfg = CalibrateConfig {
            substring_list: Some(list),
            ..tiny_config(dir.path(), "harmful")
        };
        let (mut model, mut base) = (tiny(4), tiny(3));
        let mut seen = 0;
        let work = dir.path().join("probes");
        let c = calibrate(&mut model, Some(&mut base), &cfg, &work, &mut |_| seen += 1).unwrap();
        assert!(c.reached);
        assert_eq!((c.scale, c.probes.len(), seen), (1.0 / 64.0, 7, 7));
        assert_eq!(c.refusal_at_scale, 1.0);
        assert!(c.probes.iter().all(|p| p.prompts == 3 && p.refused == 3));
        // The model now holds the calibrated weights: base + s (tuned - base).
        let (mut tuned, mut b2) = (tiny(4), tiny(3));
        Interpolation::new(&mut tuned, &mut b2)
            .unwrap()
            .apply(&mut tuned, 1.0 / 64.0)
            .unwrap();
        let p = vec![vec![1u32, 2, 3]];
        let diff = safegeo_runtime::testing::max_abs(
            &(model.last_logits(&p, &mut NoHooks).unwrap()
                - tuned.last_logits(&p, &mut NoHooks).unwrap())
            .unwrap(),
        );
        assert!(diff < 1e-5, "{diff}");
        // A re-run reads every probe back instead of generating again.
        let records = std::fs::read_to_string(work.join("scale-0.500000/records.jsonl")).unwrap();
        let (mut model, mut base) = (tiny(4), tiny(3));
        let again = calibrate(&mut model, Some(&mut base), &cfg, &work, &mut |_| {}).unwrap();
        assert_eq!(again.probes, c.probes);
        assert_eq!(
            std::fs::read_to_string(work.join("scale-0.500000/records.jsonl")).unwrap(),
            records
        );
    }

    #[test]
    fn the_opening_bias_knob_needs_no_base_and_records_the_bias_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.json");
        std::fs::write(&list, "[\"\"]").unwrap();
        let cfg = CalibrateConfig {
            substring_list: Some(list),
            knob: Knob::OpeningBias,
            openings: vec!["w3".into()],
            ..tiny_config(dir.path(), "harmful")
        };
        let mut model = tiny(4);
        let p = vec![vec![2u32, 6, 3]];
        let before = model.last_logits(&p, &mut NoHooks).unwrap();
        let c = calibrate(&mut model, None, &cfg, &dir.path().join("w"), &mut |_| {}).unwrap();
        // Everything refuses at every setting, so the bisection ends at its lowest bracket.
        assert_eq!(c.scale, 1.0 / 64.0);
        let want = -8.0 * (1.0 - 1.0 / 64.0);
        assert!((c.bias_logits.unwrap() - want).abs() < 1e-12);
        let [lo, mean, hi] = c.bias_spread.unwrap();
        // Fitted to read 1 on the six reference prompts, short of it by the ridge.
        assert!(
            lo <= mean && mean <= hi && (mean - 1.0).abs() < 0.05,
            "{lo} {mean} {hi}"
        );
        // Only "w3" (id 5) moved, and by about the bias.
        let d = (model.last_logits(&p, &mut NoHooks).unwrap() - before)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (t, x) in d.iter().enumerate() {
            if t == 5 {
                assert!(*x < 0.0, "{x}");
            } else {
                assert!(x.abs() < 1e-5, "token {t}: {x}");
            }
        }
    }

    #[test]
    fn a_checkpoint_short_of_the_target_is_measured_once_and_benign_suites_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CalibrateConfig {
            target_refusal: 1.0,
            ..tiny_config(dir.path(), "harmful")
        };
        let (mut model, mut base) = (tiny(4), tiny(3));
        let c = calibrate(
            &mut model,
            Some(&mut base),
            &cfg,
            &dir.path().join("w"),
            &mut |_| {},
        )
        .unwrap();
        // Random tiny weights write no refusal phrase.
        assert_eq!((c.reached, c.scale, c.probes.len()), (false, 1.0, 1));
        let benign = tiny_config(dir.path(), "benign");
        let e = calibrate(
            &mut model,
            Some(&mut base),
            &benign,
            &dir.path().join("b"),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("harmful prompts only") && e.contains("fix:"),
            "{e}"
        );
        // Probes of one calibration are not read back as another's.
        let other = CalibrateConfig {
            max_new_tokens: 4,
            ..cfg.clone()
        };
        let e = calibrate(
            &mut model,
            Some(&mut base),
            &other,
            &dir.path().join("w"),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("another calibration") && e.contains("fix:"),
            "{e}"
        );
    }

    #[test]
    fn bad_settings_are_errors_that_name_the_option() {
        for (cfg, word) in [
            (
                CalibrateConfig {
                    target_refusal: 1.5,
                    ..Default::default()
                },
                "--target-refusal",
            ),
            (
                CalibrateConfig {
                    tolerance: 0.0,
                    ..Default::default()
                },
                "--tolerance",
            ),
            (
                CalibrateConfig {
                    suites: vec![],
                    ..Default::default()
                },
                "--val",
            ),
            (
                CalibrateConfig {
                    fixed_scale: Some(1.2),
                    ..Default::default()
                },
                "--scale",
            ),
        ] {
            let e = cfg.check().unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
    }
}
