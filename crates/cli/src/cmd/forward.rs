//! `safegeo forward`: one forward pass over a prompt, reporting the last position.
use crate::common::{self, ModelArgs, PromptArgs};
use anyhow::{Context, Result};
use candle_core::{DType, D};
use safegeo_runtime::{Hooks, LogitsAt, Phase, Positions, Site};

#[derive(clap::Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// How many top logits to report.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The report `forward --json` prints.
#[derive(serde::Serialize)]
pub struct ForwardReport {
    pub prompt_ids: Vec<u32>,
    pub top_ids: Vec<u32>,
    pub top_logits: Vec<f32>,
    pub logsumexp: f64,
    /// Norm of resid_pre of every layer at the last prompt token.
    pub resid_pre_norms: Vec<f32>,
    pub top_tokens: Vec<String>,
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let user = a.prompt.chat.clone().context("--chat TEXT is required")?;
    let model = common::load(&a.model)?;
    let ids = common::prompt_ids(&model, &a.prompt, &a.prompt.messages(&user))?;
    if ids.len() > model.cfg.context_length {
        return Err(safegeo_runtime::Error::ContextOverflow {
            tokens: ids.len(),
            new_tokens: 0,
            context: model.cfg.context_length,
        }
        .into());
    }
    let (input, layout) = model.pad_batch(std::slice::from_ref(&ids))?;
    let mut hooks = Hooks::capture(&[Site::ResidPre], Positions::LastK(1));
    let logits = model
        .forward_ids(
            &input,
            &layout,
            None,
            LogitsAt::Last,
            Phase::Prompt,
            &mut hooks,
        )?
        .context("no logits")?
        .flatten_all()?
        .to_dtype(DType::F64)?;
    let row: Vec<f64> = logits.to_vec1()?;
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let logsumexp = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
    order.truncate(a.top);
    let mut norms = Vec::with_capacity(model.cfg.n_layer);
    for l in 0..model.cfg.n_layer {
        let x = hooks
            .captured
            .get(Site::ResidPre, l)
            .context("missing capture")?;
        norms.push(
            x.sqr()?
                .sum(D::Minus1)?
                .sqrt()?
                .flatten_all()?
                .to_vec1::<f32>()?[0],
        );
    }
    let report = ForwardReport {
        prompt_ids: ids,
        top_ids: order.iter().map(|&i| i as u32).collect(),
        top_logits: order.iter().map(|&i| row[i] as f32).collect(),
        logsumexp,
        resid_pre_norms: norms,
        top_tokens: order
            .iter()
            .map(|&i| model.tok.id_to_token(i as u32).unwrap_or_default())
            .collect(),
    };
    if a.json {
        common::print_json(&report)?;
    } else {
        println!("prompt: {} tokens", report.prompt_ids.len());
        println!("logsumexp: {:.5}", report.logsumexp);
        println!("{:>8}  {:>10}  token", "id", "logit");
        for ((id, l), t) in report
            .top_ids
            .iter()
            .zip(&report.top_logits)
            .zip(&report.top_tokens)
        {
            println!("{id:>8}  {l:>10.5}  {t:?}");
        }
        println!("resid_pre norms at the last token:");
        for (l, n) in report.resid_pre_norms.iter().enumerate() {
            println!("  layer {l:>3}: {n:.4}");
        }
    }
    Ok(())
}
