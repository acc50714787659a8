//! `safegeo drift`: how two anchors' carriers differ.
use super::write_json;
use crate::common;
use anyhow::{bail, Result};
use safegeo_geometry::{linalg, store};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct DriftArgs {
    /// Carriers folder of the first anchor.
    pub a: PathBuf,
    /// Carriers folder of the second anchor.
    pub b: PathBuf,
    /// Dimension of the compared subspaces (top right singular vectors over positions).
    #[arg(long, default_value_t = 3)]
    pub k: usize,
    /// Position index for the per-layer carrier cosine [default: the last, t_post].
    #[arg(long)]
    pub pos: Option<usize>,
    /// Write the result here as JSON as well.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn selected(dir: &Path) -> Option<(usize, usize)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("selection.json")).ok()?).ok()?;
    let s = &v["result"]["selected"];
    Some((s["layer"].as_u64()? as usize, s["pos"].as_u64()? as usize))
}

pub fn run(a: DriftArgs) -> Result<()> {
    let ca = store::load(&a.a.join("carriers.safetensors"))?;
    let cb = store::load(&a.b.join("carriers.safetensors"))?;
    if ca.n_layer() != cb.n_layer()
        || ca.n_pos() != cb.n_pos()
        || ca.refusal[0][0].len() != cb.refusal[0][0].len()
    {
        bail!("the two anchors' carriers do not fit this model's shape: they differ in layers, positions or width\n  fix: compare checkpoints of one model, with carriers from the same prompt sets");
    }
    let pos = a.pos.unwrap_or(ca.n_pos() - 1);
    if pos >= ca.n_pos() {
        bail!("--pos {pos} is out of range (0..{})", ca.n_pos());
    }
    let d = safegeo_geometry::measures::drift(&ca, &cb, pos, a.k.max(1));
    let (sa, sb) = (selected(&a.a), selected(&a.b));
    let selected_cos = match (sa, sb) {
        (Some((la, pa)), Some((lb, pb))) => Some(serde_json::json!({
            "a": {"layer": la, "pos": pa}, "b": {"layer": lb, "pos": pb},
            "layer_shift": lb as i64 - la as i64,
            "cosine_at_a_layer": linalg::cosine(&ca.refusal[la][pa], &cb.refusal[la][pa]),
            "cosine_of_selected": linalg::cosine(&ca.refusal[la][pa], &cb.refusal[lb][pb]),
        })),
        _ => None,
    };
    let out = serde_json::json!({
        "a": a.a, "b": a.b, "k": a.k, "pos": pos,
        "principal_angles_deg": d.principal_angles_deg, "carrier_cosine_per_layer": d.cosine_per_layer,
        "selected": selected_cos,
        "note": if selected_cos.is_none() { "run `safegeo select` on both anchors to compare selected carriers" } else { "" },
    });
    if let Some(p) = &a.out {
        write_json(p, &out)?;
    }
    if a.json {
        return common::print_json(&out);
    }
    println!(
        "{:>5}  {:>10}  principal angles (deg, top-{})",
        "layer", "cos(r_a,r_b)", a.k
    );
    for (l, (c, ang)) in d
        .cosine_per_layer
        .iter()
        .zip(&d.principal_angles_deg)
        .enumerate()
    {
        let a: Vec<String> = ang.iter().map(|x| format!("{x:.1}")).collect();
        println!("{l:>5}  {c:>10.3}  {}", a.join(" "));
    }
    if let Some(s) = &out["selected"].as_object() {
        println!("selected carriers: {}", serde_json::to_string(s)?);
    }
    Ok(())
}
