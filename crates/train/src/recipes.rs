//! Recipes whose data is a fixed list of examples: `sft` (refusals + utility anchor),
//! `harmful-prefix` (Qi et al.: refusals after harmful prefixes) and `derta` (harmful-prefix MLE
//! plus Reinforced Transition Optimization). Batches are drawn from an epoch-wise shuffle
//! seeded by `(seed, epoch)`, so the batch of any step is known without replaying the run.
use crate::data::Example;
use crate::decision;
use crate::trainer::{target_rows, MicroLoss, Recipe, TargetRows};
use crate::{Error, Result};
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use safegeo_runtime::Model;
use std::collections::BTreeMap;

/// Cross-entropy on the targets of a fixed example list.
pub struct ExampleRecipe {
    name: &'static str,
    examples: Vec<Example>,
    /// Draws of the main batch: indices into `examples`.
    main: Stream,
    grad_accum: usize,
    decision_weight: f64,
    /// How the decision loss reads the decision (boundary 1/2, the rest of the mass, one token
    /// by default).
    decision_rule: decision::DecisionRule,
    refusal_ids: Vec<u32>,
    /// Prompts trained on the decision only: harmful (refuse) and harmless, each drawn in its
    /// own seeded epoch order.
    decision_pos: Vec<Example>,
    decision_neg: Vec<Example>,
    pos_stream: Stream,
    neg_stream: Stream,
}

/// `per_batch` draws per micro-batch from a list of `len` items in seeded epoch-wise shuffles.
struct Stream {
    len: usize,
    per_batch: usize,
    seed: u64,
    order: Option<(usize, Vec<usize>)>,
}

impl Stream {
    fn new(len: usize, per_batch: usize, seed: u64) -> Self {
        Self {
            len,
            per_batch,
            seed,
            order: None,
        }
    }

    /// The indices drawn for micro-batch number `slot` of the whole run.
    fn draw(&mut self, slot: usize) -> Vec<usize> {
        draw(
            &mut self.order,
            self.len,
            slot * self.per_batch,
            self.per_batch,
            self.seed,
        )
    }
}

impl ExampleRecipe {
    /// A recipe named `name` over `examples`.
    pub fn new(
        name: &'static str,
        examples: Vec<Example>,
        batch_size: usize,
        grad_accum: usize,
        seed: u64,
    ) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::Invalid(format!(
                "recipe {name}: no training examples"
            )));
        }
        if let Some(e) = examples.iter().find(|e| e.n_targets() == 0) {
            return Err(Error::Invalid(format!(
                "recipe {name}: an example ({} tokens) has no target tokens",
                e.ids.len()
            )));
        }
        Ok(Self {
            name,
            main: Stream::new(examples.len(), batch_size, seed),
            examples,
            grad_accum,
            decision_weight: 0.0,
            decision_rule: decision::DecisionRule::default(),
            refusal_ids: Vec::new(),
            decision_pos: Vec::new(),
            decision_neg: Vec::new(),
            pos_stream: Stream::new(0, 0, seed ^ 0xDEC1_5106),
            neg_stream: Stream::new(0, 0, seed ^ 0xDEC1_5105),
        })
    }

    /// Adds `weight * L_decision` ([`decision`]) over the refusal opening tokens `refusal_ids`.
    pub fn with_decision(mut self, weight: f64, refusal_ids: Vec<u32>) -> Result<Self> {
        if !(weight >= 0.0 && weight.is_finite()) || (weight > 0.0 && refusal_ids.is_empty()) {
            return Err(Error::Invalid(format!(
                "decision loss weight {weight}: use a finite weight >= 0 (and refusal tokens)"
            )));
        }
        self.decision_weight = weight;
        self.refusal_ids = refusal_ids;
        Ok(self)
    }

    /// `L_decision` over `picks` of `rows`: each example's first target row and whether it
    /// should refuse. The loss and its weighted tensor; `None` without examples.
    fn decision_term(
        &self,
        rows: &TargetRows,
        picks: &[(usize, bool)],
    ) -> Result<Option<(f64, Tensor)>> {
        if picks.is_empty() {
            return Ok(None);
        }
        let refuse: Vec<bool> = picks.iter().map(|p| p.1).collect();
        let first: Vec<u32> = picks.iter().map(|p| p.0 as u32).collect();
        let d = decision::decision_loss_at(
            &rows.log_probs_at(&first)?,
            &refuse,
            &self.refusal_ids,
            self.decision_rule.boundary,
        )?;
        d.map(|d| Ok((d.to_scalar::<f32>()? as f64, (d * self.decision_weight)?)))
            .transpose()
    }

    /// Reads the decision by `rule` ([`decision::DecisionRule`]): a boundary below 1/2 puts
    /// borderline prompts under greedy decoding's refusal threshold.
    pub fn with_decision_rule(mut self, rule: decision::DecisionRule) -> Result<Self> {
        rule.check()
            .map_err(|e| Error::Invalid(format!("decision {e}")))?;
        self.decision_rule = rule;
        Ok(self)
    }

    /// Adds prompts trained on the decision only, in a forward of their own (short rows, not
    /// padded to the replies of the main batch): `batch` per micro-batch, a share `harmful_share`
    /// of them (rounded, at least one) drawn from `harmful` (refuse) when it is not empty and the
    /// rest from `harmless`, each list in its own seeded epoch order, adding
    /// `weight * L_decision` over them. Only the reply position of each example (its first
    /// target) is read. A smaller harmful share moves the decision threshold toward refusing less.
    pub fn with_decision_only(
        mut self,
        harmful: Vec<Example>,
        harmless: Vec<Example>,
        batch: usize,
        harmful_share: f64,
    ) -> Result<Self> {
        if !(harmful_share > 0.0 && harmful_share < 1.0) {
            return Err(Error::Invalid(format!(
                "decision harmful share {harmful_share}: use a value strictly between 0 and 1"
            )));
        }
        let any = !harmful.is_empty() || !harmless.is_empty();
        if any && (self.decision_weight <= 0.0 || batch == 0) {
            return Err(Error::Invalid(
                "decision-only examples need a decision loss weight > 0 and a batch > 0".into(),
            ));
        }
        if !harmful.is_empty() && (harmless.is_empty() || batch < 2) {
            return Err(Error::Invalid(
                "decision-only harmful prompts need harmless ones beside them and a batch >= 2"
                    .into(),
            ));
        }
        if let Some(e) = harmful.iter().chain(&harmless).find(|e| e.n_targets() == 0) {
            return Err(Error::Invalid(format!(
                "a decision-only example ({} tokens) has no reply position",
                e.ids.len()
            )));
        }
        let n_pos = if harmful.is_empty() {
            0
        } else {
            ((batch as f64 * harmful_share).round() as usize).clamp(1, batch - 1)
        };
        self.pos_stream = Stream::new(harmful.len(), n_pos, self.pos_stream.seed);
        self.neg_stream = Stream::new(harmless.len(), batch - n_pos, self.neg_stream.seed);
        self.decision_pos = harmful;
        self.decision_neg = harmless;
        Ok(self)
    }

    /// Example indices of micro-batch `micro` of step `step`.
    pub fn batch_indices(&mut self, step: usize, micro: usize) -> Vec<usize> {
        self.main.draw(step * self.grad_accum + micro)
    }

    /// Decision-only draws of micro-batch `micro` of step `step`: indices into the harmful and
    /// the harmless decision lists.
    pub fn decision_indices(&mut self, step: usize, micro: usize) -> (Vec<usize>, Vec<usize>) {
        let slot = step * self.grad_accum + micro;
        (self.pos_stream.draw(slot), self.neg_stream.draw(slot))
    }

    /// The examples.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }
}

/// Entries `first..first + k` of the concatenated epoch-wise shuffles of `0..n`, seeded by
/// `(seed, epoch)`; `order` caches the current epoch's shuffle.
fn draw(
    order: &mut Option<(usize, Vec<usize>)>,
    n: usize,
    first: usize,
    k: usize,
    seed: u64,
) -> Vec<usize> {
    (first..first + k)
        .map(|g| {
            let epoch = g / n;
            if order.as_ref().map(|o| o.0) != Some(epoch) {
                let mut o: Vec<usize> = (0..n).collect();
                let mut rng = rand::rngs::StdRng::seed_from_u64(
                    seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                o.shuffle(&mut rng);
                *order = Some((epoch, o));
            }
            order.as_ref().expect("set above").1[g % n]
        })
        .collect()
}

impl Recipe for ExampleRecipe {
    fn name(&self) -> &'static str {
        self.name
    }

    fn micro_loss(&mut self, model: &Model, step: usize, micro: usize) -> Result<MicroLoss> {
        let idx = self.batch_indices(step, micro);
        let batch: Vec<&Example> = idx.iter().map(|&i| &self.examples[i]).collect();
        let rows = target_rows(model, &batch)?;
        let lp = rows.label_log_probs()?;
        let mut loss = (lp.sum_all()? * (-1.0 / lp.dim(0)? as f64))?;
        let harmful = batch.iter().filter(|e| e.kind != "harmless").count();
        let mut parts = BTreeMap::new();
        parts.insert("harmful_share".into(), harmful as f64 / batch.len() as f64);
        if self.decision_weight > 0.0 {
            parts.insert("ce".into(), loss.to_scalar::<f32>()? as f64);
            let picks: Vec<(usize, bool)> = batch
                .iter()
                .zip(&rows.first)
                .filter_map(|(e, &row)| decision::side(e, &self.refusal_ids).map(|h| (row, h)))
                .collect();
            if let Some((d, weighted)) = self.decision_term(&rows, &picks)? {
                parts.insert("decision".into(), d);
                loss = (loss + weighted)?;
            }
        }
        let mut tokens = rows.tokens;
        if !self.decision_neg.is_empty() {
            let (pos, neg) = self.decision_indices(step, micro);
            let batch: Vec<&Example> = pos
                .iter()
                .map(|&i| &self.decision_pos[i])
                .chain(neg.iter().map(|&i| &self.decision_neg[i]))
                .collect();
            let rows = target_rows(model, &batch)?;
            let picks: Vec<(usize, bool)> = (rows.first.iter().enumerate())
                .map(|(i, &row)| (row, i < pos.len()))
                .collect();
            if let Some((d, weighted)) = self.decision_term(&rows, &picks)? {
                parts.insert("decision_only".into(), d);
                loss = (loss + weighted)?;
            }
            tokens += rows.tokens;
        }
        Ok(MicroLoss {
            loss,
            tokens,
            parts,
            seconds: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: u32) -> Example {
        Example::reply(vec![1, 2], vec![n], "harmless")
    }

    #[test]
    fn every_epoch_visits_every_example_once_and_steps_are_reproducible() {
        let examples: Vec<Example> = (3..13).map(ex).collect();
        let mut r = ExampleRecipe::new("sft", examples.clone(), 2, 1, 7).unwrap();
        let mut seen: Vec<usize> = (0..5).flat_map(|s| r.batch_indices(s, 0)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        // A fresh recipe (a resumed run) draws the same batch for step 7.
        let mut fresh = ExampleRecipe::new("sft", examples, 2, 1, 7).unwrap();
        assert_eq!(fresh.batch_indices(7, 0), r.batch_indices(7, 0));
        assert!(ExampleRecipe::new("sft", vec![], 2, 1, 0).is_err());
    }
}
