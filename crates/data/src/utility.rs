//! Benign utility as cross-entropy on reference completions (docs/protocol.md §4): the mean negative
//! log-likelihood per token of a reference reply given its chat prompt. References are typically
//! the base model's own greedy replies to harmless prompts (`safegeo generate --input ... --output`).
use crate::{Error, Result};
use candle_core::DType;
use safegeo_runtime::{Message, Model, NoHooks, Observer, Phase};
use std::path::Path;

/// A harmless prompt with a reference reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// User prompt.
    pub prompt: String,
    /// Reference reply.
    pub completion: String,
}

/// Read references from JSONL: `prompt` or `chat`, and `completion` or `response`.
pub fn read_references(path: &Path) -> Result<Vec<Reference>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Parse {
            path: path.into(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        let s = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(String::from))
        };
        match (s(&["prompt", "chat"]), s(&["completion", "response"])) {
            (Some(prompt), Some(completion)) if !completion.is_empty() => out.push(Reference { prompt, completion }),
            _ => {
                return Err(Error::Parse {
                    path: path.into(),
                    reason: format!("line {}: needs `prompt` (or `chat`) and a non-empty `completion` (or `response`)", i + 1),
                })
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Empty(path.display().to_string()));
    }
    Ok(out)
}

/// Mean cross-entropy (nats per token) of each reference's completion tokens. Logits are
/// computed only at the positions that predict a completion token (not over the prompt and the
/// whole vocabulary at every position), and chunks are formed by length to save padding.
pub fn completion_cross_entropy(
    model: &Model,
    refs: &[Reference],
    batch: usize,
    obs: &mut dyn Observer,
) -> Result<Vec<f64>> {
    let raw = model.tok.chat_template.is_none(); // base models get the raw prompt
    let mut seqs = Vec::with_capacity(refs.len());
    let mut spans = Vec::with_capacity(refs.len());
    for r in refs {
        let prompt = model
            .tok
            .encode_chat(&[Message::new("user", r.prompt.clone())], raw)?;
        let completion = model.tok.encode(&r.completion, false)?;
        spans.push((prompt.len(), completion.len()));
        seqs.push([prompt, completion].concat());
    }
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut out = vec![0.0; refs.len()];
    for chunk in order.chunks(batch.max(1)) {
        let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| seqs[i].clone()).collect();
        let (ids, layout) = model.pad_batch(&rows)?;
        let t = ids.dim(1)?;
        // Row `r`'s completion token k sits at pad + p_len + k and is predicted one before.
        let mut at = Vec::new();
        let mut targets = Vec::new();
        for (r, (&i, pad)) in chunk.iter().zip(&layout.pad).enumerate() {
            let (p_len, c_len) = spans[i];
            for k in 0..c_len {
                let pos = pad + p_len + k;
                at.push((r * t + pos - 1) as u32);
                targets.push(rows[r][pos - pad]);
            }
        }
        if at.is_empty() {
            chunk.iter().for_each(|&i| out[i] = f64::NAN);
            continue;
        }
        let logits = model
            .forward_ids(
                &ids,
                &layout,
                None,
                safegeo_runtime::LogitsAt::Rows(at),
                Phase::Prompt,
                obs,
            )?
            .expect("logits requested")
            .squeeze(0)?
            .to_dtype(DType::F64)?;
        let logp = safegeo_runtime::log_softmax_last(&logits)?; // (n_targets, V)
        let idx = candle_core::Tensor::new(targets.as_slice(), logp.device())?.unsqueeze(1)?;
        let nll: Vec<f64> = logp.gather(&idx, 1)?.squeeze(1)?.neg()?.to_vec1()?;
        let mut k = 0;
        for &i in chunk {
            let c_len = spans[i].1;
            // An empty completion has no cross-entropy: NaN, as 0 / 0.
            out[i] = nll[k..k + c_len].iter().sum::<f64>() / c_len as f64;
            k += c_len;
        }
    }
    Ok(out)
}

/// [`completion_cross_entropy`] without interventions.
pub fn cross_entropy_plain(model: &Model, refs: &[Reference], batch: usize) -> Result<Vec<f64>> {
    completion_cross_entropy(model, refs, batch, &mut NoHooks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safegeo_runtime::testing::tiny_model;
    use safegeo_runtime::Arch;

    #[test]
    fn cross_entropy_matches_a_hand_computation_and_is_batch_independent() {
        let m = tiny_model(Arch::Llama, 5, DType::F32).unwrap();
        let refs = vec![
            Reference {
                prompt: "w1 w2".into(),
                completion: "w3 w4 w5".into(),
            },
            Reference {
                prompt: "w9".into(),
                completion: "w7".into(),
            },
        ];
        let batched = cross_entropy_plain(&m, &refs, 2).unwrap();
        // By hand for the first: sum over completion tokens of -log softmax at the previous position.
        let p: Vec<u32> = m
            .tok
            .encode_chat(&[Message::new("user", "w1 w2")], true)
            .unwrap();
        let c: Vec<u32> = m.tok.encode("w3 w4 w5", false).unwrap();
        let seq = [p.clone(), c.clone()].concat();
        let (ids, layout) = m.pad_batch(std::slice::from_ref(&seq)).unwrap();
        let logits = m
            .forward_ids(
                &ids,
                &layout,
                None,
                safegeo_runtime::LogitsAt::All,
                Phase::Prompt,
                &mut NoHooks,
            )
            .unwrap()
            .unwrap();
        let rows: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let mut nll = 0.0f64;
        for k in 0..c.len() {
            let row = &rows[p.len() + k - 1];
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            nll += lse - row[c[k] as usize] as f64;
        }
        assert!(
            (batched[0] - nll / c.len() as f64).abs() < 1e-4,
            "{} vs {}",
            batched[0],
            nll / 3.0
        );
        let single = cross_entropy_plain(&m, &refs[1..], 1).unwrap();
        assert!((batched[1] - single[0]).abs() < 1e-4);
        // Chunks are formed by length, results come back in the references' order.
        let mut three = refs.clone();
        three.insert(
            0,
            Reference {
                prompt: "w4 w4 w4 w4 w4 w4".into(),
                completion: "w2".into(),
            },
        );
        let got = cross_entropy_plain(&m, &three, 2).unwrap();
        let alone: Vec<f64> = three
            .iter()
            .map(|r| cross_entropy_plain(&m, std::slice::from_ref(r), 1).unwrap()[0])
            .collect();
        for (g, a) in got.iter().zip(&alone) {
            assert!((g - a).abs() < 1e-4, "{got:?} vs {alone:?}");
        }
        assert!((got[1] - batched[0]).abs() < 1e-4);
    }
}
