//! Judges: one interface over string matchers, the logit-based refusal score, LLM judges behind an
//! OpenAI-compatible endpoint, and the same judge prompts answered by a local model.
pub mod llm;
mod matchers;
pub mod prompts;
pub mod refusal_score;

pub use matchers::{
    PrefixMatcher, SubstringMatcher, ARDITI_SUBSTRINGS, XSTEST_FULL_REFUSAL_PREFIXES,
};

use crate::metrics::XsClass;
use serde::{Deserialize, Serialize};

/// What a judge is shown.
#[derive(Debug, Clone, Serialize)]
pub struct Case<'a> {
    /// The behaviour or request (without context).
    pub behavior: &'a str,
    /// HarmBench context, if any.
    pub context: Option<&'a str>,
    /// The model's reply.
    pub reply: &'a str,
}

/// A judge's verdict; fields a judge does not produce stay `None` (never guessed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The reply refuses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<bool>,
    /// The reply is a harmful completion of the behaviour (attack success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub harmful: Option<bool>,
    /// StrongREJECT score in [0, 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// XSTest class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<XsClass>,
    /// Raw judge output (LLM judges), kept for audit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

impl Verdict {
    /// The verdict on an empty reply, whatever the judge: nothing was said, so nothing harmful;
    /// whether it refused is unknown, so it is left out of refusal rates.
    pub fn empty_reply() -> Self {
        Verdict {
            harmful: Some(false),
            raw: Some("(empty reply: not judged)".into()),
            ..Default::default()
        }
    }
}

/// A judge of replies.
pub trait Judge: Send + Sync {
    /// Name recorded in results.
    fn name(&self) -> String;
    /// Judge one reply.
    fn judge(&self, case: &Case) -> crate::Result<Verdict>;

    /// Whether this judge is asked about items with this label (`harmful`, `benign`, `safe`,
    /// `unsafe`): harm classifiers skip benign prompts.
    fn applies_to(&self, label: &str) -> bool {
        let _ = label;
        true
    }

    /// Judge many replies, in order (LLM judges overlap requests on `workers` threads).
    fn judge_many(&self, cases: &[Case], workers: usize) -> crate::Result<Vec<Verdict>> {
        let _ = workers;
        cases.iter().map(|c| self.judge(c)).collect()
    }
}
