//! Attack test cases: one JSON object per line, written by `safegeo attack` and replayed
//! unchanged by `safegeo eval --test-cases` on any model (fixed-source evaluation).
use crate::{Dataset, Error, Item, Result};
use safegeo_runtime::Message;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::Path;

/// Where an insertion attack put its span in the model's own reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Insertion {
    /// The model's own reply before the attack.
    pub own_reply: String,
    /// Token index in the own reply where the span was inserted.
    pub position: usize,
    /// The inserted span.
    pub span: String,
    /// Token ids of the span (valid for the attacked model's tokenizer).
    pub span_ids: Vec<u32>,
    /// Every candidate tried (worst insertion) with its score; the kept one is the lowest.
    #[serde(default)]
    pub candidates: Vec<InsertionCandidate>,
}

/// One (position, span) candidate of worst insertion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InsertionCandidate {
    /// Insertion position in own-reply tokens.
    pub position: usize,
    /// Start of the span in the target continuation's tokens.
    pub span_start: usize,
    /// Span length in tokens.
    pub span_len: usize,
    /// Lower is a stronger attack (refusal-token probability, or minus target log-likelihood).
    pub score: f64,
}

/// One adversarial prompt for one behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestCase {
    /// Attack that produced it (`direct`, `prefill`, `insertion`, `worst-insertion`, `gcg`,
    /// `autodan`).
    pub attack: String,
    /// Dataset the behaviour came from.
    pub dataset: String,
    /// Behaviour id within the dataset.
    pub behavior_id: String,
    /// The behaviour as the judges should read it.
    pub behavior: String,
    /// The plain request the attack started from (with any context).
    #[serde(default)]
    pub request: String,
    /// HarmBench context, when any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Category of the behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The full adversarial conversation sent to the model.
    pub messages: Vec<Message>,
    /// Text forced at the start of the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<String>,
    /// Insertion details (insertion attacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insertion: Option<Insertion>,
    /// The affirmative target the attack optimized for.
    pub target: String,
    /// The attack's loss per step (GCG, AutoDAN), best so far.
    #[serde(default)]
    pub loss_trace: Vec<f64>,
    /// Whether the attack reached its own success criterion (e.g. GCG early stop).
    #[serde(default)]
    pub succeeded: bool,
    /// The attack's configuration.
    pub config: serde_json::Value,
    /// Model the case was generated against (path).
    #[serde(default)]
    pub source_model: String,
}

impl TestCase {
    /// The case as an evaluation item (label `harmful`).
    pub fn to_item(&self) -> Item {
        Item {
            id: format!("{}:{}", self.attack, self.behavior_id),
            prompt: self
                .messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            behavior: Some(self.behavior.clone()),
            context: self.context.clone(),
            category: self.category.clone(),
            kind: Some(self.attack.clone()),
            label: "harmful".into(),
            target: Some(self.target.clone()),
            messages: Some(self.messages.clone()),
            prefill: self.prefill.clone(),
        }
    }
}

/// Read test cases; a malformed line is an error naming the line (these files are inputs).
pub fn read_test_cases(path: &Path) -> Result<Vec<TestCase>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let case: TestCase = serde_json::from_str(&line).map_err(|e| {
            Error::Invalid(format!(
                "{} line {}: not a test case ({e}); test cases are written by `safegeo attack`",
                path.display(),
                i + 1
            ))
        })?;
        if case.messages.is_empty() {
            return Err(Error::Invalid(format!(
                "{} line {}: test case has no messages",
                path.display(),
                i + 1
            )));
        }
        out.push(case);
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "{} holds no test cases",
            path.display()
        )));
    }
    Ok(out)
}

/// Test cases as a dataset named `test-cases` for `run_eval`.
pub fn test_case_dataset(path: &Path) -> Result<Dataset> {
    let cases = read_test_cases(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(Dataset {
        name: "test-cases".into(),
        path: path.to_path_buf(),
        sha256: crate::datasets::sha256(&bytes),
        total: cases.len(),
        items: unique_ids(cases.iter().map(TestCase::to_item).collect()),
    })
}

/// Several test cases may share a behaviour and attack; records are resumed by id, so the
/// second and later ones get `#2`, `#3`, ... (in file order, so a resumed run agrees).
fn unique_ids(mut items: Vec<Item>) -> Vec<Item> {
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for it in &mut items {
        let n = seen.entry(it.id.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            it.id = format!("{}#{n}", it.id);
        }
    }
    items
}

/// Append one test case as a JSON line and flush it to disk (attacks resume from this file).
pub fn append_test_case(path: &Path, case: &TestCase) -> Result<()> {
    let mut f = crate::jsonl::Appender::open(path)?;
    f.push(case)?;
    f.sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_test_cases_of_one_behaviour_keep_distinct_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        for _ in 0..3 {
            append_test_case(&p, &case()).unwrap();
        }
        let d = test_case_dataset(&p).unwrap();
        let ids: Vec<&str> = d.items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["prefill:b1", "prefill:b1#2", "prefill:b1#3"]);
    }

    fn case() -> TestCase {
        TestCase {
            attack: "prefill".into(),
            dataset: "harmbench-val".into(),
            behavior_id: "b1".into(),
            behavior: "Do a bad thing".into(),
            request: "Do a bad thing".into(),
            context: None,
            category: None,
            messages: vec![Message::new("user", "Do a bad thing x x")],
            prefill: Some("Sure, here is".into()),
            insertion: None,
            target: "Sure, here is how".into(),
            loss_trace: vec![2.0, 1.5],
            succeeded: false,
            config: serde_json::json!({"k": 10}),
            source_model: "m.gguf".into(),
        }
    }

    #[test]
    fn round_trip_and_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("test_cases.jsonl");
        append_test_case(&p, &case()).unwrap();
        append_test_case(&p, &case()).unwrap();
        let back = read_test_cases(&p).unwrap();
        assert_eq!(back, vec![case(), case()]);
        let d = test_case_dataset(&p).unwrap();
        assert_eq!(d.items.len(), 2);
        assert_eq!(d.items[0].prompt, "Do a bad thing x x");
        assert_eq!(d.items[0].behavior.as_deref(), Some("Do a bad thing"));
        assert_eq!(d.items[0].prefill.as_deref(), Some("Sure, here is"));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(&p, "{\"attack\": 3}\n").unwrap();
        let e = read_test_cases(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("safegeo attack"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_test_cases(&p)
            .unwrap_err()
            .to_string()
            .contains("no test cases"));
        assert!(read_test_cases(&dir.path().join("missing.jsonl")).is_err());
    }
}
