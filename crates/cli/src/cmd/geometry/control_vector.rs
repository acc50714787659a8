//! `safegeo control-vector`: a carrier as a llama.cpp control vector (GGUF), so llama.cpp users
//! can steer with it (`--control-vector-scaled FILE SCALE`).
use super::chosen_carrier;
use anyhow::{Context, Result};
use safegeo_runtime::control_vector::{llama_cpp_index, write_control_vector};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ControlVectorArgs {
    /// A folder written by `safegeo carriers` (and `safegeo select`).
    pub dir: PathBuf,
    /// The carrier as LAYER:POS, or LAYER:POS:orth for an orthogonalized one [default: the one
    /// selected in DIR/selection.json]. llama.cpp can add at layers 2 and above only.
    #[arg(long)]
    pub carrier: Option<String>,
    /// Coefficient, in units of the carrier (its norm): the file holds coef x carrier, so
    /// llama.cpp's scale multiplies that (negative values push away from refusal).
    #[arg(long, allow_hyphen_values = true, value_parser = crate::common::finite)]
    pub coef: f64,
    /// Architecture written as the file's model hint [default: the one in DIR/carriers.json].
    #[arg(long)]
    pub model_hint: Option<String>,
    /// Output file (.gguf).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: ControlVectorArgs) -> Result<()> {
    let (r, layer, pos, name) = chosen_carrier(&a.dir, a.carrier.as_deref())?;
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.dir.join("carriers.json"))
            .with_context(|| format!("{}: no carriers.json", a.dir.display()))?,
    )?;
    let n_layer = meta["n_layer"]
        .as_u64()
        .context("carriers.json has no n_layer")? as usize;
    let hint = match (&a.model_hint, meta["architecture"].as_str()) {
        (Some(h), _) => h.clone(),
        (None, Some(h)) => h.to_string(),
        (None, None) => anyhow::bail!(
            "{}: carriers.json does not name the architecture\n  fix: pass --model-hint (llama, qwen2 or gemma3)",
            a.dir.display()
        ),
    };
    let v: Vec<f32> = r.iter().map(|&x| (a.coef * x) as f32).collect();
    write_control_vector(&a.out, &v, layer, n_layer, &hint)?;
    let index = llama_cpp_index(layer).expect("written, so in range");
    println!(
        "control vector: {} x {name} (layer {layer}, position {pos}) as direction.{index} -> {}\n  use: llama-cli -m MODEL --control-vector-scaled {}:1.0 (llama.cpp adds it to the output of block {index}; a control vector adds, it cannot ablate)",
        a.coef,
        a.out.display(),
        a.out.display()
    );
    Ok(())
}
