//! A training recipe as data: every setting of a run in one TOML file (`recipes/*.toml` are
//! built in). A file may start from another with `extends = "NAME"` and set only what differs, so
//! `r2d2` is visibly `sft` plus its own section. Resolution: read the file, merge it over what it
//! extends (tables key by key, values replaced), then check every field name: an unknown one is
//! an error that names it.
use crate::anchors::AnchorBias;
use crate::data::Strategy;
use crate::decision::DecisionRule;
use crate::plan::{DecisionStream, LayerSet, PlanConfig, RecipeKind};
use crate::r2d2::R2d2Config;
use crate::trainer::{LoraConfig, TrainConfig};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The built-in recipes: (name, file text).
pub const BUILTIN: &[(&str, &str)] = &[
    ("sft", include_str!("../../../recipes/sft.toml")),
    ("r2d2", include_str!("../../../recipes/r2d2.toml")),
    (
        "worst-insertion",
        include_str!("../../../recipes/worst-insertion.toml"),
    ),
    (
        "harmful-prefix",
        include_str!("../../../recipes/harmful-prefix.toml"),
    ),
    ("derta", include_str!("../../../recipes/derta.toml")),
    (
        "sft-calibrated",
        include_str!("../../../recipes/sft-calibrated.toml"),
    ),
];

/// Every setting of a training run but the model and the output folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// The recipe's name (a run folder's label, not its identity: the fields are).
    pub name: String,
    /// One line on what it trains.
    pub description: String,
    /// Which losses and data builders run.
    pub kind: RecipeKind,
    /// Seed of the data order, adapters, sampling and augmentation.
    pub seed: u64,
    /// Training data.
    pub data: DataSection,
    /// Optimizer schedule and anchors.
    pub schedule: ScheduleSection,
    /// Adapters and weight averaging.
    pub adapters: AdapterSection,
    /// The refusal decision loss at the first reply token (weight 0: off).
    pub decision: DecisionSection,
    /// How the anchors' refusal threshold is set after training.
    pub operating_point: OperatingPoint,
    /// R2D2's adversarial pool (the `r2d2` kind only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r2d2: Option<R2d2Section>,
}

/// Training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Harmful prompts (a `*-train` split or a file).
    pub harmful: String,
    /// Harmless prompts (a `*-train` split or a file).
    pub harmless: String,
    /// Harmful prompts used (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_harmful: Option<usize>,
    /// Harmless prompts with self-distilled replies.
    pub n_harmless: usize,
    /// Harmless prompts added for the vocabulary they share with the harmful ones.
    pub n_hard_negatives: usize,
    /// Refusal phrasing: `polite` or `rebuttal`.
    pub strategy: Strategy,
    /// Longest self-distilled reply, in tokens.
    pub utility_tokens: usize,
    /// System prompt of every example (the template's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// Optimizer schedule and anchors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// Optimizer steps.
    pub steps: usize,
    /// Steps at which an anchor checkpoint is written (0 = the starting model).
    pub save_at: Vec<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Final learning rate as a share of the peak (cosine decay).
    pub min_lr_ratio: f64,
    /// Gradient-norm clip (0 = off).
    pub max_grad_norm: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
}

/// Adapters and weight averaging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// Train every weight instead of LoRA adapters.
    pub full: bool,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (scale alpha / rank).
    pub alpha: f64,
    /// Projections that get adapters.
    pub targets: Vec<String>,
    /// Blocks that get adapters: `all`, `14-29`, `0,2,10-12` or a share of the depth (`40%-`).
    pub layers: String,
    /// Runs that differ only in their seed, averaged into every anchor (1 = one run).
    pub soup: usize,
}

/// The refusal decision loss (`decision.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionSection {
    /// Weight of the loss; 0 = off (the other fields are then unused).
    pub weight: f64,
    /// Harmless prompts trained on the decision only.
    pub negatives: usize,
    /// Decision prompts per micro-batch.
    pub batch: usize,
    /// Put the harmful prompts in the decision stream too.
    pub harmful: bool,
    /// Share of each decision batch drawn from the harmful prompts.
    pub harmful_share: f64,
    /// Refusal mass at which the loss's two sides part.
    pub boundary: f64,
}

/// How the anchors' refusal threshold is set once training ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatingPoint {
    /// A fixed bias, in logits (<= 0), on the refusal openings' first tokens of every anchor
    /// after step 0; 0 keeps the anchors as trained.
    #[serde(default)]
    pub opening_bias: f64,
    /// Instead: the least bias at which each anchor still refuses this share of
    /// `calibration_set`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opening_bias_target: Option<f64>,
    /// Harmful prompts the target is measured on (a validation split or a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_set: Option<String>,
}

/// R2D2's pool: a preset, and single values that override it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct R2d2Section {
    /// `cpu` or `reference` (HarmBench's run).
    pub preset: R2d2Preset,
    /// Test cases in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
    /// GCG steps per case per training step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcg_steps: Option<usize>,
    /// GCG search width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcg_width: Option<usize>,
    /// GCG top-k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcg_topk: Option<usize>,
}

/// R2D2's preset sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum R2d2Preset {
    /// Pool 4, 1 GCG step of width 64 / top-k 64 per training step, 10-token suffix.
    Cpu,
    /// HarmBench: pool 8, 5 GCG steps of width 512 / top-k 256, 20-token suffix.
    Reference,
}

/// The names of the built-in recipes.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// A recipe by built-in name or by path to a `.toml` file, resolved and checked.
pub fn load(name_or_path: &str) -> Result<RecipeFile> {
    let table = resolve(name_or_path, 0)?;
    let recipe: RecipeFile = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| {
            Error::Invalid(format!(
                "recipe `{name_or_path}`: {}\n  fix: compare with `safegeo train --print-recipe sft`",
                e.message()
            ))
        })?;
    recipe.check()?;
    Ok(recipe)
}

fn resolve(name_or_path: &str, depth: usize) -> Result<toml::Table> {
    if depth > 8 {
        return Err(Error::Invalid(format!(
            "recipe `{name_or_path}`: `extends` goes more than 8 files deep (a cycle?)"
        )));
    }
    let (text, origin, stem) = match BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
        Some((n, text)) => (text.to_string(), None, n.to_string()),
        None => {
            let path = PathBuf::from(name_or_path);
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                return Err(Error::Invalid(format!(
                    "`{name_or_path}` is neither a built-in recipe ({}) nor a .toml file",
                    builtin_names().join(", ")
                )));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            (text, Some(path), stem)
        }
    };
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        Error::Invalid(format!("recipe `{name_or_path}` is not valid TOML: {e}"))
    })?;
    let base = match table.remove("extends") {
        None => None,
        Some(toml::Value::String(b)) => {
            // A relative path is taken from the extending file's folder.
            let b = match (&origin, BUILTIN.iter().any(|(n, _)| *n == b)) {
                (Some(p), false) if Path::new(&b).is_relative() => p
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(&b)
                    .display()
                    .to_string(),
                _ => b,
            };
            Some(resolve(&b, depth + 1)?)
        }
        Some(other) => {
            return Err(Error::Invalid(format!(
                "recipe `{name_or_path}`: `extends` takes a recipe name or file, not `{other}`"
            )))
        }
    };
    if !table.contains_key("name") {
        table.insert("name".into(), toml::Value::String(stem));
    }
    Ok(match base {
        Some(mut base) => {
            merge(&mut base, table);
            base
        }
        None => table,
    })
}

/// `over`'s values replace `base`'s, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl RecipeFile {
    /// The resolved file, as `--print-recipe` shows it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Refuses settings that cannot mean anything, naming the field.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("recipe `{}`: {m}", self.name)));
        if self.adapters.soup == 0 {
            return bad(
                "adapters.soup = 0: a soup has at least one member (1 trains one run)".into(),
            );
        }
        LayerSet::parse(&self.adapters.layers)
            .map_err(|e| Error::Invalid(format!("recipe `{}`: adapters.layers {e}", self.name)))?;
        match (self.kind, &self.r2d2) {
            (RecipeKind::R2d2, None) => {
                return bad("kind = \"r2d2\" needs an [r2d2] section (preset = \"cpu\")".into())
            }
            (k, Some(_)) if k != RecipeKind::R2d2 => {
                return bad(format!(
                    "an [r2d2] section belongs to kind = \"r2d2\", not \"{}\"",
                    k.as_str()
                ))
            }
            _ => {}
        }
        self.anchor_bias().check()
    }

    /// How each anchor's opening bias is set.
    pub fn anchor_bias(&self) -> AnchorBias {
        match self.operating_point.opening_bias_target {
            Some(share) => AnchorBias::Target(share),
            None => AnchorBias::Fixed(self.operating_point.opening_bias),
        }
    }

    /// The calibration set of a targeted opening bias.
    pub fn calibration_set(&self) -> String {
        self.operating_point
            .calibration_set
            .clone()
            .unwrap_or_else(|| "harmful-val".into())
    }

    /// R2D2's settings: the preset with this file's overrides.
    pub fn r2d2_config(&self) -> R2d2Config {
        let Some(s) = &self.r2d2 else {
            return R2d2Config::default();
        };
        let mut r = match s.preset {
            R2d2Preset::Cpu => R2d2Config::default(),
            R2d2Preset::Reference => R2d2Config::reference(),
        };
        r.pool_size = s.pool_size.unwrap_or(r.pool_size);
        r.gcg_steps = s.gcg_steps.unwrap_or(r.gcg_steps);
        r.gcg.search_width = s.gcg_width.unwrap_or(r.gcg.search_width);
        r.gcg.topk = s.gcg_topk.unwrap_or(r.gcg.topk);
        r.gcg.seed = self.seed;
        r
    }

    /// The run's settings for [`crate::plan`]; `data_dir` is where the named splits live.
    pub fn plan_config(&self, data_dir: Option<PathBuf>) -> Result<PlanConfig> {
        let a = &self.adapters;
        let s = &self.schedule;
        let d = &self.decision;
        Ok(PlanConfig {
            recipe: self.kind,
            strategy: self.data.strategy,
            train: TrainConfig {
                steps: s.steps,
                batch_size: s.batch_size,
                grad_accum: s.grad_accum,
                lr: s.lr,
                warmup_steps: s.warmup,
                min_lr_ratio: s.min_lr_ratio,
                weight_decay: s.weight_decay,
                max_grad_norm: s.max_grad_norm,
                lora: (!a.full).then(|| LoraConfig {
                    rank: a.rank,
                    alpha: a.alpha,
                    targets: a.targets.clone(),
                    // Resolved once the model's depth is known.
                    layers: None,
                }),
                seed: self.seed,
                save_at: s.save_at.clone(),
                state_every: 5,
            },
            lora_layers: LayerSet::parse(&a.layers).map_err(Error::Invalid)?,
            r2d2: self.r2d2_config(),
            harmful: self.data.harmful.clone(),
            harmless: self.data.harmless.clone(),
            n_harmful: self.data.n_harmful,
            n_harmless: self.data.n_harmless,
            n_hard_negatives: self.data.n_hard_negatives,
            decision: DecisionStream {
                weight: d.weight,
                negatives: d.negatives,
                batch: d.batch,
                harmful: d.harmful,
                harmful_share: d.harmful_share,
                rule: DecisionRule {
                    boundary: d.boundary,
                },
            },
            utility_tokens: self.data.utility_tokens,
            system: self.data.system.clone(),
            data_dir,
            seed: self.seed,
        })
    }

    /// The dotted names of the fields in which `self` and `other` differ (`adapters.rank`),
    /// leaving out `name` and `description`, which label rather than configure.
    pub fn differences(&self, other: &RecipeFile) -> Vec<String> {
        let flat = |r: &RecipeFile| {
            let mut out = std::collections::BTreeMap::new();
            let v = serde_json::to_value(r).unwrap_or_default();
            flatten("", &v, &mut out);
            out.remove("name");
            out.remove("description");
            out
        };
        let (a, b) = (flat(self), flat(other));
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect()
    }
}

/// How the arms of a comparison differ beyond what each recipe is about: every field but the
/// recipe's kind and its own R2D2 section. Empty: the arms are matched.
pub fn arm_differences(a: &RecipeFile, b: &RecipeFile) -> Vec<String> {
    a.differences(b)
        .into_iter()
        .filter(|f| f != "kind" && !f.starts_with("r2d2."))
        .collect()
}

/// The arms of a comparison (label, recipe), pair by pair: one sentence each, saying that the
/// pair is matched or naming every field in which it differs.
pub fn compare_arms(arms: &[(String, RecipeFile)]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (la, ra)) in arms.iter().enumerate() {
        for (lb, rb) in &arms[i + 1..] {
            let d = arm_differences(ra, rb);
            out.push(if d.is_empty() {
                format!("arms {la} and {lb} are matched: they differ only in their recipes' own losses and data ({} vs {})", ra.kind.as_str(), rb.kind.as_str())
            } else {
                format!("arms {la} and {lb} differ in: {}", d.join(", "))
            });
        }
    }
    out
}

fn flatten(
    prefix: &str,
    v: &serde_json::Value,
    out: &mut std::collections::BTreeMap<String, serde_json::Value>,
) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_recipe_parses_and_checks() {
        for name in builtin_names() {
            let r = load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.name, name);
            r.plan_config(None).unwrap().check().unwrap();
            // The printed file reads back as the same recipe.
            let back: RecipeFile = toml::from_str(&r.to_toml()).unwrap();
            assert_eq!(back, r, "{name}");
        }
    }

    #[test]
    fn r2d2_is_sft_plus_its_own_section() {
        let sft = load("sft").unwrap();
        let r2d2 = load("r2d2").unwrap();
        assert_eq!(sft.differences(&r2d2), ["kind", "r2d2.preset"]);
        for name in ["worst-insertion", "harmful-prefix", "derta"] {
            assert_eq!(sft.differences(&load(name).unwrap()), ["kind"], "{name}");
        }
    }

    #[test]
    fn plain_sft_has_no_decision_loss_soup_bias_or_hard_negatives() {
        let sft = load("sft").unwrap();
        assert_eq!(sft.decision.weight, 0.0);
        assert_eq!(sft.adapters.soup, 1);
        assert_eq!(sft.anchor_bias(), AnchorBias::Fixed(0.0));
        assert_eq!(sft.data.n_hard_negatives, 0);
        let tuned = load("sft-calibrated").unwrap();
        assert_eq!(
            sft.differences(&tuned),
            [
                "adapters.alpha",
                "adapters.layers",
                "adapters.rank",
                "adapters.soup",
                "data.n_hard_negatives",
                "decision.boundary",
                "decision.harmful",
                "decision.negatives",
                "decision.weight",
                "operating_point.calibration_set",
                "operating_point.opening_bias_target",
            ]
        );
    }

    #[test]
    fn arms_are_matched_unless_a_setting_besides_the_recipes_own_differs() {
        let sft = load("sft").unwrap();
        let r2d2 = load("r2d2").unwrap();
        let notes = compare_arms(&[("a".into(), sft.clone()), ("b".into(), r2d2.clone())]);
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].starts_with("arms a and b are matched"),
            "{}",
            notes[0]
        );
        let mut wide = r2d2;
        wide.adapters.rank = 64;
        wide.adapters.soup = 2;
        let notes = compare_arms(&[("a".into(), sft.clone()), ("b".into(), wide)]);
        assert_eq!(
            notes,
            ["arms a and b differ in: adapters.rank, adapters.soup"]
        );
        let tuned = load("sft-calibrated").unwrap();
        assert!(arm_differences(&sft, &tuned).contains(&"decision.weight".to_string()));
    }

    #[test]
    fn an_unknown_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.toml");
        std::fs::write(&path, "extends = \"sft\"\n[adapters]\nrnak = 8\n").unwrap();
        let err = load(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("rnak"), "{err}");
        assert!(matches!(
            load(path.to_str().unwrap()),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn a_user_file_extends_a_builtin_and_takes_its_name_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.toml");
        std::fs::write(
            &path,
            "extends = \"r2d2\"\n[schedule]\nsteps = 12\nsave_at = [6, 12]\n",
        )
        .unwrap();
        let r = load(path.to_str().unwrap()).unwrap();
        assert_eq!(r.name, "short");
        assert_eq!(r.schedule.steps, 12);
        assert_eq!(
            load("r2d2").unwrap().differences(&r),
            ["schedule.save_at", "schedule.steps"]
        );
    }

    #[test]
    fn an_extends_cycle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "extends = \"b.toml\"\n").unwrap();
        std::fs::write(dir.path().join("b.toml"), "extends = \"a.toml\"\n").unwrap();
        let err = load(dir.path().join("a.toml").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn an_r2d2_section_outside_r2d2_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, "extends = \"sft\"\n[r2d2]\npreset = \"cpu\"\n").unwrap();
        let err = load(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("belongs to kind"), "{err}");
    }
}
