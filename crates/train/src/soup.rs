//! A uniform model soup (Wortsman et al., 2022): the anchor of runs that differ only in their
//! seed, averaged weight by weight,
//!
//! `W_soup = (1 / K) sum_k W_k`,
//!
//! over the K members' checkpoints at the same step. The members start from the same base
//! model, so their weights stay in one basin and the average is a model of its own; its
//! refusal decision averages out the part of each run's readout that depends on its seed
//! (docs/experiments.md).
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The weights file of a checkpoint folder written by `safegeo train`.
const WEIGHTS: &str = "model.safetensors";

/// Write the soup of the checkpoint folders `members` into `out`: the averaged
/// `model.safetensors`, the first member's other files (config, tokenizer), and a
/// `checkpoint.json` that names the members and averages their `loss`. Tensors are read one at
/// a time from memory-mapped files and averaged in f32, then stored in the first member's dtype.
pub fn write_soup(members: &[PathBuf], out: &Path) -> Result<()> {
    let Some(first) = members.first() else {
        return Err(Error::Invalid("a soup needs at least one member".into()));
    };
    let files = members
        .iter()
        .map(|m| {
            let path = m.join(WEIGHTS);
            // Safety: the files are checkpoints this process or an earlier run wrote and nothing
            // rewrites them while they are read.
            unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }
                .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut names: Vec<String> = files[0].tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();
    for (m, f) in members.iter().zip(&files).skip(1) {
        let mut other: Vec<String> = f.tensors().into_iter().map(|(n, _)| n).collect();
        other.sort();
        if other != names {
            return Err(Error::Invalid(format!(
                "{} and {} hold different tensors; a soup averages runs of one model and recipe",
                first.display(),
                m.display()
            )));
        }
    }
    let mut soup = HashMap::with_capacity(names.len());
    for name in &names {
        let t0 = files[0].load(name, &Device::Cpu)?;
        let dtype = t0.dtype();
        let mut sum = t0.to_dtype(DType::F32)?;
        for (m, f) in members.iter().zip(&files).skip(1) {
            let t = f.load(name, &Device::Cpu)?;
            if t.shape() != sum.shape() {
                return Err(Error::Invalid(format!(
                    "{name}: shape {:?} in {} but {:?} in {}",
                    sum.dims(),
                    first.display(),
                    t.dims(),
                    m.display()
                )));
            }
            sum = (sum + t.to_dtype(DType::F32)?)?;
        }
        soup.insert(name.clone(), (sum / members.len() as f64)?.to_dtype(dtype)?);
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    safegeo_runtime::files::save_tensors_atomic(&soup, &out.join(WEIGHTS))?;
    let entries = std::fs::read_dir(first).map_err(|e| Error::io(first, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(first, e))?.path();
        let name = path.file_name().unwrap_or_default();
        if path.is_file() && name != WEIGHTS && name != "checkpoint.json" {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            safegeo_runtime::files::write_atomic(&out.join(name), &bytes)?;
        }
    }
    let checkpoints = members
        .iter()
        .map(|m| read_json(&m.join("checkpoint.json")))
        .collect::<Result<Vec<_>>>()?;
    let losses: Option<Vec<f64>> = checkpoints.iter().map(|c| c["loss"].as_f64()).collect();
    let mut checkpoint = checkpoints[0].clone();
    if let Some(l) = losses {
        checkpoint["loss"] = (l.iter().sum::<f64>() / l.len() as f64).into();
    }
    checkpoint["soup"] = members
        .iter()
        .map(|m| m.display().to_string())
        .collect::<Vec<_>>()
        .into();
    safegeo_runtime::files::write_atomic(
        &out.join("checkpoint.json"),
        serde_json::to_string_pretty(&checkpoint)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(())
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    fn member(dir: &Path, name: &str, w: &[f32], loss: f64) -> PathBuf {
        let m = dir.join(name);
        std::fs::create_dir_all(&m).unwrap();
        let mut t = HashMap::new();
        t.insert(
            "w".to_string(),
            Tensor::from_slice(w, (2, 2), &Device::Cpu).unwrap(),
        );
        t.insert(
            "b".to_string(),
            Tensor::from_slice(&w[..2], 2, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&t, m.join(WEIGHTS)).unwrap();
        std::fs::write(m.join("config.json"), format!("{{\"from\": \"{name}\"}}")).unwrap();
        std::fs::write(
            m.join("checkpoint.json"),
            format!("{{\"step\": 10, \"loss\": {loss}, \"recipe\": \"sft\"}}"),
        )
        .unwrap();
        m
    }

    #[test]
    fn the_soup_is_the_mean_of_the_members_weights() {
        let dir = tempfile::tempdir().unwrap();
        let a = member(dir.path(), "a", &[1.0, 2.0, 3.0, 4.0], 0.5);
        let b = member(dir.path(), "b", &[3.0, -2.0, 0.0, 8.0], 1.0);
        let c = member(dir.path(), "c", &[2.0, 0.0, 6.0, 0.0], 1.5);
        let out = dir.path().join("soup");
        write_soup(&[a.clone(), b, c], &out).unwrap();
        let t = candle_core::safetensors::load(out.join(WEIGHTS), &Device::Cpu).unwrap();
        let w = t["w"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(w, vec![2.0, 0.0, 3.0, 4.0]);
        assert_eq!(t["b"].to_vec1::<f32>().unwrap(), vec![2.0, 0.0]);
        // The first member's other files come along; checkpoint.json averages the loss and
        // names the members.
        assert_eq!(
            std::fs::read_to_string(out.join("config.json")).unwrap(),
            "{\"from\": \"a\"}"
        );
        let ck = read_json(&out.join("checkpoint.json")).unwrap();
        assert!((ck["loss"].as_f64().unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(ck["step"], 10);
        assert_eq!(ck["soup"][0], a.display().to_string());
        assert_eq!(ck["soup"].as_array().unwrap().len(), 3);
        // A soup of one is the member itself.
        let one = dir.path().join("one");
        write_soup(std::slice::from_ref(&a), &one).unwrap();
        assert_eq!(
            std::fs::read(one.join(WEIGHTS)).unwrap(),
            std::fs::read(a.join(WEIGHTS)).unwrap()
        );
    }

    #[test]
    fn members_of_different_models_are_errors_that_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let a = member(dir.path(), "a", &[1.0, 2.0, 3.0, 4.0], 0.5);
        let b = dir.path().join("b");
        std::fs::create_dir_all(&b).unwrap();
        let mut t = HashMap::new();
        t.insert(
            "w".to_string(),
            Tensor::zeros((4, 1), DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "b".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&t, b.join(WEIGHTS)).unwrap();
        let e = write_soup(&[a.clone(), b.clone()], &dir.path().join("s")).unwrap_err();
        assert!(e.to_string().contains("w: shape [2, 2]"), "{e}");
        t.remove("b");
        candle_core::safetensors::save(&t, b.join(WEIGHTS)).unwrap();
        let e = write_soup(&[a, b], &dir.path().join("s")).unwrap_err();
        assert!(e.to_string().contains("different tensors"), "{e}");
        assert!(write_soup(&[], &dir.path().join("s")).is_err());
        let missing = dir.path().join("missing");
        let e = write_soup(&[missing], &dir.path().join("s")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
