//! Direct request and prefill (docs/protocol.md §5): the reply is forced to start with the first
//! `k` tokens of the affirmative target; decoding continues from there.
use crate::{user_messages, Result};
use safegeo_runtime::Tok;
use serde::{Deserialize, Serialize};

/// Prefill settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefillConfig {
    /// Target tokens forced at the start of the reply (0 = direct request).
    pub k: usize,
}

impl Default for PrefillConfig {
    fn default() -> Self {
        Self { k: 10 }
    }
}

/// The forced reply prefix: the first `k` tokens of `target`, as text.
pub fn prefill_text(tok: &Tok, target: &str, k: usize) -> Result<String> {
    let ids = tok.encode(target, false)?;
    Ok(tok.decode(&ids[..k.min(ids.len())], false)?)
}

/// A prefill test case for one behaviour (`k = 0`: the direct request).
pub fn prefill_case(
    tok: &Tok,
    system: Option<&str>,
    prompt: &str,
    target: &str,
    cfg: &PrefillConfig,
) -> Result<(Vec<safegeo_runtime::Message>, Option<String>)> {
    let prefix = (cfg.k > 0)
        .then(|| prefill_text(tok, target, cfg.k))
        .transpose()?;
    Ok((user_messages(system, prompt), prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safegeo_runtime::testing::tiny_tokenizer;

    #[test]
    fn prefix_is_the_first_k_target_tokens() {
        let tok = tiny_tokenizer(48);
        let target = "w5 w6 w7 w8";
        let ids = tok.encode(target, false).unwrap();
        let p = prefill_text(&tok, target, 2).unwrap();
        assert_eq!(tok.encode(&p, false).unwrap(), ids[..2].to_vec());
        // k beyond the target keeps all of it.
        assert_eq!(
            prefill_text(&tok, target, 99).unwrap(),
            tok.decode(&ids, false).unwrap()
        );
        let (m, none) = prefill_case(&tok, None, "hi", target, &PrefillConfig { k: 0 }).unwrap();
        assert!(none.is_none());
        assert_eq!(m.len(), 1);
    }
}
