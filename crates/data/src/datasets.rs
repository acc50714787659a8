//! Benchmark datasets by name, read from a data directory (`--data-dir`, `$SAFEGEO_DATA`, or
//! `../shared/data`), with deterministic sampling and provenance (file hash, sampled ids).
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One prompt of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Stable id within the dataset (BehaviorID, row id, or row index).
    pub id: String,
    /// The request as sent to the model (for contextual HarmBench rows: context, then behaviour).
    pub prompt: String,
    /// The bare behaviour/request without context, when it differs from `prompt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behavior: Option<String>,
    /// Context string (HarmBench contextual).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Category (semantic category, JBB category, XSTest type, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Sub-kind (HarmBench functional category: standard, contextual, copyright).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `safe` or `unsafe` (XSTest), `harmful` or `benign` otherwise.
    pub label: String,
    /// An affirmative target reply (AdvBench, JBB), for attacks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A whole conversation to send instead of `prompt` alone (attack test cases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<safegeo_runtime::Message>>,
    /// Text forced at the start of the reply (prefill and insertion attacks); the judged reply
    /// includes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<String>,
}

/// A loaded dataset with its provenance.
#[derive(Debug, Clone, Serialize)]
pub struct Dataset {
    /// Name it was loaded by.
    pub name: String,
    /// File it came from.
    pub path: PathBuf,
    /// sha256 of the file.
    pub sha256: String,
    /// Rows in the file before filtering or sampling.
    pub total: usize,
    /// The rows (filtered and sampled).
    pub items: Vec<Item>,
}

/// The named datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetName {
    /// AdvBench harmful behaviours (goal, target).
    AdvBench,
    /// HarmBench text validation behaviours.
    HarmBenchVal,
    /// JailbreakBench harmful behaviours.
    JbbHarmful,
    /// JailbreakBench benign behaviours.
    JbbBenign,
    /// XSTest safe and unsafe prompts.
    XsTest,
    /// StrongREJECT small.
    StrongRejectSmall,
    /// Alpaca instructions (harmless).
    Alpaca,
    /// refusal_direction harmful train split.
    HarmfulTrain,
    /// refusal_direction harmful validation split.
    HarmfulVal,
    /// refusal_direction harmless train split.
    HarmlessTrain,
    /// refusal_direction harmless validation split.
    HarmlessVal,
    /// refusal_direction harmless test split.
    HarmlessTest,
}

/// Names accepted on the command line.
pub const DATASET_NAMES: &[&str] = &[
    "advbench",
    "harmbench-val",
    "jbb-harmful",
    "jbb-benign",
    "xstest",
    "strongreject-small",
    "alpaca",
    "harmful-train",
    "harmful-val",
    "harmless-train",
    "harmless-val",
    "harmless-test",
];

impl DatasetName {
    /// Parse a command-line name.
    pub fn parse(s: &str) -> Result<Self> {
        use DatasetName::*;
        Ok(match s {
            "advbench" => AdvBench,
            "harmbench-val" | "harmbench" => HarmBenchVal,
            "jbb-harmful" => JbbHarmful,
            "jbb-benign" => JbbBenign,
            "xstest" => XsTest,
            "strongreject-small" | "strongreject" => StrongRejectSmall,
            "alpaca" => Alpaca,
            "harmful-train" => HarmfulTrain,
            "harmful-val" => HarmfulVal,
            "harmless-train" => HarmlessTrain,
            "harmless-val" => HarmlessVal,
            "harmless-test" => HarmlessTest,
            other => return Err(Error::UnknownDataset(other.to_string())),
        })
    }

    /// The file, relative to the data directory.
    pub fn file(self) -> &'static str {
        use DatasetName::*;
        match self {
            AdvBench => "advbench/harmful_behaviors.csv",
            HarmBenchVal => "harmbench/harmbench_behaviors_text_val.csv",
            JbbHarmful => "jailbreakbench/harmful-behaviors.csv",
            JbbBenign => "jailbreakbench/benign-behaviors.csv",
            XsTest => "xstest/xstest_prompts.csv",
            StrongRejectSmall => "strongreject/strongreject_small_dataset.csv",
            Alpaca => "alpaca/alpaca_noinput_31323.json",
            HarmfulTrain => "refusal_splits/harmful_train.json",
            HarmfulVal => "refusal_splits/harmful_val.json",
            HarmlessTrain => "refusal_splits/harmless_train.json",
            HarmlessVal => "refusal_splits/harmless_val.json",
            HarmlessTest => "refusal_splits/harmless_test.json",
        }
    }

    /// Whether training code may use it (only `*-train` splits).
    pub fn is_train_split(self) -> bool {
        matches!(self, DatasetName::HarmfulTrain | DatasetName::HarmlessTrain)
    }
}

/// Candidate data directories, in order: explicit, `$SAFEGEO_DATA`, `../shared/data`.
fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = explicit {
        c.push(p.to_path_buf());
        return c;
    }
    if let Some(p) = std::env::var_os("SAFEGEO_DATA") {
        c.push(PathBuf::from(p));
    }
    c.push(PathBuf::from("../shared/data"));
    if let Ok(exe) = std::env::current_exe() {
        // A binary under <repo>/target/release/ finds <repo>/../shared/data.
        for anc in exe.ancestors().skip(1).take(5) {
            c.push(anc.join("../shared/data"));
        }
    }
    c
}

/// The data directory that holds `file`.
pub fn data_dir(explicit: Option<&Path>, name: &str, file: &str) -> Result<PathBuf> {
    let cands = candidates(explicit);
    for c in &cands {
        if c.join(file).is_file() {
            return Ok(c.clone());
        }
    }
    Err(Error::MissingDataset {
        name: name.to_string(),
        wanted: file.to_string(),
        looked: cands
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn read_csv(path: &Path, bytes: &[u8]) -> Result<Vec<std::collections::HashMap<String, String>>> {
    let mut r = csv::ReaderBuilder::new().flexible(false).from_reader(bytes);
    let headers: Vec<String> = r
        .headers()
        .map_err(|e| Error::Parse {
            path: path.into(),
            reason: e.to_string(),
        })?
        .iter()
        .map(|h| h.trim().to_lowercase())
        .collect();
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| Error::Parse {
            path: path.into(),
            reason: e.to_string(),
        })?;
        rows.push(
            headers
                .iter()
                .cloned()
                .zip(rec.iter().map(String::from))
                .collect(),
        );
    }
    Ok(rows)
}

fn get(row: &std::collections::HashMap<String, String>, k: &str) -> Option<String> {
    row.get(k)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn need(
    row: &std::collections::HashMap<String, String>,
    k: &str,
    path: &Path,
    i: usize,
) -> Result<String> {
    get(row, k).ok_or_else(|| Error::Parse {
        path: path.into(),
        reason: format!("row {}: empty or missing column `{k}`", i + 1),
    })
}

/// HarmBench's contextual prompt layout (its generation template puts the context first).
fn contextual_prompt(context: &str, behavior: &str) -> String {
    format!("{context}\n\n---\n\n{behavior}")
}

/// The items of a named dataset's file (`path` only names it in errors).
pub fn parse_named(name: DatasetName, path: &Path, bytes: &[u8]) -> Result<Vec<Item>> {
    use DatasetName::*;
    let item = |id: String, prompt: String, label: &str| Item {
        id,
        prompt,
        behavior: None,
        context: None,
        category: None,
        kind: None,
        label: label.to_string(),
        target: None,
        messages: None,
        prefill: None,
    };
    match name {
        AdvBench => read_csv(path, bytes)?
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Ok(Item {
                    target: get(r, "target"),
                    ..item(i.to_string(), need(r, "goal", path, i)?, "harmful")
                })
            })
            .collect(),
        HarmBenchVal => read_csv(path, bytes)?
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let behavior = need(r, "behavior", path, i)?;
                let context = get(r, "contextstring");
                let prompt = match &context {
                    Some(c) => contextual_prompt(c, &behavior),
                    None => behavior.clone(),
                };
                Ok(Item {
                    behavior: Some(behavior),
                    context,
                    category: get(r, "semanticcategory"),
                    kind: get(r, "functionalcategory"),
                    ..item(need(r, "behaviorid", path, i)?, prompt, "harmful")
                })
            })
            .collect(),
        JbbHarmful | JbbBenign => {
            let label = if name == JbbHarmful {
                "harmful"
            } else {
                "benign"
            };
            read_csv(path, bytes)?
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let id = get(r, "index")
                        .or_else(|| get(r, ""))
                        .unwrap_or_else(|| i.to_string());
                    Ok(Item {
                        target: get(r, "target"),
                        category: get(r, "category"),
                        kind: get(r, "behavior"),
                        ..item(id, need(r, "goal", path, i)?, label)
                    })
                })
                .collect()
        }
        XsTest => read_csv(path, bytes)?
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let label = need(r, "label", path, i)?;
                if label != "safe" && label != "unsafe" {
                    return Err(Error::Parse {
                        path: path.into(),
                        reason: format!("row {}: label `{label}`", i + 1),
                    });
                }
                Ok(Item {
                    category: get(r, "type"),
                    ..item(need(r, "id", path, i)?, need(r, "prompt", path, i)?, &label)
                })
            })
            .collect(),
        StrongRejectSmall => read_csv(path, bytes)?
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Ok(Item {
                    category: get(r, "category"),
                    kind: get(r, "source"),
                    ..item(
                        i.to_string(),
                        need(r, "forbidden_prompt", path, i)?,
                        "harmful",
                    )
                })
            })
            .collect(),
        Alpaca | HarmfulTrain | HarmfulVal | HarmlessTrain | HarmlessVal | HarmlessTest => {
            #[derive(Deserialize)]
            struct Row {
                instruction: String,
                category: Option<String>,
            }
            let rows: Vec<Row> = serde_json::from_slice(bytes).map_err(|e| Error::Parse {
                path: path.into(),
                reason: e.to_string(),
            })?;
            let label = if matches!(name, HarmfulTrain | HarmfulVal) {
                "harmful"
            } else {
                "benign"
            };
            Ok(rows
                .into_iter()
                .enumerate()
                .map(|(i, r)| Item {
                    category: r.category,
                    ..item(i.to_string(), r.instruction, label)
                })
                .collect())
        }
    }
}

/// Options for [`load_dataset`].
#[derive(Debug, Clone, Default)]
pub struct LoadSpec<'a> {
    /// Data directory (else `$SAFEGEO_DATA`, else `../shared/data`).
    pub data_dir: Option<&'a Path>,
    /// Keep rows whose category or kind equals this.
    pub category: Option<&'a str>,
    /// Sample at most this many rows.
    pub limit: Option<usize>,
    /// Sampling seed.
    pub seed: u64,
    /// For user files: the column holding the prompt (else `prompt`, `instruction`, `goal`, `chat`).
    pub prompt_column: Option<&'a str>,
}

/// Load a dataset by name (or a `.jsonl`/`.csv` path with a `prompt` column), filter, sample.
pub fn load_dataset(name: &str, spec: &LoadSpec) -> Result<Dataset> {
    let (path, items) = if name.ends_with(".jsonl") || name.ends_with(".csv") {
        let path = PathBuf::from(name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let items = parse_user_file(&path, &bytes, spec.prompt_column)?;
        (path, (bytes, items))
    } else {
        let dn = DatasetName::parse(name)?;
        let dir = data_dir(spec.data_dir, name, dn.file())?;
        let path = dir.join(dn.file());
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let items = parse_named(dn, &path, &bytes)?;
        (path, (bytes, items))
    };
    let (bytes, mut items) = items;
    // Results are keyed and resumed by id: two rows under one id would count as one.
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = items.iter().find(|it| !seen.insert(it.id.as_str())) {
        return Err(Error::Parse {
            path: path.clone(),
            reason: format!(
                "the id `{}` is used by two rows; every row needs its own id (results are resumed by id)",
                dup.id
            ),
        });
    }
    let total = items.len();
    if let Some(c) = spec.category {
        items.retain(|it| {
            it.category.as_deref() == Some(c) || it.kind.as_deref() == Some(c) || it.label == c
        });
    }
    if let Some(n) = spec.limit {
        if n < items.len() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
            let mut idx: Vec<usize> = (0..items.len()).collect();
            idx.shuffle(&mut rng);
            idx.truncate(n);
            idx.sort_unstable();
            items = idx.into_iter().map(|i| items[i].clone()).collect();
        }
    }
    if items.is_empty() {
        return Err(Error::Empty(name.to_string()));
    }
    Ok(Dataset {
        name: name.to_string(),
        path,
        sha256: sha256(&bytes),
        total,
        items,
    })
}

/// A user file: JSONL objects or CSV rows with `prompt` (or `instruction`/`goal`/`chat`), and
/// optional `id`, `category`, `label`, `target`. CSV when `path` ends in `.csv`, else JSONL.
pub fn parse_user_file(
    path: &Path,
    bytes: &[u8],
    prompt_column: Option<&str>,
) -> Result<Vec<Item>> {
    let rows: Vec<serde_json::Map<String, serde_json::Value>> =
        if path.extension().is_some_and(|e| e == "csv") {
            read_csv(path, bytes)?
                .into_iter()
                .map(|r| {
                    r.into_iter()
                        .map(|(k, v)| (k, serde_json::Value::String(v)))
                        .collect()
                })
                .collect()
        } else {
            let text = std::str::from_utf8(bytes).map_err(|e| Error::Parse {
                path: path.into(),
                reason: e.to_string(),
            })?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    serde_json::from_str(l).map_err(|e| Error::Parse {
                        path: path.into(),
                        reason: format!("line {}: {e}", i + 1),
                    })
                })
                .collect::<Result<_>>()?
        };
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let s = |k: &str| {
                r.get(k).and_then(|v| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
            };
            let prompt = match prompt_column {
                Some(c) => s(c),
                None => ["prompt", "instruction", "goal", "chat"]
                    .iter()
                    .find_map(|k| s(k)),
            }
            .ok_or_else(|| Error::Parse {
                path: path.into(),
                reason: format!(
                    "row {}: needs a `{}` field",
                    i + 1,
                    prompt_column.unwrap_or("prompt` (or `instruction`, `goal`, `chat`")
                ),
            })?;
            Ok(Item {
                id: s("id").unwrap_or_else(|| i.to_string()),
                prompt,
                behavior: None,
                context: s("context"),
                category: s("category"),
                kind: s("kind"),
                label: s("label").unwrap_or_else(|| "unknown".into()),
                target: s("target"),
                messages: None,
                prefill: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Option<PathBuf> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
        p.is_dir().then_some(p)
    }

    #[test]
    fn rows_that_share_an_id_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dup.jsonl");
        std::fs::write(
            &p,
            "{\"id\": \"a\", \"prompt\": \"x\"}\n{\"id\": \"a\", \"prompt\": \"y\"}\n",
        )
        .unwrap();
        let e = load_dataset(p.to_str().unwrap(), &LoadSpec::default()).unwrap_err();
        assert!(
            e.to_string().contains("the id `a` is used by two rows"),
            "{e}"
        );
    }

    #[test]
    fn every_named_dataset_loads_with_its_documented_row_count() {
        let Some(dir) = shared() else {
            panic!("../shared/data is missing")
        };
        let spec = LoadSpec {
            data_dir: Some(&dir),
            ..Default::default()
        };
        let expect = [
            ("advbench", 520),
            ("harmbench-val", 80),
            ("jbb-harmful", 100),
            ("jbb-benign", 100),
            ("xstest", 450),
            ("strongreject-small", 60),
            ("alpaca", 31323),
            ("harmful-train", 260),
            ("harmful-val", 39),
            ("harmless-train", 18793),
            ("harmless-val", 6264),
            ("harmless-test", 6266),
        ];
        for (name, n) in expect {
            let d = load_dataset(name, &spec).unwrap();
            assert_eq!(d.items.len(), n, "{name}");
            assert_eq!(d.sha256.len(), 64);
        }
        let hb = load_dataset("harmbench-val", &spec).unwrap();
        let kinds = |k: &str| {
            hb.items
                .iter()
                .filter(|i| i.kind.as_deref() == Some(k))
                .count()
        };
        assert_eq!(
            (kinds("standard"), kinds("contextual"), kinds("copyright")),
            (41, 19, 20)
        );
        let ctx = hb.items.iter().find(|i| i.context.is_some()).unwrap();
        assert!(ctx.prompt.starts_with(ctx.context.as_deref().unwrap()));
        let xs = load_dataset("xstest", &spec).unwrap();
        assert_eq!(xs.items.iter().filter(|i| i.label == "safe").count(), 250);
        let jbb = load_dataset("jbb-benign", &spec).unwrap();
        assert!(jbb.items[0]
            .target
            .as_deref()
            .unwrap()
            .starts_with("Sure, here is"));
    }

    #[test]
    fn sampling_is_deterministic_and_filters_apply() {
        let Some(dir) = shared() else {
            panic!("../shared/data is missing")
        };
        let spec = LoadSpec {
            data_dir: Some(&dir),
            limit: Some(10),
            seed: 3,
            ..Default::default()
        };
        let a = load_dataset("harmless-val", &spec).unwrap();
        let b = load_dataset("harmless-val", &spec).unwrap();
        assert_eq!(a.items, b.items);
        let c = load_dataset(
            "harmless-val",
            &LoadSpec {
                seed: 4,
                ..spec.clone()
            },
        )
        .unwrap();
        assert_ne!(a.items, c.items);
        assert_eq!(a.total, 6264);
        let cat = load_dataset(
            "harmbench-val",
            &LoadSpec {
                data_dir: Some(&dir),
                category: Some("copyright"),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cat.items.len(), 20);
    }

    #[test]
    fn missing_and_unknown_datasets_say_where_they_looked() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_dataset(
            "xstest",
            &LoadSpec {
                data_dir: Some(dir.path()),
                ..Default::default()
            },
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("xstest/xstest_prompts.csv")
                && msg.contains(&dir.path().display().to_string()),
            "{msg}"
        );
        assert!(matches!(
            load_dataset("nope", &LoadSpec::default()),
            Err(Error::UnknownDataset(_))
        ));
    }

    #[test]
    fn user_files_need_a_prompt_and_may_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"hi\", \"id\": 7}\n\n{\"instruction\": \"yo\"}\n",
        )
        .unwrap();
        let d = load_dataset(p.to_str().unwrap(), &LoadSpec::default()).unwrap();
        assert_eq!(d.items.len(), 2);
        assert_eq!(d.items[0].id, "7");
        std::fs::write(&p, "{\"text\": \"hi\"}\n").unwrap();
        assert!(load_dataset(p.to_str().unwrap(), &LoadSpec::default())
            .unwrap_err()
            .to_string()
            .contains("needs a `prompt`"));
        std::fs::write(&p, "").unwrap();
        assert!(matches!(
            load_dataset(p.to_str().unwrap(), &LoadSpec::default()),
            Err(Error::Empty(_))
        ));
        std::fs::write(&p, "{\"q\": \"custom\"}\n").unwrap();
        let spec = LoadSpec {
            prompt_column: Some("q"),
            ..Default::default()
        };
        assert_eq!(
            load_dataset(p.to_str().unwrap(), &spec).unwrap().items[0].prompt,
            "custom"
        );
        let c = dir.path().join("y.csv");
        std::fs::write(&c, "prompt,label\n\"a, b\",safe\n").unwrap();
        assert_eq!(
            load_dataset(c.to_str().unwrap(), &LoadSpec::default())
                .unwrap()
                .items[0]
                .prompt,
            "a, b"
        );
    }
}
