//! `safegeo abliterate`: a copy of the model with a carrier orthogonalized out of its weights.
use super::write_json;
use super::{carriers_model, chosen_carrier};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct AbliterateArgs {
    /// A folder written by `safegeo carriers` (and `safegeo select`).
    pub dir: PathBuf,
    /// The carrier as LAYER:POS, or LAYER:POS:orth for an orthogonalized one [default: the one
    /// selected in DIR/selection.json, of the family it was selected from].
    #[arg(long)]
    pub carrier: Option<String>,
    /// Model [default: the one recorded in DIR/carriers.json].
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: crate::common::DeviceArgs,
    /// Output Hugging Face folder (config, safetensors, tokenizer, chat template).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: AbliterateArgs) -> Result<()> {
    let (r, layer, pos, name) = chosen_carrier(&a.dir, a.carrier.as_deref())?;
    let mut model = carriers_model(&a.dir, a.model.as_deref(), &a.device)?;
    safegeo_geometry::abliterate::orthogonalize_weights(&mut model, &r)?;
    safegeo_runtime::export_hf(&mut model, &a.out)?;
    write_json(
        &a.out.join("safegeo_abliteration.json"),
        &serde_json::json!({"source_model": model.source, "carrier": name, "layer": layer, "pos": pos,
            "edit": "W <- W - r r^T W on the embedding, attention output and MLP down projections; LM head untied"}),
    )?;
    println!(
        "abliterated model (carrier layer {layer} position {pos}) -> {}",
        a.out.display()
    );
    Ok(())
}
