//! Weight orthogonalization (docs/protocol.md §2; Arditi et al. 2024): `W <- W - r^ r^T W` for the
//! embedding and every matrix that writes into the residual stream (attention output, MLP down),
//! so that no component along `r^` is ever written. Equivalent to directional ablation at every
//! block input, attention output and MLP output, as an edited model that needs no hooks.
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use safegeo_runtime::{Arch, Model};

/// Project `r^` out of what `w` writes: rows of the embedding (`E - (E r) r^T`), or the output
/// side of a `(d_out, d_in)` matrix (`W - r (r^T W)`).
fn remove_direction(w: &Tensor, r: &Tensor, output_rows: bool) -> Result<Tensor> {
    let w64 = w.to_dtype(DType::F64)?;
    let r = r.to_dtype(DType::F64)?;
    let out = if output_rows {
        // Embedding (V, d): each row is a written vector.
        let proj = w64.matmul(&r.unsqueeze(1)?)?; // (V, 1)
        (&w64 - proj.matmul(&r.unsqueeze(0)?)?)?
    } else {
        // (d, in): columns are written vectors.
        let proj = r.unsqueeze(0)?.matmul(&w64)?; // (1, in)
        (&w64 - r.unsqueeze(1)?.matmul(&proj)?)?
    };
    Ok(out.to_dtype(w.dtype())?)
}

/// Orthogonalize `model`'s weights against `direction` (normalized here). The LM head is untied
/// from the embedding first, so only what is written into the residual stream changes.
pub fn orthogonalize_weights(model: &mut Model, direction: &[f64]) -> Result<()> {
    if model.cfg.arch == Arch::Gemma3 {
        return Err(Error::Invalid(
            "weight orthogonalization is exact only for families without post-block norms (Llama, Qwen2); Gemma 3 normalizes block outputs after the projection\n  fix: use runtime ablation (`--ablate`) for Gemma 3".into(),
        ));
    }
    let unit = crate::linalg::normalize(direction);
    if unit.len() != model.cfg.hidden || unit.iter().all(|&x| x == 0.0) {
        return Err(Error::Invalid(format!(
            "direction of length {} for width {}",
            unit.len(),
            model.cfg.hidden
        )));
    }
    let r = Tensor::from_vec(unit, model.cfg.hidden, &model.device)?;
    // Untie: the head keeps reading the original embedding.
    model.lm_head.w = model.lm_head.w.copy()?;
    model.lm_head.quantized = None;
    model.embed = remove_direction(&model.embed, &r, true)?;
    for b in model.blocks.iter_mut() {
        for (name, l) in b.linears_mut() {
            if name == "o" || name == "down" {
                l.w = remove_direction(&l.w, &r, false)?;
                l.quantized = None;
                if let Some(bias) = &l.bias {
                    let proj = (bias.to_dtype(DType::F64)? * r.to_dtype(DType::F64)?)?.sum_all()?;
                    l.bias = Some(
                        (bias.to_dtype(DType::F64)?
                            - r.to_dtype(DType::F64)?.broadcast_mul(&proj)?)?
                        .to_dtype(bias.dtype())?,
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use safegeo_runtime::testing::tiny_model;
    use safegeo_runtime::{Hooks, Intervention, NoHooks};

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let s = b
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        d / s.max(1e-12)
    }

    #[test]
    fn orthogonalized_weights_equal_runtime_ablation_and_survive_export() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let base = tiny_model(arch, 9, DType::F32).unwrap();
            let r: Vec<f64> = (0..16).map(|i| ((i * 5 % 7) as f64) - 3.0).collect();
            let prompts = vec![vec![3u32, 9, 27, 4, 11], vec![5, 6]];
            let rt = Tensor::from_vec(
                r.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                16,
                &Device::Cpu,
            )
            .unwrap();
            let mut hooks = Hooks::with_interventions(vec![Intervention::ablate(&rt).unwrap()]);
            let ablated = base.last_logits(&prompts, &mut hooks).unwrap();
            let mut edited = tiny_model(arch, 9, DType::F32).unwrap();
            orthogonalize_weights(&mut edited, &r).unwrap();
            let direct = edited.last_logits(&prompts, &mut NoHooks).unwrap();
            assert!(
                max_rel(&direct, &ablated) < 1e-4,
                "{arch:?}: {}",
                max_rel(&direct, &ablated)
            );
            assert!(
                max_rel(&base.last_logits(&prompts, &mut NoHooks).unwrap(), &ablated) > 1e-3,
                "ablation had no effect"
            );
            let dir = tempfile::tempdir().unwrap();
            safegeo_runtime::export_hf(&mut edited, dir.path()).unwrap();
            let back = safegeo_runtime::load_model(dir.path(), &Device::Cpu).unwrap();
            let reloaded = back.last_logits(&prompts, &mut NoHooks).unwrap();
            assert!(
                max_rel(&reloaded, &ablated) < 1e-4,
                "{arch:?} exported: {}",
                max_rel(&reloaded, &ablated)
            );
        }
        let mut g = tiny_model(Arch::Gemma3, 1, DType::F32).unwrap();
        assert!(orthogonalize_weights(&mut g, &[1.0; 16])
            .unwrap_err()
            .to_string()
            .contains("Gemma 3"));
    }
}
